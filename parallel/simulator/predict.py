"""The predictor: per-rank memory, communication bytes and step time of a layout.

Legend: T tokens per micro-batch on a rank (b·S), S sequence, D model dim, H query heads,
G key/value heads, Dh head dim, V vocab,
E experts, El = E/ep experts per rank, K experts per token, F expert hidden, Fin its input
projection width (2F for SwiGLU), N rows a rank keeps for dispatch (T·K dropless), R rows its
experts compute, m micro-batches per step, p pipeline stages, v virtual stages, L layers.

**Model states** (megatron engine: fp32 parameters in megatron's DDP buffers, fp32 gradient
buffers, distributed AdamW): each buffer is laid out as megatron lays it out (parameters in
reverse order, each start padded to 64 elements, the end padded to ``lcm(group, 128)``:
``megatron_buffer_layout``); per pipeline chunk, dense parameters form one buffer sharded over
``dp``, expert parameters another over ``edp``. Bytes: params ``4·numel`` + grads ``4·numel``
per buffer, and AdamW's ``exp_avg``/``exp_avg_sq`` over the shard's parameter elements plus
one 4-byte ``step`` per parameter whose range meets this rank's shard. DeepSpeed ZeRO-s uses
the textbook per-parameter counts with fp32 master weights (ZeRO-1 ``4Ψ+4Ψ+8Ψ/N``, ZeRO-2
``4Ψ+4Ψ/N+8Ψ/N``, ZeRO-3 ``16Ψ/N``).

**Activations** (``activation_elements``, ``head_elements``): the tensors autograd keeps in
this code base's model (counted with ``saved_tensors_hooks``; docs/simulation.md lists them),
not Korthikanti's GPT-3 figure, split by dtype (``Saved``): with bf16 activations the norms,
SDPA's logsumexp, the router, the gated expert rows and the loss keep fp32 tensors. ``train.recompute`` (``moe/recompute.py``): ``full`` keeps a
recomputed block's input ``T·D`` only (the first ``recompute_layers`` blocks of each chunk);
``selective`` keeps neither a norm's ``x·rsqrt`` and ``rsqrt`` nor an MLP's or expert's
activation output (and SwiGLU's ``silu(gate)``). Under ``ep > 1`` the experts' output rows
(``R·D``) are kept too: the combine's ``index_copy`` to source-rank order saves its source. 1F1B keeps ``p − stage`` micro-batches in
flight.

**Communication** per rank per step, in ``comm_counter``'s convention (all-to-all: bytes
sent off-rank; reduce-scatter/all-gather: bytes of the full buffer; p2p: each send and
receive; b: bytes of the activation dtype, 2 in bf16): EP all-to-all ``2·(send_off +
recv_off)·D·b`` per MoE layer per micro-batch (dispatch and combine, forward and backward;
uniform routing ``send_off = recv_off = T·K·(ep−1)/ep``, so ``4·T·K·D·b·(ep−1)/ep``) plus
``(ep−1)·(El+3)·8`` bytes of counts and headers per forward; DP: a reduce-scatter of each
(fp32) gradient buffer and all-gathers of each parameter buffer (in the parameters' dtype);
TP: ``_tp_bytes``; PP: activations and their gradients (``b`` each) per chunk boundary
and micro-batch, the tied embedding's gradient between first and last stage; the training
loop's metric reductions.

**Step time** (``rank_time``): compute = FLOPs / the device's matmul rate + non-matmul bytes /
memory bandwidth + operations × per-op overhead (+ under TP without SP the residual-stream
work every TP rank repeats, ``tp_replicated_time``); communication = alpha-beta per collective
(ring ``(n−1)/n`` of a buffer for reduce-scatter and all-gather); the slowest expert rank;
pipeline bubble ``(p−1)/(m+p−1)`` (1F1B) or ``(p−1)/(v·m)`` of the ideal time
(interleaved). This engine reduces gradients after the backward (``overlap_grad_reduce=False``),
so nothing overlaps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moe.accounting import attention_width, experts_per_token, num_moe_layers, router_params, train_flops_per_token
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.mlp import input_width
from moe.recompute import Recompute
from parallel.config import ParallelConfig
from parallel.pipeline import stage_layers as pipeline_stage_layers
from parallel.simulator.hardware import Hardware, Link
from parallel.simulator.routing import ForwardRouting, expert_capacity_or_none, group_rows, kept_counts, load_imbalance
from parallel.topology import BatchShape, Topology

ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MAIN_PARAM_BYTES = 4  # the fp32 master copy of a bf16 parameter
STEP_BYTES = 4  # torch AdamW's per-parameter ``step`` scalar (fp32)
NONFINITE_FLAGS = 4  # lm, aux and z-loss, local gradients: one flag each


@dataclass(frozen=True)
class Layout:
    """A validated layout plus the batch split: what the predictor needs of a config."""

    topology: Topology
    micro_batch: int
    seq_len: int
    dtype: str  # float32 | bfloat16: activations and matmul rate
    recompute: Recompute = "none"  # train.recompute
    zero_stage: int = 1
    threads: int | None = None  # CPU ranks only: torch threads per rank (launch.threads)
    sequence_parallel: bool = False
    recompute_layers: int | None = None  # train.recompute_layers (full: blocks per chunk; None = all)

    @classmethod
    def build(cls, parallel: ParallelConfig, model: ModelConfig, moe: MoEConfig, batch_size: int,
              micro_batch_size: int | None, dtype: str = "float32", recompute: Recompute = "none",
              threads: int | None = None, recompute_layers: int | None = None) -> Layout:
        per_rank = max(1, batch_size // parallel.dp)
        batch = BatchShape(batch_size, micro_batch_size or per_rank)
        topology = Topology.build(parallel, model, moe, batch, parallel.world_size)
        return cls(topology, batch.micro_batch, model.seq_len, dtype, recompute, parallel.zero_stage, threads,
                   parallel.sequence_parallel and parallel.tp > 1, recompute_layers)

    def block_recomputed(self, model: ModelConfig, layer: int) -> bool:
        """Whether ``train.recompute=full`` recomputes block ``layer``: one of the first
        ``recompute_layers`` blocks of its pipeline chunk (``moe.recompute.apply_recompute``)."""
        if self.recompute != "full":
            return False
        if self.recompute_layers is None:
            return True
        t = self.topology
        for stage in range(t.pp):
            for chunk in pipeline_stage_layers(model.n_layers, t.pp, t.vpp, stage, t.first_stage_layers,
                                               t.last_stage_layers):
                if layer in chunk:
                    return chunk.index(layer) < self.recompute_layers
        raise ValueError(f"block {layer} is in no pipeline chunk of {model.n_layers} layers")

    @property
    def tokens(self) -> int:
        """T: tokens per micro-batch on one rank (replicated over its TP group)."""
        return self.micro_batch * self.seq_len

    @property
    def routed_tokens(self) -> int:
        """Tokens one rank routes: TP ranks route disjoint B·S/tp tokens of the micro-batch
        (``parallel.tensor_parallel.local_shape``; the topology checks that tp divides B·S)."""
        return self.tokens // self.topology.tp


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a rank: its numel, whether it lives in megatron's expert buffer, and
    the pipeline chunk (virtual stage) whose DDP buffers hold it."""

    name: str
    numel: int
    expert: bool
    chunk: int = 0


def stage_chunks(model: ModelConfig, layout: Layout, stage: int) -> list[list[int]]:
    """Global block indices of each chunk (virtual stage) of pipeline rank ``stage``: the
    training's own split (``parallel.pipeline.stage_layers``, uneven first/last stages included)."""
    t = layout.topology
    return pipeline_stage_layers(model.n_layers, t.pp, t.vpp, stage, t.first_stage_layers, t.last_stage_layers)


def stage_layers(model: ModelConfig, layout: Layout, stage: int) -> list[int]:
    """Global block indices held by pipeline rank ``stage``, over its v chunks."""
    return [i for chunk in stage_chunks(model, layout, stage) for i in chunk]


def rows_per_token(moe: MoEConfig, layout: Layout) -> float:
    """Expert rows per routed token (``moe`` as built, ``fine_grained()``): K, or expert
    choice's ``C·E/G`` over its group (a sequence; a rank's routed tokens under
    ``moe.expert_choice_scope=micro_batch``)."""
    return experts_per_token(moe, layout.seq_len if moe.expert_choice_scope == "sequence" else layout.routed_tokens)


def _router_specs(prefix: str, dim: int, moe: MoEConfig, chunk: int) -> list[ParamSpec]:
    """A learned router's weights as ``moe.layer`` names them: ``weight_ED`` (``W_g``), and
    noisy top-k's ``noise_weight_ED``; none for hash routing (``accounting.router_params``)."""
    names = {"hash": [], "noisy_topk": ["weight_ED", "noise_weight_ED"]}.get(moe.router, ["weight_ED"])
    return [ParamSpec(f"{prefix}ffn.router.{name}", moe.num_experts * dim, False, chunk) for name in names]


def rank_params(model: ModelConfig, moe: MoEConfig, layout: Layout, stage: int = 0) -> list[ParamSpec]:
    """This rank's parameters in ``Transformer.named_parameters()`` order, sharded.

    tp divides attention, dense MLP and (padded) vocabulary matrices; ep·etp divide expert
    weights, which are expert-buffer parameters whenever they are sharded (ep > 1) or tensor
    parallelism marks them (tp or etp > 1, ``parallel/tensor_parallel.py``); the tied LM head
    is a second copy on the last stage when pp > 1 (megatron's rule). Fine-grained experts
    as built (``moe.fine_grained()``)."""
    moe = moe.fine_grained()
    t = layout.topology
    d, tp = model.dim, t.tp
    hd = attention_width(model)  # H·Dh
    vocab_shard = -(-model.vocab_size // tp)  # parallel.tensor_parallel.padded_vocab_size / tp
    expert_buffer = t.ep > 1 or t.tp > 1 or t.etp > 1
    chunk_of = {i: c for c, layers in enumerate(stage_chunks(model, layout, stage)) for i in layers}
    out: list[ParamSpec] = []
    first, last = stage == 0, stage == t.pp - 1
    if first:
        out.append(ParamSpec("embed.weight", vocab_shard * d, False, 0))
    for i in stage_layers(model, layout, stage):
        p, c = f"blocks.{i}.", chunk_of[i]
        out += [ParamSpec(p + "attn_norm.weight", d, False, c),
                ParamSpec(p + "attn.qkv.weight", model.qkv_width * d // tp, False, c)]
        if model.qk_norm:  # replicated over tp
            out += [ParamSpec(p + "attn.q_norm.weight", model.head_size, False, c),
                    ParamSpec(p + "attn.k_norm.weight", model.head_size, False, c)]
        out += [ParamSpec(p + "attn.out.weight", d * hd // tp, False, c), ParamSpec(p + "ffn_norm.weight", d, False, c)]
        if model.is_moe_layer(i):
            local, f = moe.num_experts // t.ep, moe.expert_ffn_dim // t.etp
            out += [*_router_specs(p, d, moe, c),
                    ParamSpec(p + "ffn.experts.w_in_EDF", local * d * input_width(f, moe.activation), expert_buffer, c),
                    ParamSpec(p + "ffn.experts.w_out_EFD", local * f * d, expert_buffer, c)]
            if moe.num_shared_experts:
                fs = moe.expert_ffn_dim * moe.num_shared_experts // tp
                out += [ParamSpec(p + "ffn.shared.w_in.weight", d * input_width(fs, moe.activation), False, c),
                        ParamSpec(p + "ffn.shared.w_out.weight", fs * d, False, c)]
        else:
            f = model.ffn_dim // tp
            out += [ParamSpec(p + "ffn.w_in.weight", d * input_width(f, model.activation), False, c),
                    ParamSpec(p + "ffn.w_out.weight", f * d, False, c)]
    if last:
        out.append(ParamSpec("norm.weight", d, False, t.vpp - 1))
        if not model.tie_embeddings or (t.pp > 1 and not first):
            out.append(ParamSpec("lm_head.weight", vocab_shard * d, False, t.vpp - 1))
    return out


def rank_buffers(model: ModelConfig, moe: MoEConfig, layout: Layout, stage: int) -> list[tuple[list[ParamSpec], bool]]:
    """megatron's DDP buffers on a rank of ``stage``: per chunk, the dense then the expert
    parameters (each its own buffer; empty ones are left out)."""
    specs = rank_params(model, moe, layout, stage)
    out = []
    for chunk in range(layout.topology.vpp):
        for expert in (False, True):
            members = [s for s in specs if s.chunk == chunk and s.expert == expert]
            if members:
                out.append((members, expert))
    return out


def _pad(n: int, divisor: int) -> int:
    return math.ceil(n / divisor) * divisor


def megatron_buffer_layout(numels: list[int], group: int) -> tuple[list[tuple[int, int]], int]:
    """Megatron's DDP buffer with the distributed optimizer and one bucket: parameters in
    reverse order, each start padded to 64 elements, the end to ``lcm(group, 128)``.
    Returns each parameter's (start, end), in the given order, and the buffer numel."""
    ranges: dict[int, tuple[int, int]] = {}
    start = end = 0
    for index in reversed(range(len(numels))):
        start = _pad(start, 64)
        end = start + numels[index]
        ranges[index] = (start, end)
        start = end
    total = _pad(end, math.lcm(group, 128)) if numels else 0
    return [ranges[i] for i in range(len(numels))], total


@dataclass
class Memory:
    """Bytes on one rank; ``peak`` = states + activations in flight + the largest transient."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.states + self.activations + self.transient


def _param_bytes(layout: Layout) -> tuple[int, int]:
    """(bytes of a parameter element, bytes of its fp32 master copy): bf16 states keep an
    fp32 main copy beside each bf16 parameter; fp32 parameters are their own master."""
    return (2, MAIN_PARAM_BYTES) if layout.dtype == "bfloat16" else (4, 0)


def _megatron_states(specs: list[ParamSpec], group: int, group_rank: int, layout: Layout) -> tuple[int, int, int, int]:
    """(params, grads, optimizer bytes, shard numel) of one megatron buffer on one rank: the
    padded parameter buffer in the parameters' dtype, the padded fp32 gradient buffer
    (``grad_reduce_in_fp32``), and for the rank's ``1/group`` shard Adam's fp32 moments,
    in bf16 the fp32 main copy of the shard, and a step scalar per parameter it meets."""
    ranges, numel = megatron_buffer_layout([s.numel for s in specs], group)
    if not numel:
        return 0, 0, 0, 0
    shard = numel // group
    lo, hi = group_rank * shard, (group_rank + 1) * shard
    meeting = sum(1 for a, b in ranges if min(b, hi) > max(a, lo))
    in_shard = sum(max(0, min(b, hi) - max(a, lo)) for a, b in ranges)
    param, main = _param_bytes(layout)
    return param * numel, 4 * numel, (ADAM_STATE_BYTES + main) * in_shard + STEP_BYTES * meeting, shard


def state_memory(model: ModelConfig, moe: MoEConfig, layout: Layout, engine: str, rank: int) -> tuple[Memory, int]:
    """Model-state bytes of global ``rank`` and the numel of its optimizer shard.

    Per parameter element, in fp32 (``layout.dtype``): the parameter 4 B, its gradient 4 B,
    Adam's moments 8 B; with bf16 states: the parameter 2 B, the fp32 gradient accumulator
    4 B, the fp32 master 4 B and the moments 8 B (the bf16 ``.grad`` of a backward lives
    only until it is added into the accumulator). Megatron shards the masters and moments
    over the (expert) data-parallel group; DeepSpeed's ZeRO-1/2 shard them over ``dp``
    (``edp`` for experts), ZeRO-2 the gradients too."""
    t = layout.topology
    coords = rank_coords(t, rank)
    specs = rank_params(model, moe, layout, coords["pp"])
    dense = [s for s in specs if not s.expert]
    expert = [s for s in specs if s.expert]
    param, main = _param_bytes(layout)
    if t.world_size == 1:  # LocalEngine: torch AdamW over the parameters (or their fp32 masters)
        n = sum(s.numel for s in specs)
        return Memory(param * n, 4 * n, (ADAM_STATE_BYTES + main) * n + STEP_BYTES * len(specs)), n
    if engine == "megatron":
        memory, shard = Memory(), 0
        for members, is_expert in rank_buffers(model, moe, layout, coords["pp"]):
            group, group_rank = (t.edp, coords["edp"]) if is_expert else (t.dp, coords["dp"])
            params, grads, optimizer, buffer_shard = _megatron_states(members, group, group_rank, layout)
            memory.params += params
            memory.grads += grads
            memory.optimizer += optimizer
            shard += buffer_shard
        return memory, shard
    psi_d, psi_e = sum(s.numel for s in dense), sum(s.numel for s in expert)
    sharded = psi_d / t.dp + psi_e / t.edp
    full = psi_d + psi_e
    stage = layout.zero_stage
    params = param * (sharded if stage == 3 else full)
    grads = 4 * (sharded if stage >= 2 else full)
    optimizer = (ADAM_STATE_BYTES + main) * (sharded if stage >= 1 else full)
    return Memory(int(params), int(grads), int(optimizer)), int(sharded)


def rank_coords(t: Topology, rank: int) -> dict[str, int]:
    """megatron-core's rank order: dense ``tp-cp-dp-pp`` (tp fastest), experts ``etp-ep-edp-pp``."""
    per_stage = t.tp * t.dp
    pp_rank, r = divmod(rank, per_stage)
    return {"pp": pp_rank, "tp": r % t.tp, "dp": r // t.tp, "etp": r % t.etp,
            "ep": (r // t.etp) % t.ep, "edp": r // (t.etp * t.ep)}


def ep_groups(t: Topology) -> list[list[int]]:
    """Global ranks of every EP group, members in EP-rank order."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for rank in range(t.world_size):
        c = rank_coords(t, rank)
        groups.setdefault((c["pp"], c["etp"], c["edp"]), []).append(rank)
    return list(groups.values())


@dataclass(frozen=True)
class Saved:
    """Elements autograd keeps, by dtype: ``fp32`` are float32 whatever ``train.dtype`` (the
    router, RMSNorm's upcast input and statistics, SDPA's logsumexp, the loss's log-softmax,
    the gated expert rows; int64 ids as two 4-byte elements each), ``act`` are in the
    activation dtype (the parameters' under bf16 states, float32 otherwise)."""

    fp32: float = 0.0
    act: float = 0.0

    def __add__(self, other: Saved) -> Saved:
        return Saved(self.fp32 + other.fp32, self.act + other.act)

    @property
    def elements(self) -> float:
        return self.fp32 + self.act

    def bytes(self, layout: Layout) -> float:
        return 4 * self.fp32 + _dtype_bytes(layout) * self.act


def _norm_saved(n: float, d: int, layout: Layout, output_kept: bool = True) -> Saved:
    """An RMSNorm over ``n`` tokens of width ``d`` (torch's composite: ``x32 = x.float()``,
    ``r = rsqrt(mean(x32²) + eps)``, ``(x32·r)·g`` cast back to x's dtype). It keeps ``x32``
    (in fp32 that is its input), ``x32·r`` and ``r``; its output is kept by the layer that
    reads it (``output_kept``). ``selective`` recomputes it: its input and output only."""
    out = n * d if output_kept else 0
    if layout.recompute == "selective":
        return Saved(act=n * d + out)
    if layout.dtype == "float32":
        return Saved(fp32=n * d + n, act=n * d + out)
    return Saved(fp32=2 * n * d + n, act=out)


def activation_elements(model: ModelConfig, moe: MoEConfig, layout: Layout, layer: int, rows: float) -> Saved:
    """Elements autograd keeps for block ``layer`` of one micro-batch, by dtype (see the
    module doc); ``rows``: the rows this rank's experts compute (R; N is taken as T·K).

    Under bf16 activations the fp32 pieces are the norms' ``x.float()``, ``x·rsqrt`` and
    ``rsqrt`` (in place of the bf16 input), SDPA's logsumexp, the router's ``x.float()`` and
    ``W.float()`` beside its fp32 logits, softmax and gates, and the expert rows ``y.float()``
    the gates multiply (the product is cast back: N·D of each dtype). N is T·K, under expert
    choice ``rows_per_token``; the router's own tensors are counted as softmax top-k's."""
    moe = moe.fine_grained()
    t = layout.topology
    T, D, tp, k = layout.tokens, model.dim, t.tp, moe.top_k
    Tn = T // tp if layout.sequence_parallel else T  # tokens a norm sees
    if layout.block_recomputed(model, layer):
        return Saved(act=Tn * D)  # the block's input
    selective = layout.recompute == "selective"
    wide = layout.dtype != "float32"  # fp32 pieces are copies beside the activations
    q, kv = attention_width(model), model.kv_heads * model.head_size  # H·Dh, G·Dh
    # qkv output, rotated q and k, attention output and its contiguous copy (7·T·D for
    # multi-head with Dh = D/H); the logsumexp per query head and token
    attn = _norm_saved(Tn, D, layout) + Saved(fp32=layout.micro_batch * model.n_heads / tp * layout.seq_len,
                                              act=T * (4 * q + 3 * kv) / tp)
    if model.qk_norm:  # q and k norms: (input.float(),) input·rsqrt and rsqrt (their input is a view of qkv)
        attn += Saved(fp32=T * ((2 if wide else 1) * (q + kv) + model.n_heads + model.kv_heads) / tp)
    if model.is_moe_layer(layer):
        f = moe.expert_ffn_dim / t.etp
        Tr = layout.routed_tokens
        # logits, probs, lse, int64 top-k ids, gates; bf16: the fp32 copies of input and weight
        router = 2 * Tr * moe.num_experts + Tr + 2 * Tr * k + Tr * k + (Tr * D + moe.num_experts * D if wide else 0)
        experts = rows * (D + mlp_elements(f, moe.activation, selective))
        if t.ep > 1:  # the expert output rows R·D: the combine's index_copy back to source order keeps its source
            experts += rows * D
        # gated rows: the expert outputs (their fp32 copy in bf16) and the products; the
        # local sort's row order and each row's token (int64), each row's gate
        n = Tr * rows_per_token(moe, layout)  # N
        gated = Saved(fp32=n * D, act=n * D) if wide else Saved(act=2 * n * D)
        gated += Saved(fp32=2 * 2 * n + n)
        # bf16: only a shared expert keeps the norm's output (the router keeps its fp32 copy)
        norm = _norm_saved(Tn, D, layout, output_kept=not wide or moe.num_shared_experts > 0)
        ffn = norm + Saved(fp32=router, act=experts) + gated
        if moe.num_shared_experts:  # on the routed tokens; their input is the norm's output
            ffn += Saved(act=Tr * mlp_elements(moe.expert_ffn_dim * moe.num_shared_experts, moe.activation, selective))
    else:
        ffn = _norm_saved(Tn, D, layout) + Saved(act=T * mlp_elements(model.ffn_dim / tp, model.activation, selective))
    return attn + ffn


def mlp_elements(f: float, activation: str, selective: bool) -> float:
    """Per token (row), what an MLP of hidden width ``f`` keeps past its input: the input
    projection's output (``Fin``), and unless selective recomputation frees them, the
    activation's output (kept by ``W_out``) and, for SwiGLU, ``silu(gate)`` (kept by the product)."""
    fin = input_width(int(f), activation)  # type: ignore[arg-type]
    return fin if selective else fin + f * (2 if activation == "swiglu" else 1)


def head_elements(model: ModelConfig, layout: Layout) -> Saved:
    """The final norm, the loss's fp32 log-softmax ``T·V`` (its input ``logits.float()`` is
    not kept), and the logits the training loop holds (``out.logits_BSV``) through the
    backward, in the activation dtype."""
    T, V = layout.tokens, model.vocab_size / layout.topology.tp
    return _norm_saved(T, model.dim, replace(layout, recompute="none")) + Saved(fp32=T * V, act=T * V)


@dataclass
class Comm:
    """Bytes per step of one rank, by category (``comm_counter`` convention)."""

    ep_all_to_all: int = 0
    ep_counts: int = 0
    dp_reduce_scatter: int = 0
    dp_all_gather: int = 0
    edp_reduce_scatter: int = 0
    edp_all_gather: int = 0
    tp_all_reduce: int = 0
    tp_all_gather: int = 0
    tp_reduce_scatter: int = 0
    pp_send_recv: int = 0
    pp_metrics: int = 0
    pp_embedding: int = 0
    dp_metrics: int = 0
    grad_norm: int = 0

    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class RankPrediction:
    rank: int
    coords: dict[str, int]
    memory: Memory
    comm: Comm
    time: dict[str, float] = field(default_factory=dict)
    rows: float = 0.0  # rows its experts compute per MoE layer per micro-batch (time model)

    def to_dict(self) -> dict[str, Any]:
        mem = asdict(self.memory) | {"states": self.memory.states, "peak": self.memory.peak}
        return {"rank": self.rank, "coords": self.coords, "memory": mem, "comm": asdict(self.comm), "time": self.time}


def _dtype_bytes(layout: Layout) -> int:
    return 2 if layout.dtype == "bfloat16" else 4


def replay_rows(
    routing: list[ForwardRouting], layout: Layout, moe: MoEConfig
) -> dict[int, dict[str, float]]:
    """Per global rank, summed over the recorded steps: rows sent off-rank, received from
    other ranks, computed by its experts, for gradient (``grad``) and no-gradient forwards,
    and the number of forwards of each kind; ``rows_layers``: per MoE layer, the most rows
    its experts computed in one gradient forward (the observed maximum load, for memory);
    ``rows_sync``: per gradient forward and layer, the mean of the EP group's largest
    computed rows (every layer's all-to-all waits for the slowest member: for time);
    ``rows_mean``: the same for the group's mean (the work a CPU shared by all ranks does).
    Expert choice's counts are the rows its experts took: no capacity applies to them."""
    moe = moe.fine_grained()
    t = layout.topology
    by_key: dict[tuple[int, int, bool, int], ForwardRouting] = {}
    ordinal: dict[tuple[int, int, bool], int] = {}
    for rec in routing:
        key = (rec.rank, rec.step, rec.grad)
        idx = ordinal.get(key, 0)
        ordinal[key] = idx + 1
        by_key[(rec.rank, rec.step, rec.grad, idx)] = rec
    out: dict[int, dict[str, float]] = {r: {"send_grad": 0, "recv_grad": 0, "send_nograd": 0, "recv_nograd": 0,
                                            "rows_sync": 0, "rows_mean": 0, "forwards_grad": 0, "forwards_nograd": 0,
                                            "rows_layers": []}
                                        for r in range(t.world_size)}
    keys = sorted({(s, g, i) for (_, s, g, i) in by_key})
    for step, grad, idx in keys:
        for members in ep_groups(t):
            recs = [by_key.get((r, step, grad, idx)) for r in members]
            if any(r is None for r in recs):
                raise ConfigError(f"routing records incomplete for step {step}: ranks {members} must all be recorded")
            cap = None if moe.router == "expert_choice" else expert_capacity_or_none(
                recs[0].tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
            for layer in range(len(recs[0].counts_LE)):
                rows = group_rows([kept_counts(r.counts_LE[layer], cap) for r in recs])
                tag = "grad" if grad else "nograd"
                for i, rank in enumerate(members):
                    out[rank][f"send_{tag}"] += rows.send_off_P[i]
                    out[rank][f"recv_{tag}"] += rows.recv_off_P[i]
                    if grad:
                        layers = out[rank]["rows_layers"]
                        layers.extend([0] * (layer + 1 - len(layers)))
                        layers[layer] = max(layers[layer], rows.computed_P[i])
                        out[rank]["rows_sync"] += max(rows.computed_P)
                        out[rank]["rows_mean"] += sum(rows.computed_P) / len(members)
            for rank in members:
                out[rank][f"forwards_{'grad' if grad else 'nograd'}"] += 1
    for rank_rows in out.values():
        n = rank_rows["forwards_grad"] * max(len(rank_rows["rows_layers"]), 1)
        for key in ("rows_sync", "rows_mean"):
            rank_rows[key] = rank_rows[key] / n if n else 0
    return out


def _tp_bytes(comm: Comm, model: ModelConfig, moe: MoEConfig, layout: Layout, layers: list[int], stage: int,
              steps: int) -> None:
    """Tensor-parallel bytes of this code base's TP (``parallel/tensor_parallel.py``: megatron's
    column/row-parallel linears, vocab-parallel embedding and cross-entropy, MoE layers
    routing B·S/tp tokens per rank), per step, activations ``x = T·D`` in the activation dtype:

    - without SP: attention and dense MLP 2 all-reduces of x per layer (row-parallel forward,
      column-parallel backward); MoE layers 2 all-gathers of x (output forward, input
      gradient backward); embedding forward and LM head backward 1 all-reduce of x each;
    - with SP (Korthikanti): those all-reduces become an all-gather and a reduce-scatter of x
      each, the MoE layer needs none, the embedding reduce-scatters (backward: all-gather),
      and every column-parallel layer all-gathers its input once more in the backward;
    - the loss: 3 all-reduces of T floats (vocab-parallel cross-entropy); MoE statistics
      ``(3 + E)`` floats per layer, and ``E`` more for the micro-batch aux loss's counts
      (``B·E`` for the per-sequence one's: a sequence's tokens may lie on several TP ranks);
    - per step: gradients of parameters every TP rank computes on its own tokens (routers;
      with SP also the RMSNorm gains) or heads (the q/k norm gains of ``model.qk_norm``)
      all-reduced in ``finalize_model_grads``, and the routers' again for the logged router
      gradient norm.
    """
    moe = moe.fine_grained()
    t = layout.topology
    x = layout.tokens * model.dim * _dtype_bytes(layout)
    m = t.micro_batches
    n_moe = sum(model.is_moe_layer(i) for i in layers)
    n_dense = len(layers) - n_moe
    first, last = stage == 0, stage == t.pp - 1
    counts = {"micro_batch": moe.num_experts, "sequence": layout.micro_batch * moe.num_experts}
    stats = n_moe * 4 * (3 + moe.num_experts + counts.get(moe.aux_loss_scope, 0))
    loss = 3 * layout.tokens * 4 if last else 0
    routers = n_moe * router_params(model.dim, moe) * 4
    qk_norms = len(layers) * 2 * model.head_size * 4 if model.qk_norm else 0
    if layout.sequence_parallel:
        linears = 2 * len(layers) + 2 * n_dense  # qkv and out in every layer, w_in and w_out in dense ones
        # + column-parallel layers gather their input again in the backward (for the weight
        # gradient), and the embedding's reduce-scatter has an all-gather as its backward.
        regather = len(layers) + n_dense + last
        comm.tp_all_gather = steps * m * (linears + last + regather + first) * x
        comm.tp_reduce_scatter = steps * m * (linears + first + last) * x
        norms = (2 * len(layers) + last) * model.dim * 4
        comm.tp_all_reduce = steps * (m * (loss + stats) + 2 * routers + norms + qk_norms)
    else:
        ar = 2 * len(layers) + 2 * n_dense + first + last  # attention 2, dense MLP 2, embed, head
        comm.tp_all_reduce = steps * (m * (ar * x + loss + stats) + 2 * routers + qk_norms)
        comm.tp_all_gather = steps * m * 2 * n_moe * x


def tp_replicated_time(model: ModelConfig, layout: Layout, hw: Hardware, layers: list[int], stage: int) -> float:
    """Seconds per micro-batch a tensor-parallel rank spends on residual-stream work it does
    not share: without sequence parallelism every TP rank runs the blocks' two RMSNorms and
    residual adds, and the final norm, on all ``T`` tokens, forward and backward. The
    calibrated matmul efficiency folds that work into the FLOP rate, which ``tp`` divides,
    so ``(1 − 1/tp)`` of it is added back:
    ``(1 − 1/tp) · (2·L_stage + last) · T · D · residual_s_per_element`` (the hardware file's
    measured cost of one norm and add per element; 0 where it gives none). Not counted:
    the embedding's backward and the MoE layer's token split and gather, also per token."""
    t = layout.topology
    if t.tp == 1 or layout.sequence_parallel:
        return 0.0
    units = 2 * len(layers) + (stage == t.pp - 1)
    return (1 - 1 / t.tp) * units * layout.tokens * model.dim * hw.residual_s_per_element


def tp_calls_per_micro_batch(model: ModelConfig, layout: Layout, layers: list[int], stage: int) -> int:
    """Blocking TP collective calls of one micro-batch on one rank (``_tp_bytes``' list):
    without SP the all-reduces (2 per layer, 2 more per dense layer, embedding, head), 3
    for the loss and 2 statistics all-reduces and 2 all-gathers per MoE layer; with SP an
    all-gather and a reduce-scatter per linear pair, the backward re-gathers, the embedding."""
    n_moe = sum(model.is_moe_layer(i) for i in layers)
    n_dense = len(layers) - n_moe
    first, last = int(stage == 0), int(stage == layout.topology.pp - 1)
    if layout.sequence_parallel:
        linears = 2 * len(layers) + 2 * n_dense
        regather = len(layers) + n_dense + last
        return 2 * linears + 2 * (first + last) + regather + 3 * last + 2 * n_moe
    return 2 * len(layers) + 2 * n_dense + first + last + 3 * last + 4 * n_moe


def comm_bytes(model: ModelConfig, moe: MoEConfig, layout: Layout, rank: int, extra_forwards: int,
               rows: dict[str, float] | None, steps: int = 1) -> Comm:
    """Bytes of one rank over ``steps`` steps. ``rows`` from ``replay_rows`` (exact), else
    uniform routing. ``extra_forwards``: no-gradient routing pre-passes per step
    (``moe.aux_loss_scope=global_batch`` with more than one forward per global batch)."""
    moe = moe.fine_grained()
    t = layout.topology
    coords = rank_coords(t, rank)
    layers = stage_layers(model, layout, coords["pp"])
    n_moe = sum(model.is_moe_layer(i) for i in layers)
    m = t.micro_batches
    act = _dtype_bytes(layout)  # the dispatched rows are the norm's output, in the activation dtype
    comm = Comm()
    if t.ep > 1 and n_moe:
        D = model.dim
        if rows is None:
            off = layout.routed_tokens * rows_per_token(moe, layout) * (t.ep - 1) / t.ep
            comm.ep_all_to_all = int(steps * n_moe * (m * 2 * 2 * off + extra_forwards * 2 * off) * D * act)
            forwards = steps * (m + extra_forwards)
        else:
            grad_rows = 2 * (rows["send_grad"] + rows["recv_grad"])
            nograd_rows = rows["send_nograd"] + rows["recv_nograd"]
            comm.ep_all_to_all = int((grad_rows + nograd_rows) * D * act)
            forwards = int(rows["forwards_grad"] + rows["forwards_nograd"])
        local = moe.num_experts // t.ep
        comm.ep_counts = forwards * n_moe * (t.ep - 1) * (local + 3) * 8
    if t.world_size > 1:
        buffers = rank_buffers(model, moe, layout, coords["pp"])
        dense = sum(megatron_buffer_layout([s.numel for s in b], t.dp)[1] for b, is_expert in buffers if not is_expert)
        expert = sum(megatron_buffer_layout([s.numel for s in b], t.edp)[1] for b, is_expert in buffers if is_expert)
        # megatron-core 0.16's ChainedOptimizer: each inner distributed optimizer (dense, and
        # experts when there are expert parameters) all-gathers *every* buffer after its step.
        optimizers = 1 + bool(expert)
        comm.dp_reduce_scatter = steps * 4 * dense
        param, _ = _param_bytes(layout)  # the parameter buffers are gathered; gradients reduce in fp32
        comm.dp_all_gather = steps * optimizers * param * dense
        comm.edp_reduce_scatter = steps * 4 * expert
        comm.edp_all_gather = steps * optimizers * param * expert
        # The clipping norm's 4-byte all-reduce, and the training loop's non-finite check:
        # 4 float32 flags all-reduced over every rank (launch/train.py ``_on_any_rank``).
        comm.grad_norm = steps * (4 + NONFINITE_FLAGS * 4)
        n_moe_all = num_moe_layers(model)
        loss_sums, load_counts = 4 * 4, 4 * n_moe_all * moe.num_experts
        prepass = load_counts if extra_forwards else 0
        if t.dp > 1:
            router_grads = 4 * n_moe * router_params(model.dim, moe)  # this stage's routers
            comm.dp_metrics = steps * (loss_sums + load_counts + router_grads + prepass)
        if t.pp > 1:  # stage sums of the losses and counts, and of the router gradient's square (fp64)
            comm.pp_metrics = steps * (loss_sums + load_counts + 8 + prepass)
            if model.tie_embeddings and coords["pp"] in (0, t.pp - 1):
                comm.pp_embedding = steps * -(-model.vocab_size // t.tp) * model.dim * 4
    if t.tp > 1:
        _tp_bytes(comm, model, moe, layout, layers, coords["pp"], steps)
    if t.pp > 1:  # per chunk boundary and micro-batch: activations one way, their gradient back (pipeline_dtype)
        boundaries = t.vpp * 2 - (coords["pp"] == 0) - (coords["pp"] == t.pp - 1)
        comm.pp_send_recv = steps * m * boundaries * 2 * layout.tokens * model.dim * _dtype_bytes(layout)
    return comm


# -- step time ---------------------------------------------------------------------------

def cores_per_rank(hw: Hardware, world: int, threads: int | None = None) -> float:
    """Cores one rank computes on: a GPU rank has its device (1); CPU ranks share the
    machine's cores, each running ``threads`` threads (default ``max(1, cores // W)``,
    the launchers' default)."""
    if hw.kind != "cpu":
        return 1.0
    threads = threads or max(1, hw.cores // world)
    return min(float(threads), hw.cores / world)


def micro_batch_flops(model: ModelConfig, moe: MoEConfig, layout: Layout, stage: int, rows: float) -> dict[str, float]:
    """Forward FLOPs of one micro-batch on one rank of ``stage`` by kernel (``matmul``:
    projections, router (two matmuls under noisy top-k), head; ``grouped_mm``: the experts'
    ``rows``; ``attention``); backward = 2x."""
    moe = moe.fine_grained()
    t = layout.topology
    T, D, S, tp = layout.tokens, model.dim, layout.seq_len, t.tp
    hd = attention_width(model)  # H·Dh
    flops = {"matmul": 0.0, "grouped_mm": 0.0, "attention": 0.0}
    for i in stage_layers(model, layout, stage):
        flops["matmul"] += 2 * T * D * (model.qkv_width + hd) / tp  # qkv + out
        flops["attention"] += 2 * T * S * hd / tp  # causal QK^T and AV
        if model.is_moe_layer(i):
            f = moe.expert_ffn_dim / t.etp
            flops["matmul"] += 2 * layout.routed_tokens * router_params(D, moe)
            flops["grouped_mm"] += 2 * rows * D * (input_width(int(f), moe.activation) + f)
            if moe.num_shared_experts:
                fs = moe.expert_ffn_dim * moe.num_shared_experts / tp
                flops["matmul"] += 2 * T * D * (input_width(int(fs), moe.activation) + fs)
        else:
            f = model.ffn_dim / tp
            flops["matmul"] += 2 * T * D * (input_width(int(f), model.activation) + f)
    if stage == t.pp - 1:
        flops["matmul"] += 2 * T * D * model.vocab_size / tp
    return flops


def _link_for(hw: Hardware, members: list[int]) -> Link:
    nodes = {r // hw.devices_per_node for r in members}
    return hw.inter_node if len(nodes) > 1 else hw.intra_node


def _ring(link: Link, n: int, n_bytes: float, calls: int, efficiency: float = 1.0) -> float:
    """Reduce-scatter or all-gather of an ``n_bytes`` buffer over ``n`` ranks (ring), at
    ``efficiency`` of the link's bandwidth (``Hardware.collective_efficiency``)."""
    if n <= 1:
        return 0.0
    return calls * (n - 1) * link.latency_s + (n - 1) / n * n_bytes / (link.bandwidth * efficiency)


# ATen operations per micro-batch, forward + backward, counted once on this code base with a
# TorchDispatchMode around a 1- and a 2-block model (docs/simulation.md, "Operation counts"):
# a dense block (attention + MLP), an MoE block with the local dispatcher, the extra ops of
# the all-to-all dispatcher, and the embedding/head/loss; the optimizer step (torch AdamW,
# foreach) costs OPS_OPTIMIZER_BASE + OPS_OPTIMIZER_PER_BLOCK per block.
OPS_DENSE_BLOCK = 164
OPS_MOE_BLOCK = 257
OPS_MOE_EP_EXTRA = 45
OPS_MICRO_BATCH = 54
OPS_OPTIMIZER_BASE = 30
OPS_OPTIMIZER_PER_BLOCK = 58
ELEMENTWISE_PASSES = 3.0  # each kept activation is written forward, read and its gradient written backward


def rank_time(model: ModelConfig, moe: MoEConfig, layout: Layout, hw: Hardware, rank: int, comm: Comm,
              memory: Memory, opt_shard: int, rows: float, rows_mean: float) -> dict[str, float]:
    """Seconds per step on ``rank`` by component (see the module doc); ``rows``: the
    slowest EP member's expert rows per layer per micro-batch, ``rows_mean`` the mean."""
    t = layout.topology
    coords = rank_coords(t, rank)
    stage = coords["pp"]
    share = cores_per_rank(hw, t.world_size, layout.threads)
    if hw.kind == "cpu" and share < 1:
        # More ranks than cores: a rank waiting in gloo sleeps and the others use its core,
        # so the CPU does the group's mean work at ``share`` of a core per rank, or the
        # slowest rank's work on a whole core if that takes longer.
        rows = max(rows_mean, rows * share)
    bandwidth = hw.memory_bandwidth * min(share, 1.0) if hw.kind == "cpu" else hw.memory_bandwidth
    overhead = hw.op_overhead_s / min(share, 1.0) if hw.kind == "cpu" else hw.op_overhead_s
    layers = stage_layers(model, layout, stage)
    m = t.micro_batches
    # forward, backward (2x); a recomputed block's forward once more (selective recomputes
    # elementwise work only, counted with the activations below)
    passes = 3 + sum(layout.block_recomputed(model, i) for i in layers) / max(len(layers), 1)
    flops = micro_batch_flops(model, moe, layout, stage, rows)
    matmul_time = sum(passes * f / (hw.kernel_rate(k, layout.dtype) * share) for k, f in flops.items())
    head = head_elements(model, layout).bytes(layout) if stage == t.pp - 1 else 0
    kept = sum(activation_elements(model, moe, layout, i, rows).bytes(layout) for i in layers) + head
    every = layout if layout.recompute == "none" else replace(layout, recompute="none", recompute_layers=None)
    act = sum(activation_elements(model, moe, every, i, rows).bytes(layout) for i in layers) + head
    # each activation is written in the forward, read and its gradient written in the
    # backward; one recomputation frees (act - kept) is written once more in the backward
    elementwise = (ELEMENTWISE_PASSES * act + act - kept) / bandwidth
    n_moe = sum(model.is_moe_layer(i) for i in layers)
    ops = (n_moe * (OPS_MOE_BLOCK + (OPS_MOE_EP_EXTRA if t.ep > 1 else 0))
           + (len(layers) - n_moe) * OPS_DENSE_BLOCK + OPS_MICRO_BATCH)
    micro = {"matmul": matmul_time, "elementwise": elementwise, "op_overhead": ops * overhead}
    ep_members = next(g for g in ep_groups(t) if rank in g)
    a2a_calls = 5 * n_moe * m  # counts + 2 forward + 2 backward exchanges per layer
    ep_link = _link_for(hw, ep_members)
    ep_time = (a2a_calls * ep_link.latency_s + comm.ep_all_to_all / ep_link.bandwidth) / m if t.ep > 1 else 0.0
    tp_link = _link_for(hw, list(range(rank - coords["tp"], rank - coords["tp"] + t.tp)))
    tp_calls = tp_calls_per_micro_batch(model, layout, layers, stage)
    eff = {k: hw.collective_efficiency.get(k, 1.0) for k in ("reduce_scatter", "all_gather", "all_reduce")}
    # An all-reduce moves twice its bytes (ring: a reduce-scatter, then an all-gather).
    tp_time = (_ring(tp_link, t.tp, 2 * comm.tp_all_reduce / m, tp_calls, eff["all_reduce"])
               + _ring(tp_link, t.tp, comm.tp_all_gather / m, 0, eff["all_gather"])
               + _ring(tp_link, t.tp, comm.tp_reduce_scatter / m, 0, eff["reduce_scatter"])) if t.tp > 1 else 0.0
    pp_link = hw.inter_node if t.tp * t.dp >= hw.devices_per_node else hw.intra_node
    pp_time = (comm.pp_send_recv / m) / pp_link.bandwidth + 2 * pp_link.latency_s if t.pp > 1 else 0.0
    tp_replicated = tp_replicated_time(model, layout, hw, layers, stage)
    per_micro = sum(micro.values()) + ep_time + tp_time + tp_replicated + pp_time
    if t.pp > 1 and t.vpp > 1:
        bubble = m * per_micro * (t.pp - 1) / (t.vpp * m)
    else:
        bubble = (t.pp - 1) * per_micro
    dp_members = [r for r in range(t.world_size) if rank_coords(t, r)["pp"] == stage and rank_coords(t, r)["tp"] == coords["tp"]]
    dp_link = _link_for(hw, dp_members)
    edp_members = [r for r in range(t.world_size)
                   if all(rank_coords(t, r)[k] == coords[k] for k in ("pp", "etp", "ep"))]
    edp_link = _link_for(hw, edp_members)
    optimizers = 1 + bool(comm.edp_reduce_scatter)
    rs, ag = eff["reduce_scatter"], eff["all_gather"]
    dp_time = (_ring(dp_link, t.dp, comm.dp_reduce_scatter, 1, rs) + _ring(dp_link, t.dp, comm.dp_all_gather, optimizers, ag)
               + _ring(edp_link, t.edp, comm.edp_reduce_scatter, 1, rs)
               + _ring(edp_link, t.edp, comm.edp_all_gather, optimizers, ag)
               + (4 * dp_link.latency_s if t.world_size > 1 else 0.0))
    # Every blocking collective is a synchronisation point: ranks arrive after computing,
    # at different times, and the early ones wait (``Hardware.sync_wait``). Per step: the
    # all-to-alls, the TP collectives, 2 PP transfers per micro-batch, and the DP ring
    # calls plus the engine's 4 small all-reduces (loss, gradient norm, statistics).
    dp_calls = ((4 if t.world_size > 1 else 0) + (1 + optimizers if t.dp > 1 and comm.dp_reduce_scatter else 0)
                + (1 + optimizers if t.edp > 1 and comm.edp_reduce_scatter else 0))
    sync_calls = ((a2a_calls if t.ep > 1 else 0) + m * ((tp_calls if t.tp > 1 else 0) + (2 if t.pp > 1 else 0))
                  + dp_calls)
    buffer_elems = (memory.params + memory.grads) / 8
    optimizer_ops = OPS_OPTIMIZER_BASE + OPS_OPTIMIZER_PER_BLOCK * len(layers)
    optimizer_time = (28 * opt_shard + 12 * buffer_elems) / bandwidth + optimizer_ops * overhead
    return {
        "matmul": m * micro["matmul"],
        "elementwise": m * micro["elementwise"],
        "op_overhead": m * micro["op_overhead"],
        "ep_all_to_all": m * ep_time,
        "tp_comm": m * tp_time,
        "tp_replicated": m * tp_replicated,
        "pp_p2p": m * pp_time,
        "pp_bubble": bubble,
        "dp_comm": dp_time,
        "sync_wait": sync_calls * hw.sync_wait(t.world_size),
        "optimizer": optimizer_time,
    }


# -- the whole prediction -------------------------------------------------------------

@dataclass
class Prediction:
    layout: Layout
    hardware: Hardware
    ranks: list[RankPrediction]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        t = self.layout.topology
        return {"layout": asdict(t) | {"micro_batch": self.layout.micro_batch, "seq_len": self.layout.seq_len,
                                       "dtype": self.layout.dtype, "recompute": self.layout.recompute,
                                       "recompute_layers": self.layout.recompute_layers},
                "hardware": self.hardware.name, "summary": self.summary, "ranks": [r.to_dict() for r in self.ranks]}


def recorded_comm(model: ModelConfig, moe: MoEConfig, layout: Layout, routing: list[ForwardRouting]) -> list[Comm]:
    """Predicted bytes per rank summed over every step of a recording made on this layout
    (what ``CommCounter`` counts over the same steps)."""
    rows = replay_rows(routing, layout, moe)
    steps = len({r.step for r in routing})
    return [comm_bytes(model, moe, layout, rank, _extra_forwards(moe, layout), rows[rank], steps)
            for rank in range(layout.topology.world_size)]


def _extra_forwards(moe: MoEConfig, layout: Layout) -> int:
    """No-gradient routing pre-passes per step (launch/train.py ``_global_load``)."""
    t = layout.topology
    return t.micro_batches if moe.aux_loss_scope == "global_batch" and (t.micro_batches > 1 or t.dp > 1) else 0


def predict(model: ModelConfig, moe: MoEConfig, layout: Layout, hw: Hardware, engine: str = "megatron",
            routing: list[ForwardRouting] | None = None) -> Prediction:
    """Per-rank memory, bytes and time of one step; ``routing`` (recorded on this layout)
    makes bytes exact and sets the slowest expert rank's load, else routing is uniform.

    Routing recorded on another layout (a scaled-down emulation) gives the imbalance only:
    per layer and step, the expert shares are folded onto this layout's EP ranks."""
    moe = moe.fine_grained()
    t = layout.topology
    if hw.kind == "gpu" and t.world_size > hw.world_size:
        raise ConfigError(f"the layout needs {t.world_size} devices but cluster '{hw.name}' has "
                          f"{hw.nodes} x {hw.devices_per_node} = {hw.world_size}; raise nodes in the hardware file")
    same_layout = routing is not None and {r.rank for r in routing} == set(range(t.world_size))
    rows = replay_rows(routing, layout, moe) if same_layout else None
    steps = max(1, len({r.step for r in routing})) if same_layout else 1
    imbalance = _imbalance(routing, t.ep, moe) if routing else 1.0
    ranks = []
    for rank in range(t.world_size):
        coords = rank_coords(t, rank)
        memory, shard = state_memory(model, moe, layout, engine, rank)
        r_rows = rows[rank] if rows else None
        comm = comm_bytes(model, moe, layout, rank, _extra_forwards(moe, layout), r_rows, steps)
        stage_layers_ = stage_layers(model, layout, coords["pp"])
        n_moe = sum(model.is_moe_layer(i) for i in stage_layers_)
        if r_rows and t.ep > 1:
            comm = Comm(**{k: v / steps for k, v in asdict(comm).items()})  # per-step mean
            rows_time, rows_mean, rows_layers = r_rows["rows_sync"], r_rows["rows_mean"], r_rows["rows_layers"]
        else:
            if r_rows:
                comm = Comm(**{k: v / steps for k, v in asdict(comm).items()})
            rows_mean = layout.routed_tokens * rows_per_token(moe, layout)
            rows_time = rows_mean * imbalance
            rows_layers = [rows_time] * n_moe
        add_activations(memory, model, moe, layout, coords["pp"], rows_layers, shard)
        time_ = rank_time(model, moe, layout, hw, rank, comm, memory, shard, rows_time, rows_mean)
        ranks.append(RankPrediction(rank, coords, memory, comm, time_, rows_time))
    return Prediction(layout, hw, ranks, _summary(model, moe, layout, hw, ranks, imbalance))


def add_activations(memory: Memory, model: ModelConfig, moe: MoEConfig, layout: Layout, stage: int,
                    rows_layers: list[float], shard: int) -> None:
    """Fill ``memory``'s activations and largest transient for a rank of pipeline ``stage``
    whose experts compute ``rows_layers[j]`` rows in its j-th MoE layer; ``shard`` is its
    optimizer shard's numel (``state_memory``)."""
    t = layout.topology
    layers = stage_layers(model, layout, stage)
    in_flight = t.pp - stage if t.pp > 1 else 1
    moe_ordinal = {i: j for j, i in enumerate(i for i in layers if model.is_moe_layer(i))}
    rows = {i: rows_layers[moe_ordinal[i]] if i in moe_ordinal else 0 for i in layers}
    act = sum(activation_elements(model, moe, layout, i, rows[i]).bytes(layout) for i in layers)
    last = stage == t.pp - 1
    head = head_elements(model, layout).bytes(layout) if last else 0
    memory.activations = int(in_flight * act + head)
    # Largest transient: the loss's gradient over the logits (2·T·V) at the start of
    # the backward, AdamW's temporaries (one shard-sized buffer) in the update, or under
    # full recomputation a recomputed block's activations: its backward first runs its
    # forward again, which keeps everything (measured: `moe bench memory`), or under
    # selective an MLP's activation recompute (``refill_rise``).
    logits_grad = 2 * layout.tokens * model.vocab_size / t.tp * 4 if last else 0
    kept = replace(layout, recompute="none")
    recomputed = max((activation_elements(model, moe, kept, i, rows[i]).bytes(layout) for i in layers
                      if layout.block_recomputed(model, i)), default=0.0)
    head_freed = head - layout.tokens * model.vocab_size / t.tp * _dtype_bytes(layout) if last else 0.0
    memory.transient = int(max(logits_grad, 4 * shard, recomputed, refill_rise(model, moe, layout, layers, rows, head_freed)))


def refill_rise(model: ModelConfig, moe: MoEConfig, layout: Layout, layers: list[int], rows: dict[int, float],
                head_freed: float) -> float:
    """Under ``selective``: the most live bytes rise, over the backward's start, while an
    MLP's activation is recomputed (``moe.recompute.activation_without_output``), over the
    stage's blocks in backward order (b: activation bytes; R rows, ``f`` hidden, Fin input
    width: the routed experts' R and ``expert_ffn_dim/etp``, a dense MLP's T and ``ffn_dim/tp``).

    Block i's MLP backward rises twice; live at ``W_out``'s backward: the refilled output
    ``a`` (R·f), its gradient (R·f), the gradient of ``W_out``'s weight (``W``: E/ep·f·D for
    the routed experts, f·D for a dense MLP; a transient where it is added into a kept
    gradient), the output's gradient (R·D, the experts' own rows; a dense MLP's is the
    residual stream's) and the residual stream's gradient (T·D); at the activation's
    backward (``a`` freed with ``W_out``'s node): ``a``'s gradient (R·f), the recomputed
    output (R·f), the input's gradient (R·Fin) and T·D. Freed by then: the head but the
    logits the loop holds (``head_freed``), block i's pieces after the MLP (an MoE block's
    gated rows and, under ep > 1, the expert output rows R·D), and every later block's
    activations, ``h`` with its activation's node and ``a`` with ``W_out``'s (the refill
    hook drops its own references once it refilled ``a``). Measured (profiled allocation by
    allocation, one process, fp32, GeLU, ``test_simulate``'s
    ``test_selective_refill_rise_is_the_measured_backward_transient``): the peak is
    ``W_out``'s backward of the last MLP; shared experts are not counted."""
    if layout.recompute != "selective":
        return 0.0
    moe = moe.fine_grained()
    b, t, D, T = _dtype_bytes(layout), layout.topology, model.dim, layout.tokens
    rise, freed = 0.0, head_freed
    for i in reversed(layers):
        if model.is_moe_layer(i):
            R, f, activation = rows[i], moe.expert_ffn_dim / t.etp, moe.activation
            weight, grad_y = moe.num_experts / t.ep * f * D, R * D
            # the gated rows N·D (fp32: the expert rows; bf16: their fp32 copy) and the products N·D
            after = layout.routed_tokens * rows_per_token(moe, layout) * D * (4 + b) + (R * D * b if t.ep > 1 else 0.0)
        else:
            R, f, activation, after = T, model.ffn_dim / t.tp, model.activation, 0.0
            weight, grad_y = f * D, 0.0
        fin = input_width(int(f), activation)  # type: ignore[arg-type]
        w_out = 2 * R * f + weight + grad_y + T * D
        act = 2 * R * f + R * fin + T * D
        rise = max(rise, max(w_out, act) * b - freed - after)
        freed += activation_elements(model, moe, layout, i, rows[i]).bytes(layout)
    return rise


def uniform_memory(model: ModelConfig, moe: MoEConfig, layout: Layout, engine: str, rank: int) -> Memory:
    """Global ``rank``'s predicted bytes under uniform routing: model states (exact), the
    activations and the largest transient (see the module doc)."""
    moe = moe.fine_grained()
    memory, shard = state_memory(model, moe, layout, engine, rank)
    stage = rank_coords(layout.topology, rank)["pp"]
    n_moe = sum(model.is_moe_layer(i) for i in stage_layers(model, layout, stage))
    add_activations(memory, model, moe, layout, stage, [layout.routed_tokens * rows_per_token(moe, layout)] * n_moe, shard)
    return memory


def _imbalance(routing: list[ForwardRouting], ep: int, moe: MoEConfig) -> float:
    """Mean over recorded steps and layers of the slowest EP rank's load over the mean."""
    if ep == 1:
        return 1.0
    totals: dict[tuple[int, bool], list[list[float]]] = {}
    for rec in routing:
        if not rec.grad:
            continue
        acc = totals.setdefault((rec.step, rec.grad), [[0.0] * len(c) for c in rec.counts_LE])
        for layer, counts in enumerate(rec.counts_LE):
            for e, c in enumerate(counts):
                acc[layer][e] += c
    values = [load_imbalance(layer, ep) for acc in totals.values() for layer in acc if sum(layer)]
    return sum(values) / len(values) if values else 1.0


def _summary(model: ModelConfig, moe: MoEConfig, layout: Layout, hw: Hardware, ranks: list[RankPrediction],
             imbalance: float) -> dict[str, Any]:
    t = layout.topology
    step = max(sum(r.time.values()) for r in ranks)
    slowest = max(ranks, key=lambda r: sum(r.time.values()))
    tokens = layout.micro_batch * t.micro_batches * t.dp * layout.seq_len
    tokens_per_s = tokens / step
    peak_device = hw.peak_flops.get(layout.dtype, hw.peak_flops["float32"])
    if hw.kind == "cpu":
        peak_device *= cores_per_rank(hw, t.world_size, layout.threads)
    mfu = train_flops_per_token(model, moe) * tokens_per_s / (t.world_size * peak_device)
    peak_mem = max(r.memory.peak for r in ranks)
    over = [(r.rank, r.memory.peak - hw.memory_capacity) for r in ranks if r.memory.peak > hw.memory_capacity]
    bottleneck = max(slowest.time, key=lambda k: slowest.time[k])
    return {
        "step_time_s": step,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory_bytes": peak_mem,
        "memory_capacity_bytes": hw.memory_capacity,
        "fits": not over,
        "over_capacity": [{"rank": r, "over_bytes": int(b)} for r, b in over],
        "bottleneck": bottleneck,
        "slowest_rank": slowest.rank,
        "expert_imbalance": imbalance,
    }


MEASURED_KEYS = {
    "all_to_all_single@ep[float32]": "ep_all_to_all",
    "all_to_all_single@ep[bfloat16]": "ep_all_to_all",
    "all_gather_into_tensor@dp[bfloat16]": "dp_all_gather",
    "all_gather_into_tensor@edp[bfloat16]": "edp_all_gather",
    "all_reduce@tp[bfloat16]": "tp_all_reduce",
    "all_gather_into_tensor@tp[bfloat16]": "tp_all_gather",
    "reduce_scatter_tensor@tp[bfloat16]": "tp_reduce_scatter",
    "all_to_all_single@ep[int64]": "ep_counts",
    "reduce_scatter_tensor@dp[float32]": "dp_reduce_scatter",
    "all_gather_into_tensor@dp[float32]": "dp_all_gather",
    "reduce_scatter_tensor@edp[float32]": "edp_reduce_scatter",
    "all_gather_into_tensor@edp[float32]": "edp_all_gather",
    "all_reduce@dp[float32]": "dp_metrics",
    "all_reduce@tp[float32]": "tp_all_reduce",
    "all_gather_into_tensor@tp[float32]": "tp_all_gather",
    "reduce_scatter_tensor@tp[float32]": "tp_reduce_scatter",
    "all_reduce@pp[float32]": "pp_metrics",
    "all_reduce@pp[float64]": "pp_metrics",
    "all_reduce@embd[float32]": "pp_embedding",
}


def measured_categories(totals: dict[str, int]) -> dict[str, int]:
    """``CommCounter.totals()`` keys mapped onto ``Comm`` categories; the one 4-byte
    all-reduce over the distributed optimizer's group (every rank) is the gradient norm."""
    out = {name: 0 for name in Comm.__dataclass_fields__}
    for key, value in totals.items():
        if key in MEASURED_KEYS:
            out[MEASURED_KEYS[key]] += value
        elif key.split("@")[0] in ("isend", "irecv", "send", "recv"):
            out["pp_send_recv"] += value
        elif key.startswith("all_reduce@") and key.endswith("[float32]"):
            out["grad_norm"] += value
        else:
            out.setdefault("unclassified:" + key, 0)
            out["unclassified:" + key] += value
    return out
