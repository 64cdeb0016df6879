"""The Sinkhorn (S-BASE) router: balanced plan, assignment, gates, eval routing, the layer."""

import pytest
import torch

from moe.config import MoEConfig
from moe.layer import MoELayer
from moe.router import TopKRouter
from moe.sinkhorn_router import SinkhornRouter, sinkhorn_log_plan


def _biased_logits(tokens: int, experts: int) -> torch.Tensor:
    """A router that prefers expert 0 for every token (the collapse balance must undo)."""
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(tokens, experts, generator=gen) * 3
    logits_TE[:, 0] += 5.0
    return logits_TE


def test_plan_has_the_balanced_marginals() -> None:
    tokens, experts = 1024, 32
    plan_TE = sinkhorn_log_plan(_biased_logits(tokens, experts)).exp()
    assert torch.allclose(plan_TE.sum(0), torch.full((experts,), 1 / experts), rtol=1e-5)
    assert torch.allclose(plan_TE.sum(1), torch.full((tokens,), 1 / tokens), rtol=1e-2)


def test_plan_is_finite_for_logits_that_overflow_exp() -> None:
    logits_TE = _biased_logits(64, 8) * 100  # exp(>88) is inf in fp32
    assert torch.isfinite(sinkhorn_log_plan(logits_TE)).all()


def test_plan_keeps_each_tokens_order_when_already_balanced() -> None:
    """A plan that is already balanced is left as it is: routing == plain argmax."""
    logits_TE = torch.eye(8).repeat(16, 1) * 4  # token t prefers expert t % 8, 16 tokens each
    assert torch.equal(sinkhorn_log_plan(logits_TE).argmax(1), logits_TE.argmax(1))


def _router(top_k: int, normalize: bool, weight_ED: torch.Tensor) -> SinkhornRouter:
    router = SinkhornRouter(weight_ED.shape[1], weight_ED.shape[0], top_k, normalize, jitter_eps=0.0)
    with torch.no_grad():
        router.weight_ED.copy_(weight_ED)
    return router


def test_training_spreads_a_collapsed_router_and_eval_follows_the_logits() -> None:
    """x = [1, noise] and a weight whose column 0 is a +5 bias for expert 0: top-1 softmax
    sends almost every token to expert 0, the balanced plan spreads them."""
    tokens, experts, dim = 1024, 8, 4
    gen = torch.Generator().manual_seed(1)
    x_TD = torch.cat([torch.ones(tokens, 1), torch.randn(tokens, dim - 1, generator=gen)], dim=1)
    weight_ED = torch.randn(experts, dim, generator=gen)
    weight_ED[:, 0] = 0.0
    weight_ED[0, 0] = 5.0
    router = _router(1, False, weight_ED)
    plain = TopKRouter(dim, experts, 1, False, 0.0)
    with torch.no_grad():
        plain.weight_ED.copy_(weight_ED)
    assert plain(x_TD).counts_E.max() > 0.9 * tokens
    train = router(x_TD)
    assert train.counts_E.sum() == tokens and train.counts_E.max() < 1.5 * tokens / experts
    router.eval()
    assert torch.equal(router(x_TD).experts_TK, plain(x_TD).experts_TK)


def test_top1_gate_is_the_sigmoid_of_the_chosen_logit_and_trains_the_router() -> None:
    router = _router(1, False, torch.randn(6, 8))
    routing = router(torch.randn(64, 8))
    chosen_T1 = routing.logits_TE.gather(1, routing.experts_TK)
    assert torch.allclose(routing.weights_TK, torch.sigmoid(chosen_T1))
    routing.weights_TK.sum().backward()
    assert router.weight_ED.grad is not None and router.weight_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_topk_gates_are_softmax_probabilities(normalize: bool) -> None:
    router = _router(2, normalize, torch.randn(6, 8))
    routing = router(torch.randn(64, 8))
    probs_TK = routing.probs_TE.gather(1, routing.experts_TK)
    expected = probs_TK / probs_TK.sum(-1, keepdim=True) if normalize else probs_TK
    assert torch.allclose(routing.weights_TK, expected)
    assert (routing.experts_TK[:, 0] != routing.experts_TK[:, 1]).all()


def test_loss_statistics_match_the_logits() -> None:
    router = _router(2, True, torch.randn(6, 8))
    routing = router(torch.randn(64, 8))
    assert torch.allclose(routing.prob_sum_E, routing.probs_TE.sum(0))
    assert torch.allclose(routing.lse_sq_sum, routing.logits_TE.logsumexp(-1).square().sum())
    assert torch.equal(routing.counts_E, torch.bincount(routing.experts_TK.flatten(), minlength=6))


def test_moe_layer_with_the_sinkhorn_router_trains() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, router="sinkhorn", normalize_weights=False, aux_loss_coeff=0.0,
                    expert_ffn_dim=16)
    layer = MoELayer(8, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert isinstance(layer.router, SinkhornRouter)
    x_BSD = torch.randn(2, 16, 8)
    y_BSD, stats = layer(x_BSD)
    (y_BSD.square().mean() + stats.z_loss).backward()
    assert y_BSD.shape == x_BSD.shape and stats.tokens_per_expert_E.sum() == 32
    assert all(p.grad is not None for p in layer.parameters())

