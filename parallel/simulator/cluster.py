"""The GPU cluster model: step time and memory of a megatron-core bf16 MoE run on a cluster.

``predict.py`` predicts *this* trainer (its tensors, its collectives) and is exact on a CPU.
This module predicts what a megatron-core run of the same model on a GPU cluster takes:
the kernels such a run launches (cuBLAS/grouped GEMMs, fused flash attention, fused
elementwise kernels), its rank placement and its overlap options. It is what
``moe simulate plan`` ranks layouts with, and what ``tests/test_simulate_published.py``
holds against published runs.

Legend: T tokens of a micro-batch (b·S), Tn = T/tp tokens a rank holds between TP regions
(sequence parallelism), D model dim, q = H·Dh query width, kv = G·Dh, E experts, El = E/ep
local experts, K experts per token, F expert hidden (Fin = 2F for SwiGLU), R rows a rank's
experts compute per micro-batch (uniform routing: Tn·K·etp; expert choice: Tn·cf·K·etp), V
vocab, L layers, p pipeline stages, v virtual stages (chunks per stage), m micro-batches per
step and DP rank. E, K, F are those of the layer as built (``MoEConfig.fine_grained``: E·G
experts of width F/G, K·G per token); the router GEMM is D x E (D x 2E for noisy top-k).

**Placement** (megatron-core ``RankGenerator``, order ``tp-cp-ep-dp-pp``; cp = 1): dense
ranks ``r = tp_rank + tp·(dp_rank + dp·pp_rank)``; expert ranks
``r = etp_rank + etp·(ep_rank + ep·(edp_rank + edp·pp_rank))``. A group's members are the
ranks that differ in one coordinate; node ``r // devices_per_node``. Each collective's
bytes split into the share its peers on the same node carry (NVLink) and the share that
crosses nodes (one NIC per GPU).

**Compute** per micro-batch and pipeline stage, forward; the backward runs twice the GEMM
FLOPs (data and weight gradients) and ``ATTENTION_BACKWARD`` times the attention's:
- GEMM ``(m, n, k)`` (roofline): ``max(2mnk / (peak·e), 2(mk + kn + mn) / (bw·e_mem))``,
  ``e`` = ``matmul_efficiency`` (a large GEMM's share of peak), times
  ``kernel_efficiency.grouped_mm`` for the experts' grouped GEMM (El > 1; one local expert is
  one plain GEMM), whose per-expert
  ``m = R/El`` is what makes small experts memory-bound;
- attention: flash attention, causal ``2·T·S·q/tp`` FLOPs forward at
  ``peak · kernel_efficiency.attention``; its scores never reach memory;
- elementwise (norms, RoPE, residual adds, SwiGLU, permute/unpermute) at
  ``memory_bandwidth · memory_efficiency`` (``elementwise_bytes``);
- the loss on the last stage: the LM head's GEMMs and megatron's vocab-parallel
  cross-entropy, ``CROSS_ENTROPY_BYTES[layout.cross_entropy] · T·V/tp`` bytes at that rate;
- ``op_overhead_s`` per kernel (``KERNELS_*``).
Recompute: ``full`` runs each block's forward again in the backward; ``selective``
(megatron's ``--recompute-modules layernorm moe_act``, this trainer's ``selective``) reruns
the norms and the activation function; ``moe`` (``--recompute-modules layernorm moe``) the
norms and each MoE block's forward, its all-to-alls included.

**Communication**: TP (sequence parallel) all-gathers and reduce-scatters the ``T·D·2``-byte
activation (``Tn·D·2`` per rank) twice per attention (and dense MLP) forward and backward,
ring over the TP group (with ``tp_comm_overlap``, TE's userbuffers pipeline each with its
GEMM: only what exceeds the layer's TP-region GEMMs is exposed);
the EP dispatcher moves ``R·D·2`` bytes of rows per rank 4 times per MoE layer (dispatch,
combine; forward, backward), the same-node share over NVLink and the other-node share
across nodes, both in flight at once (``max``), at the dispatcher profile's bandwidths plus
its latency (``all_to_all_time``; a DeepEP-class profile sends a token once per node,
``remote_node_share``). **Host-bound MoE forward**: each forward (and recomputed) dispatch
waits on the host for the token counts (a device-to-host sync that drains the GPU's queue);
the host then needs the profile's ``host_s`` to launch the layer up to the next sync, so the
GPU idles ``max(0, host_s − G)``, ``G`` the GPU time of that layer's forward (attention,
router, experts, both all-to-alls, elementwise, launches): a short layer (few tokens per
rank) is host-bound, a long one hides the host. PP sends ``Tn·D·2`` per chunk boundary
per micro-batch each way (the interleaved schedule overlaps it with compute, leaving the
latency); DP reduce-scatters the fp32 gradient buffers over ``dp`` (dense) and ``edp``
(experts) and all-gathers the bf16 parameters, ring over the group's link; with
``overlap_grad_reduce`` the reduce-scatter hides behind the last micro-batch's backward,
with ``overlap_param_gather`` the all-gather behind the first micro-batch's forward (only
what exceeds it is exposed). ``overlap_moe_a2a`` (megatron-core's
``overlap_moe_expert_parallel_comm``, interleaved 1F1B or no PP) pairs each all-to-all with
another micro-batch's attention or MLP (``StageTime.exposed_ep``) in the schedule's steady
state only: the warm-up forwards and cool-down backwards run alone (``paired_share``).

**Step**: ``m · t_micro`` of the slowest stage, the bubble ``(p−1)·t_micro`` (1F1B) or
``(p−1)·t_micro / v`` (interleaved), the exposed DP time and the optimizer (memory-bound
over the shard: ``OPTIMIZER_BYTES`` per shard element, ``6`` per local element).

**Memory** per rank of stage s (bf16 run, megatron's distributed optimizer): bf16
parameters ``2Ψ``, fp32 gradient buffers ``4Ψ`` (``grad_reduce_in_fp32``), fp32 main
parameters and Adam moments ``12Ψ_dense/dp + 12Ψ_expert/edp``; activations
(``layer_activation_bytes``) times the micro-batches in flight: ``p − s`` (1F1B) or
``min(m·v, 2(p − s − 1) + (v − 1)p + 1)`` chunks (interleaved: megatron's warm-up plus
one); the loss's logits at its peak on the last stage (transient, ``CROSS_ENTROPY_PEAK_BYTES``); the
device's reserved bytes (CUDA context, NCCL/dispatcher buffers, cuBLAS workspaces); and the
caching allocator's fragmentation as its own line: ``fragmentation · (activations +
transient)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from moe.accounting import attention_width, experts_per_token, train_flops_per_token
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.mlp import input_width
from parallel.simulator.hardware import Dispatcher, Hardware

Recompute = Literal["none", "selective", "moe", "full"]
RECOMPUTE_MODES = ("none", "selective", "moe", "full")
BF16 = 2  # bytes per bf16 element
ATTENTION_BACKWARD = 2.5  # flash attention's backward: 5 GEMM-like passes to the forward's 2 (Dao 2023)
CrossEntropy = Literal["unfused", "native", "te"]
# Bytes megatron-core's vocab-parallel cross-entropy moves per bf16 logit of a rank, forward and
# backward, by implementation:
# - unfused (tensor_parallel/cross_entropy.py, the default): the fp32 copy of the logits (read 2,
#   write 4), the max (read 4), the in-place subtraction (8), exp (8), the sum (read 4), the
#   in-place division (8); backward, the in-place multiplication by the loss gradient (8) and
#   autograd's cast of the fp32 gradient to bf16 (read 4, write 2);
# - native (--cross-entropy-loss-fusion --cross-entropy-fusion-impl native,
#   fusions/fused_cross_entropy.py): each torch.compile'd step one pass over its operands, a
#   mutated input written back: the fp32 copy and its max (6), subtract-exp-sum in place (8), the
#   division in place (8), the backward's in-place multiplication and bf16 cast (read 4, write 6);
# - te (--cross-entropy-fusion-impl te, TransformerEngine's Triton kernels,
#   transformer_engine/pytorch/triton/cross_entropy.py): the online-softmax pass reads the bf16
#   logits (2), the backward kernel reads them and writes the gradient in place (4).
CROSS_ENTROPY_BYTES: dict[str, int] = {"unfused": 6 + 4 + 8 + 8 + 4 + 8 + 8 + 6, "native": 6 + 8 + 8 + 10, "te": 2 + 4}
# Bytes per logit live at the loss's peak: unfused and native hold the bf16 logits and their fp32
# copy in the forward, the fp32 softmax and the bf16 gradient cast from it in the backward (6);
# TransformerEngine's kernels keep the bf16 logits and write the gradient into them (2).
CROSS_ENTROPY_PEAK_BYTES: dict[str, int] = {"unfused": 2 + 4, "native": 2 + 4, "te": 2}
OPTIMIZER_BYTES = 30  # per shard element: fp32 main param, exp_avg, exp_avg_sq read+write (24), fp32 grad read (4), bf16 param write (2)
# Kernels per layer, forward (fused TE/megatron kernels: norm, qkv, RoPE, attention, out
# proj, residual; router, top-k, permute, dispatch, grouped GEMMs, act, combine, unpermute);
# the backward launches about twice as many.
KERNELS_ATTENTION = 10
KERNELS_MOE = 20
KERNELS_DENSE_MLP = 6


@dataclass(frozen=True)
class ClusterLayout:
    """A megatron-core layout on a GPU cluster: degrees, batch split, recompute, dispatcher
    and overlap options (megatron-core's names in the field comments)."""

    tp: int = 1  # tensor_model_parallel_size (with sequence parallelism when > 1)
    pp: int = 1  # pipeline_model_parallel_size
    vpp: int = 1  # virtual_pipeline_model_parallel_size (chunks per stage)
    ep: int = 1  # expert_model_parallel_size
    etp: int = 1  # expert_tensor_parallel_size
    dp: int = 1  # data-parallel size of the dense layers: world / (tp·pp)
    micro_batch: int = 1  # micro_batch_size
    global_batch: int = 1  # global_batch_size
    seq_len: int = 4096
    recompute: Recompute = "none"
    dispatcher: str = "alltoall"  # moe_token_dispatcher_type alltoall | flex (DeepEP): a profile in the hardware file
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    overlap_moe_a2a: bool = False  # overlap_moe_expert_parallel_comm
    tp_comm_overlap: bool = False  # tp_comm_overlap (TE userbuffers: TP all-gathers/reduce-scatters pipelined with their GEMMs)
    embedding_loss_slots: bool = False  # account_for_embedding_in_pipeline_split and account_for_loss_in_pipeline_split
    cross_entropy: CrossEntropy = "unfused"  # cross_entropy_loss_fusion off | on with cross_entropy_fusion_impl native | te

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: the dense ``tp·dp`` ranks of a stage regrouped as ``etp·ep·edp``."""
        return self.tp * self.dp // (self.ep * self.etp)

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def tokens(self) -> int:
        """T: tokens of one micro-batch."""
        return self.micro_batch * self.seq_len

    def describe(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"] + ([f"vpp={self.vpp}"] if self.vpp > 1 else [])
        parts += [f"ep={self.ep}"] + ([f"etp={self.etp}"] if self.etp > 1 else []) + [f"dp={self.dp}"]
        parts += [f"mbs={self.micro_batch}", f"recompute={self.recompute}", f"dispatcher={self.dispatcher}"]
        parts += ["a2a-overlap"] if self.overlap_moe_a2a else []
        parts += ["tp-overlap"] if self.tp_comm_overlap else []
        return " ".join(parts + ([f"ce-{self.cross_entropy}"] if self.cross_entropy != "unfused" else []))


def layout_problem(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, gpus: int | None = None) -> str | None:
    """Why megatron-core would refuse ``layout`` for this model (None when it would not)."""
    t, moe = layout, moe.fine_grained()
    checks = [
        (gpus is None or t.world_size == gpus, f"tp·pp·dp = {t.world_size} is not the {gpus} GPUs"),
        (model.n_heads % t.tp == 0 and model.kv_heads % t.tp == 0,
         f"tp={t.tp} must divide the {model.n_heads} query and {model.kv_heads} key/value heads"),
        (t.vpp == 1 or t.pp > 1, f"vpp={t.vpp} needs pp > 1"),
        (pipeline_slots(model, t) >= t.pp * t.vpp,
         f"{model.n_layers} layers cannot fill pp·vpp = {t.pp * t.vpp} chunks (megatron's "
         "account_for_embedding/loss_in_pipeline_split count 2 more)"),
        (moe.num_experts % t.ep == 0, f"ep={t.ep} must divide the {moe.num_experts} experts (as built: E·G)"),
        ((t.tp * t.dp) % (t.ep * t.etp) == 0, f"ep·etp = {t.ep * t.etp} must divide tp·dp = {t.tp * t.dp}"),
        (moe.expert_ffn_dim % t.etp == 0, f"etp={t.etp} must divide the experts' width {moe.expert_ffn_dim} (as built: F/G)"),
        (t.global_batch % (t.micro_batch * t.dp) == 0,
         f"the global batch {t.global_batch} is not a multiple of micro-batch x dp = {t.micro_batch * t.dp}"),
        (t.vpp == 1 or t.micro_batches % t.pp == 0,
         f"the interleaved schedule needs the {t.micro_batches} micro-batches to be a multiple of pp={t.pp}"),
        (t.tokens % t.tp == 0, f"tp={t.tp} must divide the micro-batch's {t.tokens} tokens (sequence parallelism)"),
        (t.recompute in RECOMPUTE_MODES, f"recompute={t.recompute!r} is not one of {list(RECOMPUTE_MODES)}"),
        (t.cross_entropy in CROSS_ENTROPY_BYTES,
         f"cross_entropy={t.cross_entropy!r} is not one of {list(CROSS_ENTROPY_BYTES)}"),
    ]
    return next((why for ok, why in checks if not ok), None)


def require_cluster_fields(hw: Hardware, layout: ClusterLayout) -> Dispatcher:
    """The hardware fields the cluster model needs; one ``ConfigError`` naming the missing one."""
    if hw.kind != "gpu":
        raise ConfigError(f"hardware '{hw.name}' is kind {hw.kind}; the cluster model predicts GPU clusters "
                          "(pass --cluster configs/hardware/h100-ib.yaml or another kind: gpu file)")
    for key in ("memory_efficiency", "reserved_bytes"):
        if not getattr(hw, key):
            raise ConfigError(f"hardware '{hw.name}': missing field '{key}' that the cluster model needs "
                              "(see configs/hardware/h100-ib.yaml)")
    if "bfloat16" not in hw.peak_flops:
        raise ConfigError(f"hardware '{hw.name}': peak_flops has no bfloat16 rate; the cluster model predicts bf16 runs")
    if not hw.dispatchers:
        raise ConfigError(f"hardware '{hw.name}': missing field 'dispatchers' (the all-to-all profiles) that the "
                          "cluster model needs (see configs/hardware/h100-ib.yaml)")
    if layout.dispatcher not in hw.dispatchers:
        raise ConfigError(f"dispatcher '{layout.dispatcher}' is not a profile of hardware '{hw.name}'; "
                          f"known: {sorted(hw.dispatchers)} (add it under 'dispatchers' in the hardware file)")
    return hw.dispatchers[layout.dispatcher]


# -- placement ----------------------------------------------------------------------

def dense_rank(layout: ClusterLayout, tp: int, dp: int, pp: int) -> int:
    """Global rank of dense coordinates (megatron-core order tp-cp-ep-dp-pp, cp = 1)."""
    return tp + layout.tp * (dp + layout.dp * pp)


def expert_rank(layout: ClusterLayout, etp: int, ep: int, edp: int, pp: int) -> int:
    """Global rank of expert coordinates (the expert generator's etp-ep-edp-pp)."""
    return etp + layout.etp * (ep + layout.ep * (edp + layout.edp * pp))


def group_split(hw: Hardware, members: list[int]) -> tuple[int, int]:
    """(peers on the first member's node, peers on other nodes) of a group."""
    node = members[0] // hw.devices_per_node
    same = sum(1 for r in members[1:] if r // hw.devices_per_node == node)
    return same, len(members) - 1 - same


def tp_group(layout: ClusterLayout) -> list[int]:
    return [dense_rank(layout, i, 0, 0) for i in range(layout.tp)]


def dp_group(layout: ClusterLayout) -> list[int]:
    return [dense_rank(layout, 0, i, 0) for i in range(layout.dp)]


def ep_group(layout: ClusterLayout) -> list[int]:
    return [expert_rank(layout, 0, i, 0, 0) for i in range(layout.ep)]


def edp_group(layout: ClusterLayout) -> list[int]:
    return [expert_rank(layout, 0, 0, i, 0) for i in range(layout.edp)]


def ring_time(hw: Hardware, members: list[int], n_bytes: float, efficiency: float = 1.0) -> float:
    """Reduce-scatter or all-gather of an ``n_bytes`` buffer over ``members`` (ring): each rank
    moves ``(n−1)/n`` of it over the slowest link the ring crosses (a ring that spans nodes
    is limited by each GPU's NIC), and ``n − 1`` steps of latency."""
    n = len(members)
    if n <= 1:
        return 0.0
    link = hw.inter_node if group_split(hw, members)[1] else hw.intra_node
    return (n - 1) * link.latency_s + (n - 1) / n * n_bytes / (link.bandwidth * efficiency)


def remote_node_share(hw: Hardware, moe: MoEConfig, members: list[int]) -> float:
    """Of the K rows a token sends, the expected number of distinct *other nodes* they go to,
    over K: a DeepEP-class dispatcher sends a token once per destination node over the
    inter-node fabric and forwards it over NVLink there. The group's E experts sit evenly on
    its nodes (``e`` per node); a node is hit unless all K picks miss it:
    ``(nodes − 1)·(1 − C(E − e, K) / C(E, K)) / K``."""
    moe = moe.fine_grained()
    nodes = len({r // hw.devices_per_node for r in members})
    if nodes <= 1:
        return 0.0
    e, E, K = moe.num_experts // nodes, moe.num_experts, moe.top_k
    miss = math.comb(E - e, K) / math.comb(E, K)
    return (nodes - 1) * (1 - miss) / K


def all_to_all_time(hw: Hardware, dispatcher: Dispatcher, moe: MoEConfig, members: list[int], n_bytes: float) -> float:
    """One all-to-all in which every rank sends ``n_bytes`` of rows spread evenly over the
    group (its own share stays): the NVLink share and the inter-node share move at once,
    each at the dispatcher profile's bandwidth, plus its per-call latency. With
    ``node_dedup`` the inter-node share is the distinct nodes' (``remote_node_share``)."""
    n = len(members)
    if n <= 1:
        return 0.0
    same, other = group_split(hw, members)
    inter_share = remote_node_share(hw, moe, members) if dispatcher.node_dedup else other / n
    intra = n_bytes * same / n / dispatcher.intra_node_bandwidth
    inter = n_bytes * inter_share / dispatcher.inter_node_bandwidth
    return max(intra, inter) + dispatcher.latency_s


# -- compute ------------------------------------------------------------------------

def gemm_time(hw: Hardware, m: float, n: float, k: float, share: float = 1.0) -> float:
    """A bf16 GEMM ``(m x k) @ (k x n)`` under the roofline: its FLOPs at ``matmul_efficiency
    · share`` of the peak, or its operands' bytes at the achievable memory bandwidth,
    whichever takes longer."""
    if m <= 0:
        return 0.0
    flops = 2.0 * m * n * k
    n_bytes = BF16 * (m * k + k * n + m * n)
    return max(flops / (hw.peak_flops["bfloat16"] * hw.matmul_efficiency * share),
               n_bytes / (hw.memory_bandwidth * hw.memory_efficiency))


def pipeline_slots(model: ModelConfig, layout: ClusterLayout) -> int:
    """Layers the pipeline split counts: L, plus the embedding and the loss when
    ``embedding_loss_slots`` (megatron-core counts each as one layer of the first/last chunk)."""
    return model.n_layers + (2 if layout.embedding_loss_slots else 0)


def stage_layers(model: ModelConfig, layout: ClusterLayout, stage: int) -> list[int]:
    """Global layer indices of pipeline ``stage``: megatron's even split of the layer slots
    (``pipeline_slots``) over the p·v chunks, the remainder given to the first chunks (chunk
    c of stage s is virtual stage ``c·p + s``); the embedding and loss slots hold no layer."""
    chunks = layout.pp * layout.vpp
    slots = pipeline_slots(model, layout)
    base, extra = divmod(slots, chunks)
    starts = [c * base + min(c, extra) for c in range(chunks + 1)]
    offset = 1 if layout.embedding_loss_slots else 0
    return [i - offset for c in range(layout.vpp)
            for i in range(starts[c * layout.pp + stage], starts[c * layout.pp + stage + 1])
            if 0 <= i - offset < model.n_layers]


def rows_per_rank(moe: MoEConfig, layout: ClusterLayout) -> float:
    """R: rows one rank's experts compute per micro-batch under uniform routing: its EP
    group routes ``ep·Tn·K`` rows over E experts, ``El`` of them here, each row split over etp
    (K of the built layer: ``K·G`` for fine-grained experts). Expert-choice routing
    (Zhou et al. 2022) has each expert take ``C = min(ceil(cf·G·K/E), G)`` tokens of each
    group of G (a sequence, or the micro-batch under ``expert_choice_scope=micro_batch``):
    ``C·E/G`` rows per token (``moe.accounting.experts_per_token``, as the emulation's
    predictor counts them; ``cf·K`` when ``cf·G·K/E`` is whole)."""
    moe = moe.fine_grained()
    group = layout.seq_len if moe.expert_choice_scope == "sequence" else layout.tokens
    return layout.tokens / layout.tp * experts_per_token(moe, group) * layout.etp


def router_width(moe: MoEConfig) -> int:
    """Output columns of the router GEMM: E, or 2E for noisy top-k gating (``W_g`` and
    ``W_noise``, Shazeer et al. 2017), E of the built layer (``E·G``)."""
    moe = moe.fine_grained()
    return moe.num_experts * (2 if moe.router == "noisy_topk" else 1)


@dataclass
class StageTime:
    """Seconds per micro-batch of one pipeline stage, by component (forward + backward);
    ``moe_layers``: per MoE layer (attention forward, MLP forward, one all-to-all, the GPU's
    idle wait on the host after the token-count syncs), what the all-to-all overlap pairs up."""

    gemm: float = 0.0
    grouped_gemm: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    kernel_overhead: float = 0.0
    tp_comm: float = 0.0
    ep_comm: float = 0.0  # the dispatcher's all-to-alls and the GPU's idle wait on the host after its token-count syncs
    pp_comm: float = 0.0
    moe_layers: list[tuple[float, float, float, float]] = field(default_factory=list)
    paired: float = 1.0  # share of the micro-batches the all-to-all overlap pairs (``paired_share``)

    @property
    def compute(self) -> float:
        return self.gemm + self.grouped_gemm + self.attention + self.elementwise + self.kernel_overhead

    def exposed_ep(self, overlap_share: float | None) -> float:
        """The all-to-all time a micro-batch adds to its compute. Not overlapped: all of it.
        Overlapped (megatron-core's combined 1F1B: micro-batch i+1's forward runs beside
        micro-batch i's backward), per MoE layer four pairs: forward attention with the
        backward combine, the forward dispatch (and the GPU's wait on the host) with the backward MLP, the forward
        MLP with the backward dispatch, the forward combine with the backward attention
        (backward ≈ 2x forward). A pair of comm ``c`` and compute ``x``, which runs at
        ``overlap_share`` of its speed while ``c`` is in flight, adds ``max(c − x, c·(1 − share))``.
        Only the ``paired`` share of the stage's chunk steps run as such pairs; the schedule's
        warm-up forwards and cool-down backwards run alone, their all-to-alls exposed."""
        if overlap_share is None:
            return self.ep_comm

        def extra(c: float, x: float) -> float:
            return max(c - x, c * (1 - overlap_share))

        pairs = sum(extra(a2a, attn) + extra(a2a + sync, 2 * mlp) + extra(a2a, mlp) + extra(a2a, 2 * attn)
                    for attn, mlp, a2a, sync in self.moe_layers)
        return self.paired * pairs + (1 - self.paired) * self.ep_comm

    def total(self, overlap_share: float | None) -> float:
        return self.compute + self.tp_comm + self.exposed_ep(overlap_share) + self.pp_comm


def paired_share(layout: ClusterLayout, stage: int) -> float:
    """Share of stage ``stage``'s chunk forwards (and backwards) that megatron-core's combined
    1F1B (``overlap_moe_expert_parallel_comm``) runs as overlapped forward-backward pairs: all
    but the warm-up forwards and as many cool-down backwards, which run alone. Interleaved:
    ``2(p − s − 1) + (v − 1)p + 1`` of the ``m·v`` chunk steps (pipeline_parallel/schedules.py
    ``get_pp_rank_microbatches``: the interleaved warm-up plus the one extra forward it schedules
    so that each pair's forward and backward are independent); without PP the first forward and
    the last backward, 1 of ``m`` (``combined_1f1b_schedule_for_no_pipelining``)."""
    t = layout
    steps = t.micro_batches * t.vpp
    alone = 1 if t.pp == 1 else 2 * (t.pp - stage - 1) + (t.vpp - 1) * t.pp + 1
    return 1.0 - min(steps, alone) / steps


def elementwise_bytes(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout,
                      moe_layer: bool) -> tuple[float, float, float]:
    """(bytes every layer's fused elementwise kernels move forward, the share that
    ``selective`` recomputation moves again, the MoE block's routing and activation share): 2 norms (read and write ``Tn·D``),
    2 residual adds (2 reads, 1 write of ``Tn·D``), RoPE on q and k (read+write), and for an
    MoE layer the router's softmax/top-k over ``Tn·E`` (fp32 read+write), permute and unpermute
    (read+write ``R·D`` each), the combine (read ``R·D``, write ``Tn·D``) and SwiGLU (read
    ``Fin``, write ``F`` per row); a dense layer's activation on ``T·F/tp``."""
    t, moe = layout, moe.fine_grained()
    T, D, Tn = t.tokens, model.dim, t.tokens / t.tp
    q, kv = attention_width(model), model.kv_heads * model.head_size
    norms = 2 * 2 * Tn * D
    common = norms + 2 * 3 * Tn * D + 2 * T * (q + kv) / t.tp
    if moe_layer:
        R, f = rows_per_rank(moe, t), moe.expert_ffn_dim / t.etp
        act = R * (input_width(int(f), moe.activation) + f)
        routed = 2 * Tn * moe.num_experts * 2 + 2 * 2 * R * D + R * D + Tn * D
    else:
        f = model.ffn_dim / t.tp
        act = T * (input_width(int(f), model.activation) + f)
        routed = 0.0
    return BF16 * (common + routed + act), BF16 * (norms + act), BF16 * (routed + act if moe_layer else 0.0)


def stage_micro_time(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, hw: Hardware,
                     dispatcher: Dispatcher, stage: int) -> StageTime:
    """Forward + backward seconds of one micro-batch on pipeline ``stage`` (module doc)."""
    t, moe = layout, moe.fine_grained()
    T, D, S, Tn = t.tokens, model.dim, t.seq_len, t.tokens / t.tp
    q = attention_width(model)
    layers = stage_layers(model, t, stage)
    passes = 3.0 + (t.recompute == "full")  # forward, 2x backward, a recomputed forward
    moe_passes = 3.0 + (t.recompute in ("full", "moe"))
    rate_bw = hw.memory_bandwidth * hw.memory_efficiency
    out = StageTime(paired=paired_share(t, stage))
    R = rows_per_rank(moe, t)
    local = moe.num_experts // t.ep
    ep_members = ep_group(t)
    for i in layers:
        fwd_gemm = gemm_time(hw, T, model.qkv_width / t.tp, D) + gemm_time(hw, T, D, q / t.tp)
        flash = 2 * T * S * q / t.tp / hw.kernel_rate("attention", "bfloat16")
        out.attention += (1 + ATTENTION_BACKWARD + (t.recompute == "full")) * flash
        attention_forward = fwd_gemm + flash
        kernels = KERNELS_ATTENTION
        out.gemm += passes * fwd_gemm
        tp_gemms = passes * fwd_gemm  # the GEMMs inside TP regions, which tp_comm_overlap hides TP traffic behind
        if model.is_moe_layer(i):
            f = moe.expert_ffn_dim / t.etp
            fwd_moe = gemm_time(hw, Tn, router_width(moe), D)
            rows = R / local  # per expert
            # one local expert is one plain GEMM (TE's GroupedLinear with a single group)
            share = hw.kernel_efficiency.get("grouped_mm", 1.0) if local > 1 else 1.0
            expert = local * (gemm_time(hw, rows, input_width(int(f), moe.activation), D, share)
                              + gemm_time(hw, rows, D, f, share))
            out.grouped_gemm += moe_passes * expert
            if moe.num_shared_experts:
                fs = moe.expert_ffn_dim * moe.num_shared_experts / t.tp
                shared = gemm_time(hw, T, input_width(int(fs), moe.activation), D) + gemm_time(hw, T, D, fs)
                fwd_moe += shared
                tp_gemms += moe_passes * shared
            out.gemm += moe_passes * fwd_moe
            kernels += KERNELS_MOE
            if t.ep > 1:  # dispatch + combine, forward and backward (and recomputed); a token-count sync per forward dispatch
                a2a = all_to_all_time(hw, dispatcher, moe, ep_members, R * D * BF16)
                out.ep_comm += 2 * (moe_passes - 1) * a2a
        else:
            f = model.ffn_dim / t.tp
            dense = passes * (gemm_time(hw, T, input_width(int(f), model.activation), D) + gemm_time(hw, T, D, f))
            out.gemm += dense
            tp_gemms += dense
            kernels += KERNELS_DENSE_MLP
        moved, selective, ffn = elementwise_bytes(model, moe, t, model.is_moe_layer(i))
        if model.is_moe_layer(i) and t.ep > 1:
            # the host waits at each forward dispatch for the token counts, then launches the
            # layer up to the next one: the GPU idles for what its forward work does not cover
            covered = attention_forward + fwd_moe + expert + 2 * a2a + moved / rate_bw + kernels * hw.op_overhead_s
            syncs = (moe_passes - 2) * max(0.0, dispatcher.host_s - covered)
            out.ep_comm += syncs
            out.moe_layers.append((attention_forward, fwd_moe + expert, a2a, syncs))
        again = {"none": 0.0, "selective": selective, "moe": selective + ffn, "full": moved}[t.recompute]
        out.elementwise += (3 * moved + again) / rate_bw
        out.kernel_overhead += 3 * kernels * hw.op_overhead_s
        if t.tp > 1:  # sequence parallelism: all-gather + reduce-scatter around attention and dense MLPs, fwd and bwd
            regions = 1 + (not model.is_moe_layer(i)) + bool(model.is_moe_layer(i) and moe.num_shared_experts)
            tp = regions * 4 * ring_time(hw, tp_group(t), T * D * BF16, hw.collective_efficiency.get("all_gather", 1.0))
            # tp_comm_overlap pipelines each all-gather/reduce-scatter with the GEMM it feeds or
            # follows (TE userbuffers, chunked): only what exceeds those GEMMs is exposed
            out.tp_comm += max(0.0, tp - tp_gemms) if t.tp_comm_overlap else tp
    if stage == t.pp - 1:  # LM head and megatron's vocab-parallel cross-entropy
        out.gemm += 3 * gemm_time(hw, T, model.vocab_size / t.tp, D)
        out.elementwise += CROSS_ENTROPY_BYTES[t.cross_entropy] * T * model.vocab_size / t.tp / rate_bw
    if t.pp > 1:
        neighbour = [dense_rank(t, 0, 0, 0), dense_rank(t, 0, 0, 1)]
        link = hw.inter_node if group_split(hw, neighbour)[1] else hw.intra_node
        boundaries = 2 * t.vpp
        per = Tn * D * BF16 / link.bandwidth
        out.pp_comm = boundaries * (link.latency_s + (0.0 if t.vpp > 1 else per))
    return out


# -- memory -------------------------------------------------------------------------

def layer_activation_bytes(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, layer: int) -> float:
    """Bytes one micro-batch of layer ``layer`` keeps for the backward in a megatron-core bf16
    run with flash attention and sequence parallelism:

    - attention: the norm's input ``Tn·D`` and its output (the QKV GEMM's sharded input)
      ``Tn·D``, q, k, v ``T·(q + 2kv)/tp``, the attention output ``T·q/tp`` (flash attention's
      output and the projection's input), the fp32 log-sum-exp ``T·H/tp``;
    - MoE: the norm's input and output, the router's fp32 logits and probabilities
      ``2·Tn·E``, the dispatched rows ``R·D`` (FC1's input), FC1's output ``R·Fin``, the
      activation's output ``R·F`` (FC2's input); the gates multiply inside the activation
      (megatron-core's ``activation_func_with_probs``), so FC2's output is not kept;
    - dense MLP: norm input and output, FC1's output ``T·Fin/tp`` and the activation's ``T·F/tp``.

    ``selective`` drops the norms' outputs and the activation's output (recomputed);
    ``moe`` drops the norms' outputs and keeps of an MoE block its input ``Tn·D`` only;
    ``full`` keeps the layer's input ``Tn·D`` only."""
    t, moe = layout, moe.fine_grained()
    T, D, Tn = t.tokens, model.dim, t.tokens / t.tp
    if t.recompute == "full":
        return BF16 * Tn * D
    selective = t.recompute in ("selective", "moe")
    norm = Tn * D * (1 if selective else 2)
    q, kv = attention_width(model), model.kv_heads * model.head_size
    attn = norm + T * (2 * q + 2 * kv) / t.tp + 2 * T * model.n_heads / t.tp
    if model.is_moe_layer(layer) and t.recompute == "moe":
        ffn = Tn * D
    elif model.is_moe_layer(layer):
        R, f = rows_per_rank(moe, t), moe.expert_ffn_dim / t.etp
        fin = input_width(int(f), moe.activation)
        ffn = norm + 4 * Tn * moe.num_experts + R * (D + fin + (0 if selective else f))
        if moe.num_shared_experts:
            fs = moe.expert_ffn_dim * moe.num_shared_experts / t.tp
            ffn += T * (input_width(int(fs), moe.activation) + (0 if selective else fs))
    else:
        f = model.ffn_dim / t.tp
        ffn = norm + T * (input_width(int(f), model.activation) + (0 if selective else f))
    return BF16 * (attn + ffn)


def in_flight(layout: ClusterLayout, stage: int) -> tuple[int, bool]:
    """(micro-batches, or chunk micro-batches when interleaved, whose activations a rank of
    ``stage`` holds at its peak; whether the count is of chunks)."""
    t = layout
    if t.pp == 1:
        return 1, False
    if t.vpp == 1:
        return min(t.pp - stage, t.micro_batches), False
    return min(t.micro_batches * t.vpp, 2 * (t.pp - stage - 1) + (t.vpp - 1) * t.pp + 1), True


@dataclass
class StageMemory:
    """Bytes on one rank of a pipeline stage; ``peak`` is their sum."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    reserved: float = 0.0
    fragmentation: float = 0.0

    @property
    def peak(self) -> float:
        return sum(asdict(self).values())


def stage_param_counts(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, stage: int) -> tuple[float, float]:
    """(dense, expert) parameter elements on one rank of ``stage``: the built layer's experts
    (``E·G`` of width ``F/G``), its router ``router_width · D``."""
    t, moe = layout, moe.fine_grained()
    D = model.dim
    dense = expert = 0.0
    for i in stage_layers(model, t, stage):
        dense += 2 * D + (model.qkv_width * D + attention_width(model) * D) / t.tp
        dense += 2 * model.head_size if model.qk_norm else 0
        if model.is_moe_layer(i):
            f = moe.expert_ffn_dim / t.etp
            dense += router_width(moe) * D
            expert += moe.num_experts / t.ep * D * (input_width(int(f), moe.activation) + f)
            if moe.num_shared_experts:
                fs = moe.expert_ffn_dim * moe.num_shared_experts / t.tp
                dense += D * (input_width(int(fs), moe.activation) + fs)
        else:
            f = model.ffn_dim / t.tp
            dense += D * (input_width(int(f), model.activation) + f)
    vocab = math.ceil(model.vocab_size / t.tp) * D
    if stage == 0:
        dense += vocab
    if stage == t.pp - 1:
        dense += D + (vocab if not model.tie_embeddings or t.pp > 1 else 0)
    return dense, expert


def stage_memory(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, hw: Hardware, stage: int) -> StageMemory:
    """Peak bytes of one rank of ``stage`` (module doc)."""
    t = layout
    dense, expert = stage_param_counts(model, moe, t, stage)
    mem = StageMemory(params=BF16 * (dense + expert), grads=4 * (dense + expert),
                      optimizer=12 * (dense / t.dp + expert / t.edp), reserved=hw.reserved_bytes)
    count, chunked = in_flight(t, stage)
    layers = stage_layers(model, t, stage)
    per_micro = sum(layer_activation_bytes(model, moe, t, i) for i in layers)
    mem.activations = count * (per_micro / t.vpp if chunked else per_micro)
    if stage == t.pp - 1:
        mem.transient = CROSS_ENTROPY_PEAK_BYTES[t.cross_entropy] * t.tokens * model.vocab_size / t.tp
    mem.fragmentation = hw.fragmentation * (mem.activations + mem.transient)
    return mem


def peak_memory(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, hw: Hardware) -> float:
    """The largest per-rank peak over the stages that can hold it (first: most in flight; last: the head)."""
    return max(stage_memory(model, moe, layout, hw, s).peak for s in sorted({0, layout.pp - 1}))


# -- the step ---------------------------------------------------------------------

@dataclass
class ClusterPrediction:
    layout: ClusterLayout
    step_time_s: float
    tokens_per_s: float
    mfu: float
    peak_memory_bytes: float
    fits: bool
    bottleneck: str
    breakdown: dict[str, float]
    memory: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": asdict(self.layout), "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu, "peak_memory_bytes": self.peak_memory_bytes, "fits": self.fits,
                "bottleneck": self.bottleneck, "breakdown": self.breakdown, "memory": self.memory}


def data_parallel_time(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, hw: Hardware,
                       stage: int) -> tuple[float, float]:
    """Seconds of one step's gradient reduce-scatter (fp32) and parameter all-gather (bf16)
    over dp (dense buffer) and edp (expert buffer), before overlap."""
    dense, expert = stage_param_counts(model, moe, layout, stage)
    rs, ag = hw.collective_efficiency.get("reduce_scatter", 1.0), hw.collective_efficiency.get("all_gather", 1.0)
    dp, edp = dp_group(layout), edp_group(layout)
    grads = ring_time(hw, dp, 4 * dense, rs) + ring_time(hw, edp, 4 * expert, rs)
    params = ring_time(hw, dp, BF16 * dense, ag) + ring_time(hw, edp, BF16 * expert, ag)
    return grads, params


def predict_cluster(model: ModelConfig, moe: MoEConfig, layout: ClusterLayout, hw: Hardware) -> ClusterPrediction:
    """Step time, throughput, MFU and peak memory of ``layout`` on ``hw`` (module doc)."""
    problem = layout_problem(model, moe, layout)
    if problem:
        raise ConfigError(f"layout {layout.describe()}: {problem}")
    dispatcher = require_cluster_fields(hw, layout)
    if layout.world_size > hw.world_size:
        raise ConfigError(f"layout {layout.describe()} needs {layout.world_size} GPUs but cluster '{hw.name}' has "
                          f"{hw.world_size}; raise nodes in the hardware file")
    t = layout
    m = t.micro_batches
    # megatron-core overlaps the all-to-all with another micro-batch's compute in the
    # interleaved 1F1B schedule (or without pipelining) only
    overlap = dispatcher.compute_share if t.overlap_moe_a2a and (t.pp == 1 or t.vpp > 1) else None
    worst: tuple[float, dict[str, float]] = (-1.0, {})
    # Stages 0 and 1 hold the most layers (the split gives the remainder to the first
    # chunks) and stage 0 the most micro-batches in flight; the last holds the head.
    stages = sorted({0, min(1, t.pp - 1), t.pp - 1})
    memories = [stage_memory(model, moe, t, hw, s) for s in stages]
    stage_times = [stage_micro_time(model, moe, t, hw, dispatcher, s) for s in stages]
    t_micro = max(st.total(overlap) for st in stage_times)
    bubble = (t.pp - 1) * t_micro / t.vpp
    for s, st in zip(stages, stage_times):
        grads, params = data_parallel_time(model, moe, t, hw, s)
        backward = (st.compute + st.tp_comm) * 2 / 3
        forward = (st.compute + st.tp_comm) / 3
        dp_exposed = (max(0.0, grads - backward) if t.overlap_grad_reduce else grads) + (
            max(0.0, params - forward) if t.overlap_param_gather else params)
        dense, expert = stage_param_counts(model, moe, t, s)
        shard = dense / t.dp + expert / t.edp
        optimizer = (OPTIMIZER_BYTES * shard + 6 * (dense + expert)) / (hw.memory_bandwidth * hw.memory_efficiency)
        exposed_ep = st.exposed_ep(overlap)
        parts = {"gemm": m * st.gemm, "grouped_gemm": m * st.grouped_gemm, "attention": m * st.attention,
                 "elementwise": m * st.elementwise, "kernel_overhead": m * st.kernel_overhead,
                 "tp_comm": m * st.tp_comm, "ep_comm": m * exposed_ep, "pp_comm": m * st.pp_comm,
                 "pp_bubble": bubble + m * (t_micro - st.total(overlap)), "dp_comm": dp_exposed,
                 "optimizer": optimizer}
        total = sum(parts.values())
        if total > worst[0]:
            worst = (total, parts)
    step, parts = worst
    tokens = t.global_batch * t.seq_len
    peak = max(memories, key=lambda mem: mem.peak)
    mfu = train_flops_per_token(model, moe) * tokens / step / (t.world_size * hw.peak_flops["bfloat16"])
    return ClusterPrediction(t, step, tokens / step, mfu, peak.peak, peak.peak <= hw.memory_capacity,
                             max(parts, key=lambda k: parts[k]), parts, asdict(peak) | {"peak": peak.peak})

