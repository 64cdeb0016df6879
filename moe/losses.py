"""Routing losses. Both return scalars that carry gradient to the router: the model adds
them to the LM loss, so they reach the optimizer through autograd, not through side lists.

Legend: B sequences, S positions, T tokens, E experts, K experts per token.

The load-balancing loss comes in three scopes (``moe.aux_loss_scope``), which differ in the
set of tokens ``f`` and ``P`` are averaged over:

- ``micro_batch``: this forward's tokens (Switch, GShard). Changes with the data-parallel
  degree and with gradient accumulation, since both change which tokens share a forward.
- ``sequence``: each sequence on its own, then the mean over sequences (DeepSeek-V3's
  sequence-wise balance loss). Invariant to dp, ep and accumulation: no layout splits a
  sequence.
- ``global_batch``: ``f`` over the whole global batch, supplied by the caller (the trainer
  gathers router counts over micro-batches and data-parallel ranks first); each forward's
  loss is ``coeff·E·sum_i f_i^global · P_i^forward``, whose mean over equal-sized forwards
  is the global-batch loss. Invariant to dp, ep and micro-batch size.
"""

from __future__ import annotations

import torch


def load_balancing_loss_from_stats(
    prob_sum_E: torch.Tensor,
    counts_E: torch.Tensor,
    num_tokens: int,
    top_k: int,
    coeff: float,
    load_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """``load_balancing_loss`` from the gating pass's sums: ``f = counts / (T·K)`` (or
    ``load_E``), ``P = prob_sum / T``."""
    num_experts = prob_sum_E.shape[0]
    f_E = counts_E.float() / max(num_tokens * top_k, 1) if load_E is None else load_E
    p_E = prob_sum_E / max(num_tokens, 1)
    return coeff * num_experts * torch.sum(f_E.to(p_E.dtype) * p_E)


def load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, coeff: float, load_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``coeff * E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the T·K routed assignments that chose expert i (counted
    before capacity drops, normalised by K so that it sums to 1), and ``P_i`` the mean
    router probability of expert i over the T tokens. ``f`` is piecewise constant, so
    the gradient flows through ``P`` only. A perfectly uniform router gives ``coeff``;
    the minimum over routings is ``coeff`` too, reached by any balanced assignment.
    ``load_E`` replaces ``f`` when given (the global-batch scope).
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    return load_balancing_loss_from_stats(probs_TE.sum(dim=0), counts_E, num_tokens, experts_TK.shape[1], coeff, load_E)


def sequence_load_balancing_loss(probs_BSE: torch.Tensor, experts_BSK: torch.Tensor, coeff: float) -> torch.Tensor:
    """The load-balancing loss of each sequence, averaged over sequences:
    ``mean_b coeff·E·sum_i f_bi · P_bi``."""
    batch, seq, num_experts = probs_BSE.shape
    counts_BE = torch.zeros(batch, num_experts, device=probs_BSE.device).scatter_add_(
        1, experts_BSK.reshape(batch, -1), torch.ones(experts_BSK.reshape(batch, -1).shape, device=probs_BSE.device)
    )
    f_BE = counts_BE / experts_BSK[0].numel()
    p_BE = probs_BSE.mean(dim=1)
    return coeff * num_experts * (f_BE.to(probs_BSE.dtype) * p_BE).sum(dim=1).mean()


def router_z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss ``coeff * mean_t(logsumexp_i(logits_ti)^2)``.

    Penalises large router logits, which keeps the fp32 softmax away from overflow and
    the routing from becoming brittle.
    """
    return router_z_loss_from_stats(torch.logsumexp(logits_TE, dim=-1).square().sum(), logits_TE.shape[0], coeff)


def router_z_loss_from_stats(lse_sq_sum: torch.Tensor, num_tokens: int, coeff: float) -> torch.Tensor:
    """``router_z_loss`` from the gating pass's ``sum_t logsumexp(logits_t)^2``."""
    return coeff * lse_sq_sum / max(num_tokens, 1)


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation ``Var(x) / mean(x)^2`` (population variance),
    0 for a single expert; ``1e-10`` in the denominator keeps an all-zero ``x`` finite, as in
    Shazeer et al.'s tensor2tensor ``cv_squared``."""
    if x_E.numel() < 2:
        return x_E.new_zeros(())
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)


def importance_loss(gate_sum_E: torch.Tensor, coeff: float) -> torch.Tensor:
    """Shazeer et al. 2017's importance loss ``w_imp · CV(sum_x G(x))^2`` over this forward's
    tokens; ``gate_sum_E`` is the gates summed over tokens (zero where not chosen)."""
    return coeff * cv_squared(gate_sum_E)


def load_loss(load_E: torch.Tensor, coeff: float) -> torch.Tensor:
    """Shazeer et al. 2017's load loss ``w_load · CV(sum_x P(x, ·))^2`` over this forward's
    tokens; ``load_E`` is the smooth load estimate (``moe.noisy_router.smooth_load``)."""
    return coeff * cv_squared(load_E)
