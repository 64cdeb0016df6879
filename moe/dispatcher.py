"""Local token dispatcher: permute tokens into expert-sorted order and back.

Legend: T tokens, D model dim, E experts, K experts per token, A = T·K assignments,
N rows in the expert-sorted buffer (the kept assignments).

Data flows one way: ``permute`` turns token rows into expert-contiguous rows plus a
plan; the experts run on those rows; ``unpermute`` scales each row by its gate and sums a
token's K rows back into its slot. The expert-parallel dispatcher in ``parallel/`` has the
same two methods, with all-to-alls between them.

Two implementations of the same mapping, picked per call by ``impl``:

- torch (``DispatchPlan``): the kept assignments, compacted; sorting on the host side.
- the fused kernels (``KernelPlan``, ``moe.kernels.permute``/``unpermute``): no host
  synchronisation. Dropless, the rows are the same as torch's; with a capacity every
  expert gets a block of C rows, its kept rows first and zero padding after, so shapes
  are known without reading any count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.kernels import permute as permute_kernels
from moe.kernels import unpermute as unpermute_kernels
from moe.kernels._triton import Impl, use_triton


@dataclass(frozen=True)
class DispatchPlan:
    """How expert-sorted rows map back to tokens.

    ``assignment_N`` indexes the token-major assignments ``a = t*K + k`` in expert-sorted
    order; ``token_N = assignment_N // K``; ``tokens_per_expert_E`` are the row counts
    of each expert's contiguous segment.
    """

    assignment_N: torch.Tensor
    token_N: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int


@dataclass(frozen=True)
class KernelPlan:
    """The fused kernels' plan: ``dest_TK`` is each assignment's row (-1 if dropped);
    ``tokens_per_expert_E`` the length of each expert's block of rows (C each with a
    capacity, padding included)."""

    dest_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor


class LocalDispatcher:
    """Permute/unpermute for experts that all live in this process."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def permute(
        self,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        capacity: int | None = None,
        impl: Impl = "torch",
    ) -> tuple[torch.Tensor, DispatchPlan | KernelPlan]:
        """Rows for each expert, contiguous; ``capacity`` is what ``keep_TK`` enforces."""
        if use_triton(x_TD.device, impl):
            return self._permute_fused(x_TD, experts_TK, keep_TK, capacity)
        return self._permute_torch(x_TD, experts_TK, keep_TK)

    def _permute_fused(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, capacity: int | None
    ) -> tuple[torch.Tensor, KernelPlan]:
        out = permute_kernels.permute(x_TD, experts_TK, keep_TK, self.num_experts, capacity, impl="triton")
        rows_E = out.tokens_per_expert_E if capacity is None else torch.full_like(out.tokens_per_expert_E, capacity)
        return out.x_ND, KernelPlan(out.dest_TK, rows_E)

    def _permute_torch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """Gather the kept assignments' token rows, grouped by expert.

        Within an expert, rows keep token order (stable sort), so results do not depend
        on sort implementation details. Dropped assignments get the out-of-range key E
        and fall off the end.
        """
        num_tokens, top_k = experts_TK.shape
        experts_A = experts_TK.reshape(-1)
        if keep_TK is None:
            sort_key_A = experts_A
            tokens_per_expert_E = torch.bincount(experts_A, minlength=self.num_experts)
        else:
            keep_A = keep_TK.reshape(-1)
            sort_key_A = torch.where(keep_A, experts_A, self.num_experts)
            tokens_per_expert_E = torch.bincount(experts_A[keep_A], minlength=self.num_experts)
        num_rows = int(tokens_per_expert_E.sum())
        assignment_N = torch.argsort(sort_key_A, stable=True)[:num_rows]
        token_N = assignment_N // top_k
        x_ND = x_TD.index_select(0, token_N)
        return x_ND, DispatchPlan(assignment_N, token_N, tokens_per_expert_E, num_tokens)

    def unpermute(
        self, y_ND: torch.Tensor, plan: DispatchPlan | KernelPlan, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """``y_t = sum_k gate_tk * expert_k(x_t)`` over the token's kept assignments.

        The gates are fp32 (router precision); the torch path casts the product back to
        the expert output's dtype before the sum, the kernel sums in fp32.
        """
        if isinstance(plan, KernelPlan):
            return unpermute_kernels.unpermute(y_ND, plan.dest_TK, weights_TK, impl="triton")
        gate_N = weights_TK.reshape(-1).index_select(0, plan.assignment_N)
        weighted_ND = (y_ND.float() * gate_N.unsqueeze(1)).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[1])
        return y_TD.index_add(0, plan.token_N, weighted_ND)
