"""Hash routing: a fixed token-id -> expert map (Roller et al. 2021, "Hash Layers For
Large Sparse Models"; the baseline of Clark et al. 2022, arXiv 2202.01169).

Legend: T tokens, V vocabulary, E experts, K experts per token (always 1 here).

Nothing is learned: every occurrence of token id v goes to expert ``map_V[v]``, with gate
1. The map is a random permutation of the vocabulary dealt out round-robin, so every
expert owns ``floor(V/E)`` or ``ceil(V/E)`` ids (balanced over ids, not over token
frequency; Roller et al. find the random hash as good as a frequency-balanced one). It
is drawn from a generator with a fixed seed, independent of ``train.seed``: the same map
on every rank, in every run, with no state to checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.router import Routing

HASH_SEED = 20210830  # fixed: the map must not depend on the training seed or the rank


def hash_map(vocab_size: int, num_experts: int) -> torch.Tensor:
    """``map_V``: expert of each token id; a seeded permutation of ids, dealt round-robin."""
    gen = torch.Generator().manual_seed(HASH_SEED)
    perm_V = torch.randperm(vocab_size, generator=gen)
    map_V = torch.empty(vocab_size, dtype=torch.long)
    map_V[perm_V] = torch.arange(vocab_size) % num_experts
    return map_V


class HashRouter(nn.Module):
    """Routes token ``t`` to expert ``map_V[id_t]`` with gate 1; no parameters.

    The returned ``Routing`` holds the one-hot assignment as ``logits_TE`` (the router's
    whole probability mass sits on the hashed expert), counts per expert in
    ``counts_E`` and ``prob_sum_E``, and a zero ``lse_sq_sum``. The layer adds no aux or
    z-loss for it: there is no gate to train.
    """

    def __init__(self, vocab_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("map_V", hash_map(vocab_size, num_experts), persistent=False)

    def forward(self, ids_T: torch.Tensor) -> Routing:
        experts_TK = self.map_V[ids_T].unsqueeze(-1)
        onehot_TE = torch.nn.functional.one_hot(experts_TK[:, 0], self.num_experts).float()
        counts_E = onehot_TE.sum(dim=0)
        return Routing(
            logits_TE=onehot_TE,
            weights_TK=torch.ones(experts_TK.shape, device=ids_T.device),
            experts_TK=experts_TK,
            prob_sum_E=counts_E,
            counts_E=counts_E.long(),
            lse_sq_sum=torch.zeros((), device=ids_T.device),
        )
