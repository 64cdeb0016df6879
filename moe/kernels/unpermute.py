"""Unpermute: gather expert-sorted rows back to their tokens and combine them with the gates.

Legend: T tokens, D hidden, E experts, K top-k, A = T*K assignments, N rows in the
expert-sorted buffer, C capacity.

Forward, with ``dest_TK`` from ``permute`` (-1 for dropped assignments):

    y_TD[t] = sum_{k : dest_tk >= 0} w_tk * y_ND[dest_tk]

computed in fp32 and returned in ``y_ND``'s dtype (a token with every assignment dropped
gets a zero row). Backward:

    grad_y_ND[dest_tk] = w_tk * grad_y_TD[t]      (0 for rows no assignment points at)
    grad_w_tk          = <grad_y_TD[t], y_ND[dest_tk]>   (0 where dropped)

The forward is a gather (each output row read-combined by one program). The backward
scatters each kept assignment into its own row: ``permute`` gives every kept assignment
a distinct row, so no two programs write the same element and no atomics are needed.
Destinations outside ``[0, N)`` count as dropped in the Triton kernels (no access ever
leaves the buffers); the torch reference rejects those above N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe.kernels._triton import Impl, clamp_pow2, num_programs, pow2_at_least, use_triton


@dataclass(frozen=True)
class CombineBlocks:
    """Tile sizes: BLOCK_T tokens by BLOCK_D features."""

    block_t: int
    block_d: int

    @classmethod
    def for_shape(cls, dim: int) -> CombineBlocks:
        """16 tokens by up to 64 features: the backward, which unrolls K, compiles for sm_90
        with 4 warps without register spills up to K=8."""
        return cls(block_t=16, block_d=clamp_pow2(pow2_at_least(dim), 16, 64))


def _check_args(y_ND: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> None:
    if y_ND.dim() != 2 or dest_TK.dim() != 2:
        raise ValueError(f"y_ND and dest_TK must be 2-D, got {tuple(y_ND.shape)} and {tuple(dest_TK.shape)}")
    if weights_TK is not None and weights_TK.shape != dest_TK.shape:
        raise ValueError(f"weights_TK {tuple(weights_TK.shape)} must match dest_TK {tuple(dest_TK.shape)}")


# --------------------------------------------------------------------------- reference


def unpermute_reference(y_ND: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Plain-torch unpermute, differentiable through autograd in ``y_ND`` and ``weights_TK``.

    Computes in ``promote(dtype, fp32)`` (fp64 for fp64 inputs: the tests' reference).
    Dropped assignments read an appended zero row, so they contribute (and receive) 0.
    """
    _check_args(y_ND, dest_TK, weights_TK)
    num_rows, dim = y_ND.shape
    compute_dtype = torch.promote_types(torch.promote_types(y_ND.dtype, weights_TK.dtype), torch.float32)
    padded_ND = torch.cat([y_ND.to(compute_dtype), y_ND.new_zeros(1, dim, dtype=compute_dtype)])
    rows_A = torch.where(dest_TK >= 0, dest_TK, num_rows).reshape(-1)
    gathered_TKD = padded_ND.index_select(0, rows_A).view(*dest_TK.shape, dim)
    y_TD = torch.einsum("tk,tkd->td", weights_TK.to(compute_dtype), gathered_TKD)
    return y_TD.to(y_ND.dtype)


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _combine_kernel(
    y_ptr,
    dest_ptr,
    weights_ptr,
    out_ptr,
    num_tokens,
    num_rows,
    dim,
    stride_yn,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: a BLOCK_T x BLOCK_D tile of ``out_TD = sum_k w_tk * y_ND[dest_tk]``
    (``w = 1`` without weights); every element of the tile is written."""
    t_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok_T = t_T < num_tokens
    d_ok_D = d_D < dim
    acc_TD = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        a_T = t_T.to(tl.int64) * TOP_K + k
        dest_T = tl.load(dest_ptr + a_T, mask=t_ok_T, other=-1).to(tl.int64)
        row_ok_T = (dest_T >= 0) & (dest_T < num_rows)
        rows_TD = tl.load(
            y_ptr + dest_T[:, None] * stride_yn + d_D[None, :],
            mask=row_ok_T[:, None] & d_ok_D[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            w_T = tl.load(weights_ptr + a_T, mask=row_ok_T, other=0.0).to(tl.float32)
            rows_TD = rows_TD * w_T[:, None]
        acc_TD += rows_TD
    out_TD = t_T[:, None].to(tl.int64) * dim + d_D[None, :]
    tl.store(out_ptr + out_TD, acc_TD.to(out_ptr.dtype.element_ty), mask=t_ok_T[:, None] & d_ok_D[None, :])


@triton.jit
def _combine_backward_kernel(
    y_ptr,
    dest_ptr,
    weights_ptr,
    grad_out_ptr,
    grad_y_ptr,
    grad_weights_ptr,
    num_tokens,
    num_rows,
    dim,
    stride_yn,
    stride_gt,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_T tokens, all D (in BLOCK_D chunks). Scatters
    ``w_tk * grad_out[t]`` to row ``dest_tk`` and writes ``grad_w_tk`` for its tokens."""
    t_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k_K = tl.arange(0, BLOCK_K)
    t_ok_T = t_T < num_tokens
    grad_w_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        d_D = d_start + tl.arange(0, BLOCK_D)
        d_ok_D = d_D < dim
        grad_TD = tl.load(
            grad_out_ptr + t_T[:, None].to(tl.int64) * stride_gt + d_D[None, :],
            mask=t_ok_T[:, None] & d_ok_D[None, :],
            other=0.0,
        ).to(tl.float32)
        for k in tl.static_range(TOP_K):
            a_T = t_T.to(tl.int64) * TOP_K + k
            dest_T = tl.load(dest_ptr + a_T, mask=t_ok_T, other=-1).to(tl.int64)
            w_T = tl.load(weights_ptr + a_T, mask=t_ok_T, other=0.0).to(tl.float32)
            row_TD = dest_T[:, None] * stride_yn + d_D[None, :]
            row_ok_TD = ((dest_T >= 0) & (dest_T < num_rows))[:, None] & d_ok_D[None, :]
            y_TD = tl.load(y_ptr + row_TD, mask=row_ok_TD, other=0.0).to(tl.float32)
            dot_T = tl.sum(grad_TD * y_TD, axis=1)
            grad_w_TK += tl.where(k_K[None, :] == k, dot_T[:, None], 0.0)
            grad_row_TD = (grad_TD * w_T[:, None]).to(grad_y_ptr.dtype.element_ty)
            tl.store(grad_y_ptr + row_TD, grad_row_TD, mask=row_ok_TD)
    out_TK = t_T[:, None].to(tl.int64) * TOP_K + k_K[None, :]
    out_ok_TK = t_ok_T[:, None] & (k_K[None, :] < TOP_K)
    tl.store(grad_weights_ptr + out_TK, grad_w_TK.to(grad_weights_ptr.dtype.element_ty), mask=out_ok_TK)


# --------------------------------------------------------------------------- launchers


def combine_triton(
    y_ND: torch.Tensor,
    dest_TK: torch.Tensor,
    weights_TK: torch.Tensor | None,
    blocks: CombineBlocks | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out_TD[t] = sum_k w_tk * y_ND[dest_tk]`` over kept k (``w = 1`` when ``weights_TK``
    is None: that is ``permute``'s backward). No autograd; ``out`` is a test hook."""
    _check_args(y_ND, dest_TK, weights_TK)
    num_tokens, top_k = dest_TK.shape
    dim = y_ND.shape[1]
    blocks = blocks or CombineBlocks.for_shape(dim)
    y_ND = y_ND if y_ND.stride(1) == 1 else y_ND.contiguous()
    out = out if out is not None else torch.empty(num_tokens, dim, dtype=y_ND.dtype, device=y_ND.device)
    grid = (num_programs(num_tokens, blocks.block_t), num_programs(dim, blocks.block_d))
    _combine_kernel[grid](
        y_ND,
        dest_TK.contiguous(),
        None if weights_TK is None else weights_TK.contiguous(),
        out,
        num_tokens,
        y_ND.shape[0],
        dim,
        y_ND.stride(0),
        TOP_K=top_k,
        HAS_WEIGHTS=weights_TK is not None,
        BLOCK_T=blocks.block_t,
        BLOCK_D=blocks.block_d,
    )
    return out


def combine_backward_triton(
    y_ND: torch.Tensor,
    dest_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    grad_y_TD: torch.Tensor,
    blocks: CombineBlocks | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_y_ND, grad_weights_TK)`` of ``combine_triton``. ``grad_y_ND`` starts at zero
    (rows nobody points at, e.g. capacity padding, keep it); ``out`` is a test hook whose
    first tensor is zeroed here, the second written in full by the kernel."""
    num_tokens, top_k = dest_TK.shape
    blocks = blocks or CombineBlocks.for_shape(y_ND.shape[1])
    y_ND = y_ND if y_ND.stride(1) == 1 else y_ND.contiguous()
    grad_y_TD = grad_y_TD if grad_y_TD.stride(1) == 1 else grad_y_TD.contiguous()
    if out is None:
        out = (torch.empty_like(y_ND, memory_format=torch.contiguous_format), torch.empty_like(weights_TK))
    grad_y_ND, grad_weights_TK = out
    grad_y_ND.zero_()
    _combine_backward_kernel[(num_programs(num_tokens, blocks.block_t),)](
        y_ND,
        dest_TK.contiguous(),
        weights_TK.contiguous(),
        grad_y_TD,
        grad_y_ND,
        grad_weights_TK,
        num_tokens,
        y_ND.shape[0],
        y_ND.shape[1],
        y_ND.stride(0),
        grad_y_TD.stride(0),
        TOP_K=top_k,
        BLOCK_T=blocks.block_t,
        BLOCK_D=blocks.block_d,
        BLOCK_K=pow2_at_least(top_k),
    )
    return grad_y_ND, grad_weights_TK


# --------------------------------------------------------------------------- autograd


class _UnpermuteFn(torch.autograd.Function):
    """Triton unpermute; differentiable in ``y_ND`` and ``weights_TK``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y_ND: torch.Tensor,
        dest_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(y_ND, dest_TK, weights_TK)
        return combine_triton(y_ND, dest_TK, weights_TK)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y_TD: torch.Tensor
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        y_ND, dest_TK, weights_TK = ctx.saved_tensors
        grad_y_ND, grad_weights_TK = combine_backward_triton(y_ND, dest_TK, weights_TK, grad_y_TD)
        return grad_y_ND, None, grad_weights_TK


def unpermute(
    y_ND: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor, impl: Impl = "auto"
) -> torch.Tensor:
    """``y_TD[t] = sum_{k: dest_tk >= 0} weights_TK[t, k] * y_ND[dest_tk]`` (see the module docstring).

    ``dest_TK`` must give distinct rows to distinct kept assignments, as ``permute`` does.
    ``impl="auto"`` runs Triton on CUDA tensors (and on CPU tensors under
    ``TRITON_INTERPRET=1``), else the torch reference; ``"triton"``/``"torch"`` force one.
    """
    if not use_triton(y_ND.device, impl):
        return unpermute_reference(y_ND, dest_TK, weights_TK)
    return _UnpermuteFn.apply(y_ND, dest_TK, weights_TK)
