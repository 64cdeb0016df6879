"""Expert tensor parallelism (megatron-core's ``expert_tensor_parallel_size``): each expert's
hidden width F is split over the expert-tensor-parallel group ``groups.etp``.

Legend: n rows this rank brings (expert-sorted), N rows of the whole etp group, m the
largest n in the group (gloo's all_gather pads to it), D model dim, F expert hidden dim,
E experts on this rank (El in ``parallel/expert_parallel.py``), P = etp ranks in the group.

An expert is ``y = act(x · W_in) · W_out``; with W_in's columns (interleaved SwiGLU pairs:
a contiguous slice holds whole pairs) and W_out's rows split into P slices,
``y = sum_p act(x · W_in[:, p]) · W_out[p, :]`` exactly. So within an etp group:

1. every rank's expert-sorted rows are all-gathered (row counts first: gloo's all_gather
   needs equal sizes, so rows are padded to the largest count and the padding dropped),
   and re-sorted expert-major;
2. each rank computes all N rows with its F slice, a partial output;
3. the partial outputs are summed over the group and each rank keeps its own n rows.

Autograd: the backward of (1) is a sum over the group of the gradients of this rank's
rows (every rank computed with them), the backward of (3) an all-gather of the outputs'
gradients. A rank's expert weight gradient therefore sums the contributions of every
row of its etp group (and, through the EP all-to-all, of its ep group).

Gradient scaling: expert weights are ``allreduce = False``; the engine sums their
gradients over the expert-data-parallel group and divides by ``dp``. The etp·ep·edp ranks
of a pipeline stage are its tp·dp ranks; every token of the step sits on exactly one of
them, and its contribution reaches each F slice exactly once (gathered over etp, routed
over ep, summed over edp), so the sum is the sum over data-parallel replicas of the
gradient of their own mean loss, and ``1/dp`` makes it the global-batch mean's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.experts import GroupedExperts


def _all_gather_rows(x_nD: torch.Tensor, counts_P: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows (rank-major); ``counts_P[p]`` rows from rank p."""
    most = max(max(counts_P), 1)
    padded_mD = x_nD.new_zeros(most, x_nD.shape[1])
    padded_mD[: x_nD.shape[0]] = x_nD
    parts = [torch.empty_like(padded_mD) for _ in counts_P]
    dist.all_gather(parts, padded_mD, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts_P)])


def _own_rows(x_ND: torch.Tensor, counts_P: list[int], rank: int) -> torch.Tensor:
    start = sum(counts_P[:rank])
    return x_ND[start : start + counts_P[rank]]


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather rows over the group; backward: sum the gradient over the group
    and keep this rank's rows (a reduce-scatter with uneven splits)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x_nD: torch.Tensor, counts_P: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.counts_P, ctx.group = counts_P, group
        return _all_gather_rows(x_nD, counts_P, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        total_ND = grad_ND.contiguous().clone()
        dist.all_reduce(total_ND, group=ctx.group)
        return _own_rows(total_ND, ctx.counts_P, ctx.group.rank()), None, None


class _SumOwnRows(torch.autograd.Function):
    """Forward: sum the partial outputs over the group, keep this rank's rows; backward:
    all-gather the rows' gradients (every rank's partial output fed every rank's rows)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, y_ND: torch.Tensor, counts_P: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.counts_P, ctx.group = counts_P, group
        total_ND = y_ND.contiguous().clone()
        dist.all_reduce(total_ND, group=group)
        return _own_rows(total_ND, counts_P, group.rank())

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_nD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _all_gather_rows(grad_nD.contiguous(), ctx.counts_P, ctx.group), None, None


class ExpertTensorParallelExperts(GroupedExperts):
    """``GroupedExperts`` holding this rank's F slice of each expert (set by class swap,
    which keeps the parameter names); attribute added: ``etp_group``."""

    etp_group: dist.ProcessGroup

    def forward(self, x_nD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        group = self.etp_group
        size, experts = group.size(), tokens_per_expert_E.shape[0]
        mine_E = tokens_per_expert_E.to(torch.long).contiguous()
        counts = [torch.empty_like(mine_E) for _ in range(size)]
        dist.all_gather(counts, mine_E, group=group)
        counts_PE = torch.stack(counts).cpu()
        counts_P = counts_PE.sum(1).tolist()
        x_ND = _GatherRows.apply(x_nD, counts_P, group)
        # rank-major (rank, expert) segments -> expert-major (expert, rank)
        expert_of_row_N = torch.repeat_interleave(torch.arange(experts).repeat(size), counts_PE.reshape(-1))
        order_N = torch.argsort(expert_of_row_N, stable=True).to(x_ND.device)
        y_ND = super().forward(x_ND.index_select(0, order_N), counts_PE.sum(0).to(tokens_per_expert_E.device))
        y_rank_major_ND = torch.zeros_like(y_ND).index_copy(0, order_N, y_ND)
        return _SumOwnRows.apply(y_rank_major_ND, counts_P, group)


def shard_expert_hidden(experts: GroupedExperts, group: dist.ProcessGroup) -> None:
    """Keep this rank's contiguous 1/P slice of every expert's hidden width (W_in's last
    dim, W_out's middle dim) and compute through the etp group."""
    size, rank = group.size(), group.rank()
    experts.w_in_EDF = nn.Parameter(experts.w_in_EDF.detach().chunk(size, dim=2)[rank].clone())
    experts.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach().chunk(size, dim=1)[rank].clone())
    experts.__class__ = ExpertTensorParallelExperts
    experts.etp_group = group
