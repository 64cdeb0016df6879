"""The MoE layer: router -> capacity -> dispatcher -> experts -> combine (+ shared experts).

Legend: B batch, S sequence, T = B·S tokens, D model dim, E experts, K experts per token,
N expert-sorted rows, V vocabulary.

The router is learned from the hidden states (``moe.router: topk``, softmax top-k, or
``sinkhorn``, a balanced assignment in training) or a fixed hash of the token ids
(``moe.router: hash``, from ``ids_BS``, which the model hands to every MoE layer; no aux
or z-loss, as there is no gate to train). ``expert_choice`` (``moe.expert_choice_router``:
experts take tokens; not causal over a sequence) and ``noisy_topk``
(``moe.noisy_router``: Shazeer et al. 2017, with its importance and load losses added to
the aux loss) complete the menu.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe.capacity import expert_capacity, keep_mask
from moe.config import MoEConfig
from moe.dispatcher import LocalDispatcher
from moe.expert_choice_router import ExpertChoiceRouter, ExpertChoiceRouting
from moe.experts import GroupedExperts
from moe.kernels._triton import Impl
from moe.losses import load_balancing_loss_from_stats, router_z_loss_from_stats, sequence_load_balancing_loss
from moe.losses import importance_loss, load_loss
from moe.noisy_router import NoisyRouting, NoisyTopKRouter
from moe.hash_router import HashRouter
from moe.router import Routing
from moe.mlp import MLP
from moe.router import SigmoidRouter, TopKRouter
from moe.sinkhorn_router import SinkhornRouter


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

    def __init__(self, dim: int, cfg: MoEConfig, vocab_size: int | None = None) -> None:
        """``vocab_size``: the token ids' range, needed by the hash router only."""
        super().__init__()
        cfg = cfg.fine_grained()  # moe.granularity G: E·G experts of width F/G, K·G per token
        self.cfg = cfg
        self.router: TopKRouter | HashRouter | NoisyTopKRouter
        if cfg.router == "expert_choice":
            assert cfg.capacity_factor is not None  # MoEConfig requires it for expert choice
            self.router = ExpertChoiceRouter(dim, cfg.num_experts, cfg.top_k, cfg.capacity_factor,
                                             cfg.expert_choice_scope, cfg.jitter_eps)
        elif cfg.router == "noisy_topk":
            self.router = NoisyTopKRouter(dim, cfg.num_experts, cfg.top_k)
        elif cfg.router == "hash":
            if vocab_size is None:
                raise ValueError("moe.router='hash' maps token ids to experts: MoELayer needs vocab_size")
            self.router = HashRouter(vocab_size, cfg.num_experts, cfg.top_k)
        elif cfg.score == "sigmoid":
            self.router = SigmoidRouter(dim, cfg.num_experts, cfg.top_k, cfg.normalize_weights, cfg.jitter_eps,
                                        cfg.routed_scaling_factor, cfg.n_groups, cfg.eligible_groups)
        else:
            router = SinkhornRouter if cfg.router == "sinkhorn" else TopKRouter
            self.router = router(dim, cfg.num_experts, cfg.top_k, cfg.normalize_weights, cfg.jitter_eps)
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

    def _route(self, x_TD: torch.Tensor, ids_BS: torch.Tensor | None, impl: Impl, batch: int) -> Routing:
        if isinstance(self.router, ExpertChoiceRouter):
            return self.router(x_TD.view(batch, -1, x_TD.shape[1]))
        if isinstance(self.router, NoisyTopKRouter):
            return self.router(x_TD, ids_BS)
        if isinstance(self.router, TopKRouter):
            return self.router(x_TD, impl)
        if ids_BS is None:
            raise ValueError("moe.router='hash' routes by token id: call the MoE layer with ids_BS")
        return self.router(ids_BS.reshape(-1))

    def _routing_losses(self, routing: Routing, batch: int, load_E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux loss, z-loss); both zero for the hash router, which has nothing to train."""
        if isinstance(self.router, HashRouter):
            zero = routing.weights_TK.new_zeros(())
            return zero, zero
        num_tokens = routing.experts_TK.shape[0]
        z_loss = router_z_loss_from_stats(routing.lse_sq_sum, num_tokens, self.cfg.z_loss_coeff)
        aux_loss = self._aux_loss(routing, batch, load_E)
        if isinstance(routing, NoisyRouting):  # Shazeer et al.'s losses, beside the Switch aux loss
            aux_loss = aux_loss + importance_loss(routing.gate_sum_E, self.cfg.importance_loss_coeff)
            aux_loss = aux_loss + load_loss(routing.load_E, self.cfg.load_loss_coeff)
        return aux_loss, z_loss

    @staticmethod
    def _dropped_fraction(routing: Routing, keep_TK: torch.Tensor | None) -> torch.Tensor:
        """The assignments capacity dropped; under expert choice the tokens no expert took."""
        if keep_TK is None:
            return torch.zeros((), device=routing.logits_TE.device)
        if isinstance(routing, ExpertChoiceRouting):
            return 1.0 - keep_TK.any(dim=1).float().mean()
        return 1.0 - keep_TK.float().mean().detach()

    def forward(
        self, x_BSD: torch.Tensor, load_E: torch.Tensor | None = None, ids_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """``load_E``: the global-batch assignment fraction, for ``aux_loss_scope=global_batch``;
        ``ids_BS``: the token ids of ``x_BSD``'s positions (the hash router's input)."""
        batch, seq, dim = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, dim)
        impl = self._impl(x_TD)
        routing = self._route(x_TD, ids_BS, impl, batch)
        if isinstance(routing, ExpertChoiceRouting):  # E slots per token, kept where an expert took it
            capacity, keep_TK = routing.capacity, routing.keep_TK
        else:
            capacity = self.capacity(x_TD.shape[0])
            keep_TK = self._keep(routing.experts_TK, routing.weights_TK, capacity)

        x_ND, plan = self.dispatcher.permute(x_TD, routing.experts_TK, keep_TK, capacity, impl)
        y_ND = self.experts(x_ND, plan.tokens_per_expert_E)
        y_TD = self.dispatcher.unpermute(y_ND, plan, routing.weights_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        aux_loss, z_loss = self._routing_losses(routing, batch, load_E)
        stats = MoEStats(
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert_E=routing.counts_E.detach(),
            dropped_fraction=self._dropped_fraction(routing, keep_TK),
        )
        return y_TD.reshape(batch, seq, dim), stats
