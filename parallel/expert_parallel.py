"""Expert parallelism: experts sharded over the EP group, tokens moved by all-to-all.

Legend: T local tokens, D model dim, E experts (global), El = E/ep experts on this rank,
K experts per token, N rows sent from this rank (its kept assignments), R rows received
(the rows this rank's experts compute), P = ep ranks in the group.

``AllToAllDispatcher`` is the expert-parallel twin of ``moe.dispatcher.LocalDispatcher``
(same ``permute``/``unpermute``). Its steps are split into local and communicating parts
so that later work can overlap them:

    permute:   sort_local -> exchange_counts* -> exchange_rows* -> group_by_expert
    unpermute: ungroup -> return_rows* -> combine_local              (* communicates)

Expert ``e`` lives on EP rank ``e // El``. Each rank sends every kept assignment's token
row to the owner of its expert, counts first (so every receiver knows its split sizes),
rows second (uneven splits); outputs return by the reverse all-to-all. Gradients flow
through both all-to-alls (backward of an all-to-all is the all-to-all with the splits
swapped), so an expert's weight gradient sums the contributions of every token routed
to it from the whole EP group.

Capacity under EP is per source rank: ``moe.capacity`` is applied to each rank's own T
tokens before dispatch, so an expert receives at most ``P · C`` rows. A single process
applying the same rule to each rank's tokens separately drops exactly the same tokens.

Every exchange starts with a header (E, El, capacity) from each rank; a rank whose header
differs from its peers' makes every rank fail with a message naming the ranks, instead of
a hang or a silent mis-route. Collectives carry the process group's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatcher import DispatchPlan, LocalDispatcher
from moe.kernels._triton import Impl
from moe.layer import MoELayer

HEADER_FIELDS = ("num_experts", "local_experts", "capacity")


class DispatchMismatchError(RuntimeError):
    """Ranks of one EP group disagree about the dispatch they are doing."""


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward sends gradients back the way the
    rows came (input and output splits swapped)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out_RD = x_ND.new_empty(sum(recv_splits), x_ND.shape[1])
        dist.all_to_all_single(out_RD, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_RD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_ND = grad_RD.new_empty(sum(ctx.send_splits), grad_RD.shape[1])
        dist.all_to_all_single(grad_ND, grad_RD.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_ND, None, None, None


@dataclass(frozen=True)
class ExpertParallelPlan:
    """What ``unpermute`` needs to undo ``permute``.

    ``local`` orders this rank's kept assignments by global expert (hence by owner rank);
    ``send_splits[p]`` rows went to rank p and ``recv_splits[p]`` came from it;
    ``group_order_R`` re-sorts received rows (source-major) into expert-major order.
    """

    local: DispatchPlan
    send_splits: list[int]
    recv_splits: list[int]
    group_order_R: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # rows per local expert (El entries)


class AllToAllDispatcher:
    """Dispatch over an expert-parallel process group; ``ep_rank`` owns experts
    ``[ep_rank·El, (ep_rank+1)·El)``."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        self.local = LocalDispatcher(num_experts)

    # -- local ---------------------------------------------------------------------

    def _header(self, capacity: int | None) -> torch.Tensor:
        return torch.tensor([self.num_experts, self.local_experts, -1 if capacity is None else capacity], dtype=torch.long)

    def _check_headers(self, headers_PH: torch.Tensor) -> None:
        mine = headers_PH[self.ep_rank]
        for field, column in zip(HEADER_FIELDS, headers_PH.T):
            if not torch.equal(column, column[:1].expand_as(column)):
                by_rank = ", ".join(f"rank {p}: {v}" for p, v in enumerate(column.tolist()))
                raise DispatchMismatchError(
                    f"expert-parallel ranks disagree on {field} ({by_rank}); this is rank {self.ep_rank} "
                    f"({field}={mine[HEADER_FIELDS.index(field)].item()}); every rank of an EP group must run "
                    "the same MoE config on the same number of tokens per micro-batch"
                )

    def _group_order(self, recv_counts_PEl: torch.Tensor) -> torch.Tensor:
        """Permutation taking received rows (by source rank, then expert) to expert-major
        order (by expert, then source rank)."""
        expert_of_row_R = torch.repeat_interleave(
            torch.arange(self.local_experts).repeat(self.ep), recv_counts_PEl.reshape(-1)
        )
        return torch.argsort(expert_of_row_R, stable=True)

    # -- communicating ---------------------------------------------------------------

    def _exchange_counts(self, counts_E: torch.Tensor, header: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send each owner rank the counts for its experts, and everyone the header."""
        send_PX = torch.cat([counts_E.view(self.ep, self.local_experts), header.expand(self.ep, -1)], dim=1)
        recv_PX = torch.empty_like(send_PX)
        dist.all_to_all_single(recv_PX, send_PX.contiguous(), group=self.group)
        return recv_PX[:, : self.local_experts], recv_PX[:, self.local_experts :]

    # -- the dispatcher interface -------------------------------------------------------

    def permute(
        self,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        capacity: int | None = None,
        impl: Impl = "torch",
    ) -> tuple[torch.Tensor, ExpertParallelPlan]:
        """``impl`` is not used: the local sort before the all-to-all is the torch one (its
        row counts are needed on the host for the split sizes anyway)."""
        x_ND, local_plan = self.local.permute(x_TD, experts_TK, keep_TK)
        # Counts travel on the tokens' device (NCCL moves only CUDA tensors); the split
        # sizes are then needed on the host, which is this dispatcher's one sync point.
        header = self._header(capacity).to(x_TD.device)
        recv_counts_PEl, headers_PH = self._exchange_counts(local_plan.tokens_per_expert_E, header)
        counts_E, recv_counts_PEl, headers_PH = local_plan.tokens_per_expert_E.cpu(), recv_counts_PEl.cpu(), headers_PH.cpu()
        self._check_headers(headers_PH)
        send_splits = counts_E.view(self.ep, self.local_experts).sum(1).tolist()
        recv_splits = recv_counts_PEl.sum(1).tolist()
        x_RD = _AllToAll.apply(x_ND, send_splits, recv_splits, self.group)
        group_order_R = self._group_order(recv_counts_PEl).to(x_RD.device)
        plan = ExpertParallelPlan(
            local=local_plan,
            send_splits=send_splits,
            recv_splits=recv_splits,
            group_order_R=group_order_R,
            tokens_per_expert_E=recv_counts_PEl.sum(0).to(x_TD.device),
        )
        return x_RD.index_select(0, group_order_R), plan

    def unpermute(self, y_RD: torch.Tensor, plan: ExpertParallelPlan, weights_TK: torch.Tensor) -> torch.Tensor:
        y_source_major_RD = torch.empty_like(y_RD).index_copy(0, plan.group_order_R, y_RD)
        y_ND = _AllToAll.apply(y_source_major_RD, plan.recv_splits, plan.send_splits, self.group)
        return self.local.unpermute(y_ND, plan.local, weights_TK)


def shard_experts(layer: MoELayer, ep_rank: int, ep: int) -> None:
    """Keep only this rank's experts' weights, marked as expert parameters.

    ``allreduce = False`` is megatron-core's mark for parameters whose gradients are
    reduced over the expert-data-parallel group rather than the whole data-parallel one.
    """
    local = layer.cfg.num_experts // ep
    rows = slice(ep_rank * local, (ep_rank + 1) * local)
    experts = layer.experts
    experts.w_in_EDF = nn.Parameter(experts.w_in_EDF.detach()[rows].clone())
    experts.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach()[rows].clone())
    for param in experts.parameters():
        param.allreduce = False  # type: ignore[attr-defined]


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Shard every MoE layer's experts over ``group`` and route tokens with all-to-all.

    Call on a model built identically on every rank (same seed): each rank keeps its own
    slice of the experts, so the sharded model holds exactly the single-process weights.
    """
    ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    for module in model.modules():
        if isinstance(module, MoELayer):
            shard_experts(module, ep_rank, ep)
            module.dispatcher = AllToAllDispatcher(group, module.cfg.num_experts)
