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

    map_VK = hash_map(257, 8)
    assert map_VK.shape == (257, 1)
    assert torch.equal(map_VK, hash_map(257, 8))  # no dependence on the global RNG
    torch.manual_seed(99)
    assert torch.equal(map_VK, hash_map(257, 8))
    ids_per_expert = torch.bincount(map_VK[:, 0], minlength=8)
    assert ids_per_expert.min() == 257 // 8 and ids_per_expert.max() == 257 // 8 + 1
    assert not torch.equal(map_VK[:, 0], torch.arange(257) % 8)  # a permutation, not id order


def test_multi_hash_map_gives_distinct_experts_and_keeps_the_first_column() -> None:
    from moe.hash_router import hash_map

    map_VK = hash_map(257, 8, top_k=3)
    assert torch.equal(map_VK[:, :1], hash_map(257, 8))  # top-1 trials keep their map
    assert all(len(set(row)) == 3 for row in map_VK.tolist())  # K distinct experts per id
    assert not torch.equal(map_VK[:, 1], map_VK[:, 0])  # independent columns, not one shifted
    # Clashes move an id to the next free expert, so columns stay near-balanced over ids.
    for k in range(3):
        ids_per_expert = torch.bincount(map_VK[:, k], minlength=8)
        assert ids_per_expert.min() >= 257 // 8 - 8 and ids_per_expert.max() <= 257 // 8 + 9
    assert torch.equal(hash_map(4, 4, top_k=4).sort(dim=1).values, torch.arange(4).expand(4, 4))  # K = E: all experts


def test_hash_router_sends_every_occurrence_of_an_id_to_its_experts_with_equal_gates() -> None:
    from moe.hash_router import HashRouter

    ids_T = torch.tensor([3, 7, 3, 19, 0, 7, 7])
    for top_k in (1, 2):
        router = HashRouter(vocab_size=20, num_experts=4, top_k=top_k)
        routing = router(ids_T)
        assert torch.equal(routing.experts_TK, router.map_VK[ids_T])
        assert torch.equal(routing.weights_TK, torch.full((7, top_k), 1.0 / top_k))
        assert torch.equal(routing.counts_E, torch.bincount(router.map_VK[ids_T].flatten(), minlength=4))
        assert torch.allclose(routing.logits_TE.sum(dim=1), torch.ones(7))  # the mass sits on the hashed experts
        assert list(router.parameters()) == []


def _hash_layer(top_k: int) -> torch.nn.Module:
    """A hash-routed MoE layer (D=8, E=4, vocabulary 30) with weights large enough to matter."""
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    cfg = MoEConfig(num_experts=4, top_k=top_k, router="hash", normalize_weights=top_k > 1, expert_ffn_dim=16)
    layer = MoELayer(8, cfg, vocab_size=30)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_hash_layer_has_no_routing_losses_and_needs_ids() -> None:
    import pytest

    layer = _hash_layer(top_k=1)
    x_BSD = torch.randn(2, 5, 8)
    ids_BS = torch.randint(0, 30, (2, 5))
    y_BSD, stats = layer(x_BSD, ids_BS=ids_BS)
    assert y_BSD.shape == x_BSD.shape
    assert stats.aux_loss.item() == 0.0 and stats.z_loss.item() == 0.0
    expert_of = layer.router.map_VK[:, 0]
    assert torch.equal(stats.tokens_per_expert_E, torch.bincount(expert_of[ids_BS.flatten()], minlength=4))
    # A token's output depends on its id only through the expert it hashes to: same id, same expert.
    same = ids_BS.clone()
    same[0, 0] = next(v for v in range(30) if v != ids_BS[0, 0] and expert_of[v] == expert_of[ids_BS[0, 0]])
    assert torch.equal(layer(x_BSD, ids_BS=same)[0], y_BSD)
    with pytest.raises(ValueError, match="ids_BS"):
        layer(x_BSD)


def test_top2_hash_layer_averages_its_two_experts() -> None:
    layer = _hash_layer(top_k=2)
    x_BSD = torch.randn(1, 5, 8)
    ids_BS = torch.randint(0, 30, (1, 5))
    y_BSD, stats = layer(x_BSD, ids_BS=ids_BS)
    experts = layer.experts
    for t, v in enumerate(ids_BS[0].tolist()):
        outs = []
        for e in layer.router.map_VK[v].tolist():
            outs.append(experts.act(x_BSD[0, t] @ experts.w_in_EDF[e]) @ experts.w_out_EFD[e])
        assert torch.allclose(y_BSD[0, t], (outs[0] + outs[1]) / 2, atol=1e-5)
    assert stats.tokens_per_expert_E.sum() == 2 * 5


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
