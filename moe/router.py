"""Softmax top-k router (Switch k=1, GShard/GLaM k=2, any k).

Legend: T tokens, D model dim, E experts, K experts per token.

The router always runs in fp32, whatever the model dtype: the softmax over experts and
the logsumexp of the z-loss are where bf16 rounding changes which expert wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens.

    ``weights_TK`` are the gates that scale each chosen expert's output (renormalised to
    sum to 1 over K when asked); ``probs_TE`` and ``logits_TE`` feed the aux and z-losses.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]


class TopKRouter(nn.Module):
    """``probs = softmax(W_r · x)``, the K largest become the token's experts and gates.

    With ``jitter_eps > 0`` the input is multiplied by ``U(1 - eps, 1 + eps)`` noise in
    training (Switch Transformer, Sec. 2.4), which explores routing early in training.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, normalize: bool, jitter_eps: float
    ) -> None:
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k = top_k
        self.normalize = normalize
        self.jitter_eps = jitter_eps

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.float())

    def _route(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise_TD = torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            x_TD = x_TD * noise_TD
        logits_TE = F.linear(x_TD, self.weight_ED.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, weights_TK, experts_TK)
