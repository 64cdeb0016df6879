"""Pipeline parallelism: the model split into stages, run by megatron-core's schedules.

Legend: B batch (micro-batch rows), S sequence, D model dim, V vocab, L MoE layers of the
full model, E experts, M micro-batches per step (per data-parallel rank).

**Stages.** The full model is built on every rank from the same seed; :func:`split_stages`
keeps this rank's chunks. With ``pp`` ranks and ``vpp`` virtual stages per rank there are
``pp·vpp`` virtual stages of consecutive layers; chunk ``v`` on pipeline rank ``r`` is
virtual stage ``v·pp + r`` (megatron's interleaved assignment; with ``vpp = 1`` rank ``r``
holds stage ``r``). Rank ``r`` holds ``n_r`` layers in all (:func:`layers_per_rank`): by
default ``n_layers/pp`` each; ``parallel.first_stage_layers`` / ``last_stage_layers`` set
``n_0`` / ``n_{pp-1}`` and the other ranks share the rest evenly. Each of a rank's ``vpp``
chunks holds ``n_r/vpp`` of them, so ``vpp`` must divide every ``n_r`` (megatron-core's
``get_transformer_layer_offset`` / ``get_num_layers_to_build``: the first/last counts are
the whole rank's, split evenly over its virtual stages). E.g. 6 layers, ``pp=2, vpp=2,
first_stage_layers=2``: rank 0 holds ``[0] [3]``, rank 1 ``[1, 2] [4, 5]``. The embedding
lives only on virtual stage 0; the final norm, LM head and loss only on the last. A chunk
is the model with the other blocks deleted, so parameter names (checkpoint keys) are the
full model's.

**Tied embeddings.** With ``tie_embeddings`` the first stage's embedding and the last
stage's LM head are two copies of one matrix. They start equal (same seed; the engine also
broadcasts the first stage's copy over the embedding group), and the engine sums their
local gradients over the embedding group (first + last pipeline rank) *before* the
data-parallel reduction, so both copies get ``dL/dW = dL/dW_embed + dL/dW_head`` and
take the same optimizer step. The last stage's copy is marked ``shared`` so megatron
counts it once in the gradient norm.

**Losses.** The last stage's loss is ``lm + aux + z`` of its own MoE layers; megatron
divides it by ``M``. A stage before the last cannot add its routing losses to that scalar,
so :class:`AttachLoss` hangs them on the stage's output activation: the identity in the
forward, and in the backward it also feeds ``1/M`` as the gradient of the attached loss.
Every MoE layer's aux/z loss therefore enters the gradient as ``(1/M)·d(aux)/dθ``, exactly
as in the single-process loop ``(lm + aux + z)/M`` (the scale is explicit, no global state,
unlike megatron's ``MoEAuxLossAutoScaler``).

**Statistics.** :class:`PipelineRunner` records, per forward, the stage's losses and per-
expert counts into the rows of its own MoE layers (global index); summing the records over
the pipeline group assembles the full model's figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe.config import ModelConfig
from moe.model import ModelOutput, Transformer
from parallel.tensor_parallel import local_shape


def layers_per_rank(n_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers each pipeline rank holds over all its chunks: ``first`` / ``last`` on the first
    / last rank when given, the rest shared evenly by the others (megatron-core's uneven
    pipeline). Raises ``ValueError`` when that split is not whole (``parallel.topology``
    refuses such layouts first, with a message naming the fix)."""
    ends = (first is not None) + (last is not None)
    rest = n_layers - (first or 0) - (last or 0)
    middle = pp - ends
    counts = [rest // middle if middle > 0 else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    if sum(counts) != n_layers or min(counts) < 1:
        raise ValueError(f"{n_layers} layers do not split over pp={pp} with first={first}, last={last}: {counts}")
    return counts


def stage_layers(
    n_layers: int, pp: int, vpp: int, pp_rank: int, first: int | None = None, last: int | None = None
) -> list[list[int]]:
    """Global layer indices of each chunk on pipeline rank ``pp_rank``: chunk ``v`` is
    virtual stage ``v·pp + pp_rank``; virtual stages hold consecutive layers, those of rank
    ``r`` ``n_r/vpp`` each (``n_r`` from :func:`layers_per_rank`)."""
    counts = layers_per_rank(n_layers, pp, first, last)
    if any(c % vpp for c in counts):
        raise ValueError(f"vpp={vpp} does not divide the layers per pipeline rank {counts}")
    chunks, start = [], 0
    for _ in range(vpp):
        for rank, count in enumerate(counts):
            if rank == pp_rank:
                chunks.append(list(range(start, start + count // vpp)))
            start += count // vpp
    return chunks


class PipelineChunk(Transformer):
    """One virtual stage: the full model's modules for its layers, under their full names.

    ``pre_process``/``post_process``: this chunk holds the embedding / the LM head (megatron's
    names, read by its schedules and ``finalize_model_grads``). ``share_embeddings_and_output_
    weights`` is False for megatron: the tied-copy gradient sum is done by the engine, before
    the data-parallel reduction (see the module docstring), not by ``finalize_model_grads``.
    """

    share_embeddings_and_output_weights = False

    def __init__(self, net: Transformer, layers: list[int], stage: int, n_stages: int) -> None:
        nn.Module.__init__(self)  # the modules are taken from ``net``, not built again
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.cfg = net.cfg
        self.moe_cfg = net.moe_cfg
        self.pre_process = stage == 0
        self.post_process = stage == n_stages - 1
        self.embed = net.embed if self.pre_process else None
        self.blocks = nn.ModuleDict({str(i): net.blocks[str(i)] for i in layers})
        self.norm = net.norm if self.post_process else None
        self.lm_head = net.lm_head if self.post_process else None
        self.loss_fn = net.loss_fn
        self.register_buffer("rope_cos_SF", net.rope_cos_SF, persistent=False)
        self.register_buffer("rope_sin_SF", net.rope_sin_SF, persistent=False)
        if self.lm_head is not None and self.cfg.tie_embeddings and not self.pre_process:
            self.lm_head.weight.shared = True  # the first stage's copy is the one counted
        self.input_tensor_SBD: torch.Tensor | None = None

    def set_input_tensor(self, tensors: list[torch.Tensor | None]) -> None:
        """megatron's schedules hand the previous stage's activation here (``[S, B, D]``)."""
        self.input_tensor_SBD = tensors[0]

    def tied_weight(self) -> nn.Parameter | None:
        """This chunk's copy of a tied embedding/LM-head matrix, if it holds one."""
        if not self.cfg.tie_embeddings:
            return None
        if self.pre_process:
            return self.embed.weight
        return self.lm_head.weight if self.post_process else None


def split_stages(
    net: Transformer, pp_rank: int, pp: int, vpp: int, first: int | None = None, last: int | None = None
) -> list[PipelineChunk]:
    """This rank's chunks of ``net``, in virtual-stage order (``first`` / ``last``: the
    layers of the first / last pipeline rank, ``parallel.first_stage_layers`` /
    ``last_stage_layers``; None = an even share).

    ``net`` is pruned to what the chunks hold (the other stages' blocks deleted, embedding /
    head set to None where no chunk has them): afterwards ``net.named_parameters()`` is
    exactly this rank's parameters under the full model's names, and shares them with the
    chunks. (Its own forward is not meant to run any more.)
    """
    n_stages = pp * vpp
    layer_sets = stage_layers(net.cfg.n_layers, pp, vpp, pp_rank, first, last)
    chunks = [PipelineChunk(net, layers, v * pp + pp_rank, n_stages) for v, layers in enumerate(layer_sets)]
    kept = {str(i) for layers in layer_sets for i in layers}
    for name in [n for n in net.blocks if n not in kept]:
        del net.blocks[name]
    if not any(c.pre_process for c in chunks):
        net.embed = None
    if not any(c.post_process for c in chunks):
        net.norm = None
        net.lm_head = None
    return chunks


def pipeline_config(
    model: ModelConfig, pp: int, vpp: int, tp: int = 1, first: int | None = None, last: int | None = None
) -> Any:
    """The megatron ``TransformerConfig`` the schedules read (through each DDP chunk), and
    ``finalize_model_grads`` too: as ``parallel/engine.py``'s ``_transformer_config``,
    ``sequence_parallel`` is on whenever ``tp > 1`` so that the gradients of parameters
    marked ``sequence_parallel`` (routers, shared experts, SP norm gains) are summed over tp.
    The schedules then size the activations they exchange as ``seq_length/tp``:
    :meth:`PipelineRunner.run` passes a ``seq_length`` that accounts for it.

    Activations cross stages as fp32 ``[S, B, D]`` tensors of a fixed shape.
    ``batch_p2p_comm=False``: with batched p2p the interleaved schedule at ``pp = 2`` swaps
    tensors when the previous and next stage are the same peer (Megatron-LM #750, #1450),
    and the batched path calls ``torch.cuda.synchronize``; separate isend/irecv are exact.

    ``first`` / ``last`` (uneven stages) become ``num_layers_in_first/last_pipeline_stage``:
    the schedules do not read them (activations have one shape whatever a stage holds),
    but megatron then checks the split by its own rules, and the config says what runs.
    """
    from megatron.core.transformer import TransformerConfig

    if pp == 2 and first is not None and last is not None and first + last == model.n_layers:
        last = None  # the same split (the last stage takes the rest); megatron-core 0.16 divides by
        # zero computing interleaved offsets when both ends are set and no middle stage is left
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return TransformerConfig(
            num_layers=model.n_layers,
            hidden_size=model.dim,
            num_attention_heads=model.n_heads,
            pipeline_model_parallel_size=pp,
            tensor_model_parallel_size=tp,
            sequence_parallel=tp > 1,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
            pipeline_dtype=torch.float32,
            batch_p2p_comm=False,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
        )


class AttachLoss(torch.autograd.Function):
    """``y = x`` in the forward; the backward passes ``dy`` to ``x`` and ``scale`` to ``loss``.

    So a loss computed on a stage that ends in an activation (not a scalar) still reaches
    its parameters with ``d(total)/d(loss) = scale``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        shape, dtype, device = ctx.loss_meta
        return grad_x, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


@dataclass
class PipelineStats:
    """Sums over the micro-batches this rank's chunks ran (before any reduction).

    ``sums_4``: LM loss (last stage only), aux loss, z-loss, dropped fraction summed over this
    rank's MoE layers; ``counts_LE``: routed assignments, rows of this rank's MoE layers only;
    ``lm_losses``: the last stage's LM loss of each micro-batch, in order (empty elsewhere).
    """

    sums_4: torch.Tensor
    counts_LE: torch.Tensor
    lm_losses: list[float]


class PipelineRunner:
    """Runs megatron's pipeline schedule over this rank's DDP-wrapped chunks.

    ``get_forward_backward_func()`` picks 1F1B for one chunk per rank and the interleaved
    schedule for several. Data reaches every chunk through its own iterator over the same
    micro-batches (each chunk runs micro-batch ``m`` at its ``m``-th forward); only the first
    chunk embeds the token ids (every chunk's hash routers read them) and only the last reads
    the targets.

    Under tensor parallelism (``tp``, applied before the split) the activation between stages
    is ``[s, b, D]`` with ``sequence_parallel``, this TP rank's contiguous ``B·S/tp`` tokens
    of the micro-batch (``(b, s) = parallel.tensor_parallel.local_shape(B, S, tp)``:
    ``[S, B/tp, D]`` when tp divides B), and the replicated ``[S, B, D]`` without; each TP
    rank of a stage exchanges its own with the same TP rank of the next stage.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        chunks: list[PipelineChunk],
        n_moe: int,
        n_experts: int,
        tp: int = 1,
        sequence_parallel: bool = False,
    ) -> None:
        self.modules = modules
        self.chunks = chunks
        self.n_moe = n_moe
        self.n_experts = n_experts
        self.tp = tp
        self.sequence_parallel = sequence_parallel and tp > 1
        self._chunk_of = {id(m): c for m, c in zip(modules, chunks, strict=True)}

    def run(
        self,
        micro: list[tuple[torch.Tensor, torch.Tensor]],
        load_LE: torch.Tensor | None,
        forward_only: bool,
    ) -> PipelineStats:
        """Forward (and, unless ``forward_only``, backward) of every micro-batch through the
        pipeline. Gradients accumulate into the DDP buffers; nothing is reduced here."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n_micro = len(micro)
        stats = PipelineStats(torch.zeros(4), torch.zeros(self.n_moe, self.n_experts), [])

        def forward_step(data: Iterator[tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> tuple[torch.Tensor, Any]:
            x_BS, y_BS = next(data)
            chunk = self._chunk_of[id(model)]
            hidden_BSD = None if chunk.pre_process else chunk.input_tensor_SBD.transpose(0, 1)
            # Every chunk gets the token ids: the first embeds them, and hash routers read them.
            out: ModelOutput = model(x_BS, y_BS if chunk.post_process else None, load_LE, hidden_BSD)
            self._record(stats, chunk, out)
            if chunk.post_process:
                return out.loss, lambda loss: (loss, {})
            hidden_BSD = out.hidden_BSD
            if not forward_only:
                hidden_BSD = AttachLoss.apply(hidden_BSD, out.aux_loss + out.z_loss, 1.0 / n_micro)
            return hidden_BSD.transpose(0, 1).contiguous(), None

        batch, seq = micro[0][0].shape
        rows, seq = local_shape(batch, seq, self.tp) if self.sequence_parallel else (batch, seq)
        # megatron sizes the exchanged tensors [seq_length/tp, micro_batch_size, D] when its
        # config has sequence_parallel (``pipeline_config``: whenever tp > 1, for the gradient
        # sums); ``seq_length = seq·tp`` makes that our [seq, rows, D].
        split = self.tp if self.modules[0].config.sequence_parallel else 1
        schedule = get_forward_backward_func()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
            schedule(
                forward_step_func=forward_step,
                data_iterator=[iter(micro) for _ in self.modules],
                model=self.modules if len(self.modules) > 1 else self.modules[0],
                num_microbatches=n_micro,
                seq_length=seq * split,
                micro_batch_size=rows,
                forward_only=forward_only,
            )
        return stats

    def _record(self, stats: PipelineStats, chunk: PipelineChunk, out: ModelOutput) -> None:
        if out.lm_loss is not None:
            stats.lm_losses.append(out.lm_loss.item())
            stats.sums_4[0] += out.lm_loss.detach().float()
        dropped = sum((s.dropped_fraction for s in out.moe_stats), torch.zeros(()))
        stats.sums_4[1:] += torch.stack([out.aux_loss, out.z_loss, dropped]).detach().cpu().float()
        moe_blocks = [name for name, block in chunk.blocks.items() if chunk.cfg.is_moe_layer(int(name))]
        for name, layer_stats in zip(moe_blocks, out.moe_stats, strict=True):
            stats.counts_LE[chunk.moe_layer_index(name)] += layer_stats.tokens_per_expert_E.cpu().float()

