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
  token tp times and their gradients come out tp times too large). As megatron-core's
  token dispatchers do, the micro-batch's *tokens* are split over tp, not its sequences:
  TP rank r takes the contiguous tokens ``[r·T/P, (r+1)·T/P)`` of the flattened
  ``T = B·S`` (:func:`local_shape`; whole sequences ``[r·B/P, (r+1)·B/P)`` when P divides
  B, half a sequence each at B = 1, P = 2). Without sequence parallelism the replicated
  input is split so before the layer (backward: all-gather) and the output all-gathered
  over tp after it (backward: split, since what follows is replicated). With sequence
  parallelism the residual stream is already split so. Any micro-batch size works with
  any tp as long as P divides B·S (topology checks it).
- The token split in the batch-first model: this rank's T/P tokens are held as
  ``[b, s, D]`` with ``(b, s) = local_shape(B, S, P)`` (``[B/P, S, D]`` when P divides B,
  else ``[1, B·S/P, D]``); the sequence-parallel collectives (megatron's, along dim 0)
  all-gather that to ``[P·b, s, D]`` and reduce-scatter ``[P·b, s, D]`` back to it, whose
  row-major order is the whole micro-batch's. The column-parallel layers view what they
  gather as ``[B, S, ...]`` (attention needs whole sequences), the row-parallel ones and the
  embedding view their ``[B, S, D]`` partial sums as ``[P·b, s, D]`` before the
  reduce-scatter. (B, S) is the micro-batch's: a :class:`TokenSplit` shared by a model's TP
  modules, set by a forward pre-hook of every block from the token ids it is handed
  (``Transformer.forward`` and the pipeline chunks hand every block the ids).
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

Routing statistics under TP (megatron-core's convention: the router reduces its aux-loss
statistics over the TP(·CP) group, ``get_tokens_per_expert_and_token_count(reduce_group=
tp_cp_group)``, and divides the z-loss coefficient by the TP size): rank r routes
``T_rank = B·S/P`` tokens. A TP rank's aux loss is over the whole micro-batch, as one
process's is: ``f`` counts every TP rank's assignments (summed over tp), ``P^(r)`` is the
mean router probability over the rank's own tokens, and rank r's loss
``E·sum_i f_i·P^(r)_i`` has tp mean ``E·sum_i f_i·P_i`` (``P = mean_r P^(r)``), the
micro-batch loss of one process; likewise the z-loss (mean over the rank's tokens, tp mean
= the micro-batch's). Each rank backpropagates ``loss^(r)/P`` (router gradients are summed
over tp) and reports the tp mean as the value, identical on every TP rank. The
per-sequence scope counts ``f_b`` per sequence over tp too (a sequence may straddle TP
ranks): rank r's loss is ``P · coeff·E·mean_b sum_i f_bi·P^(r)_bi`` with ``P^(r)_bi`` its
tokens' probability sums over S, whose tp mean is one process's per-sequence loss. The
global-batch scope's ``f`` comes from the caller, whose counts (``tokens_per_expert_E``)
are summed over tp. Capacity is per source rank, as under expert parallelism:
``capacity = ceil(cf·T_rank·K/E)`` with ``T_rank = B·S/P`` for each rank's own tokens, so
the layer drops what one process applying it to each rank's tokens separately drops.
Router jitter draws each rank's noise for its own tokens, so with ``moe.jitter_eps > 0`` TP
(like DP) routes differently from one process.

Routers that need whole sequences (expert choice over a sequence, which chooses among a
sequence's tokens; noisy top-k, whose noise is seeded by the sequence): a TP rank must hold
whole sequences, i.e. tp must divide the micro-batch (:func:`check_whole_sequences`, run
before training). Then each rank routes its sequences exactly as one process does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.config import ConfigError, MoEConfig
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


def local_shape(batch: int, seq: int, tp: int) -> tuple[int, int]:
    """How one TP rank holds its contiguous ``B·S/tp`` tokens of a ``[B, S]`` micro-batch:
    ``(B/tp, S)`` (whole sequences) when tp divides B, else ``(1, B·S/tp)``. Either way the
    ranks' pieces, stacked along dim 0 in rank order, are the micro-batch in row-major order."""
    if (batch * seq) % tp:
        raise ValueError(f"a micro-batch of {batch}x{seq} = {batch * seq} tokens does not split over tp={tp}")
    return (batch // tp, seq) if batch % tp == 0 else (1, batch * seq // tp)


def check_whole_sequences(moe: MoEConfig, tp: int, micro_batch: int) -> None:
    """Refuse a TP layout that splits sequences when the router needs them whole (see the
    module docstring); ``micro_batch``: sequences per forward of one data-parallel rank."""
    if tp == 1 or micro_batch % tp == 0:
        return
    why = ("moe.router=noisy_topk seeds its noise by whole sequences" if moe.router == "noisy_topk"
           else "moe.router=expert_choice with moe.expert_choice_scope=sequence chooses among a sequence's tokens")
    if moe.router == "noisy_topk" or (moe.router == "expert_choice" and moe.expert_choice_scope == "sequence"):
        raise ConfigError(
            f"parallel.tp={tp} with micro-batches of {micro_batch} sequence(s): {why}, and tensor parallelism would "
            f"split sequences over the TP ranks; make train.micro_batch_size a multiple of parallel.tp={tp}"
        )


class TokenSplit:
    """The shape ``(B, S)`` of the micro-batch a model is running, shared by its TP modules
    (set by every block's forward pre-hook from the token ids, see the module docstring),
    and this rank's place in the TP group."""

    def __init__(self, tp: int, rank: int) -> None:
        self.tp = tp
        self.rank = rank
        self.shape: tuple[int, int] | None = None

    def micro_batch(self) -> tuple[int, int]:
        """``(B, S)`` of the micro-batch now running."""
        if self.shape is None:
            raise RuntimeError(
                "sequence-parallel layers need the micro-batch's shape: run them inside the model's blocks, which "
                "record it from the token ids (or set TokenSplit.shape)"
            )
        return self.shape

    def local(self) -> tuple[int, int]:
        """``(b, s)``: how this rank holds its tokens (:func:`local_shape`)."""
        return local_shape(*self.micro_batch(), self.tp)

    def record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of a block ``(x, cos, sin, load_E, ids_BS)``: remember ``ids_BS``'s shape."""
        ids_BS = kwargs.get("ids_BS", args[4] if len(args) > 4 else None)
        if ids_BS is not None:
            self.shape = (ids_BS.shape[0], ids_BS.shape[1])


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
        replicated (its gradient is summed over tp) or, with sequence parallelism, this
        rank's tokens ``[b, s, D]``, all-gathered along dim 0 first and the output viewed
        as the micro-batch's ``[B, S, W/P]`` (``token_split``). Returns the output only (no bias)."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state
        token_split: TokenSplit | None = None  # set under sequence parallelism

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            y = super().forward(x)[0]
            if self.token_split is None:
                return y
            return y.view(*self.token_split.micro_batch(), y.shape[-1])

    return ColumnParallel


def _row_parallel_cls() -> type:
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallel(RowParallelLinear):
        """``y = sum_tp x_shard · W_shard^T``: this rank's columns of W (input features) on
        its slice of the input ``[B, S, W/P]``; partial outputs are all-reduced over tp or,
        with sequence parallelism, the input is viewed as ``[P·b, s, W/P]`` and the partial
        outputs reduce-scattered along dim 0 to this rank's tokens ``[b, s, D]``. Returns
        the output only."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state
        sp_tp: int = 1  # the TP size when sequence parallel, else 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if self.sp_tp > 1:
                rows, seq = local_shape(x.shape[0], x.shape[1], self.sp_tp)
                x = x.reshape(self.sp_tp * rows, seq, x.shape[-1])
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
        look up zeros, and the partial embeddings are summed over tp (all-reduce, or, with
        sequence parallelism, viewed as ``[P·b, s, D]`` and reduce-scattered along dim 0 to
        this rank's tokens ``[b, s, D]``)."""

        sequence_parallel: bool = False

        def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            outside_BS = (ids_BS < self.vocab_start_index) | (ids_BS >= self.vocab_end_index)
            local_BS = (ids_BS - self.vocab_start_index).masked_fill(outside_BS, 0)
            x_BSD = F.embedding(local_BS, self.weight).masked_fill(outside_BS.unsqueeze(-1), 0.0)
            if self.sequence_parallel:
                tp = self.tp_group.size()
                rows, seq = local_shape(x_BSD.shape[0], x_BSD.shape[1], tp)
                return reduce_scatter_to_sequence_parallel_region(x_BSD.view(tp * rows, seq, -1), group=self.tp_group)
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
    """An ``MoELayer`` whose TP ranks route disjoint tokens of the micro-batch: rank r its
    contiguous ``T/P`` of the flattened ``B·S`` (:func:`local_shape`).

    Set by class swap (``layer.__class__``), which keeps every parameter name. Attributes
    added: ``tp_group``, ``sequence_parallel`` (input already split) and ``token_split``
    (the micro-batch's shape, shared with the model's other TP modules).
    """

    tp_group: dist.ProcessGroup
    sequence_parallel: bool
    token_split: TokenSplit

    def forward(
        self, x_BSD: torch.Tensor, load_E: torch.Tensor | None = None, ids_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """``x_BSD``: the whole micro-batch (replicated), or with sequence parallelism this
        rank's tokens ``[b, s, D]``; ``ids_BS`` (hash routing): always the whole micro-batch's.
        Returns the output in the input's layout, and the stats reduced over tp."""
        from megatron.core.tensor_parallel.mappings import (
            gather_from_sequence_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        size, rank = self.tp_group.size(), self.tp_group.rank()
        if not self.sequence_parallel:
            self.token_split.shape = (x_BSD.shape[0], x_BSD.shape[1])
        batch, seq = self.token_split.micro_batch()
        check_whole_sequences(self.cfg, size, batch)
        rows, cols = self.token_split.local()
        x_bsD = x_BSD
        if not self.sequence_parallel:
            x_bsD = scatter_to_sequence_parallel_region(x_BSD.reshape(size * rows, cols, -1), group=self.tp_group)
        ids_bs = None if ids_BS is None else ids_BS.reshape(size, -1)[rank].view(rows, cols)
        y_bsD, stats = super().forward(x_bsD, load_E, ids_bs)
        if self.sequence_parallel:
            return y_bsD, self._reduce_stats(stats)
        y_BSD = gather_from_sequence_parallel_region(y_bsD, tensor_parallel_output_grad=False, group=self.tp_group)
        return y_BSD.view(batch, seq, -1), self._reduce_stats(stats)

    def _aux_loss(self, routing: Routing, batch: int, load_E: torch.Tensor | None) -> torch.Tensor:
        """The micro-batch (or per-sequence) ``f`` counts every TP rank's tokens (the
        reference counts the whole micro-batch); ``P`` stays local (see the module docstring)."""
        if self.cfg.aux_loss_scope == "sequence":
            return self._sequence_aux_loss(routing)
        if self.cfg.aux_loss_scope == "global_batch" and load_E is not None:
            return super()._aux_loss(routing, batch, load_E)
        counts_E = routing.counts_E.detach().float()
        dist.all_reduce(counts_E, group=self.tp_group)
        num_tokens, top_k = routing.experts_TK.shape
        f_E = counts_E / counts_E.sum().clamp(min=1)
        return load_balancing_loss_from_stats(routing.prob_sum_E, routing.counts_E, num_tokens, top_k, self.cfg.aux_loss_coeff, f_E)

    def _sequence_aux_loss(self, routing: Routing) -> torch.Tensor:
        """``P · coeff·E·mean_b sum_i f_bi · P^(r)_bi``: ``f_bi`` the fraction of sequence b's
        ``S·K`` assignments that chose expert i (counted on every TP rank, summed over tp),
        ``P^(r)_bi`` this rank's tokens of sequence b's probability sum over S. Its tp mean
        is one process's per-sequence loss, whichever ranks a sequence's tokens lie on."""
        batch, seq = self.token_split.micro_batch()
        size, rank = self.tp_group.size(), self.tp_group.rank()
        num_tokens, top_k = routing.experts_TK.shape
        num_experts = routing.num_experts
        device = routing.experts_TK.device
        seq_T = torch.div(rank * num_tokens + torch.arange(num_tokens, device=device), seq, rounding_mode="floor")
        slots_TK = seq_T.unsqueeze(1) * num_experts + routing.experts_TK
        counts_BE = torch.zeros(batch * num_experts, device=device).index_add_(
            0, slots_TK.reshape(-1), torch.ones(slots_TK.numel(), device=device)
        ).view(batch, num_experts)
        dist.all_reduce(counts_BE, group=self.tp_group)
        probs_TE = routing.probs_TE
        prob_sum_BE = probs_TE.new_zeros(batch, num_experts).index_add(0, seq_T, probs_TE)
        f_BE = counts_BE / (seq * top_k)
        per_sequence_B = (f_BE.to(prob_sum_BE.dtype) * prob_sum_BE / seq).sum(dim=1)
        return size * self.cfg.aux_loss_coeff * num_experts * per_sequence_B.mean()

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


def _column(
    linear: nn.Linear, config: Any, group: dist.ProcessGroup, split: TokenSplit, rows: int | None = None
) -> nn.Module:
    """A column-parallel copy of ``linear`` (output features split); ``rows`` pads them first;
    under sequence parallelism its output is viewed as ``split``'s micro-batch."""
    out_features, in_features = linear.weight.shape
    rows = out_features if rows is None else rows
    layer = _column_parallel_cls()(
        in_features, rows, config=config, init_method=_no_init, bias=False, gather_output=False, tp_group=group
    )
    if config.sequence_parallel:
        layer.token_split = split
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
    if config.sequence_parallel:
        layer.sp_tp = group.size()
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
    split = TokenSplit(tp, group.rank())
    for block in model.blocks.values():
        block.register_forward_pre_hook(split.record, with_kwargs=True)
        block.attn.qkv = _column(block.attn.qkv, config, group, split)
        block.attn.out = _row(block.attn.out, config, group)
        for norm in (block.attn.q_norm, block.attn.k_norm):
            if norm is not None:
                _mark_sequence_parallel(norm)
        if isinstance(block.ffn, MoELayer):
            block.ffn.__class__ = TensorParallelMoELayer
            block.ffn.tp_group = group
            block.ffn.sequence_parallel = sp
            block.ffn.token_split = split
            _mark_sequence_parallel(block.ffn.router)
            if block.ffn.shared is not None:
                _mark_sequence_parallel(block.ffn.shared)
        else:
            block.ffn.w_in = _column(block.ffn.w_in, config, group, split)
            block.ffn.w_out = _row(block.ffn.w_out, config, group)
        if sp:
            _mark_sequence_parallel(block.attn_norm)
            _mark_sequence_parallel(block.ffn_norm)
    if model.embed is not None:
        model.embed = _embedding(model.embed, vocab_padded, config, group, sp)
    if model.lm_head is not None:
        tied = model.cfg.tie_embeddings and model.embed is not None
        model.lm_head = _column(model.lm_head, config, group, split, rows=vocab_padded)
        if tied:
            model.lm_head.weight = model.embed.weight
        if sp:
            _mark_sequence_parallel(model.norm)
        start = group.rank() * vocab_padded // tp
        model.loss_fn = VocabParallelCrossEntropy(vocab, start, start + vocab_padded // tp)
