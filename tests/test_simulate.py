"""The simulator (parallel/simulator, launch/simulate.py): formulas against hand-computed
values, hardware-file validation, and an emulated gloo run whose counted collective bytes
and model-state bytes must equal the prediction exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launch.config import load_config
from launch.simulate import emulated_dtype
from moe.config import ConfigError, ModelConfig, MoEConfig
from multirank import RankPool
from parallel.config import ParallelConfig
from parallel.simulator.hardware import hardware_dict, load_hardware, parse_hardware
from parallel.simulator.predict import (
    Layout, activation_elements, comm_bytes, head_elements, megatron_buffer_layout, measured_categories, predict, recorded_comm,
    state_memory,
)
from parallel.simulator.routing import group_rows, load_imbalance, read_routing

ROOT = Path(__file__).resolve().parent.parent
HARDWARE = ROOT / "configs" / "hardware"
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32", "train.batch_size=8",
    "data.val_tokens=1024", "launch.threads=1", "launch.timeout_minutes=2",
]


def _layout(**kw: Any) -> tuple[ModelConfig, MoEConfig, Layout]:
    model = ModelConfig(dim=64, n_layers=4, n_heads=4, seq_len=32, ffn_dim=128, vocab_size=100)
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=64)
    batch = kw.pop("batch", 16)
    micro = kw.pop("micro", None)
    return model, moe, Layout.build(ParallelConfig(**kw), model, moe, batch, micro)


def test_uniform_all_to_all_is_four_t_k_h_bytes() -> None:
    model, moe, layout = _layout(dp=4, ep=4)
    comm = comm_bytes(model, moe, layout, rank=0, extra_forwards=0, rows=None)
    tokens = 16 // 4 * 32  # T = 4 sequences of 32 on each rank
    per_layer = 4 * tokens * 2 * 64 * 4 * 3 / 4  # 4·T·k·h·bytes·(EP−1)/EP
    assert comm.ep_all_to_all == 4 * per_layer == 786432


def test_megatron_buffer_layout_pads_like_megatron() -> None:
    # reversed order: 100 at [0,100), 10 at [128,138), 64 at [192,256); end padded to lcm(3,128)=384
    ranges, numel = megatron_buffer_layout([64, 10, 100], group=3)
    assert ranges == [(192, 256), (128, 138), (0, 100)] and numel == 384


def test_group_rows_and_imbalance_by_hand() -> None:
    # 2 ranks, 4 experts (2 each); rank 0 keeps [3,1,2,2], rank 1 keeps [0,4,1,1]
    rows = group_rows([[3, 1, 2, 2], [0, 4, 1, 1]])
    assert rows.send_off_P == [4, 4] and rows.recv_off_P == [4, 4] and rows.computed_P == [8, 6]
    assert load_imbalance([0.5, 0.25, 0.125, 0.125], ep=2) == 1.5


def test_states_follow_the_distributed_optimizer_formula() -> None:
    model, moe, layout = _layout(dp=4, ep=2)
    dense, _ = state_memory(model, moe, layout, "megatron", rank=0)
    assert dense.params == dense.grads  # fp32 param and grad buffers of the same layout
    single, _ = state_memory(*_layout(), "megatron", rank=0)
    n = single.params // 4
    assert single.optimizer == 8 * n + 4 * (1 + 4 * 7 + 1)  # AdamW moments + one step per parameter


@pytest.mark.parametrize("attention", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 2, "head_dim": 12, "qk_norm": True},
                                       {"n_kv_heads": 1, "head_dim": 6, "qk_norm": True}],
                         ids=["mha", "gqa", "gqa-wide-heads-qknorm", "one-kv-head-qknorm"])
def test_dense_block_activations_are_what_autograd_keeps(attention: dict[str, Any]) -> None:
    """``activation_elements`` of a dense (GeLU) block equals the elements of the distinct
    storages autograd saves in its forward (the block's input included, weights and RoPE
    tables not), for multi-head, grouped-query and q/k-normed attention."""
    import torch

    from moe.model import Block, rope_tables

    model = ModelConfig(dim=32, n_layers=2, n_heads=4, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=0, **attention)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)
    block = Block(model, moe, is_moe=False)
    cos_SF, sin_SF = rope_tables(model.seq_len, model.head_size, model.rope_theta)
    not_activations = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos_SF, sin_SF]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in not_activations:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(torch.randn(2, model.seq_len, model.dim, requires_grad=True), cos_SF, sin_SF)
    layout = Layout.build(ParallelConfig(), model, moe, batch_size=2, micro_batch_size=None)
    assert activation_elements(model, moe, layout, layer=0, rows=0).elements == sum(kept.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(("is_moe", "shared"), [(False, 0), (True, 1), (True, 0)], ids=["dense", "moe-shared", "moe"])
def test_block_activations_per_recompute_mode_are_what_autograd_keeps(mode: str, activation: str, is_moe: bool,
                                                                      shared: int, dtype: str) -> None:
    """``activation_elements`` under each ``train.recompute`` mode against the storages
    autograd keeps through a block's forward (read after it: the activation outputs that
    selective recomputation frees count 0), in bytes: with fp32 and with bf16 parameters
    (whose norms, attention logsumexp and router keep fp32 tensors beside the bf16 ones).
    A dense block exactly, an MoE block (with and without a shared expert) within 2% (its
    dispatch indices are not modelled)."""
    import torch
    from torch import nn

    from moe.model import Block, rope_tables
    from moe.recompute import apply_recompute, checkpointed
    from parallel.engine import cast_parameters

    model = ModelConfig(dim=32, n_layers=2, n_heads=4, seq_len=16, ffn_dim=64, vocab_size=64,
                        moe_every=1 if is_moe else 0, activation=activation)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, activation=activation, num_shared_experts=shared)
    block = Block(model, moe, is_moe=is_moe)
    cast_parameters([block], getattr(torch, dtype))
    holder = nn.Module()
    holder.blocks = nn.ModuleDict({"0": block})
    apply_recompute(holder, mode)  # type: ignore[arg-type]
    cos_SF, sin_SF = rope_tables(model.seq_len, model.head_size, model.rope_theta)
    not_activations = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos_SF, sin_SF]}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in not_activations:
            kept[t.untyped_storage().data_ptr()] = t
        return t

    x_BSD = torch.randn(2, model.seq_len, model.dim, requires_grad=True, dtype=getattr(torch, dtype))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        checkpointed(block, x_BSD, cos_SF, sin_SF) if block.recompute_block else block(x_BSD, cos_SF, sin_SF)
    measured = sum(t.untyped_storage().nbytes() for t in kept.values())
    layout = Layout.build(ParallelConfig(), model, moe, batch_size=2, micro_batch_size=None, dtype=dtype,
                          recompute=mode)  # type: ignore[arg-type]
    predicted = activation_elements(model, moe, layout, layer=0, rows=2 * model.seq_len * moe.top_k).bytes(layout)
    if is_moe and mode != "full":
        assert predicted == pytest.approx(measured, rel=0.02)
    else:
        assert predicted == measured


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_parallel_blocks_keep_the_expert_output_rows(dtype: str) -> None:
    """Under ``ep > 1`` an MoE block keeps ``R·D`` more (activation dtype): the combine puts
    the expert output rows back in source-rank order with ``index_copy``
    (``ExpertParallelDispatcher.unpermute``), whose autograd node saves its source. Found in
    ``moe bench memory``'s ep=2 ranks (profiled: one ``R·D`` per MoE layer live when the
    backward starts); the premise is checked on torch itself."""
    import torch

    y_RD = torch.randn(6, 4, requires_grad=True, dtype=getattr(torch, dtype)) * 1
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.empty_like(y_RD).index_copy(0, torch.arange(6).flip(0), y_RD)
    assert any(t.untyped_storage().data_ptr() == y_RD.untyped_storage().data_ptr() for t in saved)
    model = ModelConfig(dim=32, n_layers=2, n_heads=4, seq_len=16, ffn_dim=64, vocab_size=64)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)
    one, two = (Layout.build(ParallelConfig(ep=ep, dp=ep), model, moe, batch_size=4 * ep, micro_batch_size=None,
                             dtype=dtype, recompute="selective") for ep in (1, 2))  # type: ignore[arg-type]
    assert one.tokens == two.tokens
    rows = 37.0
    extra = activation_elements(model, moe, two, 0, rows).bytes(two) - activation_elements(model, moe, one, 0, rows).bytes(one)
    assert extra == rows * model.dim * y_RD.element_size()


@pytest.mark.parametrize("dense_last", [False, True], ids=["moe", "dense-last"])
def test_selective_refill_rise_is_the_measured_backward_transient(dense_last: bool) -> None:
    """``refill_rise`` against the profiler's allocator accounting (``measure_step``) of one
    forward and backward under ``selective`` in one process: the live bytes' most rise over
    the backward's start, while the MLPs' activations are recomputed (a small vocabulary,
    so that the loss gradient is not the largest transient), within 3%."""
    import torch

    from moe.model import Transformer
    from moe.recompute import apply_recompute
    from parallel.simulator.measure import measure_step
    from parallel.simulator.predict import refill_rise, stage_layers

    torch.manual_seed(0)
    model = ModelConfig(dim=64, n_layers=3 if dense_last else 2, n_heads=4, seq_len=64, ffn_dim=384, vocab_size=32,
                        moe_every=2 if dense_last else 1)  # dense-last: dense, MoE, dense
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=256)
    net = Transformer(model, moe)
    apply_recompute(net, "selective")
    ids_BS = torch.randint(0, model.vocab_size, (2, model.seq_len))
    net(ids_BS, ids_BS).loss.backward()  # the gradients exist before the measured step: states, not transients
    memory = measure_step(lambda: net(ids_BS, ids_BS).loss.backward(), torch.device("cpu"))
    layout = Layout.build(ParallelConfig(), model, moe, batch_size=2, micro_batch_size=None, dtype="float32",
                          recompute="selective")  # type: ignore[arg-type]
    layers = stage_layers(model, layout, 0)
    rows = {i: float(layout.tokens * moe.top_k) if model.is_moe_layer(i) else 0.0 for i in layers}
    head = head_elements(model, layout).bytes(layout) - 4 * layout.tokens * model.vocab_size
    predicted = refill_rise(model, moe, layout, layers, rows, head)
    assert predicted == pytest.approx(memory.peak_increase - memory.activations, rel=0.03)


def test_full_recompute_layers_count_per_pipeline_chunk() -> None:
    """``recompute_layers=1`` under pp=2 x vpp=2 (8 layers, 2 per chunk): the first block of
    each chunk keeps its input only, the others everything; the step recomputes half the
    blocks' forward."""
    model = ModelConfig(dim=64, n_layers=8, n_heads=4, seq_len=32, ffn_dim=128, vocab_size=100)
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=64)
    kw: dict[str, Any] = {"batch_size": 16, "micro_batch_size": 4}
    layout = Layout.build(ParallelConfig(pp=2, vpp=2), model, moe, recompute="full", recompute_layers=1, **kw)
    assert [layout.block_recomputed(model, i) for i in range(8)] == [True, False] * 4
    none = Layout.build(ParallelConfig(pp=2, vpp=2), model, moe, **kw)
    rows = layout.routed_tokens * moe.top_k
    assert activation_elements(model, moe, layout, 0, rows).elements == layout.tokens * model.dim
    assert activation_elements(model, moe, layout, 1, rows) == activation_elements(model, moe, none, 1, rows)
    full = Layout.build(ParallelConfig(pp=2, vpp=2), model, moe, recompute="full", **kw)
    assert all(full.block_recomputed(model, i) for i in range(8))


def test_recompute_trades_step_time_for_activation_memory() -> None:
    """Predicted activations: full < selective < none; step time the other way round (a
    recomputed activation is written once more, a recomputed block's matmuls run again)."""
    hw = load_hardware(HARDWARE / "h100-ib.yaml")
    model, moe, _ = _layout()
    ranks = {mode: predict(model, moe, Layout.build(ParallelConfig(), model, moe, 16, None, recompute=mode), hw).ranks[0]
             for mode in ("none", "selective", "full")}  # type: ignore[arg-type]
    activations = {mode: r.memory.activations for mode, r in ranks.items()}
    step = {mode: sum(r.time.values()) for mode, r in ranks.items()}
    assert activations["full"] < activations["selective"] < activations["none"]
    assert step["none"] < step["selective"] < step["full"]


def test_pipeline_bubble_share() -> None:
    model, moe, layout = _layout(pp=4, batch=16, micro=2)  # m = 8 micro-batches
    hw = load_hardware(HARDWARE / "h100-ib.yaml")
    rank = predict(model, moe, layout, hw).ranks[0]
    per_micro = sum(v for k, v in rank.time.items() if k not in ("pp_bubble", "dp_comm", "optimizer")) / 8
    assert rank.time["pp_bubble"] == pytest.approx(3 * per_micro)  # (p−1)/(m+p−1) of the pipeline


def test_hardware_files_validate() -> None:
    for path in sorted(HARDWARE.glob("*.yaml")):
        assert load_hardware(path).world_size >= 1
    good = json.loads(json.dumps(__import__("yaml").safe_load((HARDWARE / "h100-ib.yaml").read_text())))
    with pytest.raises(ConfigError, match="missing field 'memory_bandwidth'"):
        parse_hardware({k: v for k, v in good.items() if k != "memory_bandwidth"}, "x.yaml")
    with pytest.raises(ConfigError, match="nonsensical"):
        parse_hardware({**good, "memory_capacity": -1}, "x.yaml")
    with pytest.raises(ConfigError, match="matmul_efficiency"):
        parse_hardware({**good, "matmul_efficiency": 3}, "x.yaml")
    with pytest.raises(ConfigError, match=r"collective_efficiency must map some of \['reduce_scatter'"):
        parse_hardware({**good, "collective_efficiency": {"broadcast": 0.5}}, "x.yaml")
    with pytest.raises(ConfigError, match="are shares of the link bandwidth"):
        parse_hardware({**good, "collective_efficiency": {"reduce_scatter": 4}}, "x.yaml")


def test_collective_efficiency_slows_only_its_collective() -> None:
    """A slower reduce-scatter lengthens the data-parallel time and nothing else."""
    import dataclasses

    from parallel.simulator.predict import predict

    model, moe, layout = _layout(dp=2)
    hw = load_hardware(HARDWARE / "h100-ib.yaml")
    base = predict(model, moe, layout, hw).ranks[0].time
    slow = predict(model, moe, layout, dataclasses.replace(hw, collective_efficiency={"reduce_scatter": 0.25})).ranks[0].time
    assert slow["matmul"] == base["matmul"] and slow["tp_comm"] == base["tp_comm"]
    assert slow["dp_comm"] > base["dp_comm"]


def test_sync_wait_costs_once_per_blocking_collective_call() -> None:
    """Each layout pays ``sync_wait`` per blocking call it makes per step (the all-to-alls,
    TP and PP calls per micro-batch, the DP ring calls and the engine's 4 small
    all-reduces), the oversubscribed wait when a CPU has fewer cores than ranks, and a
    single rank pays nothing."""
    import dataclasses

    hw = dataclasses.replace(load_hardware(HARDWARE / "this-machine.yaml"), cores=2, sync_wait_s=1e-3,
                             sync_wait_oversubscribed_s=5e-3)

    def wait(**kw: Any) -> float:
        model, moe, layout = _layout(**kw)
        return max(r.time["sync_wait"] for r in predict(model, moe, layout, hw).ranks)

    assert wait(dp=1) == 0.0
    # dp=2 (ep=1: one buffer, one optimizer): its reduce-scatter and all-gather, the 4 small
    # all-reduces. ep=2 (dp=2, edp=1): 5 all-to-alls per MoE layer (4 layers) and micro-batch,
    # the dense buffer's reduce-scatter and its all-gather by each of the 2 optimizers, 4 small.
    assert wait(dp=2) == pytest.approx((2 + 4) * 1e-3)
    assert wait(dp=2, ep=2) == pytest.approx((5 * 4 + 3 + 4) * 1e-3)
    assert wait(dp=2, ep=2, micro=4) == pytest.approx((2 * 5 * 4 + 3 + 4) * 1e-3)  # 2 micro-batches
    assert wait(dp=4) == pytest.approx((2 + 4) * 5e-3)  # 4 ranks on 2 cores
    gpu = load_hardware(HARDWARE / "h100-ib.yaml")
    model, moe, layout = _layout(dp=2)
    assert predict(model, moe, layout, gpu).ranks[0].time["sync_wait"] == 0.0  # not in the file: not modelled
    with pytest.raises(ConfigError, match="sync_wait_s"):
        parse_hardware({**hardware_dict(hw), "sync_wait_s": -1}, "x.yaml")


def test_tensor_parallel_ranks_repeat_the_residual_stream_work() -> None:
    """Without sequence parallelism each TP rank runs the norms and residual adds on every
    token: ``(1 − 1/tp) · (2·L_stage + last) · T · D · residual_s_per_element`` per
    micro-batch is added to the step, nothing with SP, at tp=1 or without the field."""
    import dataclasses

    hw = dataclasses.replace(load_hardware(HARDWARE / "this-machine.yaml"), residual_s_per_element=1e-8)
    model, moe, layout = _layout(tp=2, batch=16, micro=8)  # 2 micro-batches of T = 8 x 32 tokens, 4 blocks
    rank = predict(model, moe, layout, hw).ranks[0]
    assert rank.time["tp_replicated"] == pytest.approx(2 * (1 - 1 / 2) * (2 * 4 + 1) * 8 * 32 * 64 * 1e-8)
    _, _, sp = _layout(tp=2, sequence_parallel=True, batch=16, micro=8)
    assert predict(model, moe, sp, hw).ranks[0].time["tp_replicated"] == 0.0
    assert predict(model, moe, _layout(dp=2)[2], hw).ranks[0].time["tp_replicated"] == 0.0
    without = dataclasses.replace(hw, residual_s_per_element=0.0)
    assert predict(model, moe, layout, without).ranks[0].time["tp_replicated"] == 0.0
    with pytest.raises(ConfigError, match="residual_s_per_element"):
        parse_hardware({**hardware_dict(hw), "residual_s_per_element": -1}, "x.yaml")


def test_a_layout_that_does_not_fit_is_reported() -> None:
    cfg = load_config(ROOT / "configs" / "glam-64e.yaml", ["parallel.dp=8", "parallel.ep=8"])
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size, "bfloat16")
    hw = parse_hardware({**__import__("yaml").safe_load((HARDWARE / "h100-ib.yaml").read_text()), "memory_capacity": 1e8}, "tiny.yaml")
    prediction = predict(cfg.model, cfg.moe, layout, hw)
    over = prediction.summary["over_capacity"]
    assert not prediction.summary["fits"] and [o["rank"] for o in over] == list(range(8))
    assert over[0]["over_bytes"] == int(prediction.ranks[0].memory.peak - 1e8)


def test_routing_recorder_pauses_appends_and_truncates(tmp_path: Path) -> None:
    """What ``train.record_routing`` relies on: evaluation forwards are left out, records
    move to the file, and a resume from step S drops the records of steps >= S."""
    import torch

    from moe.model import Transformer
    from parallel.simulator.routing import RoutingRecorder, truncate_routing

    model, moe, _ = _layout()
    net = Transformer(model, moe)
    ids_BS = torch.randint(0, model.vocab_size, (2, model.seq_len))
    recorder, path = RoutingRecorder(net, rank=0), tmp_path / "routing-rank-0.jsonl"
    for step in range(3):
        recorder.step = step
        net(ids_BS)
        with recorder.paused():
            net(ids_BS)
        recorder.append_to(path)
    recorded = read_routing([path])
    assert [r.step for r in recorded] == [0, 1, 2] and not recorder.records
    assert all(sum(r.counts_LE[layer]) == 2 * model.seq_len * moe.top_k for r in recorded for layer in range(4))
    truncate_routing(path, 2)
    assert [r.step for r in read_routing([path])] == [0, 1]


# -- emulated runs: counted bytes and state bytes equal the prediction ----------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from launch.data import prepare, stdlib_sources

    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:40], out, val_fraction=0.2)
    return out


def _emulate(rank: int, world: int, cfg: Any, out: str) -> dict[str, Any]:
    from launch.simulate import emulate_rank

    return emulate_rank(cfg, 3, Path(out))


@pytest.mark.parametrize("layout", [
    ["parallel.dp=2"],
    ["parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=2", "moe.aux_loss_scope=global_batch",
     "moe.capacity_factor=1.0"],
    ["parallel.dp=4", "parallel.ep=2"],
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.pp=2", "parallel.vpp=2", "parallel.dp=2", "parallel.ep=2", "model.n_layers=4", "train.micro_batch_size=2"],
    ["parallel.tp=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=true"],
    ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=2", "model.n_layers=6", "train.micro_batch_size=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=1", "moe.aux_loss_scope=sequence"],
    ["parallel.dp=2", "parallel.ep=2", "train.dtype=bfloat16"],
    ["parallel.tp=2", "train.dtype=bfloat16"],
    ["parallel.tp=2", "parallel.sequence_parallel=true", "train.dtype=bfloat16"],
    ["parallel.pp=2", "train.micro_batch_size=4", "train.dtype=bfloat16"],
], ids=["dp2", "dp2-ep2-micro2-capacity", "dp4-ep2", "tp2", "tp2-sp", "pp2-vpp2-dp2-ep2", "tp2-gqa-qknorm",
        "pp2-vpp2-uneven", "tp2-sp-micro1-sequence-aux", "dp2-ep2-bf16", "tp2-bf16", "tp2-sp-bf16", "pp2-bf16"])
def test_emulated_bytes_and_states_equal_prediction(
    rank_pool: Callable[[int], RankPool], corpus: Path, tmp_path: Path, layout: list[str]
) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *layout, f"data.path={corpus}", f"train.run_dir={tmp_path}"])
    results = rank_pool(cfg.parallel.world_size).run(_emulate, cfg, str(tmp_path), timeout=240)
    routing = read_routing(sorted(tmp_path.glob("routing-rank-*.jsonl")))
    lay = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                       emulated_dtype(cfg))
    predicted = recorded_comm(cfg.model, cfg.moe, lay, routing)
    for rank, result in enumerate(results):
        measured = measured_categories(result["comm"])
        assert not [k for k in measured if k.startswith("unclassified")], measured
        assert measured == {k: int(v) for k, v in predicted[rank].__dict__.items()}, f"rank {rank}"
        states, _ = state_memory(cfg.model, cfg.moe, lay, "megatron", rank)
        assert result["states"] == {"params": states.params, "grads": states.grads, "optimizer": states.optimizer}


def test_emulation_matches_the_real_multi_rank_run(
    corpus: Path, tmp_path: Path, start_within: Callable[..., dict[str, Any]]
) -> None:
    """The emulation runs the training step of a real run: losses, gradient norms and
    per-expert token counts are identical to ``moe train``'s (local launcher) step by step,
    and the real run's routing record (``train.record_routing``) is the emulation's."""
    from launch.metrics import read_metrics
    from launch.simulate import emulate

    overrides = [*SMALL, "parallel.dp=2", "parallel.ep=2", "train.steps=3", "train.log_every=1",
                 "train.eval_every=100", "train.ckpt_every=100", "launch.launcher=local", f"data.path={corpus}"]
    real_cfg = load_config(ROOT / "configs" / "tiny.yaml",
                           [*overrides, "train.record_routing=true", f"train.run_dir={tmp_path / 'real'}"])
    start_within(real_cfg)
    real = [r for r in read_metrics(tmp_path / "real") if r["kind"] == "train"]
    emu_cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"train.run_dir={tmp_path / 'emu'}"])
    results = emulate(emu_cfg, 3, tmp_path / "emu")
    routing = read_routing(sorted((tmp_path / "emu").glob("routing-rank-*.jsonl")))
    for step, record in enumerate(real):
        values = results[0]["values"][step]
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm", "router_grad_norm"):
            assert values[key] == record[key], (step, key)
        counts = [[sum(r.counts_LE[layer][e] for r in routing if r.step == step) for e in range(4)] for layer in range(2)]
        assert counts == record["expert_tokens"], step
    recorded = read_routing(sorted((tmp_path / "real" / "routing").glob("routing-rank-*.jsonl")))
    assert sorted(recorded, key=lambda r: (r.rank, r.step)) == sorted(routing, key=lambda r: (r.rank, r.step))
    assert len(recorded) == 2 * 3  # one forward per rank and step; evaluation is not recorded


def test_step_efficiency_makes_the_reference_step_predicted_as_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the step measured at 1.5x what full efficiency predicts, the efficiency is the
    one under which the predicted reference step equals the measured one."""
    import dataclasses

    from parallel.config import ParallelConfig
    from parallel.simulator import calibrate
    from parallel.simulator.predict import predict

    hw = dataclasses.replace(load_hardware(HARDWARE / "this-machine.yaml"), matmul_efficiency=1.0)
    moe = MoEConfig(num_experts=1, top_k=1, normalize_weights=False)
    layout = Layout.build(ParallelConfig(), calibrate.REFERENCE_MODEL, moe, calibrate.REFERENCE_BATCH, None, threads=1)

    def step_seconds(h: Any) -> float:
        return predict(calibrate.REFERENCE_MODEL, moe, layout, h).summary["step_time_s"]

    measured = 1.5 * step_seconds(hw)
    monkeypatch.setattr(calibrate, "_median_time", lambda fn, repeats=7, clock=None: measured)
    efficiency = calibrate.step_efficiency(hw)
    assert 0 < efficiency < 1
    assert step_seconds(dataclasses.replace(hw, matmul_efficiency=efficiency)) == pytest.approx(measured, rel=1e-9)


def test_timed_run_trains_plainly_and_predicts_with_its_routing(tmp_path: Path) -> None:
    """``moe simulate validate``'s step-time check: a plain ``moe train`` run (its own
    process), the step times of its log intervals after the first, and this machine's
    prediction replaying the routing that run recorded."""
    from launch.simulate import timed_run

    overrides = [*SMALL, "data.cache_dir=" + str(ROOT / "data" / "cache")]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    record = timed_run(str(ROOT / "configs" / "tiny.yaml"), overrides, cfg, 6, tmp_path / "run")
    assert len(record["interval_step_s"]) == 5 and all(s > 0 for s in record["interval_step_s"])
    assert min(record["interval_step_s"]) <= record["step_s"] <= max(record["interval_step_s"])
    steps = {json.loads(line)["step"] for line in (tmp_path / "run" / "routing" / "routing-rank-0.jsonl").open()}
    assert steps == set(range(6))
    assert record["step_predicted_s"] > 0
    # The prediction is this machine's, for the run's layout and threads, replaying its routing.
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                          threads=cfg.launch.threads)
    routing = read_routing([tmp_path / "run" / "routing" / "routing-rank-0.jsonl"])
    expected = predict(cfg.model, cfg.moe, layout, load_hardware(HARDWARE / "this-machine.yaml"), "megatron", routing)
    assert record["step_predicted_s"] == expected.summary["step_time_s"]
