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


# -- hash routing ---------------------------------------------------------------------


def test_hash_map_is_fixed_and_balanced_over_ids() -> None:
    from moe.hash_router import hash_map

    map_V = hash_map(257, 8)
    assert torch.equal(map_V, hash_map(257, 8))  # no dependence on the global RNG
    torch.manual_seed(99)
    assert torch.equal(map_V, hash_map(257, 8))
    ids_per_expert = torch.bincount(map_V, minlength=8)
    assert ids_per_expert.min() == 257 // 8 and ids_per_expert.max() == 257 // 8 + 1
    assert not torch.equal(map_V, torch.arange(257) % 8)  # a permutation, not id order


def test_hash_router_sends_every_occurrence_of_an_id_to_its_expert_with_gate_one() -> None:
    from moe.hash_router import HashRouter

    router = HashRouter(vocab_size=20, num_experts=4)
    ids_T = torch.tensor([3, 7, 3, 19, 0, 7, 7])
    routing = router(ids_T)
    assert torch.equal(routing.experts_TK[:, 0], router.map_V[ids_T])
    assert torch.equal(routing.weights_TK, torch.ones(7, 1))
    assert torch.equal(routing.counts_E, torch.bincount(router.map_V[ids_T], minlength=4))
    assert list(router.parameters()) == []


def test_hash_layer_has_no_routing_losses_and_needs_ids() -> None:
    import pytest

    from moe.config import MoEConfig
    from moe.layer import MoELayer

    cfg = MoEConfig(num_experts=4, top_k=1, router="hash", normalize_weights=False, expert_ffn_dim=16)
    layer = MoELayer(8, cfg, vocab_size=30)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x_BSD = torch.randn(2, 5, 8)
    ids_BS = torch.randint(0, 30, (2, 5))
    y_BSD, stats = layer(x_BSD, ids_BS=ids_BS)
    assert y_BSD.shape == x_BSD.shape
    assert stats.aux_loss.item() == 0.0 and stats.z_loss.item() == 0.0
    assert torch.equal(stats.tokens_per_expert_E, torch.bincount(layer.router.map_V[ids_BS.flatten()], minlength=4))
    # A token's output depends on its id only through the expert it hashes to: same id, same expert.
    expert_of = layer.router.map_V
    same = ids_BS.clone()
    same[0, 0] = next(v for v in range(30) if v != ids_BS[0, 0] and expert_of[v] == expert_of[ids_BS[0, 0]])
    assert torch.equal(layer(x_BSD, ids_BS=same)[0], y_BSD)
    with pytest.raises(ValueError, match="ids_BS"):
        layer(x_BSD)


def test_hash_router_config_rejects_top_k_above_one() -> None:
    import pytest

    from moe.config import ConfigError, MoEConfig

    with pytest.raises(ConfigError, match=r"moe.top_k=2: moe.router=hash .* set moe.top_k=1"):
        MoEConfig(num_experts=4, top_k=2, router="hash")


def test_hash_model_param_count_and_training_step() -> None:
    from moe.accounting import param_counts
    from moe.config import ModelConfig, MoEConfig
    from moe.model import Transformer

    cfg = ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, seq_len=8, ffn_dim=32)
    moe = MoEConfig(num_experts=4, top_k=1, router="hash", normalize_weights=False, expert_ffn_dim=32)
    model = Transformer(cfg, moe)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg, moe).total
    ids_BS = torch.randint(0, 40, (3, 8))
    out = model(ids_BS, torch.randint(0, 40, (3, 8)))
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    assert model.blocks["0"].ffn.experts.w_in_EDF.grad.abs().sum() > 0
