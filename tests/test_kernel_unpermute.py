"""Unpermute (gather + gate-weighted combine) kernel against a float64 torch reference and
the repo's ``LocalDispatcher``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe.kernels.unpermute as unpermute_module
from moe.capacity import expert_capacity, keep_mask
from moe.dispatcher import LocalDispatcher
from moe.kernels.permute import permute, permute_reference
from moe.kernels.unpermute import (
    CombineBlocks,
    combine_backward_triton,
    combine_triton,
    unpermute,
    unpermute_reference,
)

from kernel_testing import DEVICE, REL_TOL, assert_compiles_for_sm90, rel_err
from kernel_testing import gen  # noqa: F401 (a fixture: pytest finds it by name)

# (tokens, top_k, experts, dim, capacity factor or None, dtype, routing pattern)
CASES = [
    (50, 2, 6, 40, None, torch.float32, "random"),
    (77, 1, 10, 200, None, torch.bfloat16, "random"),
    (130, 2, 6, 24, None, torch.float32, "one_expert"),
    (45, 8, 16, 8, None, torch.bfloat16, "skip_expert"),
    (150, 2, 6, 40, 1.0, torch.float32, "random"),
    (99, 1, 10, 129, 1.25, torch.bfloat16, "skip_expert"),
    (90, 2, 10, 24, 0.25, torch.float32, "one_expert"),
    (3, 2, 5, 8, 0.3, torch.float32, "random"),
]
CASE_IDS = [
    f"T{t}-K{k}-E{e}-D{d}-{'dropless' if c is None else f'cf{c}'}-{str(dt)[6:]}-{p}"
    for t, k, e, d, c, dt, p in CASES
]


def make_inputs(case: tuple, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_ND, dest_TK, weights_TK)`` as the layer would produce them: routing, capacity
    drops (``position`` policy) and the reference permute's destinations. ``one_expert``
    puts every first choice on expert 1 (with capacity, most tokens lose every
    assignment); ``skip_expert`` never uses expert 0 (its capacity block is all padding)."""
    num_tokens, top_k, num_experts, dim, factor, dtype, pattern = case
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen)
    if pattern == "one_expert":
        scores_TE[:, 1] += 2.0
    elif pattern == "skip_expert":
        scores_TE[:, 0] -= 2.0
    weights_TK, experts_TK = scores_TE.topk(top_k, dim=-1)
    weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).to(DEVICE)
    experts_TK = experts_TK.to(DEVICE)
    capacity = None if factor is None else expert_capacity(num_tokens, top_k, num_experts, factor)
    keep_TK = None
    if capacity is not None:
        keep_TK = keep_mask(experts_TK, weights_TK, num_experts, capacity, "position")
    x_TD = torch.empty(num_tokens, dim, device=DEVICE)
    dest_TK = permute_reference(x_TD, experts_TK, keep_TK, num_experts, capacity).dest_TK
    rows = dest_TK.numel() if capacity is None else num_experts * capacity
    y_ND = torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE)
    return y_ND, dest_TK, weights_TK


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_fp64_reference(case: tuple, gen: torch.Generator) -> None:
    y_ND, dest_TK, weights_TK = make_inputs(case, gen)
    want_TD = unpermute_reference(y_ND.double(), dest_TK, weights_TK.double())
    poison_TD = torch.full((dest_TK.shape[0], y_ND.shape[1]), float("nan"), dtype=y_ND.dtype, device=DEVICE)
    got_TD = combine_triton(y_ND, dest_TK, weights_TK, out=poison_TD)

    assert got_TD is poison_TD and not got_TD.isnan().any()
    assert rel_err(got_TD, want_TD) < REL_TOL[y_ND.dtype]
    dropped_T = (dest_TK < 0).all(dim=1)
    assert not got_TD[dropped_T].any()
    public_TD = unpermute(y_ND, dest_TK, weights_TK, impl="triton")
    assert public_TD.dtype == y_ND.dtype and torch.equal(public_TD, got_TD)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_fp64_autograd(case: tuple, gen: torch.Generator) -> None:
    y_ND, dest_TK, weights_TK = make_inputs(case, gen)
    grad_TD = torch.randn(dest_TK.shape[0], y_ND.shape[1], generator=gen).to(DEVICE)

    y64_ND = y_ND.double().requires_grad_()
    w64_TK = weights_TK.double().requires_grad_()
    (unpermute_reference(y64_ND, dest_TK, w64_TK) * grad_TD.double()).sum().backward()
    y_in_ND = y_ND.clone().requires_grad_()
    w_in_TK = weights_TK.clone().requires_grad_()
    (unpermute(y_in_ND, dest_TK, w_in_TK, impl="triton") * grad_TD.to(y_ND.dtype)).sum().backward()

    tol = REL_TOL[y_ND.dtype]
    assert y_in_ND.grad.dtype == y_ND.dtype and w_in_TK.grad.dtype == weights_TK.dtype
    assert rel_err(y_in_ND.grad, y64_ND.grad) < tol
    assert rel_err(w_in_TK.grad, w64_TK.grad) < tol
    unused_N = torch.ones(y_ND.shape[0], dtype=torch.bool, device=DEVICE)
    unused_N[dest_TK[dest_TK >= 0]] = False
    assert not y_in_ND.grad[unused_N].any()
    assert not w_in_TK.grad[dest_TK < 0].any()

    poison = (torch.full_like(y_ND, float("nan")), torch.full_like(weights_TK, float("nan")))
    grad_y_ND, grad_w_TK = combine_backward_triton(
        y_ND, dest_TK, weights_TK, grad_TD.to(y_ND.dtype), out=poison
    )
    assert not grad_y_ND.isnan().any() and not grad_w_TK.isnan().any()
    assert torch.equal(grad_y_ND, y_in_ND.grad) and torch.equal(grad_w_TK, w_in_TK.grad)


@pytest.mark.parametrize("blocks", [CombineBlocks(block_t=2, block_d=16), CombineBlocks(16, 32)])
def test_block_sizes_do_not_change_results(blocks: CombineBlocks, gen: torch.Generator) -> None:
    y_ND, dest_TK, weights_TK = make_inputs((37, 2, 6, 72, 1.0, torch.float32, "random"), gen)
    grad_TD = torch.randn(dest_TK.shape[0], y_ND.shape[1], generator=gen).to(DEVICE)
    want_TD = unpermute_reference(y_ND.double(), dest_TK, weights_TK.double())
    assert rel_err(combine_triton(y_ND, dest_TK, weights_TK, blocks=blocks), want_TD) < 2e-6
    want_y, want_w = combine_backward_triton(y_ND, dest_TK, weights_TK, grad_TD)
    got_y, got_w = combine_backward_triton(y_ND, dest_TK, weights_TK, grad_TD, blocks=blocks)
    assert torch.equal(got_y, want_y)
    assert rel_err(got_w, want_w) < 2e-6


@pytest.mark.parametrize(("top_k", "num_experts"), [(1, 6), (2, 10)])
def test_dropless_roundtrip_equals_local_dispatcher(
    top_k: int, num_experts: int, gen: torch.Generator
) -> None:
    """permute -> per-row expert -> unpermute, against ``LocalDispatcher``'s pair."""
    num_tokens, dim = 80, 24
    x_TD = torch.randn(num_tokens, dim, generator=gen).to(DEVICE)
    experts_TK = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=-1)[:, :top_k].to(DEVICE)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)

    def expert(x_ND: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_ND) * 2.0 + 0.5

    dispatcher = LocalDispatcher(num_experts)
    x_want_ND, plan = dispatcher.permute(x_TD, experts_TK, None)
    want_TD = dispatcher.unpermute(expert(x_want_ND), plan, weights_TK)
    permuted = permute(x_TD, experts_TK, None, num_experts, None, impl="triton")
    got_TD = unpermute(expert(permuted.x_ND), permuted.dest_TK, weights_TK, impl="triton")
    torch.testing.assert_close(got_TD, want_TD, rtol=1e-6, atol=1e-6)


def test_dispatch_follows_device_and_environment(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    y_ND, dest_TK, weights_TK = make_inputs(CASES[0], gen)
    torch_calls: list[str] = []

    def spy(*args: object) -> torch.Tensor:
        torch_calls.append("torch")
        return unpermute_reference(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(unpermute_module, "unpermute_reference", spy)
    auto_TD = unpermute(y_ND, dest_TK, weights_TK)
    assert torch_calls == []
    torch.testing.assert_close(auto_TD, unpermute(y_ND, dest_TK, weights_TK, impl="torch"))
    assert torch_calls == ["torch"]
    with pytest.raises(ValueError, match="weights_TK"):
        unpermute(y_ND, dest_TK, weights_TK[:, :1], impl="triton")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        unpermute(y_ND, dest_TK, weights_TK)
        assert torch_calls == ["torch", "torch"]


def test_strided_rows_and_weights(gen: torch.Generator) -> None:
    y_ND, dest_TK, weights_TK = make_inputs(CASES[4], gen)
    strided_ND = torch.cat([y_ND, y_ND], dim=1)[:, : y_ND.shape[1]]  # row stride 2D
    strided_TK = weights_TK.t().contiguous().t()
    want_TD = unpermute_reference(y_ND.double(), dest_TK, weights_TK.double())
    assert rel_err(unpermute(strided_ND, dest_TK, strided_TK, impl="triton"), want_TD) < 2e-6


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """Compile the kernels at the launchers' tile sizes for sm_90."""
    blocks = CombineBlocks.for_shape(4096)
    sizes = {"num_tokens": "i32", "num_rows": "i32", "dim": "i32", "stride_yn": "i32"}
    jobs = []
    for top_k, has_weights, dtype in ((1, True, "bf16"), (8, False, "fp32")):
        forward = {"y_ptr": f"*{dtype}", "dest_ptr": "*i64", "out_ptr": f"*{dtype}", **sizes}
        forward |= {"weights_ptr": "*fp32"} if has_weights else {}
        tiles = {"TOP_K": top_k, "BLOCK_T": blocks.block_t, "BLOCK_D": blocks.block_d}
        weights = {} if has_weights else {"weights_ptr": None}
        backward = {
            "y_ptr": f"*{dtype}",
            "dest_ptr": "*i64",
            "weights_ptr": "*fp32",
            "grad_out_ptr": f"*{dtype}",
            "grad_y_ptr": f"*{dtype}",
            "grad_weights_ptr": "*fp32",
            "stride_gt": "i32",
            **sizes,
        }
        jobs.append(("_combine_kernel", forward, {**tiles, "HAS_WEIGHTS": has_weights, **weights}))
        jobs.append(("_combine_backward_kernel", backward, {**tiles, "BLOCK_K": top_k}))
    assert_compiles_for_sm90("moe.kernels.unpermute", jobs, tmp_path)
