"""Sigmoid routing (DeepSeek-V3), aux-loss-free bias balancing and fine-grained experts, on
their own: the update rule, where the bias acts (selection, not gates), the aux loss's
normalised scores, the fused-kernel fallback, and what granularity builds and counts."""

from __future__ import annotations

import logging

import pytest
import torch

from moe.accounting import param_counts
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.losses import load_balancing_loss
from moe.model import Transformer
from moe.router import SigmoidRouter, _log_fallback, update_expert_bias

DIM = 16


def _router(num_experts: int = 8, top_k: int = 2, normalize: bool = True, scaling: float = 1.0) -> SigmoidRouter:
    router = SigmoidRouter(DIM, num_experts, top_k, normalize, 0.0, scaling)
    torch.nn.init.normal_(router.weight_ED, std=0.5, generator=torch.Generator().manual_seed(0))
    return router


def test_update_rule_moves_each_bias_by_the_sign_of_its_deficit() -> None:
    bias_E = torch.tensor([0.5, 0.0, -0.5, 0.0])
    update_expert_bias(bias_E, torch.tensor([10.0, 2.0, 6.0, 6.0]), 1e-3)  # mean 6
    assert torch.equal(bias_E, torch.tensor([0.5 - 1e-3, 1e-3, -0.5, 0.0]))


def test_bias_chooses_experts_but_never_enters_the_gates() -> None:
    router = _router(scaling=2.5)
    x_TD = torch.randn(32, DIM, generator=torch.Generator().manual_seed(1))
    router.expert_bias_E[3] = 10.0  # every token now takes expert 3
    routing = router(x_TD)
    assert (routing.experts_TK == 3).any(dim=-1).all()
    scores_TE = torch.sigmoid(x_TD @ router.weight_ED.T)
    chosen_TK = scores_TE.gather(1, routing.experts_TK)
    torch.testing.assert_close(routing.weights_TK, 2.5 * chosen_TK / chosen_TK.sum(dim=-1, keepdim=True))
    # A buffer: saved with the layer, no gradient, not among the parameters an optimizer sees.
    assert "expert_bias_E" in router.state_dict() and all(p is not router.expert_bias_E for p in router.parameters())
    routing.weights_TK.sum().backward()
    assert router.expert_bias_E.grad is None and router.weight_ED.grad is not None


def test_aux_loss_uses_the_normalised_sigmoid_scores() -> None:
    """megatron-core's ``compute_routing_scores_for_aux_loss`` for sigmoid: ``s / sum_e s``."""
    router = _router()
    x_TD = torch.randn(32, DIM, generator=torch.Generator().manual_seed(2))
    routing = router(x_TD)
    scores_TE = torch.sigmoid(x_TD @ router.weight_ED.T)
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(routing.prob_sum_E, probs_TE.sum(dim=0))
    torch.testing.assert_close(routing.probs_TE, probs_TE)
    layer = MoELayer(DIM, MoEConfig(num_experts=8, top_k=2, score="sigmoid", expert_ffn_dim=8, kernels="torch"))
    layer.router.load_state_dict(router.state_dict())
    _, stats = layer(x_TD.view(4, 8, DIM))
    torch.testing.assert_close(stats.aux_loss, load_balancing_loss(probs_TE, routing.experts_TK, 0.01))


def test_the_fused_kernel_fallback_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    _log_fallback.cache_clear()
    router = _router()
    x_TD = torch.randn(8, DIM)
    with caplog.at_level(logging.INFO, logger="moe.router"):
        torch.testing.assert_close(router(x_TD, impl="auto").weights_TK, router(x_TD, impl="torch").weights_TK)
        router(x_TD, impl="auto")
    fallbacks = [r for r in caplog.records if "fused gating kernel covers softmax only" in r.getMessage()]
    assert len(fallbacks) == 1


def test_sigmoid_top1_renormalised_is_refused_as_softmax_is() -> None:
    with pytest.raises(ConfigError, match="moe.normalize_weights=True: with moe.top_k=1"):
        MoEConfig(num_experts=4, top_k=1, score="sigmoid", normalize_weights=True)
    MoEConfig(num_experts=4, top_k=1, score="sigmoid", normalize_weights=True, granularity=2, expert_ffn_dim=8)


@pytest.mark.parametrize("shared", [0, 1])
def test_granularity_builds_e_g_experts_and_keeps_the_parameter_counts(shared: int) -> None:
    model = ModelConfig(vocab_size=50, dim=DIM, n_layers=2, n_heads=2, seq_len=8, ffn_dim=32)
    coarse = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, num_shared_experts=shared)
    fine = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, num_shared_experts=shared, granularity=3)
    layer = MoELayer(DIM, fine)
    assert layer.experts.w_in_EDF.shape == (12, DIM, 8) and layer.router.weight_ED.shape == (12, DIM)
    assert layer.router.top_k == 6 and layer.cfg.num_shared_experts == 3 * shared
    net = Transformer(model, fine)
    assert param_counts(model, fine).total == sum(p.numel() for p in net.parameters())
    router_growth = 2 * (12 - 4) * DIM  # 2 MoE layers, E·G·D instead of E·D router weights
    for count in ("non_embedding_total", "non_embedding_active"):
        assert getattr(param_counts(model, fine), count) - getattr(param_counts(model, coarse), count) == router_growth
