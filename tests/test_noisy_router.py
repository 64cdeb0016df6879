"""Noisy top-k gating (Shazeer et al. 2017): noise-free it is softmax top-k, its load loss's
gradient is right (finite differences, fp64), its noise does not depend on how sequences
are grouped into forwards, and its losses are the paper's.

Legend: B sequences, S positions, T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.config import ConfigError, MoEConfig
from moe.kernels.gating import topk_gating
from moe.layer import MoELayer
from moe.losses import cv_squared, importance_loss, load_loss
from moe.noisy_router import NoisyTopKRouter, kth_excluding, sequence_noise, set_noise_step, smooth_load
from moe.router import TopKRouter

DIM, E, K = 16, 6, 2


def _router(seed: int = 0) -> NoisyTopKRouter:
    torch.manual_seed(seed)
    router = NoisyTopKRouter(DIM, E, K)
    for param in router.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return router


def test_without_noise_it_is_softmax_top_k_on_the_same_logits() -> None:
    noisy = _router().eval()
    plain = TopKRouter(DIM, E, K, normalize=True, jitter_eps=0.0)
    plain.weight_ED.data.copy_(noisy.weight_ED.data)
    x_TD = torch.randn(40, DIM)
    got, want = noisy(x_TD, None), plain(x_TD)
    assert torch.equal(got.experts_TK, want.experts_TK)
    torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.prob_sum_E, want.prob_sum_E)
    assert torch.equal(got.counts_E, want.counts_E)
    assert torch.equal(got.load_E, want.counts_E.float())  # evaluation: the load is the counts


def test_training_noise_is_h_equals_clean_plus_eps_softplus() -> None:
    router = _router().train()
    router.noise_step = 7
    x_TD, ids_BS = torch.randn(12, DIM), torch.randint(0, 100, (3, 4))
    got = router(x_TD, ids_BS)
    clean_TE = x_TD @ router.weight_ED.T
    noisy_TE = clean_TE + sequence_noise(ids_BS, router.noise_salt, 7, E) * F.softplus(x_TD @ router.noise_weight_ED.T)
    top_TK, experts_TK = noisy_TE.topk(K, dim=-1)
    assert torch.equal(got.experts_TK, experts_TK)
    torch.testing.assert_close(got.weights_TK, top_TK.softmax(dim=-1))
    torch.testing.assert_close(got.logits_TE, clean_TE)
    gates_TE = torch.zeros(12, E).scatter(1, experts_TK, top_TK.softmax(dim=-1))
    torch.testing.assert_close(got.gate_sum_E, gates_TE.sum(dim=0))
    assert not torch.equal(got.experts_TK, router.eval()(x_TD, None).experts_TK)  # the noise does change routing


def test_kth_excluding_is_the_kth_largest_of_the_others() -> None:
    noisy_TE = torch.randn(30, E)
    got_TE = kth_excluding(noisy_TE, K)
    for t in range(30):
        for i in range(E):
            others = torch.cat([noisy_TE[t, :i], noisy_TE[t, i + 1 :]])
            assert got_TE[t, i] == others.topk(K).values[-1]


def test_smooth_load_is_the_probability_of_staying_chosen() -> None:
    """P(x, i) by Monte Carlo over expert i's own noise equals the normal-CDF estimate."""
    torch.manual_seed(1)
    clean_E, std_E = torch.randn(E, dtype=torch.float64), torch.rand(E, dtype=torch.float64) + 0.5
    noisy_E = clean_E + torch.randn(E, dtype=torch.float64) * std_E
    want_E = smooth_load(clean_E[None], noisy_E[None], std_E[None], K)
    draws = 200_000
    for i in range(E):
        redrawn_NE = noisy_E.repeat(draws, 1)
        redrawn_NE[:, i] = clean_E[i] + torch.randn(draws, dtype=torch.float64) * std_E[i]
        chosen = (redrawn_NE.topk(K, dim=-1).indices == i).any(dim=-1).double().mean()
        assert abs(float(chosen) - float(want_E[i])) < 4e-3


def test_load_loss_gradient_matches_finite_differences_fp64() -> None:
    torch.manual_seed(2)
    x_TD = torch.randn(24, DIM, dtype=torch.float64)
    eps_TE = torch.randn(24, E, dtype=torch.float64)
    w_g = (torch.randn(E, DIM, dtype=torch.float64) * 0.3).requires_grad_()
    w_noise = (torch.randn(E, DIM, dtype=torch.float64) * 0.3).requires_grad_()

    def loss(w_g: torch.Tensor, w_noise: torch.Tensor) -> torch.Tensor:
        clean_TE = x_TD @ w_g.T
        std_TE = F.softplus(x_TD @ w_noise.T)
        return load_loss(smooth_load(clean_TE, clean_TE + eps_TE * std_TE, std_TE, K), 0.1)

    assert torch.autograd.gradcheck(loss, (w_g, w_noise), eps=1e-6, atol=1e-7)


def test_importance_and_load_losses_are_coeff_times_cv_squared() -> None:
    x_E = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(cv_squared(x_E)) == pytest.approx(float(x_E.var(unbiased=False) / x_E.mean() ** 2))
    assert float(cv_squared(torch.full((4,), 2.5))) == 0.0
    assert float(importance_loss(x_E, 0.1)) == pytest.approx(0.1 * float(cv_squared(x_E)))
    assert float(load_loss(x_E, 0.3)) == pytest.approx(0.3 * float(cv_squared(x_E)))


def test_noise_depends_on_the_sequence_and_step_not_on_the_grouping() -> None:
    ids_BS = torch.randint(0, 100, (4, 8))
    whole = sequence_noise(ids_BS, 5, 3, E)
    halves = torch.cat([sequence_noise(ids_BS[:2], 5, 3, E), sequence_noise(ids_BS[2:], 5, 3, E)])
    reordered = sequence_noise(ids_BS[[2, 3, 0, 1]], 5, 3, E).view(4, 8, E)[[2, 3, 0, 1]].reshape(-1, E)
    assert torch.equal(whole, halves) and torch.equal(whole, reordered)
    assert not torch.equal(whole, sequence_noise(ids_BS, 5, 4, E))  # another step
    assert not torch.equal(whole, sequence_noise(ids_BS, 6, 3, E))  # another salt (seed, layer)
    assert 0.9 < float(sequence_noise(torch.randint(0, 100, (64, 64)), 5, 3, E).std()) < 1.1


def test_layer_routes_a_batch_as_its_sequences_one_by_one_with_noise_on() -> None:
    """What keeps layouts identical: splitting the micro-batch changes nothing, noise included."""
    cfg = MoEConfig(num_experts=E, top_k=K, router="noisy_topk", expert_ffn_dim=8, aux_loss_coeff=0.0,
                    importance_loss_coeff=0.1, load_loss_coeff=0.1)
    torch.manual_seed(3)
    layer = MoELayer(DIM, cfg).train()
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    set_noise_step([layer.router], 11)
    x_BSD, ids_BS = torch.randn(4, 5, DIM), torch.randint(0, 100, (4, 5))
    y_BSD, stats = layer(x_BSD, ids_BS=ids_BS)
    parts = [layer(x_BSD[b : b + 2], ids_BS=ids_BS[b : b + 2])[0] for b in (0, 2)]
    torch.testing.assert_close(y_BSD, torch.cat(parts), rtol=1e-6, atol=1e-7)
    assert float(stats.aux_loss.detach()) > 0
    with pytest.raises(ValueError, match="seeds its training noise by the token ids"):
        layer(x_BSD)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"router": "noisy_topk", "num_experts": 4, "top_k": 4, "normalize_weights": True}, "moe.top_k=4: moe.router=noisy_topk needs"),
        ({"importance_loss_coeff": 0.1}, "moe.importance_loss_coeff=0.1: is a loss of moe.router=noisy_topk"),
        ({"router": "noisy_topk", "load_loss_coeff": -1.0}, "moe.load_loss_coeff=-1.0: must be >= 0"),
    ],
)
def test_bad_noisy_configs_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**kwargs)


def test_gating_reference_agrees_with_plain_top_k_renormalised() -> None:
    """The softmax over the kept K equals renormalised softmax probabilities (the equality
    the noise-free test relies on), checked against the gating reference directly."""
    logits_TE = torch.randn(20, E)
    gate = topk_gating(logits_TE, K, True, "torch")
    top_TK, experts_TK = logits_TE.topk(K, dim=-1)
    assert torch.equal(gate.experts_TK, experts_TK)
    torch.testing.assert_close(gate.weights_TK, top_TK.softmax(dim=-1))
