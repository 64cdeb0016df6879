"""Fused top-k gating kernel against a float64 torch reference, the router and the losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe.kernels.gating as gating
from moe.kernels.gating import (
    GatingBlocks,
    GatingOutput,
    gating_backward_triton,
    gating_forward_triton,
    topk_gating,
    topk_gating_reference,
)
from moe.losses import load_balancing_loss, router_z_loss
from moe.router import TopKRouter

from kernel_testing import DEVICE, INT_POISON, REL_TOL, assert_compiles_for_sm90, rel_err
from kernel_testing import gen  # noqa: F401 (a fixture: pytest finds it by name)

# (tokens, experts, top_k, normalize, dtype, logits pattern)
CASES = [
    (37, 6, 1, True, torch.float32, "random"),
    (130, 6, 2, False, torch.bfloat16, "random"),
    (100, 10, 2, True, torch.float32, "one_expert"),
    (65, 10, 2, True, torch.bfloat16, "skip_expert"),
    (70, 256, 8, False, torch.float32, "random"),
    (33, 256, 8, True, torch.bfloat16, "random"),
    (50, 8, 8, True, torch.float32, "ties"),
    (90, 64, 2, False, torch.float32, "ties"),
    (1, 3, 1, False, torch.float32, "random"),
]
CASE_IDS = [f"T{t}-E{e}-K{k}-{'norm' if n else 'raw'}-{str(d)[6:]}-{p}" for t, e, k, n, d, p in CASES]


def make_logits(
    num_tokens: int, num_experts: int, dtype: torch.dtype, pattern: str, gen: torch.Generator
) -> torch.Tensor:
    """Router logits with a routing pattern: ``one_expert`` sends every token's first
    choice to expert 3, ``skip_expert`` never picks expert 0, ``ties`` has many equal logits."""
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen) * 2.0
    if pattern == "one_expert":
        logits_TE[:, 3] += 30.0
    elif pattern == "skip_expert":
        logits_TE[:, 0] -= 30.0
    elif pattern == "ties":
        logits_TE = torch.randint(0, 3, (num_tokens, num_experts), generator=gen).float()
    return logits_TE.to(dtype).to(DEVICE)


def poisoned_output(num_tokens: int, num_experts: int, top_k: int) -> GatingOutput:
    return GatingOutput(
        weights_TK=torch.full((num_tokens, top_k), float("nan"), device=DEVICE),
        experts_TK=torch.full((num_tokens, top_k), INT_POISON, dtype=torch.int64, device=DEVICE),
        prob_sum_E=torch.full((num_experts,), float("nan"), device=DEVICE),
        counts_E=torch.full((num_experts,), INT_POISON, dtype=torch.int64, device=DEVICE),
        lse_sq_sum=torch.full((), float("nan"), device=DEVICE),
    )


def upstream_grads(
    num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(num_tokens, top_k, generator=gen).to(DEVICE),
        torch.randn(num_experts, generator=gen).to(DEVICE),
        torch.randn((), generator=gen).to(DEVICE),
    )


def scalar_objective(
    out: GatingOutput, grad_w_TK: torch.Tensor, grad_ps_E: torch.Tensor, grad_lse: torch.Tensor
) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the three differentiable outputs is the given grads."""
    dtype = out.weights_TK.dtype
    return (
        (out.weights_TK * grad_w_TK.to(dtype)).sum()
        + (out.prob_sum_E * grad_ps_E.to(dtype)).sum()
        + out.lse_sq_sum * grad_lse.to(dtype)
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_fp64_reference(case: tuple, gen: torch.Generator) -> None:
    num_tokens, num_experts, top_k, normalize, dtype, pattern = case
    logits_TE = make_logits(num_tokens, num_experts, dtype, pattern, gen)
    want = topk_gating_reference(logits_TE.double(), top_k, normalize)
    out = poisoned_output(num_tokens, num_experts, top_k)
    got = gating_forward_triton(logits_TE, top_k, normalize, out=out)

    assert got is out
    for unwritten in (got.weights_TK.isnan(), got.prob_sum_E.isnan(), got.lse_sq_sum.isnan()):
        assert not unwritten.any()
    assert torch.equal(got.experts_TK, want.experts_TK)
    assert torch.equal(got.counts_E, want.counts_E)
    assert rel_err(got.weights_TK, want.weights_TK) < 2e-6
    assert rel_err(got.prob_sum_E, want.prob_sum_E) < 2e-6
    assert rel_err(got.lse_sq_sum, want.lse_sq_sum) < 2e-6
    public = topk_gating(logits_TE, top_k, normalize, impl="triton")
    for name in ("weights_TK", "experts_TK", "prob_sum_E", "counts_E", "lse_sq_sum"):
        assert torch.equal(getattr(public, name), getattr(got, name)), name
    assert public.weights_TK.dtype == torch.float32 and public.experts_TK.dtype == torch.int64


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_fp64_autograd(case: tuple, gen: torch.Generator) -> None:
    num_tokens, num_experts, top_k, normalize, dtype, pattern = case
    logits_TE = make_logits(num_tokens, num_experts, dtype, pattern, gen)
    grads = upstream_grads(num_tokens, num_experts, top_k, gen)
    logits64_TE = logits_TE.double().requires_grad_()
    scalar_objective(topk_gating_reference(logits64_TE, top_k, normalize), *grads).backward()

    logits_in_TE = logits_TE.clone().requires_grad_()
    scalar_objective(topk_gating(logits_in_TE, top_k, normalize, impl="triton"), *grads).backward()
    assert logits_in_TE.grad.dtype == dtype
    assert rel_err(logits_in_TE.grad, logits64_TE.grad) < REL_TOL[dtype]

    experts_TK = topk_gating_reference(logits_TE, top_k, normalize).experts_TK
    poison_TE = torch.full_like(logits_TE, float("nan"))
    direct_TE = gating_backward_triton(logits_TE, experts_TK, *grads, normalize=normalize, out=poison_TE)
    assert not direct_TE.isnan().any()
    assert torch.equal(direct_TE, logits_in_TE.grad)


@pytest.mark.parametrize("block_t", [1, 16])
def test_block_size_does_not_change_results(block_t: int, gen: torch.Generator) -> None:
    logits_TE = make_logits(45, 10, torch.float32, "random", gen)
    want = gating_forward_triton(logits_TE, 2, True)
    got = gating_forward_triton(logits_TE, 2, True, blocks=GatingBlocks(block_t=block_t, block_e=16))
    assert torch.equal(got.experts_TK, want.experts_TK) and torch.equal(got.counts_E, want.counts_E)
    assert rel_err(got.prob_sum_E, want.prob_sum_E) < 1e-6 and rel_err(got.lse_sq_sum, want.lse_sq_sum) < 1e-6


def test_losses_and_their_gradients_equal_the_repo_losses(gen: torch.Generator) -> None:
    num_tokens, num_experts, top_k, coeff = 90, 10, 2, 0.01
    logits_TE = make_logits(num_tokens, num_experts, torch.float32, "random", gen)

    fused_TE = logits_TE.clone().requires_grad_()
    out = topk_gating(fused_TE, top_k, normalize=True, impl="triton")
    frac_E = out.counts_E.float() / (num_tokens * top_k)
    aux = coeff * num_experts * torch.sum(frac_E * out.prob_sum_E / num_tokens)
    z = coeff * out.lse_sq_sum / num_tokens
    (aux + 3.0 * z).backward()

    repo_TE = logits_TE.clone().requires_grad_()
    probs_TE = repo_TE.softmax(dim=-1)
    experts_TK = probs_TE.topk(top_k, dim=-1).indices
    aux_want = load_balancing_loss(probs_TE, experts_TK, coeff)
    z_want = router_z_loss(repo_TE, coeff)
    (aux_want + 3.0 * z_want).backward()

    assert rel_err(aux, aux_want) < 1e-6
    assert rel_err(z, z_want) < 1e-6
    assert rel_err(fused_TE.grad, repo_TE.grad) < 1e-5


@pytest.mark.parametrize(("top_k", "normalize"), [(1, False), (2, True), (8, True)])
def test_weights_and_experts_equal_topk_router(top_k: int, normalize: bool, gen: torch.Generator) -> None:
    num_tokens, num_experts = 60, 12
    logits_TE = make_logits(num_tokens, num_experts, torch.float32, "random", gen)
    router = TopKRouter(num_experts, num_experts, top_k, normalize, jitter_eps=0.0).to(DEVICE)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(num_experts))
    routing = router(logits_TE)
    assert torch.equal(routing.logits_TE, logits_TE)

    got = topk_gating(logits_TE, top_k, normalize, impl="triton")
    assert torch.equal(got.experts_TK, routing.experts_TK)
    torch.testing.assert_close(got.weights_TK, routing.weights_TK, rtol=1e-6, atol=1e-7)


def test_no_tokens() -> None:
    logits_TE = torch.empty(0, 6, device=DEVICE)
    out = gating_forward_triton(logits_TE, 2, True, out=poisoned_output(0, 6, 2))
    assert out.weights_TK.shape == (0, 2)
    assert torch.equal(out.counts_E, torch.zeros(6, dtype=torch.int64, device=DEVICE))
    assert torch.equal(out.prob_sum_E, torch.zeros(6, device=DEVICE))
    assert float(out.lse_sq_sum) == 0.0


def test_dispatch_follows_device_and_environment(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    logits_TE = make_logits(20, 6, torch.float32, "random", gen)
    torch_calls: list[str] = []

    def spy(*args: object) -> GatingOutput:
        torch_calls.append("torch")
        return topk_gating_reference(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gating, "topk_gating_reference", spy)
    auto = topk_gating(logits_TE, 2, True)
    assert torch_calls == []
    forced = topk_gating(logits_TE, 2, True, impl="torch")
    assert torch_calls == ["torch"]
    assert torch.equal(auto.experts_TK, forced.experts_TK)
    torch.testing.assert_close(auto.weights_TK, forced.weights_TK)
    with pytest.raises(ValueError, match="impl"):
        topk_gating(logits_TE, 2, True, impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        topk_gating(logits_TE, 7, True, impl="triton")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        topk_gating(logits_TE, 2, True)
        assert torch_calls == ["torch", "torch"]
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            topk_gating(logits_TE, 2, True, impl="triton")


def test_strided_logits_and_grads(gen: torch.Generator) -> None:
    """Column-major logits (strides read as given) and a broadcast upstream gradient."""
    logits_TE = make_logits(40, 10, torch.float32, "random", gen).t().contiguous().t()
    assert not logits_TE.is_contiguous()
    want = topk_gating_reference(logits_TE.contiguous(), 2, True)
    got = gating_forward_triton(logits_TE, 2, True)
    assert torch.equal(got.experts_TK, want.experts_TK) and rel_err(got.weights_TK, want.weights_TK) < 2e-6

    logits64_TE = logits_TE.double().requires_grad_()
    out64 = topk_gating_reference(logits64_TE, 2, True)
    (out64.weights_TK.sum() + out64.prob_sum_E.sum() + out64.lse_sq_sum).backward()
    logits_in_TE = logits_TE.detach().requires_grad_()
    out = topk_gating(logits_in_TE, 2, True, impl="triton")
    (out.weights_TK.sum() + out.prob_sum_E.sum() + out.lse_sq_sum).backward()
    assert rel_err(logits_in_TE.grad, logits64_TE.grad) < 2e-6


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """Compile the kernels at the launchers' tile sizes for sm_90."""
    jobs = []
    for num_experts, top_k, normalize, dtype in ((10, 2, True, "bf16"), (256, 8, False, "fp32")):
        blocks = GatingBlocks.for_shape(num_experts)
        tiles = {"TOP_K": top_k, "NORMALIZE": normalize, "BLOCK_T": blocks.block_t, "BLOCK_E": blocks.block_e}
        sizes = {name: "i32" for name in ("num_tokens", "num_experts", "stride_lt", "stride_le")}
        forward = {
            "logits_ptr": f"*{dtype}",
            "weights_ptr": "*fp32",
            "experts_ptr": "*i64",
            "prob_partial_ptr": "*fp32",
            "count_partial_ptr": "*i32",
            "lse_sq_partial_ptr": "*fp32",
            **sizes,
        }
        backward = {
            "logits_ptr": f"*{dtype}",
            "experts_ptr": "*i64",
            "grad_weights_ptr": "*fp32",
            "grad_prob_sum_ptr": "*fp32",
            "grad_lse_sq_ptr": "*fp32",
            "grad_logits_ptr": f"*{dtype}",
            "stride_gt": "i32",
            "stride_gk": "i32",
            **sizes,
        }
        jobs.append(("_gating_forward_kernel", forward, {**tiles, "BLOCK_K": top_k}))
        jobs.append(("_gating_backward_kernel", backward, tiles))
    assert_compiles_for_sm90("moe.kernels.gating", jobs, tmp_path)
