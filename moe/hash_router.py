"""Hash routing: a fixed token-id -> experts map (Roller et al. 2021, "Hash Layers For
Large Sparse Models"; the baseline of Clark et al. 2022, arXiv 2202.01169).

Legend: T tokens, V vocabulary, E experts, K experts per token.

Nothing is learned: every occurrence of token id v goes to experts ``map_VK[v]``, each with
gate 1/K (the K outputs are averaged, so the layer's output scale does not depend on K;
for K = 1 the gate is 1). Column k of the map is a seeded random permutation of the
vocabulary dealt out round-robin, so every expert owns ``floor(V/E)`` or ``ceil(V/E)`` ids
per column (balanced over ids, not over token frequency; Roller et al. find the random
hash as good as a frequency-balanced one). K > 1 is their multi-hash: K independent
columns, a clash with an earlier column moved to the next free expert so a token's K
experts are distinct. With K > 1 a hash trial has the same experts, widths and active
parameters as a learned top-K trial at the same E, so the two differ by the router only.

The map is drawn from a generator with a fixed seed, independent of ``train.seed``: the
same map on every rank, in every run, with no state to checkpoint. Column 0 is the same
for every K.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.router import Routing

HASH_SEED = 20210830  # fixed: the map must not depend on the training seed or the rank


def hash_map(vocab_size: int, num_experts: int, top_k: int = 1) -> torch.Tensor:
    """``map_VK``: the K distinct experts of each token id (see the module doc)."""
    gen = torch.Generator().manual_seed(HASH_SEED)
    map_VK = torch.empty(vocab_size, top_k, dtype=torch.long)
    for k in range(top_k):
        perm_V = torch.randperm(vocab_size, generator=gen)
        col_V = torch.empty(vocab_size, dtype=torch.long)
        col_V[perm_V] = torch.arange(vocab_size) % num_experts
        clash_V = (map_VK[:, :k] == col_V[:, None]).any(dim=1)
        while clash_V.any():
            col_V[clash_V] = (col_V[clash_V] + 1) % num_experts
            clash_V = (map_VK[:, :k] == col_V[:, None]).any(dim=1)
        map_VK[:, k] = col_V
    return map_VK


class HashRouter(nn.Module):
    """Routes token ``t`` to experts ``map_VK[id_t]`` with gates 1/K; no parameters.

    The returned ``Routing`` holds the gates scattered over the experts as ``logits_TE``
    (the router's whole probability mass sits on the hashed experts), assignments per
    expert in ``counts_E`` and ``prob_sum_E``, and a zero ``lse_sq_sum``. The layer adds
    no aux or z-loss for it: there is no gate to train.
    """

    def __init__(self, vocab_size: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("map_VK", hash_map(vocab_size, num_experts, top_k), persistent=False)

    def forward(self, ids_T: torch.Tensor) -> Routing:
        experts_TK = self.map_VK[ids_T]
        top_k = experts_TK.shape[1]
        weights_TK = torch.full(experts_TK.shape, 1.0 / top_k, device=ids_T.device)
        mass_TE = torch.zeros(experts_TK.shape[0], self.num_experts, device=ids_T.device).scatter_(1, experts_TK, weights_TK)
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        return Routing(
            logits_TE=mass_TE,
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            prob_sum_E=mass_TE.sum(dim=0),
            counts_E=counts_E,
            lse_sq_sum=torch.zeros((), device=ids_T.device),
        )
