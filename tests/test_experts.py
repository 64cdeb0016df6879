import pytest
import torch

from moe.experts import GroupedExperts, grouped_matmul, grouped_mm_supported


def _loop_reference(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([seg @ w_EDF[e] for e, seg in enumerate(x_ND.split(counts))])


@pytest.mark.parametrize("dims", [(8, 4), (6, 5)], ids=["grouped-gemm", "loop-fallback"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
def test_grouped_matmul_equals_per_expert_loop(counts: list[int], dims: tuple[int, int]) -> None:
    d, f = dims
    x_ND = torch.randn(sum(counts), d, requires_grad=True)
    w_EDF = torch.randn(4, d, f, requires_grad=True)
    assert grouped_mm_supported(x_ND, w_EDF) == (dims == (8, 4))
    tokens_E = torch.tensor(counts)
    y = grouped_matmul(x_ND, w_EDF, tokens_E)
    ref = _loop_reference(x_ND, w_EDF, counts) if sum(counts) else x_ND.new_zeros(0, f)
    assert torch.allclose(y, ref, atol=1e-5)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x_ND, w_EDF), grad, allow_unused=True)
    if sum(counts):
        rx, rw = torch.autograd.grad(ref, (x_ND, w_EDF), grad)
        assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_grouped_matmul_backward_of_sum() -> None:
    # y.sum() hands an expanded (stride-0) gradient to the grouped GEMM's backward.
    x_ND = torch.randn(6, 4, requires_grad=True)
    w_EDF = torch.randn(2, 4, 4, requires_grad=True)
    assert grouped_mm_supported(x_ND, w_EDF)
    grouped_matmul(x_ND, w_EDF, torch.tensor([2, 4])).sum().backward()
    assert torch.allclose(w_EDF.grad[0], x_ND[:2].detach().sum(0, keepdim=True).T.expand(4, 4))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_experts_match_independent_mlps(activation: str) -> None:
    experts = GroupedExperts(3, dim=8, ffn_dim=16, activation=activation)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = [4, 1, 3]
    x_ND = torch.randn(8, 8)
    y_ND = experts(x_ND, torch.tensor(counts))
    start = 0
    for e, n in enumerate(counts):
        h = x_ND[start : start + n] @ experts.w_in_EDF[e]
        h = experts.act(h)
        assert torch.allclose(y_ND[start : start + n], h @ experts.w_out_EFD[e], atol=1e-6)
        start += n
