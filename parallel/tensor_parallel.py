"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019), optionally with sequence
parallelism (Korthikanti et al. 2022), applied to the plain ``moe.model.Transformer``.

Legend: B batch (sequences of one micro-batch), S sequence, D model dim, V vocab,
Vp vocab padded to a multiple of tp, v = Vp/P this rank's vocabulary slice, H query heads,
G key/value heads, R = H/G, Dh head dim, F hidden dim, E experts, P = tp ranks.

What :func:`apply_tensor_parallel` changes (every parameter keeps its fully-qualified
name: the names are the distributed-checkpoint keys):

- ``attn.qkv``, dense ``ffn.w_in`` and ``lm_head`` become megatron-core
  ``ColumnParallelLinear``s (rows split: whole key/value groups, whole SwiGLU (gate, up)
  pairs, a vocabulary slice); ``attn.out`` and ``ffn.w_out`` become ``RowParallelLinear``s
  (columns split, outputs summed over tp). The qkv rows are group-major,
  ``[G][R + 2][Dh]`` (``moe.model.Attention``), so rank r's contiguous rows are groups
  ``[r·G/P, (r+1)·G/P)``: their query heads ``[r·H/P, (r+1)·H/P)`` with their keys and
  values, and ``attn.out``'s columns ``[r·H·Dh/P, (r+1)·H·Dh/P)`` are those heads' outputs.
  G must be divisible by tp (``parallel/topology.py``); megatron's replication of KV heads
  when tp > G is not supported. ``embed`` becomes a ``VocabParallelEmbedding``
  and ``loss_fn`` megatron's ``vocab_parallel_cross_entropy``. V is padded to Vp; the
  padded logits are masked to -inf inside the loss, so the loss equals the unpadded one.
  With tied embeddings ``lm_head`` shares the embedding's shard. ``ModelOutput.logits_BSV``
  is then this rank's vocabulary slice ``[B, S, Vp/P]`` (padding columns not masked).
- Each rank keeps exactly its slice of the full model (built identically on every rank
  from the same seed), so the sharded model computes the single-process function.
- MoE layers (class swapped to :class:`TensorParallelMoELayer`): the ep group folds over
  tp·dp ranks, so every TP rank must route *different* tokens (otherwise experts see each
  token tp times and their gradients come out tp times too large). Without sequence
  parallelism the replicated input is split over tp before the layer (backward:
  all-gather) and the output gathered after it (backward: split, since what follows is
  replicated). With sequence parallelism the residual stream is already split.
- The split is along B (whole sequences per rank; megatron's sequence-parallel
  collectives split dim 0, which is B in this batch-first model), so the per-sequence
  aux loss still sees whole sequences; B must be divisible by tp (topology checks it).
- Parameters that see only this rank's tokens (routers, shared experts and, with
  sequence parallelism, the RMSNorm gains) or only its heads (the q/k RMSNorm gains of
  ``model.qk_norm``, replicated, applied to every head: megatron's ``qk_layernorm`` rule)
  are marked ``sequence_parallel = True``:
  megatron's ``finalize_model_grads`` sums their gradients over tp (the engine passes
  ``sequence_parallel=True`` to it whenever tp > 1). Expert weights are marked
  ``allreduce = False``: their gradients are reduced over the expert-data-parallel group,
  which contains the TP ranks (see ``parallel/engine.py`` for the ``1/dp`` scaling).
- Sharded parameters carry megatron's ``tensor_model_parallel``, ``partition_dim`` and
  ``partition_stride``; expert weights carry them too (megatron marks every expert weight,
  split over ``groups.etp``, of size 1 without expert tensor parallelism). The optimizer
  counts a parameter without the mark once per TP group (on TP rank 0) in the gradient norm.

Routing statistics under TP: rank r routes T/P tokens. The load-balancing loss uses ``f``
over all tokens of the micro-batch (counts summed over tp) and ``P^(r)`` over its own, so
the reference ``E·sum_i f_i·P_i`` with ``P = mean_r P^(r)`` is the mean over ranks; likewise
the z-loss. Each rank backpropagates ``loss^(r)/P`` (router gradients are summed over tp)
and reports the tp mean as the value, identical on every TP rank. The per-sequence scope
needs no exchange (each rank holds B/P whole sequences: the mean over all sequences is the
mean of the ranks' means); the global-batch scope's ``f`` comes from the caller, whose
counts (``tokens_per_expert_E``) are summed over tp. Capacity is per source rank, as under
expert parallelism: ``ceil(cf·(T/P)·K/E)`` for each rank's own tokens. Router jitter draws
each rank's noise for its own tokens, so with ``moe.jitter_eps > 0`` TP (like DP) routes
differently from one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.layer import MoELayer, MoEStats
from moe.losses import load_balancing_loss_from_stats
from moe.model import Transformer
from moe.router import Routing
from parallel.expert_tensor_parallel import shard_expert_hidden
from parallel.groups import ParallelGroups
from parallel.megatron_compat import apply_cpu_compat


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The smallest multiple of ``tp`` that holds ``vocab_size`` ids."""
    return -(-vocab_size // tp) * tp


def _model_parallel_config(tp: int, sequence_parallel: bool) -> Any:
    """megatron's layer config: fp32 parameters allocated on the CPU, not initialised
    (each rank copies its slice of the reference weights in afterwards)."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
    )


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    """megatron's tensor-parallel attributes: split along ``dim`` over the (expert-)TP group."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/``size`` slice of ``full`` along ``dim``."""
    return full.detach().chunk(size, dim=dim)[rank].clone()


def _no_init(weight: torch.Tensor) -> None:
    """The init_method megatron's constructors require; never called (perform_initialization=False)."""
    raise AssertionError("tensor-parallel layers are filled from the reference model, not initialised")


def _plain_state_dict(layer: nn.Module) -> None:
    """Drop megatron's load hook that adds an ``_extra_state`` key, so a tensor-parallel
    layer's state dict has the same keys as the ``nn.Linear``/``nn.Embedding`` it replaces."""
    layer._load_state_dict_pre_hooks.clear()


def _column_parallel_cls() -> type:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        """``y = x · W_shard^T``: this rank's rows of W (output features); the input is
        replicated (its gradient is summed over tp) or, with sequence parallelism, split
        along dim 0 and all-gathered first. Returns the output only (no bias)."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return ColumnParallel


def _row_parallel_cls() -> type:
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallel(RowParallelLinear):
        """``y = sum_tp x_shard · W_shard^T``: this rank's columns of W (input features) on
        its slice of the input; partial outputs are all-reduced over tp or, with sequence
        parallelism, reduce-scattered along dim 0. Returns the output only."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return RowParallel


def _embedding_cls() -> type:
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    class VocabParallelEmbed(VocabParallelEmbedding):
        """Rows ``[vocab_start_index, vocab_end_index)`` of the (padded) table; ids outside
        look up zeros, and the partial embeddings are summed over tp (all-reduce, or a
        reduce-scatter along B with sequence parallelism)."""

        sequence_parallel: bool = False

        def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            outside_BS = (ids_BS < self.vocab_start_index) | (ids_BS >= self.vocab_end_index)
            local_BS = (ids_BS - self.vocab_start_index).masked_fill(outside_BS, 0)
            x_BSD = F.embedding(local_BS, self.weight).masked_fill(outside_BS.unsqueeze(-1), 0.0)
            if self.sequence_parallel:
                return reduce_scatter_to_sequence_parallel_region(x_BSD, group=self.tp_group)
            return reduce_from_tensor_model_parallel_region(x_BSD, group=self.tp_group)

    return VocabParallelEmbed


class VocabParallelCrossEntropy(nn.Module):
    """Mean next-token cross-entropy over vocab-sharded logits ``[B, S, Vp/P]``
    (megatron's ``vocab_parallel_cross_entropy``: max, sum of exps and the target logit
    are reduced over tp). Columns of padded ids (``>= vocab_size``) are set to -inf
    first: they add nothing to the softmax and get zero gradient."""

    def __init__(self, vocab_size: int, vocab_start: int, vocab_end: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab_start = vocab_start
        self.vocab_end = vocab_end

    def forward(self, logits_BSv: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits_BSv = logits_BSv.float()
        if self.vocab_end > self.vocab_size:
            padded_v = torch.arange(self.vocab_start, self.vocab_end, device=logits_BSv.device) >= self.vocab_size
            logits_BSv = logits_BSv.masked_fill(padded_v, float("-inf"))
        return vocab_parallel_cross_entropy(logits_BSv, targets_BS).mean()


def _mean_with_local_grad(local: torch.Tensor, total: torch.Tensor, size: int) -> torch.Tensor:
    """Value ``total/size`` (``total``: the detached sum of ``local`` over the group);
    gradient ``1/size`` times the local one. Each rank backpropagates its own term scaled
    by ``1/P``; gradients then summed over the group are those of the mean."""
    return local / size + (total - local.detach()) / size


class TensorParallelMoELayer(MoELayer):
    """An ``MoELayer`` whose TP ranks route disjoint sequences of the micro-batch.

    Set by class swap (``layer.__class__``), which keeps every parameter name. Attributes
    added: ``tp_group`` and ``sequence_parallel`` (input already split along B).
    """

    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    def forward(
        self, x_BSD: torch.Tensor, load_E: torch.Tensor | None = None, ids_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """``x_BSD``: the whole micro-batch (replicated), or this rank's B/P sequences with
        sequence parallelism; ``ids_BS`` (hash routing): always the whole micro-batch's."""
        from megatron.core.tensor_parallel.mappings import (
            gather_from_sequence_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        size, rank = self.tp_group.size(), self.tp_group.rank()
        if not self.sequence_parallel:
            x_BSD = scatter_to_sequence_parallel_region(x_BSD, group=self.tp_group)
        if ids_BS is not None:
            ids_BS = ids_BS.chunk(size)[rank]
        y_BSD, stats = super().forward(x_BSD, load_E, ids_BS)
        if not self.sequence_parallel:
            y_BSD = gather_from_sequence_parallel_region(y_BSD, tensor_parallel_output_grad=False, group=self.tp_group)
        return y_BSD, self._reduce_stats(stats)

    def _aux_loss(self, routing: Routing, batch: int, load_E: torch.Tensor | None) -> torch.Tensor:
        """The micro-batch ``f`` counts every TP rank's tokens (the reference counts the
        whole micro-batch); ``P`` stays local (see the module docstring)."""
        if self.cfg.aux_loss_scope == "sequence" or (self.cfg.aux_loss_scope == "global_batch" and load_E is not None):
            return super()._aux_loss(routing, batch, load_E)
        counts_E = routing.counts_E.detach().float()
        dist.all_reduce(counts_E, group=self.tp_group)
        num_tokens, top_k = routing.experts_TK.shape
        f_E = counts_E / counts_E.sum().clamp(min=1)
        return load_balancing_loss_from_stats(routing.prob_sum_E, routing.counts_E, num_tokens, top_k, self.cfg.aux_loss_coeff, f_E)

    def _reduce_stats(self, stats: MoEStats) -> MoEStats:
        """Losses: tp means (gradient 1/P each); counts: summed; dropped fraction: averaged
        (every rank holds the same number of tokens). One all-reduce for the detached values."""
        size = dist.get_world_size(self.tp_group)
        counts_E = stats.tokens_per_expert_E.float()
        packed = torch.cat([torch.stack([stats.aux_loss.detach(), stats.z_loss.detach(), stats.dropped_fraction.float()]), counts_E])
        total = packed.clone()
        dist.all_reduce(total, group=self.tp_group)
        return MoEStats(
            aux_loss=_mean_with_local_grad(stats.aux_loss, total[0], size),
            z_loss=_mean_with_local_grad(stats.z_loss, total[1], size),
            tokens_per_expert_E=total[3:].round().to(stats.tokens_per_expert_E.dtype),
            dropped_fraction=total[2] / size,
        )


def _mark_sequence_parallel(module: nn.Module) -> None:
    """Gradients of these parameters are partial sums over this rank's tokens: megatron's
    ``finalize_model_grads`` all-reduces them over tp."""
    for param in module.parameters():
        param.sequence_parallel = True  # type: ignore[attr-defined]


def _column(linear: nn.Linear, config: Any, group: dist.ProcessGroup, rows: int | None = None) -> nn.Module:
    """A column-parallel copy of ``linear`` (output features split); ``rows`` pads them first."""
    out_features, in_features = linear.weight.shape
    rows = out_features if rows is None else rows
    layer = _column_parallel_cls()(
        in_features, rows, config=config, init_method=_no_init, bias=False, gather_output=False, tp_group=group
    )
    full = torch.zeros(rows, in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    full[:out_features] = linear.weight.detach()
    with torch.no_grad():
        layer.weight.copy_(_shard(full, 0, group.rank(), group.size()))
    _mark_sharded(layer.weight, 0)
    _plain_state_dict(layer)
    return layer


def _row(linear: nn.Linear, config: Any, group: dist.ProcessGroup) -> nn.Module:
    """A row-parallel copy of ``linear`` (input features split, outputs summed over tp)."""
    out_features, in_features = linear.weight.shape
    layer = _row_parallel_cls()(
        in_features, out_features, config=config, init_method=_no_init, bias=False,
        input_is_parallel=True, skip_bias_add=False, tp_group=group,
    )
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 1, group.rank(), group.size()))
    _mark_sharded(layer.weight, 1)
    _plain_state_dict(layer)
    return layer


def _embedding(embed: nn.Embedding, vocab_padded: int, config: Any, group: dist.ProcessGroup, sp: bool) -> nn.Module:
    layer = _embedding_cls()(vocab_padded, embed.embedding_dim, init_method=_no_init, config=config, tp_group=group)
    full = torch.zeros(vocab_padded, embed.embedding_dim, dtype=embed.weight.dtype, device=embed.weight.device)
    full[: embed.num_embeddings] = embed.weight.detach()
    with torch.no_grad():
        layer.weight.copy_(_shard(full, 0, group.rank(), group.size()))
    layer.sequence_parallel = sp
    _mark_sharded(layer.weight, 0)
    _plain_state_dict(layer)
    return layer


def _check_bias_free(model: Transformer) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ValueError(f"apply_tensor_parallel: {name} has a bias; the model's projections are bias-free")


def apply_tensor_parallel(model: Transformer, groups: ParallelGroups, sequence_parallel: bool) -> None:
    """Shard ``model`` in place over ``groups.tp`` (see the module docstring), and every
    expert's hidden width over ``groups.etp`` (``parallel/expert_tensor_parallel.py``).

    Call on a model built identically on every rank (same seed), after
    ``apply_expert_parallel`` (which replaces expert parameters; the marks set here must
    land on the final ones). With tp = 1 only the experts are touched (etp split, marks).
    """
    apply_cpu_compat()
    _check_bias_free(model)
    group = groups.tp
    tp = group.size()
    sp = sequence_parallel and tp > 1
    config = _model_parallel_config(tp, sp)
    for layer in model.moe_layers():
        if groups.etp.size() > 1:
            shard_expert_hidden(layer.experts, groups.etp)
        for param in layer.experts.parameters():
            param.allreduce = False  # type: ignore[attr-defined]
        _mark_sharded(layer.experts.w_in_EDF, 2)
        _mark_sharded(layer.experts.w_out_EFD, 1)
    if tp == 1:
        return
    vocab = model.cfg.vocab_size
    vocab_padded = padded_vocab_size(vocab, tp)
    for block in model.blocks.values():
        block.attn.qkv = _column(block.attn.qkv, config, group)
        block.attn.out = _row(block.attn.out, config, group)
        for norm in (block.attn.q_norm, block.attn.k_norm):
            if norm is not None:
                _mark_sequence_parallel(norm)
        if isinstance(block.ffn, MoELayer):
            block.ffn.__class__ = TensorParallelMoELayer
            block.ffn.tp_group = group
            block.ffn.sequence_parallel = sp
            _mark_sequence_parallel(block.ffn.router)
            if block.ffn.shared is not None:
                _mark_sequence_parallel(block.ffn.shared)
        else:
            block.ffn.w_in = _column(block.ffn.w_in, config, group)
            block.ffn.w_out = _row(block.ffn.w_out, config, group)
        if sp:
            _mark_sequence_parallel(block.attn_norm)
            _mark_sequence_parallel(block.ffn_norm)
    if model.embed is not None:
        model.embed = _embedding(model.embed, vocab_padded, config, group, sp)
    if model.lm_head is not None:
        tied = model.cfg.tie_embeddings and model.embed is not None
        model.lm_head = _column(model.lm_head, config, group, rows=vocab_padded)
        if tied:
            model.lm_head.weight = model.embed.weight
        if sp:
            _mark_sequence_parallel(model.norm)
        start = group.rank() * vocab_padded // tp
        model.loss_fn = VocabParallelCrossEntropy(vocab, start, start + vocab_padded // tp)
