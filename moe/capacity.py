"""Expert capacity and token dropping (Switch Transformer, GShard).

Legend: T tokens, E experts, K experts per token, A = T·K assignments.

Each expert takes at most ``capacity = ceil(capacity_factor * T * K / E)`` assignments.
Which ones it keeps is the drop policy:

- ``position``: earlier first, in GShard's order: every token's first choice in token
  order, then every second choice, and so on (a token's first choice is never displaced
  by another token's second).
- ``probability``: the assignments with the largest router gate first.

A dropped assignment contributes nothing to its token's output; a token whose every
assignment is dropped passes through the layer's residual connection unchanged.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * T * K / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def _priority_A(weights_TK: torch.Tensor, policy: str) -> torch.Tensor:
    """Priority of each token-major assignment ``a = t*K + k``; lower goes first."""
    num_tokens, top_k = weights_TK.shape
    if policy == "position":
        t_TK = torch.arange(num_tokens, device=weights_TK.device).unsqueeze(1)
        k_TK = torch.arange(top_k, device=weights_TK.device).unsqueeze(0)
        return (k_TK * num_tokens + t_TK).reshape(-1)
    order_A = torch.argsort(weights_TK.reshape(-1), descending=True, stable=True)
    return torch.argsort(order_A)


def rank_within_expert(experts_A: torch.Tensor, priority_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each assignment, how many assignments to the same expert go before it.

    Sort by the unique key ``expert * A + priority``; an assignment's rank is its place in
    that order minus the first place of its expert.
    """
    num_assign = experts_A.numel()
    order_A = torch.argsort(experts_A * num_assign + priority_A)
    counts_E = torch.bincount(experts_A, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    sorted_rank_A = torch.arange(num_assign, device=experts_A.device) - starts_E[experts_A[order_A]]
    rank_A = torch.empty_like(sorted_rank_A)
    rank_A[order_A] = sorted_rank_A
    return rank_A


def keep_mask(
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str,
) -> torch.Tensor:
    """Boolean ``keep_TK``: True where the assignment fits within its expert's capacity."""
    rank_A = rank_within_expert(experts_TK.reshape(-1), _priority_A(weights_TK, policy), num_experts)
    return (rank_A < capacity).reshape(experts_TK.shape)
