"""Sinkhorn-balanced routing: S-BASE (Clark et al. 2022, arXiv 2202.01169, Sec. 2; BASE
layers, Lewis et al. 2021), as megatron-core's ``moe_router_load_balancing_type: sinkhorn``.

Legend: T tokens, D model dim, E experts, K experts per token.

In training a token's experts come from a balanced transport plan, not from its raw
logits: Sinkhorn scales ``exp(logits_TE)`` to a plan ``P_TE`` whose rows each sum to 1/T
and whose columns each sum to 1/E, and each token takes the K largest entries of its
row. Balance comes from the assignment itself, so no aux loss is needed
(``moe.aux_loss_coeff: 0``). The plan carries no gradient; the router learns from the
LM loss through the gate, which is ``sigmoid(logit)`` for K=1 (about 1/2 at any E, where a
softmax gate starts near 1/E and scales the expert's output down with it) and the softmax
probability for K>1 (renormalised over K if ``moe.normalize_weights``), as megatron-core.

The plan couples every token of the forward, later positions included, so it is used
only where balance is needed: in evaluation a token takes the top-K of its own logits,
which is causal. The balancing group is the T tokens the router sees in one forward:
one rank's micro-batch (whole sequences under TP), as in megatron-core.
"""

from __future__ import annotations

import math

import torch

from moe.kernels._triton import Impl
from moe.router import Routing, TopKRouter

# Sinkhorn iterations: a fixed count (no data-dependent stopping, so no host sync on a GPU).
# Routing reads only the row-wise order of the plan; by 8 rounds its rows are within 1% of
# 1/T even for a router strongly biased to one expert (tests/test_sinkhorn_router.py).
# The row argmax of a balanced plan is balanced only approximately: at T/E = 32 tokens per
# expert the loads stay within ~25% of the mean, where plain top-1 of a router biased to
# one expert sends it 7x its share.
SINKHORN_ITERS = 8


def sinkhorn_log_plan(logits_TE: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """``log P_TE`` of the balanced plan ``P = diag(r) exp(logits) diag(c)`` with rows
    summing to 1/T and columns to 1/E (exactly for the columns, which are scaled last).

    Computed in log space: ``exp(logits)`` of an unbounded router overflows fp32.
    """
    num_tokens, num_experts = logits_TE.shape
    log_p_TE = logits_TE.float()
    for _ in range(iters):
        log_p_TE = log_p_TE - log_p_TE.logsumexp(dim=1, keepdim=True) - math.log(num_tokens)
        log_p_TE = log_p_TE - log_p_TE.logsumexp(dim=0, keepdim=True) - math.log(num_experts)
    return log_p_TE


class SinkhornRouter(TopKRouter):
    """Experts from the Sinkhorn-balanced plan in training, from the logits in evaluation;
    gates from the logits (sigmoid for K=1, softmax for K>1). Same weight and jitter as
    ``TopKRouter``; the same ``Routing`` statistics (softmax sums for logging and any aux
    loss, assignment counts, logsumexp^2 for the z-loss)."""

    def _gate(self, logits_TE: torch.Tensor, impl: Impl) -> Routing:
        """``impl`` is unused: there is no fused Sinkhorn kernel; this runs in torch."""
        with torch.no_grad():
            scores_TE = sinkhorn_log_plan(logits_TE) if self.training else logits_TE
            experts_TK = scores_TE.topk(self.top_k, dim=-1).indices
        probs_TE = logits_TE.softmax(dim=-1)
        if self.top_k == 1:
            weights_TK = torch.sigmoid(logits_TE.gather(1, experts_TK))
        else:
            weights_TK = probs_TE.gather(1, experts_TK)
            if self.normalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        counts_E = torch.bincount(experts_TK.flatten(), minlength=self.weight_ED.shape[0])
        return Routing(
            logits_TE=logits_TE,
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            prob_sum_E=probs_TE.sum(dim=0),
            counts_E=counts_E,
            lse_sq_sum=logits_TE.logsumexp(dim=-1).square().sum(),
        )
