import torch

from moe.dispatcher import LocalDispatcher


def test_permute_groups_rows_by_expert_in_token_order() -> None:
    x_TD = torch.arange(4.0).unsqueeze(1)  # token t has value t
    experts_TK = torch.tensor([[1, 0], [0, 2], [1, 2], [0, 1]])
    x_ND, plan = LocalDispatcher(3).permute(x_TD, experts_TK, keep_TK=None)
    assert plan.tokens_per_expert_E.tolist() == [3, 3, 2]
    assert x_ND.squeeze(1).tolist() == [0, 1, 3, 0, 2, 3, 1, 2]


def test_unpermute_inverts_permute_with_gates() -> None:
    x_TD = torch.randn(7, 5)
    experts_TK = torch.randint(0, 4, (7, 2))
    weights_TK = torch.rand(7, 2)
    dispatcher = LocalDispatcher(4)
    x_ND, plan = dispatcher.permute(x_TD, experts_TK, None)
    y_TD = dispatcher.unpermute(x_ND, plan, weights_TK)  # identity experts
    assert torch.allclose(y_TD, x_TD * weights_TK.sum(1, keepdim=True))


def test_dropped_assignments_contribute_nothing() -> None:
    x_TD = torch.randn(3, 2)
    experts_TK = torch.tensor([[0], [0], [1]])
    keep_TK = torch.tensor([[True], [False], [True]])
    dispatcher = LocalDispatcher(2)
    x_ND, plan = dispatcher.permute(x_TD, experts_TK, keep_TK)
    assert plan.tokens_per_expert_E.tolist() == [1, 1]
    y_TD = dispatcher.unpermute(x_ND, plan, torch.ones(3, 1))
    assert torch.equal(y_TD[1], torch.zeros(2))
    assert torch.equal(y_TD[[0, 2]], x_TD[[0, 2]])


def test_expert_with_zero_tokens_and_all_to_one() -> None:
    x_TD = torch.randn(5, 3)
    experts_TK = torch.full((5, 1), 2)
    x_ND, plan = LocalDispatcher(4).permute(x_TD, experts_TK, None)
    assert plan.tokens_per_expert_E.tolist() == [0, 0, 5, 0]
    assert torch.equal(x_ND, x_TD)
