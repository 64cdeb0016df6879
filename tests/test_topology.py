"""Every topology rule, each failing with one message that prints the values and a fix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe.config import ConfigError, ModelConfig, MoEConfig
from parallel.config import ParallelConfig
from parallel.topology import BatchShape, Topology

MODEL = ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=128)
MOE = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=64)
BATCH = BatchShape(global_batch=16, micro_batch=2)


def _build(world: int, model: ModelConfig = MODEL, moe: MoEConfig = MOE, batch: BatchShape = BATCH, **degrees: object) -> Topology:
    return Topology.build(ParallelConfig(**degrees), model, moe, batch, world_size=world)


@pytest.mark.parametrize(
    "world, degrees, message",
    [
        (4, {"tp": 2}, "parallel.tp=2 x parallel.pp=1 x parallel.dp=1 = 2 ranks, but the job has 4"),
        (4, {"dp": 4, "ep": 3}, "moe.num_experts=8 is not divisible by parallel.ep=3"),
        (2, {"dp": 2, "ep": 4}, "parallel.etp=1 x parallel.ep=4 = 4 must divide parallel.tp=1 x parallel.dp=2 = 2"),
        (4, {"tp": 2, "dp": 2}, None),
        (3, {"tp": 3}, "model.n_heads=4 is not divisible by parallel.tp=3"),
        (2, {"dp": 2, "etp": 2}, None),
        (4, {"pp": 4, "vpp": 2}, "model.n_layers=4 is not divisible by parallel.pp=4 x parallel.vpp=2 = 8"),
        (1, {"vpp": 2}, "parallel.vpp=2 needs parallel.pp > 1"),
        (4, {"dp": 4}, None),
        (2, {"dp": 2, "engine": "deepspeed", "etp": 2}, "parallel.engine='deepspeed' trains ep x dp layouts only"),
    ],
)
def test_layout_rules(world: int, degrees: dict, message: str | None) -> None:
    if message is None:
        _build(world, **degrees)
        return
    with pytest.raises(ConfigError) as err:
        _build(world, **degrees)
    assert message in str(err.value)


def test_expert_ffn_must_split_over_etp() -> None:
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=64)
    with pytest.raises(ConfigError, match="moe.expert_ffn_dim=64 is not divisible by parallel.etp=3"):
        Topology.build(ParallelConfig(dp=3, etp=3), MODEL, moe, BatchShape(12, 2), world_size=3)


def test_fine_grained_experts_split_over_etp_by_their_own_width() -> None:
    """Granularity G builds experts expert_ffn_dim/G wide: that width is what etp splits."""
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=12, granularity=4, normalize_weights=True)
    with pytest.raises(ConfigError, match=r"moe.expert_ffn_dim/moe.granularity=3 is not divisible by parallel.etp=2"):
        Topology.build(ParallelConfig(dp=2, etp=2), MODEL, moe, BatchShape(12, 2), world_size=2)
    Topology.build(ParallelConfig(dp=2, etp=2), MODEL, replace(moe, granularity=2), BatchShape(12, 2), world_size=2)


def test_tensor_parallel_splits_the_micro_batch_tokens() -> None:
    """TP ranks take 1/tp of the micro-batch's B·S tokens (not whole sequences): any
    micro-batch works when tp divides the tokens, and the message names both fixes."""
    _build(4, tp=4)  # 2 sequences over 4 ranks: half a sequence each
    _build(2, batch=BatchShape(16, 1), tp=2)  # micro-batch 1
    short = ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=128, seq_len=3)
    with pytest.raises(ConfigError, match=r"a micro-batch of 1 sequences x model.seq_len=3 = 3 tokens .* not divisible "
                                          r"by parallel.tp=2; with MoE layers .* make model.seq_len a multiple of "
                                          r"parallel.tp, or train.micro_batch_size a multiple of 2"):
        _build(2, model=short, batch=BatchShape(16, 1), tp=2)
    _build(2, model=short, batch=BatchShape(16, 2), tp=2)
    dense = ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=128, moe_every=0, seq_len=3)
    odd = BatchShape(global_batch=6, micro_batch=3)
    _build(2, model=dense, batch=odd, tp=2)  # replicated tokens: any micro-batch
    with pytest.raises(ConfigError, match=r"= 9 tokens .* parallel.tp=2; with parallel.sequence_parallel=true"):
        _build(2, model=dense, batch=odd, tp=2, sequence_parallel=True)


def test_dense_model_cannot_use_expert_parallelism() -> None:
    dense = ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=128, moe_every=0)
    with pytest.raises(ConfigError, match="a dense model has no experts to split"):
        _build(2, model=dense, dp=2, ep=2)


def test_batch_rules() -> None:
    with pytest.raises(ConfigError, match="train.batch_size=16 is not divisible by parallel.dp=3 x train.micro_batch_size=2 = 6"):
        _build(3, dp=3)
    with pytest.raises(ConfigError, match="2 micro-batches per data-parallel rank .* is fewer than parallel.pp=4"):
        _build(4, batch=BatchShape(16, 8), pp=4)
    with pytest.raises(ConfigError, match="6 micro-batches per data-parallel rank is not a multiple of parallel.pp=4"):
        _build(4, model=ModelConfig(dim=64, n_layers=8, n_heads=4, ffn_dim=128), batch=BatchShape(12, 2), pp=4, vpp=2)


def test_derived_degrees() -> None:
    topo = _build(8, tp=2, dp=4, ep=4)
    assert (topo.edp, topo.micro_batches, topo.world_size) == (2, 2, 8)  # edp = tp*dp/(etp*ep)
    topo = _build(4, pp=2, dp=2, ep=2)
    assert (topo.edp, topo.micro_batches) == (1, 4)


def _layers(n: int) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=n, n_heads=4, ffn_dim=128)


@pytest.mark.parametrize(
    "n_layers, degrees, message",
    [
        # the even split that does not divide names an uneven one that does
        (94, {"pp": 8}, "model.n_layers=94 is not divisible by parallel.pp=8 x parallel.vpp=1 = 8 pipeline chunks; "
         "choose degrees whose product divides the layer count, or give the first/last stage other sizes: "
         "parallel.first_stage_layers=11 parallel.last_stage_layers=11 (12 on each other stage)"),
        (5, {"pp": 2}, "or give the first/last stage other sizes: parallel.first_stage_layers=2 (3 on each other stage)"),
        # stage sizes that do not add up (pp=2: no middle stage takes the difference)
        (6, {"pp": 2, "first_stage_layers": 2, "last_stage_layers": 3},
         "parallel.first_stage_layers=2 + parallel.last_stage_layers=3 = 5 layers, but model.n_layers=6: with "
         "parallel.pp=2 the two stages hold every layer; set parallel.last_stage_layers=4 or null"),
        # a first/last stage larger than the layers, or leaving none for the others
        (6, {"pp": 2, "first_stage_layers": 8},
         "parallel.first_stage_layers=8 is more than model.n_layers=6 for the other 1 pipeline stage(s), which need "
         "at least 1; lower it; e.g. parallel.first_stage_layers=5"),
        (6, {"pp": 3, "first_stage_layers": 3, "last_stage_layers": 3},
         "parallel.first_stage_layers=3 + parallel.last_stage_layers=3 leaves 0 of model.n_layers=6 layers for the "
         "other 1 pipeline stage(s), which need at least 1; lower it; e.g. parallel.first_stage_layers=2 or "
         "parallel.last_stage_layers=2"),
        # the middle stages not dividing evenly: the nearest values that do
        (94, {"pp": 8, "first_stage_layers": 10, "last_stage_layers": 11},
         "the 73 layers left by parallel.first_stage_layers=10 + parallel.last_stage_layers=11 (model.n_layers=94) "
         "do not split evenly over the other 6 pipeline stage(s); each takes the same number; e.g. "
         "parallel.first_stage_layers=5 or parallel.first_stage_layers=11 or parallel.last_stage_layers=6 or "
         "parallel.last_stage_layers=12"),
        (8, {"pp": 4, "last_stage_layers": 3}, "the 5 layers left by parallel.last_stage_layers=3 (model.n_layers=8) "
         "do not split evenly over the other 3 pipeline stage(s); each takes the same number; e.g. "
         "parallel.last_stage_layers=2 or parallel.last_stage_layers=5"),
        # virtual stages: vpp divides the first/last stage's layers and each middle stage's (megatron's rule)
        (6, {"pp": 2, "vpp": 2, "first_stage_layers": 3},
         "parallel.first_stage_layers=3 is not divisible by parallel.vpp=2: the stage's layers split evenly over its 2 "
         "virtual stages (megatron-core's rule); set parallel.first_stage_layers=2 or 4"),
        (9, {"pp": 3, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 2},
         "the 5 layers left by parallel.first_stage_layers=2 + parallel.last_stage_layers=2 (model.n_layers=9) do not "
         "split evenly over the other 1 pipeline stage(s); each takes the same number, a multiple of parallel.vpp=2; "
         "no first/last stage sizes split 9 layers over parallel.pp=3 with parallel.vpp=2: change parallel.vpp or "
         "parallel.pp"),
        (12, {"pp": 3, "vpp": 2, "first_stage_layers": 2}, "the 10 layers left by parallel.first_stage_layers=2 "
         "(model.n_layers=12) do not split evenly over the other 2 pipeline stage(s); each takes the same number, a "
         "multiple of parallel.vpp=2; e.g. parallel.first_stage_layers=4"),
        (6, {"pp": 2, "vpp": 2, "first_stage_layers": 6},
         "leaves 0 of model.n_layers=6 layers for the other 1 pipeline stage(s), which need at least 2 (one per "
         "virtual stage); lower it; e.g. parallel.first_stage_layers=4"),
        (6, {"first_stage_layers": 3}, "parallel.first_stage_layers=3 needs parallel.pp > 1"),
        # accepted: megatron-core's examples and the cases
        (94, {"pp": 8, "first_stage_layers": 11, "last_stage_layers": 11}, None),
        (94, {"pp": 8, "first_stage_layers": 10}, None),
        (4, {"pp": 2, "first_stage_layers": 1}, None),
        (6, {"pp": 2, "vpp": 2, "first_stage_layers": 2}, None),
        (6, {"pp": 2, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 4}, None),
        (8, {"pp": 4, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 2}, None),
    ],
)
def test_uneven_pipeline_stages(n_layers: int, degrees: dict, message: str | None) -> None:
    world = degrees.get("pp", 1)
    if message is None:
        topo = _build(world, model=_layers(n_layers), batch=BatchShape(48, 2), **degrees)
        assert (topo.first_stage_layers, topo.last_stage_layers) == (
            degrees.get("first_stage_layers"), degrees.get("last_stage_layers"))
        return
    with pytest.raises(ConfigError) as err:
        _build(world, model=_layers(n_layers), batch=BatchShape(48, 2), **degrees)
    assert message in str(err.value)


def test_stage_sizes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"parallel.last_stage_layers=0: must be >= 1 \(layers on that pipeline stage\)"):
        ParallelConfig(pp=2, last_stage_layers=0)
