"""Permute: scatter token rows into expert-sorted order (dropless, or capacity with padding).

Legend: T tokens, D hidden, E experts, K top-k, A = T*K assignments, N rows in the
expert-sorted buffer, C capacity; G blocks of BLOCK_A assignments in the Triton kernels.

Assignment ``a = t*K + k`` sends token t to expert ``e_a = experts_TK[t, k]``; it is kept
unless ``keep_TK[t, k]`` is False. With ``kept_e`` the number of kept assignments to e and
``rank_a`` the number of kept assignments to ``e_a`` that come before a (token-major
order, as ``LocalDispatcher.permute``'s stable sort):

    dest_a = start_{e_a} + rank_a  (kept),  -1 (dropped);   x_ND[dest_a] = x_TD[a // K]

- dropless (``capacity=None``): N = A, ``start_e = sum_{e' < e} kept_e'`` (rows compact);
- capacity C: N = E*C, ``start_e = e*C``; rows ``[e*C + kept_e, (e+1)*C)`` are zero padding.

The Triton path runs without host synchronisation (N follows from shapes): per-block
expert histograms, one program scanning them into per-block starts, then ranks inside a
block from a cumulative sum over a one-hot tile. Rows are then gathered, one output row
per lane (padding rows written as zeros), and the backward is the unweighted combine

    grad_x_TD[t] = sum_{k kept} grad_x_ND[dest_tk]

a gather, so both directions are deterministic and atomic-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe.kernels._triton import Impl, clamp_pow2, num_programs, pow2_at_least, use_triton
from moe.kernels.unpermute import combine_triton

_TILE_ELEMENTS = 4096


@dataclass(frozen=True)
class PermuteOutput:
    """Expert-sorted rows, each assignment's row (-1 if dropped) and kept rows per expert."""

    x_ND: torch.Tensor
    dest_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor


@dataclass(frozen=True)
class PermuteBlocks:
    """Tile sizes: BLOCK_A assignments x BLOCK_E experts (histogram, ranks), BLOCK_G
    blocks x BLOCK_E experts (scan), BLOCK_N rows x BLOCK_D features (row gather)."""

    block_a: int
    block_e: int
    block_g: int
    block_n: int
    block_d: int

    @classmethod
    def for_shape(cls, num_experts: int, dim: int) -> PermuteBlocks:
        """One-hot and scan tiles of about 4K elements; row tiles of 32 x up to 128."""
        block_e = pow2_at_least(num_experts)
        return cls(
            block_a=clamp_pow2(_TILE_ELEMENTS // block_e, 16, 1024),
            block_e=block_e,
            block_g=clamp_pow2(_TILE_ELEMENTS // block_e, 2, 256),
            block_n=32,
            block_d=clamp_pow2(pow2_at_least(dim), 16, 128),
        )


def num_rows(num_assignments: int, num_experts: int, capacity: int | None) -> int:
    """N: every assignment (dropless), or E blocks of C rows."""
    return num_assignments if capacity is None else num_experts * capacity


def _check_args(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, capacity: int | None
) -> None:
    if x_TD.dim() != 2 or experts_TK.dim() != 2 or experts_TK.shape[0] != x_TD.shape[0]:
        shapes = f"{tuple(x_TD.shape)}, {tuple(experts_TK.shape)}"
        raise ValueError(f"need x_TD (T, D) and experts_TK (T, K), got {shapes}")
    if capacity is None and keep_TK is not None:
        raise ValueError("keep_TK must be None when capacity is None (dropless)")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if keep_TK is not None and (keep_TK.shape != experts_TK.shape or keep_TK.dtype != torch.bool):
        got = f"{keep_TK.dtype} {tuple(keep_TK.shape)}"
        raise ValueError(f"keep_TK must be a bool tensor shaped like experts_TK, got {got}")


# --------------------------------------------------------------------------- reference


def permute_reference(
    x_TD: torch.Tensor,
    experts_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    capacity: int | None,
) -> PermuteOutput:
    """Plain-torch permute via a stable sort, differentiable in ``x_TD`` through autograd.

    Validates what the Triton path takes on trust (it would need host synchronisation):
    expert ids in ``[0, E)`` and ``kept_e <= C``.
    """
    _check_args(x_TD, experts_TK, keep_TK, capacity)
    experts_A = experts_TK.reshape(-1)
    if experts_A.numel() and not (0 <= int(experts_A.min()) and int(experts_A.max()) < num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts})")
    keep_A = torch.ones_like(experts_A, dtype=torch.bool) if keep_TK is None else keep_TK.reshape(-1)
    counts_E = torch.bincount(experts_A[keep_A], minlength=num_experts)
    if capacity is not None and bool((counts_E > capacity).any()):
        raise ValueError(f"an expert keeps more than capacity={capacity} assignments: {counts_E.tolist()}")

    order_A = torch.argsort(torch.where(keep_A, experts_A, num_experts), stable=True)
    kept_a_M = order_A[: int(counts_E.sum())]
    experts_M = experts_A[kept_a_M]
    first_E = counts_E.cumsum(0) - counts_E
    rank_M = torch.arange(kept_a_M.numel(), device=x_TD.device) - first_E[experts_M]
    start_E = first_E if capacity is None else torch.arange(num_experts, device=x_TD.device) * capacity
    dest_A = torch.full(experts_A.shape, -1, dtype=torch.int64, device=x_TD.device)
    dest_A[kept_a_M] = start_E[experts_M] + rank_M

    rows = num_rows(experts_A.numel(), num_experts, capacity)
    x_ND = x_TD.new_zeros(rows, x_TD.shape[1])
    x_ND = x_ND.index_copy(0, dest_A[kept_a_M], x_TD.index_select(0, kept_a_M // experts_TK.shape[1]))
    return PermuteOutput(x_ND, dest_A.view(experts_TK.shape), counts_E)


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _block_histogram_kernel(
    experts_ptr,
    keep_ptr,
    block_counts_ptr,
    num_assign,
    num_experts,
    HAS_KEEP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``block_counts_GE[g, e]`` = kept assignments to e among block g's BLOCK_A."""
    pid = tl.program_id(0)
    a_A = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    e_E = tl.arange(0, BLOCK_E)
    kept_A = a_A < num_assign
    if HAS_KEEP:
        kept_A = kept_A & (tl.load(keep_ptr + a_A, mask=kept_A, other=0) != 0)
    expert_A = tl.load(experts_ptr + a_A, mask=kept_A, other=-1)
    kept_A = kept_A & (expert_A >= 0) & (expert_A < num_experts)
    onehot_AE = ((expert_A[:, None] == e_E[None, :]) & kept_A[:, None]).to(tl.int32)
    tl.store(block_counts_ptr + pid * num_experts + e_E, tl.sum(onehot_AE, axis=0), mask=e_E < num_experts)


@triton.jit
def _scan_kernel(
    block_counts_ptr,
    block_starts_ptr,
    expert_starts_ptr,
    counts_ptr,
    num_blocks,
    num_experts,
    capacity,
    DROPLESS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program. ``block_starts_GE[g, e] = sum_{g' < g} block_counts_GE[g', e]``
    (exclusive scan over blocks, BLOCK_G rows at a time), ``counts_E = kept_e``, and
    ``expert_starts_E`` = exclusive scan of ``kept_e`` (dropless) or ``e * C``."""
    e_E = tl.arange(0, BLOCK_E)
    e_ok_E = e_E < num_experts
    running_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for g_start in range(0, num_blocks, BLOCK_G):
        g_G = g_start + tl.arange(0, BLOCK_G)
        ok_GE = (g_G < num_blocks)[:, None] & e_ok_E[None, :]
        offsets_GE = g_G[:, None] * num_experts + e_E[None, :]
        counts_GE = tl.load(block_counts_ptr + offsets_GE, mask=ok_GE, other=0)
        starts_GE = running_E[None, :] + tl.cumsum(counts_GE, axis=0) - counts_GE
        tl.store(block_starts_ptr + offsets_GE, starts_GE, mask=ok_GE)
        running_E += tl.sum(counts_GE, axis=0)
    if DROPLESS:
        expert_starts_E = tl.cumsum(running_E, axis=0) - running_E
    else:
        expert_starts_E = e_E * capacity
    tl.store(expert_starts_ptr + e_E, expert_starts_E, mask=e_ok_E)
    tl.store(counts_ptr + e_E, running_E.to(tl.int64), mask=e_ok_E)


@triton.jit
def _destination_kernel(
    experts_ptr,
    keep_ptr,
    block_starts_ptr,
    expert_starts_ptr,
    dest_ptr,
    source_ptr,
    num_assign,
    num_experts,
    num_out_rows,
    HAS_KEEP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``dest_a = expert_starts[e_a] + block_starts[g, e_a] + (rank of a within block g)``
    (-1 if dropped), and the inverse map ``source_N[dest_a] = a``. Writes stay inside
    ``source_N`` even if ``keep_TK`` broke the capacity contract."""
    pid = tl.program_id(0)
    a_A = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    e_E = tl.arange(0, BLOCK_E)
    in_range_A = a_A < num_assign
    kept_A = in_range_A
    if HAS_KEEP:
        kept_A = kept_A & (tl.load(keep_ptr + a_A, mask=in_range_A, other=0) != 0)
    expert_A = tl.load(experts_ptr + a_A, mask=kept_A, other=-1)
    kept_A = kept_A & (expert_A >= 0) & (expert_A < num_experts)
    onehot_AE = ((expert_A[:, None] == e_E[None, :]) & kept_A[:, None]).to(tl.int32)
    rank_A = tl.sum(tl.cumsum(onehot_AE, axis=0) * onehot_AE, axis=1) - 1
    block_start_A = tl.load(block_starts_ptr + pid * num_experts + expert_A, mask=kept_A, other=0)
    expert_start_A = tl.load(expert_starts_ptr + expert_A, mask=kept_A, other=0)
    dest_A = tl.where(kept_A, expert_start_A + block_start_A + rank_A, -1)
    tl.store(dest_ptr + a_A, dest_A.to(tl.int64), mask=in_range_A)
    tl.store(source_ptr + dest_A, a_A, mask=kept_A & (dest_A < num_out_rows))


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    source_ptr,
    counts_ptr,
    out_ptr,
    num_assign,
    num_out_rows,
    dim,
    stride_xt,
    capacity,
    TOP_K: tl.constexpr,
    DROPLESS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A BLOCK_N x BLOCK_D tile of ``x_ND[n] = x_TD[source_n // K]``, zero for padding
    rows (capacity mode: ``n - e*C >= kept_e`` with ``e = n // C``). Reads are bounded
    by A even if ``source_N`` were not written where expected."""
    n_N = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok_N = n_N < num_out_rows
    d_ok_D = d_D < dim
    if DROPLESS:
        filled_N = n_ok_N
    else:
        expert_N = n_N // capacity
        kept_N = tl.load(counts_ptr + expert_N, mask=n_ok_N, other=0)
        filled_N = n_ok_N & (n_N - expert_N * capacity < kept_N)
    source_N = tl.load(source_ptr + n_N, mask=filled_N, other=0)
    filled_N = filled_N & (source_N >= 0) & (source_N < num_assign)
    token_N = (source_N // TOP_K).to(tl.int64)
    rows_ND = tl.load(
        x_ptr + token_N[:, None] * stride_xt + d_D[None, :],
        mask=filled_N[:, None] & d_ok_D[None, :],
        other=0.0,
    )
    out_ND = n_N[:, None].to(tl.int64) * dim + d_D[None, :]
    tl.store(out_ptr + out_ND, rows_ND, mask=n_ok_N[:, None] & d_ok_D[None, :])


# --------------------------------------------------------------------------- launchers


def _empty_output(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int, capacity: int | None
) -> PermuteOutput:
    rows = num_rows(experts_TK.numel(), num_experts, capacity)
    return PermuteOutput(
        x_ND=torch.empty(rows, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device),
        dest_TK=torch.empty(experts_TK.shape, dtype=torch.int64, device=x_TD.device),
        tokens_per_expert_E=torch.empty(num_experts, dtype=torch.int64, device=x_TD.device),
    )


def permute_triton(
    x_TD: torch.Tensor,
    experts_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    capacity: int | None,
    blocks: PermuteBlocks | None = None,
    out: PermuteOutput | None = None,
) -> PermuteOutput:
    """Run the four permute kernels (no autograd, no host synchronisation). ``out``
    receives the results when given (a test hook: every element is written).

    Inputs are taken on trust (checking them would synchronise with the host): an expert
    id outside ``[0, E)`` counts as dropped, and a ``keep_TK`` keeping more than C for an
    expert gives wrong rows, though no write leaves the buffers."""
    _check_args(x_TD, experts_TK, keep_TK, capacity)
    blocks = blocks or PermuteBlocks.for_shape(num_experts, x_TD.shape[1])
    out = out if out is not None else _empty_output(x_TD, experts_TK, num_experts, capacity)
    source_N = _destinations(experts_TK, keep_TK, num_experts, capacity, blocks, out)
    if out.x_ND.shape[0] > 0:
        _gather_rows(x_TD, source_N, experts_TK.shape[1], capacity, blocks, out)
    return out


def _destinations(
    experts_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    capacity: int | None,
    blocks: PermuteBlocks,
    out: PermuteOutput,
) -> torch.Tensor:
    """Histogram, scan and rank kernels: fill ``out.dest_TK`` and ``out.tokens_per_expert_E``
    and return ``source_N`` (the assignment of each filled row)."""
    device = experts_TK.device
    num_assign = experts_TK.numel()
    experts_A = experts_TK.reshape(-1).contiguous()
    keep_A = None if keep_TK is None else keep_TK.reshape(-1).contiguous().view(torch.uint8)
    grid_a = num_programs(num_assign, blocks.block_a)
    block_counts_GE = torch.empty(grid_a, num_experts, dtype=torch.int32, device=device)
    block_starts_GE = torch.empty_like(block_counts_GE)
    expert_starts_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    source_N = torch.empty(out.x_ND.shape[0], dtype=torch.int32, device=device)
    meta = {"HAS_KEEP": keep_A is not None, "BLOCK_A": blocks.block_a, "BLOCK_E": blocks.block_e}
    _block_histogram_kernel[(grid_a,)](experts_A, keep_A, block_counts_GE, num_assign, num_experts, **meta)
    _scan_kernel[(1,)](
        block_counts_GE,
        block_starts_GE,
        expert_starts_E,
        out.tokens_per_expert_E,
        grid_a,
        num_experts,
        capacity or 0,
        DROPLESS=capacity is None,
        BLOCK_G=blocks.block_g,
        BLOCK_E=blocks.block_e,
    )
    _destination_kernel[(grid_a,)](
        experts_A,
        keep_A,
        block_starts_GE,
        expert_starts_E,
        out.dest_TK,
        source_N,
        num_assign,
        num_experts,
        source_N.shape[0],
        **meta,
    )
    return source_N


def _gather_rows(
    x_TD: torch.Tensor,
    source_N: torch.Tensor,
    top_k: int,
    capacity: int | None,
    blocks: PermuteBlocks,
    out: PermuteOutput,
) -> None:
    """Row-gather kernel: fill ``out.x_ND`` (padding rows with zeros)."""
    x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    rows, dim = out.x_ND.shape
    _gather_rows_kernel[(triton.cdiv(rows, blocks.block_n), num_programs(dim, blocks.block_d))](
        x_TD,
        source_N,
        out.tokens_per_expert_E,
        out.x_ND,
        out.dest_TK.numel(),
        rows,
        dim,
        x_TD.stride(0),
        capacity or 0,
        TOP_K=top_k,
        DROPLESS=capacity is None,
        BLOCK_N=blocks.block_n,
        BLOCK_D=blocks.block_d,
    )


# --------------------------------------------------------------------------- autograd


class _PermuteFn(torch.autograd.Function):
    """Triton permute; differentiable in ``x_TD``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        num_experts: int,
        capacity: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        result = permute_triton(x_TD, experts_TK, keep_TK, num_experts, capacity)
        ctx.save_for_backward(result.dest_TK)
        ctx.mark_non_differentiable(result.dest_TK, result.tokens_per_expert_E)
        return result.x_ND, result.dest_TK, result.tokens_per_expert_E

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_x_ND: torch.Tensor,
        grad_dest_TK: torch.Tensor | None,
        grad_tokens_per_expert_E: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None, None, None, None]:
        (dest_TK,) = ctx.saved_tensors
        return combine_triton(grad_x_ND, dest_TK, None), None, None, None, None


def permute(
    x_TD: torch.Tensor,
    experts_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    capacity: int | None,
    impl: Impl = "auto",
) -> PermuteOutput:
    """Scatter token rows into expert-sorted order (see the module docstring).

    ``capacity=None``: dropless, N = T*K compact rows, ``keep_TK`` must be None.
    ``capacity=C``: N = E*C rows, expert e's kept rows at ``[e*C, e*C + kept_e)``, the
    rest zero; ``keep_TK`` (from ``moe.capacity.keep_mask``) must keep at most C per expert.
    ``impl="auto"`` runs Triton on CUDA tensors (and on CPU tensors under
    ``TRITON_INTERPRET=1``), else the torch reference; ``"triton"``/``"torch"`` force one.
    """
    if not use_triton(x_TD.device, impl):
        return permute_reference(x_TD, experts_TK, keep_TK, num_experts, capacity)
    return PermuteOutput(*_PermuteFn.apply(x_TD, experts_TK, keep_TK, num_experts, capacity))
