import torch

from moe.capacity import expert_capacity, keep_mask


def test_capacity_formula() -> None:
    assert expert_capacity(num_tokens=10, top_k=2, num_experts=4, capacity_factor=1.25) == 7  # ceil(6.25)
    assert expert_capacity(num_tokens=8, top_k=1, num_experts=4, capacity_factor=1.0) == 2


def test_position_policy_keeps_earliest_tokens() -> None:
    experts_TK = torch.tensor([[0], [0], [1], [0], [0]])
    weights_TK = torch.tensor([[0.1], [0.9], [0.5], [0.8], [0.7]])
    keep = keep_mask(experts_TK, weights_TK, num_experts=2, capacity=2, policy="position")
    assert keep.squeeze(1).tolist() == [True, True, True, False, False]


def test_probability_policy_keeps_largest_gates() -> None:
    experts_TK = torch.tensor([[0], [0], [1], [0], [0]])
    weights_TK = torch.tensor([[0.1], [0.9], [0.5], [0.8], [0.7]])
    keep = keep_mask(experts_TK, weights_TK, num_experts=2, capacity=2, policy="probability")
    assert keep.squeeze(1).tolist() == [False, True, True, True, False]


def test_position_policy_serves_first_choices_before_second_choices() -> None:
    # token 0's 2nd choice and token 1's 1st choice both want expert 1 (capacity 1):
    # GShard order gives it to token 1's first choice.
    experts_TK = torch.tensor([[0, 1], [1, 0]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    keep = keep_mask(experts_TK, weights_TK, num_experts=2, capacity=1, policy="position")
    assert keep.tolist() == [[True, False], [True, False]]


def test_keep_count_never_exceeds_capacity() -> None:
    experts_TK = torch.randint(0, 5, (200, 2))
    weights_TK = torch.rand(200, 2)
    for policy in ("position", "probability"):
        keep = keep_mask(experts_TK, weights_TK, 5, capacity=30, policy=policy)
        kept = torch.bincount(experts_TK[keep], minlength=5)
        wanted = torch.bincount(experts_TK.reshape(-1), minlength=5)
        assert torch.equal(kept, wanted.clamp(max=30))
