"""Routing losses. Both return scalars that carry gradient to the router: the model adds
them to the LM loss, so they reach the optimizer through autograd, not through side lists.

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, coeff: float
) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``coeff * E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the T·K routed assignments that chose expert i (counted
    before capacity drops, normalised by K so that it sums to 1), and ``P_i`` the mean
    router probability of expert i over the T tokens. ``f`` is piecewise constant, so
    the gradient flows through ``P`` only. A perfectly uniform router gives ``coeff``;
    the minimum over routings is ``coeff`` too, reached by any balanced assignment.
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    f_E = counts_E.to(probs_TE.dtype) / max(experts_TK.numel(), 1)
    p_E = probs_TE.mean(dim=0) if num_tokens > 0 else probs_TE.sum(dim=0)
    return coeff * num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss ``coeff * mean_t(logsumexp_i(logits_ti)^2)``.

    Penalises large router logits, which keeps the fp32 softmax away from overflow and
    the routing from becoming brittle.
    """
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
