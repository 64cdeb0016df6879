"""Fused top-k gating: softmax, top-k, renormalisation and the routing-loss statistics.

Legend: T tokens, D hidden, E experts, K top-k, A = T*K assignments, N rows in the
expert-sorted buffer, C capacity; G programs (token blocks) of the Triton kernels.

From router logits ``l_TE`` (any float dtype, computed in fp32), with ``p_t = softmax(l_t)``
and ``lse_t = logsumexp(l_t)``:

- ``experts_TK[t]``: the K largest ``p_te`` (equivalently ``l_te``), ties to the lower e;
- ``weights_TK[t, k] = p_{t,e_k}``, divided by ``sum_k p_{t,e_k}`` when ``normalize``;
- ``prob_sum_E[e] = sum_t p_te``; ``counts_E[e] = #{(t, k): e_tk = e}``;
- ``lse_sq_sum = sum_t lse_t^2``.

These give the repo's losses: ``aux = coeff * E * sum_e (counts_E/A) * (prob_sum_E/T)``
and ``z = coeff * lse_sq_sum / T``. The Triton forward reads the logits once; its
backward recomputes ``p`` from the logits and applies, with ``g`` the incoming grads,

    gp_te  = g_prob_sum[e] + sum_k [e = e_tk] * c_tk,
             c_tk = g_w_tk (plain) or (g_w_tk - <g_w_t, w_t>) / S_t (normalised, S_t = sum_k p_{t,e_k}),
    g_l_te = p_te * (gp_te - <p_t, gp_t> + 2 * g_lse_sq * lse_t).

Per-expert sums are written per program and reduced afterwards (no atomics, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe.kernels._triton import Impl, clamp_pow2, num_programs, pow2_at_least, use_triton

_TILE_ELEMENTS = 1024


@dataclass(frozen=True)
class GatingOutput:
    """Top-k gates and the statistics the load-balancing and z-losses need."""

    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    prob_sum_E: torch.Tensor
    counts_E: torch.Tensor
    lse_sq_sum: torch.Tensor


@dataclass(frozen=True)
class GatingBlocks:
    """Tile sizes: BLOCK_T tokens by BLOCK_E (all) experts per program."""

    block_t: int
    block_e: int

    @classmethod
    def for_shape(cls, num_experts: int) -> GatingBlocks:
        """All experts in one tile, with up to 64 tokens: about 1K elements, which compiles
        for sm_90 with 4 warps without register spills up to E=256, K=8."""
        block_e = pow2_at_least(num_experts)
        return cls(block_t=clamp_pow2(_TILE_ELEMENTS // block_e, 1, 64), block_e=block_e)


def _check_args(logits_TE: torch.Tensor, top_k: int) -> None:
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be 2-D float, got {tuple(logits_TE.shape)} {logits_TE.dtype}")
    if not 1 <= top_k <= logits_TE.shape[1]:
        raise ValueError(f"top_k must be in [1, E={logits_TE.shape[1]}], got {top_k}")


# --------------------------------------------------------------------------- reference


def topk_gating_reference(logits_TE: torch.Tensor, top_k: int, normalize: bool) -> GatingOutput:
    """Plain-torch gating, differentiable through autograd.

    Computes in ``promote(dtype, fp32)``: fp32 for fp32/bf16/fp16 logits, fp64 for fp64
    (the precision reference of the tests). The stable descending sort breaks ties to
    the lower expert index, as the kernel does.
    """
    _check_args(logits_TE, top_k)
    compute_dtype = torch.promote_types(logits_TE.dtype, torch.float32)
    logits_TE = logits_TE.to(compute_dtype)
    num_experts = logits_TE.shape[1]
    experts_TK = torch.sort(logits_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK = probs_TE.gather(1, experts_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return GatingOutput(
        weights_TK=weights_TK,
        experts_TK=experts_TK,
        prob_sum_E=probs_TE.sum(dim=0),
        counts_E=torch.bincount(experts_TK.reshape(-1), minlength=num_experts),
        lse_sq_sum=torch.logsumexp(logits_TE, dim=-1).square().sum(),
    )


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _gating_forward_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    prob_partial_ptr,
    count_partial_ptr,
    lse_sq_partial_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    stride_le,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_T tokens. Writes their gates and experts, and row ``pid`` of
    the per-program partials of ``prob_sum_E``, ``counts_E`` and ``lse_sq_sum``."""
    pid = tl.program_id(0)
    t_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e_E = tl.arange(0, BLOCK_E)
    k_K = tl.arange(0, BLOCK_K)
    t_ok_T = t_T < num_tokens
    e_ok_E = e_E < num_experts

    # Rows past T read 0 (finite softmax, masked out below); columns past E read -inf.
    offsets_TE = t_T[:, None].to(tl.int64) * stride_lt + e_E[None, :] * stride_le
    logits_TE = tl.load(logits_ptr + offsets_TE, mask=t_ok_T[:, None] & e_ok_E[None, :], other=0.0)
    logits_TE = tl.where(e_ok_E[None, :], logits_TE.to(tl.float32), float("-inf"))
    max_T = tl.max(logits_TE, axis=1)
    exp_TE = tl.exp(logits_TE - max_T[:, None])
    sum_T = tl.sum(exp_TE, axis=1)
    probs_TE = exp_TE / sum_T[:, None]
    lse_T = max_T + tl.log(sum_T)

    avail_TE = e_ok_E[None, :] & (t_T[:, None] >= 0)
    weights_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    experts_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    counts_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        candidate_TE = tl.where(avail_TE, logits_TE, float("-inf"))
        best_T = tl.max(candidate_TE, axis=1)
        is_best_TE = avail_TE & (candidate_TE == best_T[:, None])
        pick_T = tl.min(tl.where(is_best_TE, e_E[None, :], BLOCK_E), axis=1)
        chosen_TE = e_E[None, :] == pick_T[:, None]
        avail_TE = avail_TE & (e_E[None, :] != pick_T[:, None])
        gate_T = tl.exp(best_T - max_T) / sum_T
        weights_TK = tl.where(k_K[None, :] == k, gate_T[:, None], weights_TK)
        experts_TK = tl.where(k_K[None, :] == k, pick_T[:, None], experts_TK)
        counts_E += tl.sum((chosen_TE & t_ok_T[:, None]).to(tl.int32), axis=0)
    if NORMALIZE:
        weights_TK = weights_TK / tl.sum(weights_TK, axis=1)[:, None]

    out_TK = t_T[:, None].to(tl.int64) * TOP_K + k_K[None, :]
    out_ok_TK = t_ok_T[:, None] & (k_K[None, :] < TOP_K)
    tl.store(weights_ptr + out_TK, weights_TK, mask=out_ok_TK)
    tl.store(experts_ptr + out_TK, experts_TK.to(tl.int64), mask=out_ok_TK)
    prob_part_E = tl.sum(tl.where(t_ok_T[:, None], probs_TE, 0.0), axis=0)
    tl.store(prob_partial_ptr + pid * num_experts + e_E, prob_part_E, mask=e_ok_E)
    tl.store(count_partial_ptr + pid * num_experts + e_E, counts_E, mask=e_ok_E)
    tl.store(lse_sq_partial_ptr + pid, tl.sum(tl.where(t_ok_T, lse_T * lse_T, 0.0), axis=0))


@triton.jit
def _gating_backward_kernel(
    logits_ptr,
    experts_ptr,
    grad_weights_ptr,
    grad_prob_sum_ptr,
    grad_lse_sq_ptr,
    grad_logits_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    stride_le,
    stride_gt,
    stride_gk,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program: BLOCK_T tokens; recomputes their softmax and writes ``grad_logits``."""
    pid = tl.program_id(0)
    t_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e_E = tl.arange(0, BLOCK_E)
    t_ok_T = t_T < num_tokens
    e_ok_E = e_E < num_experts
    ok_TE = t_ok_T[:, None] & e_ok_E[None, :]

    offsets_TE = t_T[:, None].to(tl.int64) * stride_lt + e_E[None, :] * stride_le
    logits_TE = tl.load(logits_ptr + offsets_TE, mask=ok_TE, other=0.0)
    logits_TE = tl.where(e_ok_E[None, :], logits_TE.to(tl.float32), float("-inf"))
    max_T = tl.max(logits_TE, axis=1)
    exp_TE = tl.exp(logits_TE - max_T[:, None])
    sum_T = tl.sum(exp_TE, axis=1)
    probs_TE = exp_TE / sum_T[:, None]
    lse_T = max_T + tl.log(sum_T)

    # grad_sel_TE[t, e] = g_w of the slot that chose e (0 if none); sel_TE marks chosen.
    grad_sel_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    sel_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert_T = tl.load(experts_ptr + t_T.to(tl.int64) * TOP_K + k, mask=t_ok_T, other=-1)
        grad_w_offsets_T = t_T.to(tl.int64) * stride_gt + k * stride_gk
        grad_w_T = tl.load(grad_weights_ptr + grad_w_offsets_T, mask=t_ok_T, other=0.0)
        chosen_TE = e_E[None, :] == expert_T[:, None]
        grad_sel_TE += tl.where(chosen_TE, grad_w_T.to(tl.float32)[:, None], 0.0)
        sel_TE += chosen_TE.to(tl.float32)
    if NORMALIZE:
        sel_sum_T = tl.where(t_ok_T, tl.sum(probs_TE * sel_TE, axis=1), 1.0)
        grad_dot_w_T = tl.sum(probs_TE * grad_sel_TE, axis=1) / sel_sum_T
        grad_sel_TE = (grad_sel_TE - sel_TE * grad_dot_w_T[:, None]) / sel_sum_T[:, None]

    grad_prob_sum_E = tl.load(grad_prob_sum_ptr + e_E, mask=e_ok_E, other=0.0).to(tl.float32)
    grad_lse_sq = tl.load(grad_lse_sq_ptr).to(tl.float32)
    grad_probs_TE = grad_prob_sum_E[None, :] + grad_sel_TE
    centred_T = tl.sum(probs_TE * grad_probs_TE, axis=1) - 2.0 * grad_lse_sq * lse_T
    grad_logits_TE = probs_TE * (grad_probs_TE - centred_T[:, None])
    out_TE = t_T[:, None].to(tl.int64) * num_experts + e_E[None, :]
    tl.store(grad_logits_ptr + out_TE, grad_logits_TE.to(grad_logits_ptr.dtype.element_ty), mask=ok_TE)


# --------------------------------------------------------------------------- launchers


def _empty_output(num_tokens: int, num_experts: int, top_k: int, device: torch.device) -> GatingOutput:
    return GatingOutput(
        weights_TK=torch.empty(num_tokens, top_k, dtype=torch.float32, device=device),
        experts_TK=torch.empty(num_tokens, top_k, dtype=torch.int64, device=device),
        prob_sum_E=torch.empty(num_experts, dtype=torch.float32, device=device),
        counts_E=torch.empty(num_experts, dtype=torch.int64, device=device),
        lse_sq_sum=torch.empty((), dtype=torch.float32, device=device),
    )


def gating_forward_triton(
    logits_TE: torch.Tensor,
    top_k: int,
    normalize: bool,
    blocks: GatingBlocks | None = None,
    out: GatingOutput | None = None,
) -> GatingOutput:
    """Run the forward kernel (no autograd). ``out`` receives the results when given
    (tests pre-fill it with poison to catch unwritten elements)."""
    _check_args(logits_TE, top_k)
    num_tokens, num_experts = logits_TE.shape
    blocks = blocks or GatingBlocks.for_shape(num_experts)
    grid = num_programs(num_tokens, blocks.block_t)
    device = logits_TE.device
    out = out if out is not None else _empty_output(num_tokens, num_experts, top_k, device)
    prob_partial_GE = torch.empty(grid, num_experts, dtype=torch.float32, device=device)
    count_partial_GE = torch.empty(grid, num_experts, dtype=torch.int32, device=device)
    lse_sq_partial_G = torch.empty(grid, dtype=torch.float32, device=device)
    _gating_forward_kernel[(grid,)](
        logits_TE,
        out.weights_TK,
        out.experts_TK,
        prob_partial_GE,
        count_partial_GE,
        lse_sq_partial_G,
        num_tokens,
        num_experts,
        logits_TE.stride(0),
        logits_TE.stride(1),
        TOP_K=top_k,
        NORMALIZE=normalize,
        BLOCK_T=blocks.block_t,
        BLOCK_E=blocks.block_e,
        BLOCK_K=pow2_at_least(top_k),
    )
    torch.sum(prob_partial_GE, dim=0, out=out.prob_sum_E)
    torch.sum(count_partial_GE, dim=0, dtype=torch.int64, out=out.counts_E)
    torch.sum(lse_sq_partial_G, dim=0, out=out.lse_sq_sum)
    return out


def gating_backward_triton(
    logits_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    grad_weights_TK: torch.Tensor,
    grad_prob_sum_E: torch.Tensor,
    grad_lse_sq_sum: torch.Tensor,
    normalize: bool,
    blocks: GatingBlocks | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the backward kernel: ``grad_logits_TE`` (logits' dtype) from the output grads."""
    num_tokens, num_experts = logits_TE.shape
    blocks = blocks or GatingBlocks.for_shape(num_experts)
    if out is None:
        out = torch.empty(num_tokens, num_experts, dtype=logits_TE.dtype, device=logits_TE.device)
    _gating_backward_kernel[(num_programs(num_tokens, blocks.block_t),)](
        logits_TE,
        experts_TK.contiguous(),
        grad_weights_TK,
        grad_prob_sum_E.contiguous(),
        grad_lse_sq_sum.contiguous(),
        out,
        num_tokens,
        num_experts,
        logits_TE.stride(0),
        logits_TE.stride(1),
        grad_weights_TK.stride(0),
        grad_weights_TK.stride(1),
        TOP_K=experts_TK.shape[1],
        NORMALIZE=normalize,
        BLOCK_T=blocks.block_t,
        BLOCK_E=blocks.block_e,
    )
    return out


# --------------------------------------------------------------------------- autograd


class _TopKGatingFn(torch.autograd.Function):
    """Triton gating; differentiable in ``weights_TK``, ``prob_sum_E`` and ``lse_sq_sum``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits_TE: torch.Tensor, top_k: int, normalize: bool
    ) -> tuple[torch.Tensor, ...]:
        result = gating_forward_triton(logits_TE, top_k, normalize)
        ctx.save_for_backward(logits_TE, result.experts_TK)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(result.experts_TK, result.counts_E)
        return result.weights_TK, result.experts_TK, result.prob_sum_E, result.counts_E, result.lse_sq_sum

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_weights_TK: torch.Tensor,
        grad_experts_TK: torch.Tensor | None,
        grad_prob_sum_E: torch.Tensor,
        grad_counts_E: torch.Tensor | None,
        grad_lse_sq_sum: torch.Tensor,
    ) -> tuple[torch.Tensor, None, None]:
        logits_TE, experts_TK = ctx.saved_tensors
        grad_logits_TE = gating_backward_triton(
            logits_TE, experts_TK, grad_weights_TK, grad_prob_sum_E, grad_lse_sq_sum, ctx.normalize
        )
        return grad_logits_TE, None, None


def topk_gating(logits_TE: torch.Tensor, top_k: int, normalize: bool, impl: Impl = "auto") -> GatingOutput:
    """Top-k softmax gating of router logits ``logits_TE`` (see the module docstring).

    ``impl="auto"`` runs Triton on CUDA tensors (and on CPU tensors under
    ``TRITON_INTERPRET=1``), else the torch reference; ``"triton"``/``"torch"`` force one.
    """
    if not use_triton(logits_TE.device, impl):
        return topk_gating_reference(logits_TE, top_k, normalize)
    return GatingOutput(*_TopKGatingFn.apply(logits_TE, top_k, normalize))
