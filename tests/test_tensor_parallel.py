"""Tensor (+ sequence, + expert-tensor) parallelism against the single-process model.

Every rank builds the reference model from one seed and runs it on its data-parallel
slice in-process; the parallel copy is sharded (``apply_expert_parallel``, then
``apply_tensor_parallel``) and run on the same slice. Compared: the forward's LM loss,
aux and z losses, and the gradient of every parameter after the reductions the engine
performs (sequence-parallel-marked: summed over tp; dense: averaged over dp; experts:
summed over edp, divided by dp), with shards gathered back to the full tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from parallel.config import ParallelConfig
from parallel.expert_parallel import apply_expert_parallel
from parallel.groups import ParallelGroups, init_groups
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import BatchShape, Topology

DENSE = ModelConfig(dim=32, n_layers=2, n_heads=4, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=0,
                    activation="swiglu", tie_embeddings=False)
MOE_MODEL = replace(DENSE, moe_every=2)  # block 0 dense, block 1 MoE
# Qwen3-like attention: 2 key/value groups of 2 query heads (one group per TP rank),
# heads of 12 (4·12 = 48 wide on a 32-wide model), q/k RMSNorm gains shared by all heads.
GQA_MODEL = replace(MOE_MODEL, n_heads=4, n_kv_heads=2, head_dim=12, qk_norm=True)
MOE = MoEConfig(num_experts=4, top_k=2, normalize_weights=True, expert_ffn_dim=32, num_shared_experts=1,
                aux_loss_coeff=0.1, z_loss_coeff=0.01, activation="swiglu")
BATCH = 4  # sequences per data-parallel rank
TOL = 1e-5


def _groups(world: int, model: ModelConfig, batch: int = BATCH, **degrees: int | bool) -> ParallelGroups:
    p = ParallelConfig(**degrees)
    topology = Topology.build(p, model, MOE, BatchShape(batch * p.dp, batch), world)
    return init_groups(topology, timeout_minutes=1)


def _batch(dp_rank: int, vocab: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + dp_rank)
    ids = torch.randint(0, vocab, (batch, DENSE.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, group=group)
    return out


def _engine_reduced_grad(param: torch.nn.Parameter, groups: ParallelGroups) -> torch.Tensor:
    """The gradient after the engine's reductions (``parallel/engine.py``), still sharded."""
    grad = param.grad
    if getattr(param, "sequence_parallel", False):
        grad = _sum(grad, groups.tp)
    if getattr(param, "allreduce", True) is False:
        return _sum(grad, groups.edp) / groups.dp_size
    return _sum(grad, groups.dp) / groups.dp_size


def _gather(shard: torch.Tensor, param: torch.nn.Parameter, group: dist.ProcessGroup) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(group.size())]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def tp_matches_single_process(
    rank: int, world: int, model_cfg: ModelConfig, moe: MoEConfig, degrees: dict, batch: int = BATCH
) -> dict[str, float]:
    """Worst relative error of losses and of every parameter's gradient vs the reference,
    on micro-batches of ``batch`` sequences per data-parallel rank."""
    groups = _groups(world, model_cfg, batch, **degrees)
    torch.manual_seed(7)
    reference = Transformer(model_cfg, moe)
    model = copy.deepcopy(reference)
    if groups.ep_size > 1:
        apply_expert_parallel(model, groups.ep)
    apply_tensor_parallel(model, groups, bool(degrees.get("sequence_parallel", False)))

    x, y = _batch(groups.dp_rank, model_cfg.vocab_size, batch)
    ref_out = reference(x, y)
    ref_out.loss.backward()
    out = model(x, y)
    out.loss.backward()

    errors = {
        "lm_loss": _relative(out.lm_loss, ref_out.lm_loss),
        "aux_loss": _relative(out.aux_loss, ref_out.aux_loss),
        "z_loss": _relative(out.z_loss, ref_out.z_loss),
    }
    ref_params = dict(reference.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(ref_params), "parameter names changed"
    assert list(model.state_dict()) == list(reference.state_dict()), "state-dict keys changed"
    ep, ep_rank = groups.ep_size, groups.ep_rank
    for name, param in model.named_parameters():
        is_expert = getattr(param, "allreduce", True) is False
        grad = _gather(_engine_reduced_grad(param, groups), param, groups.etp if is_expert else groups.tp)
        want = _sum(ref_params[name].grad, groups.dp) / groups.dp_size
        if is_expert:
            local = want.shape[0] // ep
            want = want[ep_rank * local : (ep_rank + 1) * local]
        grad = grad[: want.shape[0]]  # the vocabulary's padding rows
        assert grad.shape == want.shape, (name, grad.shape, want.shape)
        errors[name] = _relative(grad, want)
    return errors


def _check(results: list[dict[str, float]]) -> None:
    for errors in results:
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, bad
    assert results[0].keys() == results[-1].keys()


@pytest.mark.parametrize(
    "model_cfg, moe, degrees",
    [
        (DENSE, MOE, {"tp": 2}),
        (MOE_MODEL, MOE, {"tp": 2}),
        (MOE_MODEL, MOE, {"tp": 2, "sequence_parallel": True}),
        (replace(MOE_MODEL, vocab_size=63, tie_embeddings=True), MOE, {"tp": 2}),
        (MOE_MODEL, replace(MOE, aux_loss_scope="sequence"), {"tp": 2, "sequence_parallel": True}),
        (MOE_MODEL, replace(MOE, router="hash", top_k=1, normalize_weights=False), {"tp": 2, "sequence_parallel": True}),
        (GQA_MODEL, MOE, {"tp": 2}),
        (GQA_MODEL, MOE, {"tp": 2, "sequence_parallel": True}),
    ],
    ids=["dense", "moe", "moe-sp", "vocab63-tied", "sequence-aux-sp", "hash-router-sp", "gqa-qknorm", "gqa-qknorm-sp"],
)
def test_tp2_matches_single_process(
    rank_pool: Callable[[int], RankPool], model_cfg: ModelConfig, moe: MoEConfig, degrees: dict
) -> None:
    _check(rank_pool(2).run(tp_matches_single_process, model_cfg, moe, degrees))


@pytest.mark.parametrize(
    "moe, degrees, batch",
    [
        (MOE, {"tp": 2}, 1),
        (replace(MOE, aux_loss_scope="sequence"), {"tp": 2, "sequence_parallel": True}, 3),
        (replace(MOE, router="hash", top_k=1, normalize_weights=False), {"tp": 2, "sequence_parallel": True}, 1),
    ],
    ids=["moe-micro1", "sequence-aux-sp-micro3", "hash-router-sp-micro1"],
)
def test_tp2_splits_tokens_not_sequences(
    rank_pool: Callable[[int], RankPool], moe: MoEConfig, degrees: dict, batch: int
) -> None:
    """Micro-batches that tp=2 does not split into whole sequences: one sequence (each TP
    rank routes half of it), or three (the middle one straddles the ranks: the per-sequence
    aux loss counts it over tp). With and without sequence parallelism."""
    _check(rank_pool(2).run(tp_matches_single_process, MOE_MODEL, moe, degrees, batch))


def test_tp_needs_the_micro_batch_tokens_to_split() -> None:
    odd = replace(MOE_MODEL, seq_len=15)
    Topology.build(ParallelConfig(tp=2), odd, MOE, BatchShape(2, 2), 2)  # 30 tokens: 15 per TP rank
    with pytest.raises(ConfigError, match=r"a micro-batch of 1 sequences x model.seq_len=15 = 15 tokens .* not "
                       r"divisible by parallel.tp=2; .* make model.seq_len a multiple of parallel.tp, or "
                       r"train.micro_batch_size a multiple of 2"):
        Topology.build(ParallelConfig(tp=2), odd, MOE, BatchShape(1, 1), 2)


def test_tp_must_divide_the_key_value_heads() -> None:
    """tp=4 divides the 4 query heads but would split one of the 2 key/value groups."""
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=2 is not divisible by parallel.tp=4; .* one of \[1, 2\]"):
        Topology.build(ParallelConfig(tp=4), GQA_MODEL, MOE, BatchShape(BATCH, BATCH), 4)


def test_tp2_ep2_matches_single_process(rank_pool: Callable[[int], RankPool]) -> None:
    _check(rank_pool(4).run(tp_matches_single_process, MOE_MODEL, MOE, {"tp": 2, "ep": 2, "dp": 2}))


@pytest.mark.parametrize("degrees", [{"tp": 2, "etp": 2}, {"dp": 2, "etp": 2}], ids=["tp2-etp2", "dp2-etp2"])
def test_etp2_matches_single_process(rank_pool: Callable[[int], RankPool], degrees: dict) -> None:
    _check(rank_pool(2).run(tp_matches_single_process, MOE_MODEL, MOE, degrees))


def tp_capacity_is_per_rank(rank: int, world: int, batch: int) -> float:
    """With a capacity factor each TP rank applies the capacity to its own tokens (its
    contiguous half of the flattened micro-batch, ``ceil(cf·(B·S/2)·K/E)``): the output
    equals one process applying the layer to each rank's tokens separately."""
    groups = _groups(world, MOE_MODEL, batch, tp=2)
    torch.manual_seed(5)
    model = Transformer(MOE_MODEL, replace(MOE, capacity_factor=1.0))
    reference = copy.deepcopy(model.blocks["1"].ffn)
    apply_tensor_parallel(model, groups, sequence_parallel=False)
    x = torch.randn(batch, MOE_MODEL.seq_len, MOE_MODEL.dim, generator=torch.Generator().manual_seed(9))
    y, stats = model.blocks["1"].ffn(x)
    halves = [reference(part.unsqueeze(0)) for part in x.reshape(world, -1, MOE_MODEL.dim)]
    assert reference.capacity(batch * MOE_MODEL.seq_len // world) == halves[0][0].shape[1] * MOE.top_k // MOE.num_experts
    dropped = sum(s.dropped_fraction for _, s in halves) / world
    assert stats.dropped_fraction.item() == pytest.approx(dropped.item()) and dropped > 0
    return _relative(y, torch.cat([h for h, _ in halves], dim=1).view_as(x))


@pytest.mark.parametrize("batch", [BATCH, 1])
def test_tp_capacity_is_per_source_rank(rank_pool: Callable[[int], RankPool], batch: int) -> None:
    assert max(rank_pool(2).run(tp_capacity_is_per_rank, batch)) < TOL


# -- training through Run with the megatron engine -------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.normalize_weights=true", "moe.expert_ffn_dim=32",
    "moe.aux_loss_scope=global_batch", "moe.aux_loss_coeff=0.1", "model.activation=swiglu",
    "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.steps=3", "train.eval_every=3",
    "train.ckpt_every=100", "data.val_tokens=1024", "launch.threads=1", "launch.timeout_minutes=2",
]
KEYS = ("lm_loss", "aux_loss", "z_loss", "router_grad_norm", "grad_norm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from launch.data import prepare, stdlib_sources

    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:40], out, val_fraction=0.2)
    return out


def _config(corpus: Path, run_dir: Path, layout: list[str]):  # noqa: ANN202
    from launch.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [*RUN, f"data.path={corpus}", f"train.run_dir={run_dir}", *layout])


def run_rank(rank: int, world: int, corpus: Path, run_dir: Path, layout: list[str]) -> None:
    from launch.train import train_rank

    train_rank(_config(corpus, run_dir, layout), "tiny")


def _records(run_dir: Path) -> tuple[list[dict], list[float]]:
    from launch.metrics import read_metrics

    records = read_metrics(run_dir)
    return [r for r in records if r["kind"] == "train"], [r["val_loss"] for r in records if r["kind"] == "val"]


@pytest.mark.parametrize(
    "world, layout",
    [
        (2, ["parallel.tp=2", "train.micro_batch_size=2"]),
        (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true", "parallel.etp=2"]),
    ],
    ids=["tp2-accumulate", "tp2-dp2-sp-etp2"],
)
def test_run_at_tp2_trains_like_one_process(
    rank_pool: Callable[[int], RankPool], corpus: Path, tmp_path: Path, world: int, layout: list[str]
) -> None:
    from launch.train import train

    train(_config(corpus, tmp_path / "single", []), "tiny")
    rank_pool(world).run(run_rank, corpus, tmp_path / "tp", layout)
    (want, want_val), (got, got_val) = _records(tmp_path / "single"), _records(tmp_path / "tp")
    assert [r["step"] for r in got] == [1, 2, 3]
    for ours, ref in zip(got, want, strict=True):
        for key in KEYS:
            assert ours[key] == pytest.approx(ref[key], rel=TOL, abs=1e-8), (ours["step"], key)
        assert ours["expert_tokens"] == ref["expert_tokens"]
    assert got_val == pytest.approx(want_val, rel=TOL)


# -- the megatron_compat patches the sequence-parallel path needs ----------------------


def sp_linears_without_each_patch(rank: int, world: int) -> dict[str, str]:
    """Column- then row-parallel linear in sequence-parallel mode, forward and backward,
    with each CPU patch of that path undone in turn (then all in place)."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    from parallel.megatron_compat import apply_cpu_compat

    groups = _groups(world, DENSE, tp=2, sequence_parallel=True)  # with a fresh (empty) global memory buffer
    apply_cpu_compat()
    model = Transformer(DENSE, MOE)
    apply_tensor_parallel(model, groups, sequence_parallel=True)
    attn = model.blocks["0"].attn
    attn.qkv.token_split.shape = (BATCH, DENSE.seq_len)  # what the block's pre-hook records from the ids

    def run() -> str:
        x = torch.randn(BATCH // world, DENSE.seq_len, DENSE.dim, requires_grad=True)
        try:
            attn(x, model.rope_cos_SF, model.rope_sin_SF).sum().backward()
        except Exception as err:  # noqa: BLE001 - the message is the result (every rank fails at the same point)
            return str(err)
        return ""

    report = {}
    for name, module in (("global_memory_buffer_device", utils), ("tensor_parallel_mappings_device", mappings),
                         ("tensor_parallel_linear_device", layers)):
        view, module.torch = module.torch, torch
        try:
            report[name] = run()
        finally:
            module.torch = view
    report["all"] = run()
    return report


def test_sequence_parallel_needs_each_cpu_patch(rank_pool: Callable[[int], RankPool]) -> None:
    for report in rank_pool(2).run(sp_linears_without_each_patch):
        assert report.pop("all") == ""
        for name, error in report.items():
            assert "Torch not compiled with CUDA enabled" in error, (name, error)
