"""Softmax top-k router (Switch k=1, GShard/GLaM k=2, any k) and sigmoid top-k router
(DeepSeek-V3: sigmoid scores, aux-loss-free bias balancing, group-limited routing).

Legend: T tokens, D model dim, E experts, K experts per token.

The router always runs in fp32, whatever the model dtype: the softmax over experts and
the logsumexp of the z-loss are where bf16 rounding changes which expert wins.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe.group_limit import eligible_experts
from moe.kernels._triton import Impl
from moe.kernels.gating import topk_gating

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens.

    ``weights_TK`` are the gates that scale each chosen expert's output (renormalised to
    sum to 1 over K when asked). The loss statistics come out of the same gating pass:
    ``prob_sum_E`` (sum over tokens of the expert probabilities ``probs_TE``),
    ``counts_E`` (assignments per expert) and ``lse_sq_sum`` (sum over tokens of
    logsumexp(logits)^2). ``score`` names how ``probs_TE`` comes from the logits.
    """

    logits_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    prob_sum_E: torch.Tensor
    counts_E: torch.Tensor
    lse_sq_sum: torch.Tensor
    score: Literal["softmax", "sigmoid"] = "softmax"

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]

    @property
    def probs_TE(self) -> torch.Tensor:
        """The aux loss's probabilities, recomputed on demand (only the per-sequence loss
        needs them): the softmax, or for sigmoid scores ``s / sum_e s`` (megatron-core's
        ``compute_routing_scores_for_aux_loss``)."""
        if self.score == "sigmoid":
            return normalized_sigmoid(self.logits_TE)
        return self.logits_TE.softmax(dim=-1)


def normalized_sigmoid(logits_TE: torch.Tensor) -> torch.Tensor:
    """``s_te / sum_e s_te`` with ``s = sigmoid(logits)``: sigmoid scores as a distribution."""
    scores_TE = logits_TE.sigmoid()
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


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


@functools.cache
def _log_fallback(reason: str) -> None:
    """Log ``reason`` once per process, however many layers and steps meet it."""
    log.info(reason)


class SigmoidRouter(TopKRouter):
    """DeepSeek-V3 routing: ``s = sigmoid(W_r · x)``; token t's experts are the K largest
    ``s_te + b_e`` among the experts of its eligible groups (``moe.group_limit``; all of
    them with one group), ties to the lower index; the gates are the chosen ``s_te``
    (not ``s + b``), divided by their sum when ``normalize``, times ``scaling``.

    ``expert_bias_E`` (``b``) is a persistent buffer: saved with the layer, never trained
    by autograd (no gradient, no weight decay), moved only by :func:`update_expert_bias`
    after each optimizer step. The aux loss (when on) uses ``s / sum_e s``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        normalize: bool,
        jitter_eps: float,
        scaling: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__(dim, num_experts, top_k, normalize, jitter_eps)
        self.scaling = scaling
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32), persistent=True)

    def _gate(self, logits_TE: torch.Tensor, impl: Impl) -> Routing:
        if impl != "torch":
            _log_fallback("moe.score=sigmoid: the fused gating kernel covers softmax only; sigmoid routing "
                          "runs in torch (moe.router.SigmoidRouter)")
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias_E.float()
        eligible_TE = eligible_experts(choice_TE, self.n_groups, self.topk_groups)
        choice_TE = choice_TE.masked_fill(~eligible_TE, float("-inf"))
        experts_TK = torch.sort(choice_TE, dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.normalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(
            logits_TE,
            weights_TK * self.scaling,
            experts_TK,
            prob_sum_E=normalized_sigmoid(logits_TE).sum(dim=0),
            counts_E=torch.bincount(experts_TK.reshape(-1), minlength=logits_TE.shape[1]),
            lse_sq_sum=torch.logsumexp(logits_TE, dim=-1).square().sum(),
            score="sigmoid",
        )


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664), in place:
    ``b_e += rate · sign(mean_e' counts_e' - counts_e)``.

    ``counts_E``: expert e's assignments over the whole global batch (every micro-batch,
    data-parallel and tensor-parallel rank): given the same counts, every rank computes the
    same bias, whatever the layout. An expert exactly at the mean keeps its bias.
    """
    counts_E = counts_E.to(device=bias_E.device, dtype=torch.float32)
    bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E))
