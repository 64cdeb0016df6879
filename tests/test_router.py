import torch

from moe.router import TopKRouter


def _router(k: int, normalize: bool, jitter: float = 0.0) -> TopKRouter:
    router = TopKRouter(dim=8, num_experts=6, top_k=k, normalize=normalize, jitter_eps=jitter)
    torch.nn.init.normal_(router.weight_ED)
    return router


def test_top2_renormalised_weights_sum_to_one() -> None:
    routing = _router(2, normalize=True)(torch.randn(32, 8))
    assert torch.allclose(routing.weights_TK.sum(-1), torch.ones(32))
    assert routing.experts_TK.shape == (32, 2)
    assert (routing.experts_TK[:, 0] != routing.experts_TK[:, 1]).all()


def test_unnormalised_weights_are_the_probabilities() -> None:
    routing = _router(2, normalize=False)(torch.randn(32, 8))
    assert torch.allclose(routing.weights_TK, routing.probs_TE.gather(1, routing.experts_TK))
    assert (routing.weights_TK.sum(-1) < 1).all()


def test_topk_picks_largest_probabilities_any_k() -> None:
    x_TD = torch.randn(20, 8)
    for k in (1, 3, 6):
        routing = _router(k, normalize=False)(x_TD)
        expected = routing.probs_TE.sort(-1, descending=True).values[:, :k]
        assert torch.allclose(routing.weights_TK, expected)


def test_router_runs_in_fp32_for_bf16_inputs() -> None:
    router = _router(2, normalize=True)
    routing = router(torch.randn(4, 8, dtype=torch.bfloat16))
    assert routing.logits_TE.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(4, 8))
    assert routing.logits_TE.dtype == torch.float32


def test_jitter_only_in_training() -> None:
    router = _router(1, normalize=False, jitter=0.1)
    x_TD = torch.randn(16, 8)
    router.eval()
    assert torch.equal(router(x_TD).logits_TE, router(x_TD).logits_TE)
    router.train()
    assert not torch.equal(router(x_TD).logits_TE, router(x_TD).logits_TE)
