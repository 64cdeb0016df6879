"""Group-limited routing (DeepSeek-V3's node-limited routing, Sec. 2.1.2).

Legend: T tokens, E experts, N groups, M = E/N experts per group, G = topk_groups eligible groups.

The E experts form N contiguous groups of M. A group's score is the sum of its two
highest selection scores; only the ``topk_groups`` best groups of each token are eligible
for that token's top-k, the others are masked before it. Under expert parallelism a
group of contiguous experts maps to a contiguous set of ranks, which is what bounds the
number of ranks (nodes) each token is sent to.
"""

from __future__ import annotations

import torch


def eligible_experts(scores_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Bool ``[T, E]``: the experts of each token's ``topk_groups`` best groups.

    ``scores_TE``: the selection scores (sigmoid score + expert bias). Ties between
    groups are broken by ``torch.topk``, identically wherever the same scores are routed."""
    num_tokens, num_experts = scores_TE.shape
    if topk_groups >= n_groups:
        return torch.ones_like(scores_TE, dtype=torch.bool)
    scores_TNM = scores_TE.view(num_tokens, n_groups, num_experts // n_groups)
    group_TN = scores_TNM.topk(2, dim=-1).values.sum(dim=-1)
    best_TG = group_TN.topk(topk_groups, dim=-1).indices
    keep_TN = torch.zeros_like(group_TN, dtype=torch.bool).scatter_(1, best_TG, True)
    return keep_TN.unsqueeze(-1).expand_as(scores_TNM).reshape(num_tokens, num_experts)
