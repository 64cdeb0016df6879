"""The MoE layer: router -> capacity -> dispatcher -> experts -> combine (+ shared experts).

Legend: B batch, S sequence, T = B·S tokens, D model dim, E experts, K experts per token,
N expert-sorted rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe.capacity import expert_capacity, keep_mask
from moe.config import MoEConfig
from moe.dispatcher import LocalDispatcher
from moe.experts import GroupedExperts
from moe.kernels._triton import Impl
from moe.losses import load_balancing_loss_from_stats, router_z_loss_from_stats, sequence_load_balancing_loss
from moe.router import Routing
from moe.mlp import MLP
from moe.router import TopKRouter


class Plan(Protocol):
    """What the layer reads of a dispatch plan: the row count of each of its experts."""

    tokens_per_expert_E: torch.Tensor


class Dispatcher(Protocol):
    """What the layer needs of a dispatcher; ``parallel/`` provides an all-to-all twin.

    ``permute`` returns the rows for the experts this layer holds, contiguous per expert,
    and a plan; ``unpermute`` takes those rows' outputs back to token order, gated.
    """

    def permute(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, capacity: int | None, impl: Impl
    ) -> tuple[torch.Tensor, Plan]: ...

    def unpermute(self, y_ND: torch.Tensor, plan: Plan, weights_TK: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MoEStats:
    """One layer's routing losses (with gradient) and load statistics (detached).

    ``tokens_per_expert_E`` counts routed assignments before capacity drops: it is the
    load the router asked for, which is what balance is judged on.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped_fraction: torch.Tensor


class MoELayer(nn.Module):
    """``y = sum_k gate_k · expert_k(x) + shared(x)`` over each token's kept top-k experts."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.normalize_weights, cfg.jitter_eps)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_ffn_dim, cfg.activation)
        self.shared = (
            MLP(dim, cfg.expert_ffn_dim * cfg.num_shared_experts, cfg.activation)
            if cfg.num_shared_experts > 0
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for ``num_tokens`` tokens routed together; None if dropless."""
        if self.cfg.capacity_factor is None:
            return None
        return expert_capacity(num_tokens, self.cfg.top_k, self.cfg.num_experts, self.cfg.capacity_factor)

    def _keep(self, experts_TK: torch.Tensor, weights_TK: torch.Tensor, capacity: int | None) -> torch.Tensor | None:
        if capacity is None:
            return None
        return keep_mask(experts_TK, weights_TK, self.cfg.num_experts, capacity, self.cfg.drop_policy)

    def _impl(self, x: torch.Tensor) -> Impl:
        """``moe.kernels``: ``fused`` runs the Triton kernels wherever Triton runs (else their
        torch references), ``torch`` never does, ``auto`` means fused on GPU, torch on CPU."""
        if self.cfg.kernels == "fused" or (self.cfg.kernels == "auto" and x.is_cuda):
            return "auto"
        return "torch"

    def _aux_loss(self, routing: Routing, batch: int, load_E: torch.Tensor | None) -> torch.Tensor:
        """The load-balancing loss in the configured scope (see ``moe.losses``).

        ``global_batch`` uses ``load_E`` (the global-batch ``f``) when the caller has it;
        without it this forward's tokens are taken as the whole global batch.
        """
        coeff = self.cfg.aux_loss_coeff
        num_tokens, top_k = routing.experts_TK.shape
        if self.cfg.aux_loss_scope == "sequence":
            return sequence_load_balancing_loss(
                routing.probs_TE.view(batch, -1, routing.num_experts), routing.experts_TK.view(batch, -1, top_k), coeff
            )
        global_load_E = load_E if self.cfg.aux_loss_scope == "global_batch" else None
        return load_balancing_loss_from_stats(routing.prob_sum_E, routing.counts_E, num_tokens, top_k, coeff, global_load_E)

    def forward(self, x_BSD: torch.Tensor, load_E: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """``load_E``: the global-batch assignment fraction, for ``aux_loss_scope=global_batch``."""
        batch, seq, dim = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, dim)
        impl = self._impl(x_TD)
        routing = self.router(x_TD, impl)
        capacity = self.capacity(x_TD.shape[0])
        keep_TK = self._keep(routing.experts_TK, routing.weights_TK, capacity)

        x_ND, plan = self.dispatcher.permute(x_TD, routing.experts_TK, keep_TK, capacity, impl)
        y_ND = self.experts(x_ND, plan.tokens_per_expert_E)
        y_TD = self.dispatcher.unpermute(y_ND, plan, routing.weights_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        stats = MoEStats(
            aux_loss=self._aux_loss(routing, batch, load_E),
            z_loss=router_z_loss_from_stats(routing.lse_sq_sum, x_TD.shape[0], self.cfg.z_loss_coeff),
            tokens_per_expert_E=routing.counts_E.detach(),
            dropped_fraction=(
                torch.zeros((), device=x_TD.device)
                if keep_TK is None
                else 1.0 - keep_TK.float().mean().detach()
            ),
        )
        return y_TD.reshape(batch, seq, dim), stats
