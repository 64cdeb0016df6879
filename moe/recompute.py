"""Activation recomputation: keep fewer activations, compute some of them again in the backward.

Legend: T tokens, D model dim, F hidden width of an MLP or expert (N expert-sorted rows in
place of T for experts).

``train.recompute`` picks what a block keeps for its backward (``apply_recompute`` marks the
modules; their forwards read the marks):

- ``none``: everything autograd saves.
- ``full``: whole blocks (megatron-core's ``recompute_granularity=full`` with the ``block``
  method: the first ``recompute_layers`` blocks of each pipeline chunk, all of them when
  null). A recomputed block keeps only its inputs (the residual stream ``T·D``, plus the
  token ids / global load it was handed) and runs its forward again when the backward
  reaches it: ``torch.utils.checkpoint`` without reentrancy, ``preserve_rng_state=True``
  (the recompute draws the same router jitter, hence routes the same tokens) and
  ``early_stop=False``, so the recompute runs the whole block: every collective inside it
  (tensor-parallel gathers/reductions, the expert-parallel count and row all-to-alls, the
  tensor-parallel stats all-reduce) runs again, once per block, in forward order, on every
  rank of the group, as in the first forward, whatever tensors the rank happens to save.
  The block's outputs (its hidden states and ``MoEStats``) are those of the first forward;
  the recompute's are dropped, so routing losses and expert counts are counted once.
- ``selective``: the pieces that are large to keep and cheap to compute (megatron-core's
  fine-grained ``recompute_modules``):

  * ``layernorm``: the block's two RMSNorms (``attn_norm``, ``ffn_norm``) run checkpointed;
    they keep their input only (which their caller keeps anyway), not ``x·rsqrt`` (``T·D``)
    nor ``rsqrt`` (``T``).
  * ``mlp_act`` / ``moe_act``: the activation of the dense MLPs, the shared experts and the
    routed experts. ``act(W_in·x)`` is kept by ``W_out`` for its weight gradient; with
    :func:`activation_without_output` its storage is freed once ``W_out`` ran and recomputed
    from ``W_in·x`` (kept for the activation's own backward) just before ``W_out``'s backward
    (megatron-core's ``CheckpointWithoutOutput``). Frees ``T·F`` per MLP (``N·F`` per
    expert layer), and for SwiGLU also the ``silu(gate)`` product term (``T·F``).

  Not recomputed: attention (its softmax is never kept: ``scaled_dot_product_attention``
  keeps the logsumexp only), the q/k norms, the router, and the MoE permute/unpermute
  buffers (megatron-core's ``moe`` module recompute): their recompute would re-run the
  expert-parallel all-to-alls, which selective mode is meant to avoid.

Recomputing the same ops on the same inputs in the same order gives the same bits: the
losses, gradients and routed counts do not change with the mode (``tests/test_recompute.py``).

Why in ``moe/``: marking modules and checkpointing needs no rank, group or global state;
the collectives a block holds re-run by themselves because they are ops of its forward.
It is applied after tensor and expert parallelism (which replace modules: the marks must
be on the final ones) and after the pipeline split (``recompute_layers`` counts a chunk's
blocks): ``launch/train.py``'s ``Run.__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import nn

Recompute = Literal["none", "selective", "full"]


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` keeping only ``args`` for the backward, which runs ``fn`` again (see the
    module doc: non-reentrant, same RNG, the whole of ``fn`` re-run). Without gradients
    (evaluation, a forward-only pre-pass) ``fn`` simply runs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, early_stop=False)


def in_backward() -> bool:
    """Whether this runs inside a backward pass: a forward there is a recompute, which
    observers of the forward (``parallel.simulator.routing.RoutingRecorder``) must not count
    again. (torch has no public flag for it; the autograd engine's graph task id is -1
    outside a backward.)"""
    return torch._C._current_graph_task_id() != -1


class _ActivationWithoutOutput(torch.autograd.Function):
    """``y = act(h)`` whose backward recomputes ``act`` from ``h`` (saved) with gradients on."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.act = act
        ctx.autocast = _autocast_state(h)
        ctx.save_for_backward(h)
        return act(h)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(True)
        with torch.enable_grad(), _autocast(h, ctx.autocast):
            y = ctx.act(h)
        (grad_h,) = torch.autograd.grad(y, h, grad_y)
        return grad_h, None


def _autocast_state(x: torch.Tensor) -> tuple[bool, torch.dtype]:
    device = x.device.type
    return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(x: torch.Tensor, state: tuple[bool, torch.dtype]) -> Any:
    """The forward's autocast state, for a recompute in the backward (which runs outside it)."""
    enabled, dtype = state
    return torch.autocast(x.device.type, dtype=dtype) if enabled else nullcontext()


def activation_without_output(
    act: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``project(act(h))`` where ``act(h)`` is not kept: its storage is freed after ``project``
    ran (which saved it for its weight gradient) and refilled with ``act(h)`` when the
    gradient of ``project``'s output arrives, before ``project``'s backward reads it."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        return project(act(h))
    autocast = _autocast_state(h)
    a = _ActivationWithoutOutput.apply(h, act)
    y = project(a)
    if not y.requires_grad:
        return y
    size = a.untyped_storage().nbytes()
    a.untyped_storage().resize_(0)
    # The hook's own references to h and a, dropped once it refilled a: afterwards a lives
    # on in W_out's saved tensor and h in _ActivationWithoutOutput's, each freed when its
    # backward node ran, not when the step's graph (which holds this hook) is freed.
    held = [h, a]

    def refill(grad: torch.Tensor) -> None:
        if not held:  # a second backward over a retained graph: a is still full
            return
        h_, a_ = held
        held.clear()
        with torch.no_grad(), _autocast(h_, autocast):
            again = act(h_.detach())
        a_.untyped_storage().resize_(size)
        a_.untyped_storage().copy_(again.untyped_storage())

    y.register_hook(refill)
    return y


def apply_recompute(model: nn.Module, mode: Recompute, layers: int | None = None) -> None:
    """Mark ``model``'s modules for recomputation in ``mode`` (see the module doc).

    ``model``: a ``moe.model.Transformer`` or one pipeline chunk of it (its ``blocks``);
    ``layers``: for ``full``, how many of its first blocks are recomputed (None: all; a chunk
    with fewer recomputes all of its own, as on megatron-core's uneven stages).
    Idempotent; ``none`` clears the marks.
    """
    if layers is not None and mode != "full":
        raise ValueError(f"recompute layers={layers} counts whole blocks: it needs mode='full', not {mode!r}")
    blocks = list(model.blocks.values())  # type: ignore[union-attr]
    count = len(blocks) if layers is None else min(layers, len(blocks))
    for index, block in enumerate(blocks):
        block.recompute_block = mode == "full" and index < count
        block.recompute_norms = mode == "selective"
        for module in block.modules():
            if hasattr(module, "recompute_act"):  # MLP, GroupedExperts
                module.recompute_act = mode == "selective"
