"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing", arXiv 2202.09368).

Legend: B sequences, S positions, T = B·S tokens, D model dim, E experts, K the top_k of
the config (the mean experts per token), G tokens in a choice group.

Experts choose tokens, not tokens experts: ``probs_TE = softmax(x·W_r)`` over experts, and
each expert takes the C tokens of a group with its largest probabilities,
``C = min(ceil(capacity_factor · G · K / E), G)`` (``moe.capacity_factor`` is required;
the paper uses 2). A token is taken by 0 to E experts; its gate for an expert that took it
is its softmax probability for that expert (not renormalised; ``moe.normalize_weights``
and ``moe.drop_policy`` do not apply). Every expert takes exactly C tokens per group, so
the load is balanced by construction and the aux loss is not needed
(``moe.aux_loss_coeff: 0``; with it on, ``f`` is uniform and the loss constant).

The group (``moe.expert_choice_scope``):

- ``sequence``: each sequence on its own (G = S). Not causal: whether an expert takes
  position s depends on the later positions of the sequence, which a decoder generating
  token by token does not have yet. Evaluate with the same scope (the validation loss here
  does), and read a generation-time quality from a causal router instead. Every layout
  (data, expert, pipeline parallel, any micro-batch size) routes whole sequences, so the
  choice is the one process's; under tensor parallelism a TP rank must hold whole
  sequences (``parallel/tensor_parallel.py``).
- ``micro_batch``: the T tokens the layer routes in one forward (G = T: one rank's
  micro-batch, under tensor parallelism its T/tp tokens). Changes with dp, tp and the
  micro-batch size, like ``moe.aux_loss_scope=micro_batch``.

How the layer runs it without its own dispatcher: the routing has E slots per token
(``experts_TE[t, e] = e``), gates ``weights_TE`` (the probability where taken, else 0) and
``keep_TE`` (taken or not), which the dispatcher's capacity path already handles as a
token-choice routing whose dropped assignments are the ones no expert took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from moe.kernels._triton import Impl
from moe.router import Routing, TopKRouter

Scope = Literal["sequence", "micro_batch"]


@dataclass(frozen=True, kw_only=True)
class ExpertChoiceRouting(Routing):
    """``Routing`` with E slots per token (``experts_TK`` is ``arange(E)`` on every row) and
    ``keep_TK``, the (token, expert) pairs the experts took; ``capacity`` is the rows each
    expert takes in this forward (C per group times the groups)."""

    keep_TK: torch.Tensor
    capacity: int


def group_capacity(group_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = min(ceil(cf · G · K / E), G)``: an expert cannot take a token twice."""
    return min(math.ceil(capacity_factor * group_tokens * top_k / num_experts), group_tokens)


def expert_choice(probs_GTE: torch.Tensor, capacity: int) -> torch.Tensor:
    """``taken_GTE``: per group, each expert's ``capacity`` tokens with the largest
    probabilities (ties to the earlier token)."""
    groups, tokens, num_experts = probs_GTE.shape
    order_GTE = torch.sort(probs_GTE, dim=1, descending=True, stable=True).indices
    taken_GTE = torch.zeros(groups, tokens, num_experts, dtype=torch.bool, device=probs_GTE.device)
    return taken_GTE.scatter_(1, order_GTE[:, :capacity], True)


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing over groups of ``scope`` (see the module docstring). Same
    weight and jitter as ``TopKRouter``; runs in torch (no fused kernel)."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, capacity_factor: float, scope: Scope, jitter_eps: float
    ) -> None:
        super().__init__(dim, num_experts, top_k, normalize=False, jitter_eps=jitter_eps)
        self.capacity_factor = capacity_factor
        self.scope = scope

    def forward(self, x_BSD: torch.Tensor, impl: Impl = "torch") -> ExpertChoiceRouting:  # type: ignore[override]
        """Route ``x_BSD``'s tokens (its sequences are the ``sequence`` scope's groups). Takes
        ``[B, S, D]``, where ``TopKRouter`` takes ``[T, D]``: the groups need the sequences.
        ``impl`` is unused (no fused expert-choice kernel)."""
        batch, seq, dim = x_BSD.shape
        with torch.autocast(x_BSD.device.type, enabled=False):
            x_TD = x_BSD.reshape(batch * seq, dim).float()
            if self.training and self.jitter_eps > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            logits_TE = F.linear(x_TD, self.weight_ED.float())
            groups = batch if self.scope == "sequence" else 1
            return self._choose(logits_TE, groups)

    def _choose(self, logits_TE: torch.Tensor, groups: int) -> ExpertChoiceRouting:
        num_tokens, num_experts = logits_TE.shape
        probs_TE = logits_TE.softmax(dim=-1)
        capacity = group_capacity(num_tokens // groups, self.top_k, num_experts, self.capacity_factor)
        with torch.no_grad():
            keep_TE = expert_choice(probs_TE.detach().view(groups, -1, num_experts), capacity).view(num_tokens, -1)
        experts_TE = torch.arange(num_experts, device=logits_TE.device).expand(num_tokens, -1)
        return ExpertChoiceRouting(
            logits_TE=logits_TE,
            weights_TK=probs_TE * keep_TE,
            experts_TK=experts_TE,
            prob_sum_E=probs_TE.sum(dim=0),
            counts_E=keep_TE.sum(dim=0),
            lse_sq_sum=logits_TE.logsumexp(dim=-1).square().sum(),
            keep_TK=keep_TE,
            capacity=capacity * groups,
        )
