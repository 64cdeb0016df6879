"""The GPU cluster model's pieces (parallel/simulator/cluster.py) against hand-computed
values, and ``moe simulate plan`` (parallel/simulator/plan.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from launch.config import load_config
from moe.config import ConfigError
from parallel.simulator.cluster import (
    CROSS_ENTROPY_BYTES, CROSS_ENTROPY_PEAK_BYTES, ClusterLayout, all_to_all_time, dp_group, edp_group, ep_group, gemm_time, group_split,
    in_flight, layout_problem, paired_share, predict_cluster, remote_node_share, rows_per_rank, stage_layers,
    stage_memory, stage_micro_time, stage_param_counts, tp_group,
)
from parallel.simulator.hardware import load_hardware, parse_hardware
from parallel.simulator.plan import plan

ROOT = Path(__file__).resolve().parent.parent
H100 = load_hardware(ROOT / "configs" / "hardware" / "h100-ib.yaml")
QWEN = load_config(ROOT / "configs" / "qwen3-235b-a22b.yaml")
SMALL = load_config(ROOT / "configs" / "qwen3-30b-a3b.yaml")


def test_placement_follows_megatron_core_order() -> None:
    """tp innermost, then dp (dense) / ep then edp (experts), pp outermost: with tp=2 ep=32
    the EP group is 32 consecutive ranks over 4 nodes, the DP group strides by tp."""
    layout = ClusterLayout(tp=2, pp=8, ep=32, dp=16)
    assert tp_group(layout) == [0, 1]
    assert ep_group(layout) == list(range(32))
    assert dp_group(layout) == list(range(0, 32, 2))
    assert edp_group(layout) == [0]
    assert group_split(H100, ep_group(layout)) == (7, 24)  # same node, other nodes
    assert group_split(H100, tp_group(layout)) == (1, 0)
    assert group_split(H100, ep_group(ClusterLayout(tp=4, ep=8, dp=8))) == (7, 0)  # ep=8 with tp=4: one node


def test_deepep_sends_a_token_once_per_node() -> None:
    """128 experts over 4 nodes (32 each), top-8: a node is missed with probability
    C(96, 8) / C(128, 8); of 8 rows a token sends, 3·(1 − that)/8 cross to other nodes
    instead of the 24/32 an all-to-all sends."""
    members = list(range(32))
    expected = 3 * (1 - math.comb(96, 8) / math.comb(128, 8)) / 8
    assert remote_node_share(H100, QWEN.moe, members) == pytest.approx(expected)
    assert expected < 24 / 32
    deepep, nccl = H100.dispatchers["deepep"], H100.dispatchers["alltoall"]
    plain = dataclasses.replace(deepep, node_dedup=False)
    n_bytes = 1e8
    assert all_to_all_time(H100, plain, QWEN.moe, members, n_bytes) == pytest.approx(
        max(n_bytes * 7 / 32 / deepep.intra_node_bandwidth, n_bytes * 24 / 32 / deepep.inter_node_bandwidth) + deepep.latency_s)
    assert all_to_all_time(H100, deepep, QWEN.moe, members, n_bytes) < all_to_all_time(H100, plain, QWEN.moe, members, n_bytes)
    within = list(range(8))  # one node: NVLink only
    assert all_to_all_time(H100, nccl, QWEN.moe, within, n_bytes) == pytest.approx(
        n_bytes * 7 / 8 / nccl.intra_node_bandwidth + nccl.latency_s)


def test_small_gemms_are_memory_bound() -> None:
    """The roofline: a 4096³ GEMM runs at the matmul rate, a 64-row one at the memory rate."""
    rate = H100.peak_flops["bfloat16"] * H100.matmul_efficiency
    assert gemm_time(H100, 4096, 4096, 4096) == pytest.approx(2 * 4096**3 / rate)
    small = gemm_time(H100, 64, 3072, 4096)
    assert small == pytest.approx(2 * (64 * 4096 + 4096 * 3072 + 64 * 3072) / (H100.memory_bandwidth * H100.memory_efficiency))
    assert 2 * 64 * 3072 * 4096 / small < 0.3 * rate


def test_stage_split_and_interleaved_in_flight() -> None:
    """94 layers + embedding + loss over 32 chunks of 3 slots (megatron's account_for_*):
    the first stage's first chunk holds the embedding and 2 layers; megatron's interleaved
    warm-up keeps 2(p − s − 1) + (v − 1)p + 1 chunks in flight."""
    layout = ClusterLayout(tp=2, pp=8, vpp=4, ep=32, dp=16, global_batch=2048, embedding_loss_slots=True)
    assert stage_layers(QWEN.model, layout, 0) == [0, 1, 23, 24, 25, 47, 48, 49, 71, 72, 73]
    assert stage_layers(QWEN.model, layout, 7)[-2:] == [92, 93]
    assert sum(len(stage_layers(QWEN.model, layout, s)) for s in range(8)) == 94
    assert in_flight(layout, 0) == (2 * 7 + 3 * 8 + 1, True)
    assert in_flight(layout, 7) == (3 * 8 + 1, True)
    assert in_flight(dataclasses.replace(layout, vpp=1, embedding_loss_slots=False), 2) == (6, False)


def test_memory_states_follow_the_distributed_optimizer() -> None:
    """bf16 parameters 2 B, fp32 gradients 4 B, fp32 main copy and Adam 12 B over dp (dense)
    and edp (experts); full recomputation keeps a block's input only; fragmentation is its
    own line, a share of activations + transient."""
    layout = ClusterLayout(tp=1, pp=1, ep=8, dp=8, global_batch=8, seq_len=SMALL.model.seq_len)
    mem = stage_memory(SMALL.model, SMALL.moe, layout, H100, 0)
    total = mem.params / 2
    assert mem.grads == pytest.approx(4 * total)
    assert mem.fragmentation == pytest.approx(H100.fragmentation * (mem.activations + mem.transient))
    full = stage_memory(SMALL.model, SMALL.moe, dataclasses.replace(layout, recompute="full"), H100, 0)
    assert full.activations == pytest.approx(2 * SMALL.model.seq_len * SMALL.model.dim * SMALL.model.n_layers)
    assert full.activations < stage_memory(SMALL.model, SMALL.moe, dataclasses.replace(layout, recompute="selective"),
                                           H100, 0).activations < mem.activations


def test_overlap_and_recompute_move_step_time_the_right_way() -> None:
    base = ClusterLayout(tp=2, pp=8, vpp=4, ep=32, dp=16, global_batch=2048, recompute="selective",
                         dispatcher="deepep", embedding_loss_slots=True)
    step = {name: predict_cluster(QWEN.model, QWEN.moe, layout, H100).step_time_s for name, layout in {
        "base": base, "overlap": dataclasses.replace(base, overlap_moe_a2a=True),
        "full": dataclasses.replace(base, recompute="full"), "nccl": dataclasses.replace(base, dispatcher="alltoall")}.items()}
    assert step["overlap"] < step["base"] < step["full"]
    assert step["base"] < step["nccl"]  # DeepEP's node dedup and bandwidth beat NCCL's all-to-all across 4 nodes


def test_host_bound_moe_forward_idles_for_what_the_gpu_does_not_cover() -> None:
    """Per MoE layer forward the GPU idles ``max(0, host_s − G)``: nothing when host_s is 0 or
    below the layer's GPU time, and one extra second per extra host second beyond it."""
    layout = ClusterLayout(tp=4, pp=8, vpp=4, ep=8, dp=8, global_batch=2048, dispatcher="deepep", embedding_loss_slots=True)
    moe_layers = sum(QWEN.model.is_moe_layer(i) for i in stage_layers(QWEN.model, layout, 0))

    def idle(host_s: float) -> float:
        profile = dataclasses.replace(H100.dispatchers["deepep"], host_s=host_s)
        return stage_micro_time(QWEN.model, QWEN.moe, layout, H100, profile, 0).ep_comm
    assert idle(1e-6) == idle(0.0)  # a host faster than the GPU costs nothing
    assert idle(1.0) - idle(0.5) == pytest.approx(0.5 * moe_layers)
    long = dataclasses.replace(layout, seq_len=16384, global_batch=256)
    profile = H100.dispatchers["deepep"]
    assert stage_micro_time(QWEN.model, QWEN.moe, long, H100, dataclasses.replace(profile, host_s=0.0), 0).ep_comm \
        == pytest.approx(stage_micro_time(QWEN.model, QWEN.moe, long, H100, profile, 0).ep_comm)  # 16k hides 6.1 ms


def test_tp_comm_overlap_and_one_local_expert() -> None:
    """tp_comm_overlap leaves of the TP traffic only what exceeds the TP-region GEMMs (here
    none); a single local expert runs as one plain GEMM, without the grouped GEMM's share."""
    layout = ClusterLayout(tp=2, pp=8, vpp=7, ep=8, dp=8, global_batch=256)
    cfg = load_config(ROOT / "configs" / "mixtral-8x7b.yaml")
    profile = H100.dispatchers["alltoall"]
    plain = stage_micro_time(cfg.model, cfg.moe, layout, H100, profile, 0)
    hidden = stage_micro_time(cfg.model, cfg.moe, dataclasses.replace(layout, tp_comm_overlap=True), H100, profile, 0)
    assert plain.tp_comm > 0 and hidden.tp_comm == 0 and hidden.gemm == plain.gemm
    T, D, F = layout.tokens / layout.tp * cfg.moe.top_k, cfg.model.dim, cfg.moe.expert_ffn_dim
    layers = len(stage_layers(cfg.model, layout, 0))
    assert plain.grouped_gemm == pytest.approx(3 * layers * (gemm_time(H100, T, 2 * F, D) + gemm_time(H100, T, D, F)))


@pytest.fixture(scope="module")
def qwen_plan() -> object:
    return plan(QWEN.model, QWEN.moe, H100, 256, 2048)


def test_plan_ranks_the_published_layouts(qwen_plan: object) -> None:
    """The published 256-H100 Qwen3-235B layouts (tests/test_simulate_published.py) are among
    the layouts plan considers and keeps, at the rank their predicted step time gives."""
    from test_simulate_published import RUNS

    ranked = qwen_plan.ranked  # type: ignore[attr-defined]
    layouts = [p.layout for p in ranked]
    times = [p.step_time_s for p in ranked]
    assert times == sorted(times)
    for run in RUNS:
        if run.model == "qwen3-235b-a22b" and run.layout["global_batch"] == 2048:
            assert run.cluster_layout() in layouts, run.name


def test_plan_json_and_table(tmp_path: Path) -> None:
    from launch.simulate import main

    out = tmp_path / "plan.json"
    args = ["plan", str(ROOT / "configs" / "qwen3-30b-a3b.yaml"), "--gpus", "16", "--top", "3", "--json", str(out)]
    assert main(args) == 0
    ranked = json.loads(out.read_text())["plan"]["layouts"]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert all(r["peak_memory_bytes"] <= H100.memory_capacity for r in ranked)
    assert main(args) == 0  # its own file may be replaced
    other = tmp_path / "mine.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="exists and was not written by `moe simulate plan`"):
        main([*args[:-1], str(other)])


def test_plan_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="--gpus 255: no layout of this model uses 255 GPUs"):
        plan(QWEN.model, QWEN.moe, H100, 255, 2048)
    with pytest.raises(ConfigError, match="--gpus 512: cluster 'h100-ib' has 32 x 8 = 256 GPUs"):
        plan(QWEN.model, QWEN.moe, H100, 512, 2048)
    with pytest.raises(ConfigError, match=r"dispatcher 'hybridep' is not a profile of hardware 'h100-ib'; known: \['alltoall', 'deepep'\]"):
        plan(QWEN.model, QWEN.moe, H100, 256, 2048, "hybridep")
    no_profiles = dataclasses.replace(H100, dispatchers={})
    with pytest.raises(ConfigError, match="missing field 'dispatchers'"):
        plan(QWEN.model, QWEN.moe, no_profiles, 256, 2048)
    with pytest.raises(ConfigError, match="missing field 'memory_efficiency'"):
        predict_cluster(QWEN.model, QWEN.moe, ClusterLayout(tp=2, ep=8, dp=4, global_batch=8),
                        dataclasses.replace(H100, memory_efficiency=0.0))
    with pytest.raises(ConfigError, match="dispatchers.deepep: missing field 'inter_node_bandwidth'"):
        raw = {"name": "x", "kind": "gpu", "nodes": 1, "devices_per_node": 8, "peak_flops": {"bfloat16": 1e15, "float32": 1e14},
               "matmul_efficiency": 0.7, "memory_bandwidth": 3e12, "memory_capacity": 8e10, "op_overhead_s": 0,
               "intra_node": {"bandwidth": 4e11, "latency_s": 0}, "inter_node": {"bandwidth": 5e10, "latency_s": 0},
               "dispatchers": {"deepep": {"intra_node_bandwidth": 3e11, "latency_s": 0}}}
        parse_hardware(raw, "x.yaml")


def test_routing_variants_count_the_layer_as_built() -> None:
    """Fine-grained experts (G = 2) are counted as built: 2E experts of width F/2, 2K per
    token (twice the rows, the same expert parameters, a router of 2E·D, and ep may divide
    2E); noisy top-k's router is 2E·D (W_g and W_noise); expert choice computes C·E/G rows per
    token (each expert takes C = ceil(cf·G·K/E) tokens of a group of G; cf·K when whole)."""
    layout = ClusterLayout(tp=2, pp=1, ep=8, dp=8, global_batch=64)
    moe, D, E = QWEN.moe, QWEN.model.dim, QWEN.moe.num_experts
    fine = dataclasses.replace(moe, granularity=2)
    noisy = dataclasses.replace(moe, router="noisy_topk")
    choice = dataclasses.replace(moe, router="expert_choice", capacity_factor=2.0, aux_loss_coeff=0.0)
    tokens = layout.tokens / layout.tp
    assert rows_per_rank(moe, layout) == tokens * 8
    assert rows_per_rank(fine, layout) == tokens * 16
    assert rows_per_rank(choice, layout) == tokens * 8 * 2.0
    # Where cf·G·K/E is not whole, each expert takes C = ceil(...) tokens of a sequence of G:
    # 100-token sequences, cf 1: C = ceil(100·8/128) = 7, so 7·128/100 rows per token, not cf·K = 8.
    short, one = dataclasses.replace(layout, seq_len=100), dataclasses.replace(choice, capacity_factor=1.0)
    assert rows_per_rank(one, short) == pytest.approx(short.tokens / short.tp * 7 * 128 / 100)
    (dense, expert), (fine_dense, fine_expert) = (stage_param_counts(QWEN.model, m, layout, 0) for m in (moe, fine))
    layers = QWEN.model.n_layers
    assert fine_expert == pytest.approx(expert)
    assert fine_dense - dense == pytest.approx(layers * E * D)  # the router grows to 2E·D
    assert stage_param_counts(QWEN.model, noisy, layout, 0)[0] - dense == pytest.approx(layers * E * D)
    wide = ClusterLayout(tp=2, pp=1, ep=256, dp=128, global_batch=256)
    assert "must divide the 128 experts" in (layout_problem(QWEN.model, moe, wide) or "")
    assert layout_problem(QWEN.model, fine, wide) is None
    profile = H100.dispatchers["alltoall"]
    one = dataclasses.replace(QWEN.model, n_layers=1)
    grouped = stage_micro_time(one, fine, layout, H100, profile, 0).grouped_gemm
    rows, local, f = tokens * 16 / (2 * E / 8), 2 * E // 8, moe.expert_ffn_dim // 2
    share = H100.kernel_efficiency["grouped_mm"]
    assert grouped == pytest.approx(3 * local * (gemm_time(H100, rows, 2 * f, D, share) + gemm_time(H100, rows, D, f, share)))


class _ByteCount(TorchDispatchMode):
    """Bytes the aten ops read (their tensor arguments) and write (their results) of tensors
    with ``numel`` elements; ops that move no data or touch one element per row (views, the
    target gather and its scatter) are not counted."""

    NO_DATA = {"view", "_unsafe_view", "alias", "unsqueeze", "expand", "as_strided", "detach", "index", "index_put_"}

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.bytes = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket.__name__ not in self.NO_DATA:
            reads = tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
            for t in reads + tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                    self.bytes += t.numel() * t.element_size()
        return out


def _one_rank_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """megatron-core's vocab-parallel cross-entropy module, run as one TP rank without a group."""
    import megatron.core.tensor_parallel.cross_entropy as ce
    monkeypatch.setattr(ce, "get_tensor_model_parallel_group", lambda: None)
    monkeypatch.setattr(ce, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(ce, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *args, **kwargs: None)
    return ce


def test_cross_entropy_bytes_are_megatron_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """CROSS_ENTROPY_BYTES["unfused"] is what megatron-core's vocab-parallel cross-entropy
    (forward and backward through autograd, one TP rank) moves per bf16 logit, counted op by
    op; the last stage adds the bytes of the layout's implementation over an identical stage
    (the fused ones are read off their kernels, not measured here); an unknown one is refused."""
    ce = _one_rank_cross_entropy(monkeypatch)
    S, V = 64, 1000
    logits = torch.randn(S, 1, V, dtype=torch.bfloat16, requires_grad=True)
    with _ByteCount(S * V) as count:
        ce.vocab_parallel_cross_entropy(logits, torch.randint(0, V, (S, 1))).sum().backward()
    assert count.bytes == CROSS_ENTROPY_BYTES["unfused"] * S * V

    two = dataclasses.replace(QWEN.model, n_layers=2)
    layout = ClusterLayout(tp=2, pp=2, ep=8, dp=4, global_batch=64)
    first, last = (stage_micro_time(two, QWEN.moe, layout, H100, H100.dispatchers["alltoall"], s) for s in (0, 1))
    rate = H100.memory_bandwidth * H100.memory_efficiency
    logits = layout.tokens * two.vocab_size / layout.tp
    assert last.elementwise - first.elementwise == pytest.approx(CROSS_ENTROPY_BYTES["unfused"] * logits / rate)
    for impl in ("native", "te"):
        fused_layout = dataclasses.replace(layout, cross_entropy=impl)  # type: ignore[arg-type]
        fused = stage_micro_time(two, QWEN.moe, fused_layout, H100, H100.dispatchers["alltoall"], 1)
        assert last.elementwise - fused.elementwise == pytest.approx(
            (CROSS_ENTROPY_BYTES["unfused"] - CROSS_ENTROPY_BYTES[impl]) * logits / rate)
    unknown = dataclasses.replace(layout, cross_entropy="fused")  # type: ignore[arg-type]
    assert "cross_entropy='fused' is not one of" in (layout_problem(two, QWEN.moe, unknown) or "")


def test_all_to_all_overlap_pairs_the_steady_state_only() -> None:
    """Combined 1F1B runs the warm-up forwards (interleaved: 2(p − s − 1) + (v − 1)p + 1 chunk
    steps of m·v) and as many cool-down backwards alone; without PP the first and last of m."""
    layout = ClusterLayout(tp=2, pp=8, vpp=4, ep=32, dp=16, global_batch=2048, overlap_moe_a2a=True)
    steps = layout.micro_batches * layout.vpp
    assert paired_share(layout, 0) == pytest.approx(1 - (14 + 24 + 1) / steps)
    assert paired_share(layout, 7) == pytest.approx(1 - (24 + 1) / steps)
    flat = ClusterLayout(tp=2, pp=1, ep=8, dp=128, global_batch=2048)
    assert paired_share(flat, 0) == pytest.approx(1 - 1 / 16)
    st = stage_micro_time(QWEN.model, QWEN.moe, layout, H100, H100.dispatchers["deepep"], 0)
    share = H100.dispatchers["deepep"].compute_share
    alone, paired = dataclasses.replace(st, paired=0.0), dataclasses.replace(st, paired=1.0)
    assert alone.exposed_ep(share) == st.ep_comm
    assert st.exposed_ep(share) == pytest.approx(
        st.paired * paired.exposed_ep(share) + (1 - st.paired) * st.ep_comm)


class _LivePeak(TorchDispatchMode):
    """The most bytes held at once by tensors of ``numel`` elements the aten ops create
    (each storage counted until it is freed)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.live, self.now, self.peak = numel, {}, 0, 0  # type: ignore[var-annotated]

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, storage.data_ptr())
        return out


def test_cross_entropy_peak_is_megatron_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last stage's transient is the logits megatron-core's unfused cross-entropy holds at
    its peak (the head's bf16 logits and their fp32 copy; the fp32 softmax and the bf16
    gradient), measured through forward and backward: 6 bytes per logit."""
    ce = _one_rank_cross_entropy(monkeypatch)
    S, V = 64, 1000
    hidden = torch.randn(S, 1, V, dtype=torch.bfloat16, requires_grad=True)
    with _LivePeak(S * V) as live:
        logits = hidden * 1.0  # the head's bf16 output, made inside the count
        loss = ce.vocab_parallel_cross_entropy(logits, torch.randint(0, V, (S, 1)))
        del logits
        loss.sum().backward()
    assert live.peak == CROSS_ENTROPY_PEAK_BYTES["unfused"] * S * V
    layout = ClusterLayout(tp=2, pp=2, ep=8, dp=4, global_batch=64)
    for impl in CROSS_ENTROPY_PEAK_BYTES:
        mem = stage_memory(QWEN.model, QWEN.moe, dataclasses.replace(layout, cross_entropy=impl), H100, 1)  # type: ignore[arg-type]
        assert mem.transient == CROSS_ENTROPY_PEAK_BYTES[impl] * layout.tokens * QWEN.model.vocab_size / layout.tp
