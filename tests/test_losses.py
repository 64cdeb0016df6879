import math

import torch

from moe.losses import load_balancing_loss, router_z_loss


def test_aux_loss_hand_computed_on_fixed_routing() -> None:
    # 4 tokens, 2 experts, top-1: experts [0, 0, 0, 1] -> f = [3/4, 1/4]
    probs_TE = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts_TK = torch.tensor([[0], [0], [0], [1]])
    p = probs_TE.mean(0)  # [0.65, 0.35]
    expected = 0.01 * 2 * (0.75 * p[0] + 0.25 * p[1])
    got = load_balancing_loss(probs_TE, experts_TK, coeff=0.01)
    assert torch.allclose(got, expected)
    assert math.isclose(got.item(), 0.01 * 2 * (0.75 * 0.65 + 0.25 * 0.35), rel_tol=1e-6)


def test_aux_loss_top2_counts_normalised_by_k() -> None:
    probs_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    experts_TK = torch.tensor([[0, 1], [1, 2]])  # counts [1, 2, 1] / 4
    p = probs_TE.mean(0)
    expected = 0.1 * 3 * (0.25 * p[0] + 0.5 * p[1] + 0.25 * p[2])
    assert torch.allclose(load_balancing_loss(probs_TE, experts_TK, coeff=0.1), expected)


def test_aux_loss_equals_alpha_under_uniform_router() -> None:
    num_experts, num_tokens = 8, 64
    probs_TE = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    experts_TK = torch.arange(num_tokens).remainder(num_experts).unsqueeze(1)  # perfectly balanced
    assert math.isclose(load_balancing_loss(probs_TE, experts_TK, 0.01).item(), 0.01, rel_tol=1e-6)


def test_aux_loss_is_larger_when_imbalanced() -> None:
    probs_TE = torch.tensor([[0.9, 0.1]] * 4)
    experts_TK = torch.zeros(4, 1, dtype=torch.long)
    assert load_balancing_loss(probs_TE, experts_TK, 0.01).item() > 0.01


def test_aux_loss_gradient_flows_through_probs_only() -> None:
    logits_TE = torch.randn(16, 4, requires_grad=True)
    probs_TE = logits_TE.softmax(-1)
    experts_TK = probs_TE.topk(1, dim=-1).indices
    load_balancing_loss(probs_TE, experts_TK, 0.01).backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


def test_z_loss_equals_its_formula() -> None:
    logits_TE = torch.randn(10, 5, dtype=torch.float64)
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.tolist()) / 10
    assert math.isclose(router_z_loss(logits_TE, 1e-3).item(), 1e-3 * by_hand, rel_tol=1e-9)


def test_sequence_loss_is_the_mean_of_per_sequence_losses() -> None:
    from moe.losses import sequence_load_balancing_loss

    probs_BSE = torch.randn(3, 5, 4).softmax(-1)
    experts_BSK = probs_BSE.topk(2, dim=-1).indices
    per_seq = [load_balancing_loss(probs_BSE[b], experts_BSK[b], 0.01) for b in range(3)]
    got = sequence_load_balancing_loss(probs_BSE, experts_BSK, 0.01)
    assert torch.allclose(got, torch.stack(per_seq).mean())


def test_supplied_load_replaces_the_local_fraction() -> None:
    probs_TE = torch.randn(6, 3).softmax(-1)
    experts_TK = torch.zeros(6, 1, dtype=torch.long)
    load_E = torch.tensor([0.2, 0.3, 0.5])
    expected = 0.01 * 3 * (load_E * probs_TE.mean(0)).sum()
    assert torch.allclose(load_balancing_loss(probs_TE, experts_TK, 0.01, load_E), expected)
