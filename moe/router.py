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

from moe.kernels._triton import Impl
from moe.kernels.gating import topk_gating


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens.

    ``weights_TK`` are the gates that scale each chosen expert's output (renormalised to
    sum to 1 over K when asked). The loss statistics come out of the same gating pass:
    ``prob_sum_E`` (sum over tokens of the softmax), ``counts_E`` (assignments per expert)
    and ``lse_sq_sum`` (sum over tokens of logsumexp(logits)^2).
    """

    logits_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    prob_sum_E: torch.Tensor
    counts_E: torch.Tensor
    lse_sq_sum: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]

    @property
    def probs_TE(self) -> torch.Tensor:
        """The full softmax, recomputed on demand (only the per-sequence loss needs it)."""
        return self.logits_TE.softmax(dim=-1)


class TopKRouter(nn.Module):
    """``probs = softmax(W_r · x)``, the K largest become the token's experts and gates
    (ties to the lower expert index).

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

    def forward(self, x_TD: torch.Tensor, impl: Impl = "torch") -> Routing:
        """``impl`` picks the gating implementation (``moe.kernels.gating``): the fused
        Triton kernel or its torch reference; both compute the same thing."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), impl)

    def _route(self, x_TD: torch.Tensor, impl: Impl) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise_TD = torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            x_TD = x_TD * noise_TD
        return self._gate(F.linear(x_TD, self.weight_ED.float()), impl)

    def _gate(self, logits_TE: torch.Tensor, impl: Impl) -> Routing:
        """Experts, gates and loss statistics from fp32 logits (subclasses choose differently)."""
        gate = topk_gating(logits_TE, self.top_k, self.normalize, impl)
        return Routing(logits_TE, gate.weights_TK, gate.experts_TK, gate.prob_sum_E, gate.counts_E, gate.lse_sq_sum)
