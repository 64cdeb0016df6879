"""Permute kernel against the float64 torch reference and ``LocalDispatcher.permute``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe.capacity import expert_capacity, keep_mask
from moe.dispatcher import LocalDispatcher
import moe.kernels.permute as permute_module
from moe.kernels.permute import (
    PermuteBlocks,
    PermuteOutput,
    num_rows,
    permute,
    permute_reference,
    permute_triton,
)
from moe.kernels.unpermute import combine_triton

from kernel_testing import DEVICE, INT_POISON, assert_compiles_for_sm90, rel_err
from kernel_testing import gen  # noqa: F401 (a fixture: pytest finds it by name)

# (tokens, top_k, experts, dim, capacity factor or None, drop policy, dtype, routing pattern)
CASES = [
    (50, 2, 6, 40, None, None, torch.float32, "random"),
    (77, 1, 10, 200, None, None, torch.bfloat16, "random"),
    (130, 2, 6, 24, None, None, torch.float32, "one_expert"),
    (300, 2, 64, 16, None, None, torch.bfloat16, "skip_expert"),
    (100, 8, 256, 8, None, None, torch.float32, "random"),
    (150, 2, 6, 40, 1.0, "position", torch.float32, "random"),
    (99, 1, 10, 24, 1.25, "probability", torch.bfloat16, "skip_expert"),
    (90, 2, 10, 24, 0.5, "position", torch.float32, "one_expert"),
    (120, 4, 256, 8, 0.8, "probability", torch.float32, "random"),
    (3, 2, 5, 8, 0.3, "position", torch.float32, "random"),
]
CASE_IDS = [
    f"T{t}-K{k}-E{e}-D{d}-{'dropless' if c is None else f'cf{c}-{p}'}-{str(dt)[6:]}-{pat}"
    for t, k, e, d, c, p, dt, pat in CASES
]


def make_routing(
    num_tokens: int, top_k: int, num_experts: int, pattern: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token and gates: ``one_expert`` puts every first choice on
    expert 1, ``skip_expert`` never uses expert 0."""
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen)
    if pattern == "one_expert":
        scores_TE[:, 1] += 2.0
    elif pattern == "skip_expert":
        scores_TE[:, 0] -= 2.0
    weights_TK, experts_TK = scores_TE.topk(top_k, dim=-1)
    return experts_TK.to(DEVICE), weights_TK.to(DEVICE)


def make_inputs(
    case: tuple, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int | None]:
    num_tokens, top_k, num_experts, dim, factor, policy, dtype, pattern = case
    experts_TK, weights_TK = make_routing(num_tokens, top_k, num_experts, pattern, gen)
    x_TD = torch.randn(num_tokens, dim, generator=gen).to(dtype).to(DEVICE)
    if factor is None:
        return x_TD, experts_TK, None, num_experts, None
    capacity = expert_capacity(num_tokens, top_k, num_experts, factor)
    keep_TK = keep_mask(experts_TK, weights_TK, num_experts, capacity, policy)
    return x_TD, experts_TK, keep_TK, num_experts, capacity


def poisoned_output(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int, capacity: int | None
) -> PermuteOutput:
    rows = num_rows(experts_TK.numel(), num_experts, capacity)
    return PermuteOutput(
        x_ND=torch.full((rows, x_TD.shape[1]), float("nan"), dtype=x_TD.dtype, device=DEVICE),
        dest_TK=torch.full(experts_TK.shape, INT_POISON, dtype=torch.int64, device=DEVICE),
        tokens_per_expert_E=torch.full((num_experts,), INT_POISON, dtype=torch.int64, device=DEVICE),
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case: tuple, gen: torch.Generator) -> None:
    x_TD, experts_TK, keep_TK, num_experts, capacity = make_inputs(case, gen)
    want = permute_reference(x_TD.double(), experts_TK, keep_TK, num_experts, capacity)
    out = poisoned_output(x_TD, experts_TK, num_experts, capacity)
    got = permute_triton(x_TD, experts_TK, keep_TK, num_experts, capacity, out=out)

    assert got is out
    assert not got.x_ND.isnan().any()
    assert not (got.dest_TK == INT_POISON).any() and not (got.tokens_per_expert_E == INT_POISON).any()
    assert torch.equal(got.dest_TK, want.dest_TK)
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    assert torch.equal(got.x_ND.double(), want.x_ND)
    public = permute(x_TD, experts_TK, keep_TK, num_experts, capacity, impl="triton")
    assert torch.equal(public.x_ND, got.x_ND) and torch.equal(public.dest_TK, got.dest_TK)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_local_dispatcher(case: tuple, gen: torch.Generator) -> None:
    """Same rows in the same order as the repo's dispatcher (its rows are our kept rows)."""
    x_TD, experts_TK, keep_TK, num_experts, capacity = make_inputs(case, gen)
    got = permute(x_TD, experts_TK, keep_TK, num_experts, capacity, impl="triton")
    x_want_MD, plan = LocalDispatcher(num_experts).permute(x_TD, experts_TK, keep_TK)

    assert torch.equal(got.tokens_per_expert_E, plan.tokens_per_expert_E)
    assert torch.equal(got.dest_TK.reshape(-1)[plan.assignment_N].cpu(), kept_rows(got, capacity).cpu())
    assert torch.equal(got.x_ND[kept_rows(got, capacity)], x_want_MD)
    if capacity is None:
        assert torch.equal(got.x_ND, x_want_MD)
    else:
        padding_rows = torch.ones(got.x_ND.shape[0], dtype=torch.bool, device=DEVICE)
        padding_rows[kept_rows(got, capacity)] = False
        assert not got.x_ND[padding_rows].any()


def kept_rows(out: PermuteOutput, capacity: int | None) -> torch.Tensor:
    """Indices of the filled rows of ``x_ND`` in order: all (dropless) or each expert's
    ``[e*C, e*C + kept_e)``."""
    counts = out.tokens_per_expert_E.tolist()
    if capacity is None:
        return torch.arange(sum(counts), device=DEVICE)
    return torch.cat([torch.arange(e * capacity, e * capacity + n) for e, n in enumerate(counts)]).to(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_fp64_autograd(case: tuple, gen: torch.Generator) -> None:
    x_TD, experts_TK, keep_TK, num_experts, capacity = make_inputs(case, gen)
    rows = num_rows(experts_TK.numel(), num_experts, capacity)
    grad_x_ND = torch.randn(rows, x_TD.shape[1], generator=gen).to(DEVICE)

    x64_TD = x_TD.double().requires_grad_()
    want = permute_reference(x64_TD, experts_TK, keep_TK, num_experts, capacity)
    (want.x_ND * grad_x_ND.double()).sum().backward()
    x_in_TD = x_TD.clone().requires_grad_()
    out = permute(x_in_TD, experts_TK, keep_TK, num_experts, capacity, impl="triton")
    (out.x_ND * grad_x_ND.to(x_TD.dtype)).sum().backward()

    tol = 2e-6 if x_TD.dtype == torch.float32 else 1e-2
    assert x_in_TD.grad.dtype == x_TD.dtype
    assert rel_err(x_in_TD.grad, x64_TD.grad) < tol
    poison_TD = torch.full_like(x_TD, float("nan"))
    direct_TD = combine_triton(grad_x_ND.to(x_TD.dtype), out.dest_TK, None, out=poison_TD)
    assert not direct_TD.isnan().any()
    assert torch.equal(direct_TD, x_in_TD.grad)


@pytest.mark.parametrize("capacity", [None, 7])
def test_block_sizes_do_not_change_results(capacity: int | None, gen: torch.Generator) -> None:
    """Many histogram blocks (BLOCK_A=16) scanned two at a time (BLOCK_G=2), odd D tiles."""
    case = (70, 2, 10, 20, None, None, torch.float32, "random")
    x_TD, experts_TK, _, num_experts, _ = make_inputs(case, gen)
    keep_TK = None
    if capacity is not None:
        weights_TK = torch.rand(experts_TK.shape, generator=gen).to(DEVICE)
        keep_TK = keep_mask(experts_TK, weights_TK, num_experts, capacity, "position")
    want = permute_reference(x_TD, experts_TK, keep_TK, num_experts, capacity)
    blocks = PermuteBlocks(block_a=16, block_e=16, block_g=2, block_n=16, block_d=16)
    got = permute_triton(x_TD, experts_TK, keep_TK, num_experts, capacity, blocks=blocks)
    assert torch.equal(got.dest_TK, want.dest_TK)
    assert torch.equal(got.x_ND, want.x_ND)
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)


def test_triton_path_never_reads_tensors_on_the_host(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """No .item()/.tolist()/int()/bool() of a tensor: N and the grid follow from shapes."""
    x_TD, experts_TK, keep_TK, num_experts, capacity = make_inputs(CASES[5], gen)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in the Triton path")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    permute_triton(x_TD, experts_TK, keep_TK, num_experts, capacity)
    with pytest.raises(AssertionError, match="host synchronisation"):
        permute_reference(x_TD, experts_TK, keep_TK, num_experts, capacity)


def test_argument_checks(gen: torch.Generator) -> None:
    x_TD, experts_TK, _, num_experts, _ = make_inputs(CASES[0], gen)
    keep_TK = torch.ones_like(experts_TK, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_TK must be None"):
        permute(x_TD, experts_TK, keep_TK, num_experts, None, impl="triton")
    with pytest.raises(ValueError, match="capacity"):
        permute(x_TD, experts_TK, keep_TK, num_experts, 2, impl="torch")
    with pytest.raises(ValueError, match="expert ids"):
        permute(x_TD, experts_TK, None, num_experts - 1, None, impl="torch")


def test_dispatch_follows_device_and_environment(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    x_TD, experts_TK, _, num_experts, _ = make_inputs(CASES[0], gen)
    torch_calls: list[str] = []

    def spy(*args: object) -> PermuteOutput:
        torch_calls.append("torch")
        return permute_reference(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(permute_module, "permute_reference", spy)
    auto = permute(x_TD, experts_TK, None, num_experts, None)
    assert torch_calls == []
    assert torch.equal(auto.x_ND, permute(x_TD, experts_TK, None, num_experts, None, impl="torch").x_ND)
    assert torch_calls == ["torch"]
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        permute(x_TD, experts_TK, None, num_experts, None)
        assert torch_calls == ["torch", "torch"]


@pytest.mark.gpu
def test_no_device_synchronisation_on_cuda(gen: torch.Generator) -> None:
    x_TD, experts_TK, keep_TK, num_experts, capacity = make_inputs(CASES[5], gen)
    x_TD.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = permute(x_TD, experts_TK, keep_TK, num_experts, capacity, impl="triton")
        out.x_ND.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_strided_tokens(gen: torch.Generator) -> None:
    x_TD, experts_TK, _, num_experts, _ = make_inputs(CASES[0], gen)
    wide_TD = torch.randn(x_TD.shape[0], 2 * x_TD.shape[1], generator=gen).to(DEVICE)
    strided_TD = wide_TD[:, ::2]
    want = permute_reference(strided_TD.contiguous(), experts_TK, None, num_experts, None)
    got = permute(strided_TD, experts_TK, None, num_experts, None, impl="triton")
    assert torch.equal(got.x_ND, want.x_ND)


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """Compile the kernels at the launchers' tile sizes for sm_90."""
    jobs = []
    for num_experts, dropless, dtype in ((10, True, "bf16"), (256, False, "fp32")):
        blocks = PermuteBlocks.for_shape(num_experts, 4096)
        keep_types = {} if dropless else {"keep_ptr": "*u8"}
        assign = {"HAS_KEEP": not dropless, "BLOCK_A": blocks.block_a, "BLOCK_E": blocks.block_e}
        assign |= {"keep_ptr": None} if dropless else {}
        sizes = {"num_assign": "i32", "num_experts": "i32"}
        histogram = {"experts_ptr": "*i64", "block_counts_ptr": "*i32", **keep_types, **sizes}
        destination = {
            "experts_ptr": "*i64",
            "block_starts_ptr": "*i32",
            "expert_starts_ptr": "*i32",
            "dest_ptr": "*i64",
            "source_ptr": "*i32",
            "num_out_rows": "i32",
            **keep_types,
            **sizes,
        }
        scan = {
            "block_counts_ptr": "*i32",
            "block_starts_ptr": "*i32",
            "expert_starts_ptr": "*i32",
            "counts_ptr": "*i64",
            "num_blocks": "i32",
            "num_experts": "i32",
            "capacity": "i32",
        }
        gather = {
            "x_ptr": f"*{dtype}",
            "source_ptr": "*i32",
            "counts_ptr": "*i64",
            "out_ptr": f"*{dtype}",
            "num_assign": "i32",
            "num_out_rows": "i32",
            "dim": "i32",
            "stride_xt": "i32",
            "capacity": "i32",
        }
        gather_tiles = {"TOP_K": 2, "DROPLESS": dropless, "BLOCK_N": blocks.block_n}
        gather_tiles["BLOCK_D"] = blocks.block_d
        jobs.append(("_block_histogram_kernel", histogram, assign))
        jobs.append(("_destination_kernel", destination, assign))
        scan_tiles = {"DROPLESS": dropless, "BLOCK_G": blocks.block_g, "BLOCK_E": blocks.block_e}
        jobs.append(("_scan_kernel", scan, scan_tiles))
        jobs.append(("_gather_rows_kernel", gather, gather_tiles))
    assert_compiles_for_sm90("moe.kernels.permute", jobs, tmp_path)
