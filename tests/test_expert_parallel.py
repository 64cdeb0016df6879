"""The all-to-all dispatcher against the single-process MoE layer (gloo ranks)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.layer import MoELayer
from multirank import RankPool
from parallel.expert_parallel import DispatchMismatchError, apply_expert_parallel

DIM = 8


def _layer(num_experts: int, top_k: int, capacity_factor: float | None, skew: bool) -> MoELayer:
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, normalize_weights=top_k > 1,
                    capacity_factor=capacity_factor, expert_ffn_dim=16)
    layer = MoELayer(DIM, cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if skew:  # with positive inputs, expert 0 (then 1) wins for every token
        with torch.no_grad():
            layer.router.weight_ED.zero_()
            layer.router.weight_ED[0] = 3.0
            layer.router.weight_ED[1] = 2.0
    return layer


def _tokens(rank: int, num_tokens: int, skew: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, num_tokens, DIM, generator=gen, dtype=torch.float64)
    return (x.abs() if skew else x), torch.randn(1, num_tokens, DIM, generator=gen, dtype=torch.float64)


def ep_matches_single_process(rank: int, world: int, experts: int, top_k: int, skew: bool) -> float:
    """Dropless EP=world with uneven token counts per rank vs one process on all tokens."""
    counts = [5 + 3 * r for r in range(world)]
    data = [_tokens(r, counts[r], skew) for r in range(world)]
    reference = _layer(experts, top_k, None, skew)
    x_all = torch.cat([x for x, _ in data], dim=1).requires_grad_()
    y_all, _ = reference(x_all)
    (y_all * torch.cat([g for _, g in data], dim=1)).sum().backward()

    layer = copy.deepcopy(reference)
    layer.zero_grad()
    apply_expert_parallel(layer, dist.group.WORLD)
    x, g = data[rank]
    x = x.clone().requires_grad_()
    y, _ = layer(x)
    (y * g).sum().backward()

    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    local = experts // world
    experts_mine = slice(rank * local, (rank + 1) * local)
    router_grad = layer.router.weight_ED.grad.clone()
    dist.all_reduce(router_grad)
    checks = [
        (y, y_all[:, mine]),
        (x.grad, x_all.grad[:, mine]),
        (router_grad, reference.router.weight_ED.grad),
        (layer.experts.w_in_EDF.grad, reference.experts.w_in_EDF.grad[experts_mine]),
        (layer.experts.w_out_EFD.grad, reference.experts.w_out_EFD.grad[experts_mine]),
    ]
    worst = 0.0
    for got, want in checks:
        assert got.shape == want.shape
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item())
    return worst


def ep_capacity_is_per_rank(rank: int, world: int) -> tuple[float, float]:
    """With a capacity factor, EP drops exactly what one process drops applying the
    capacity to each rank's tokens separately."""
    x, _ = _tokens(rank, 12, skew=True)
    reference = _layer(4, 2, 1.0, skew=True)
    y_ref, stats_ref = reference(x)
    layer = copy.deepcopy(reference)
    apply_expert_parallel(layer, dist.group.WORLD)
    y, stats = layer(x)
    assert stats.dropped_fraction.item() == stats_ref.dropped_fraction.item() > 0
    return (y - y_ref).abs().max().item(), stats.dropped_fraction.item()


def ep_mismatch_fails_on_every_rank(rank: int, world: int) -> str:
    x, _ = _tokens(rank, 8 + 4 * rank, skew=False)  # different T -> different capacity
    layer = _layer(4, 2, 1.0, skew=False)
    apply_expert_parallel(layer, dist.group.WORLD)
    with pytest.raises(DispatchMismatchError) as err:
        layer(x)
    return str(err.value)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("top_k, skew", [(1, False), (2, False), (2, True)], ids=["k1", "k2", "k2-all-to-one"])
def test_ep_matches_single_process(rank_pool: Callable[[int], RankPool], world: int, top_k: int, skew: bool) -> None:
    worst = rank_pool(world).run(ep_matches_single_process, 8, top_k, skew)
    assert max(worst) < 1e-6, worst  # the router computes in fp32 by design


def test_ep_with_experts_receiving_zero_tokens(rank_pool: Callable[[int], RankPool]) -> None:
    # 12 experts over 4 ranks, all tokens to experts 0 and 1: ranks 1-3 compute nothing.
    assert max(rank_pool(4).run(ep_matches_single_process, 12, 2, True)) < 1e-6


def test_ep_capacity_matches_per_rank_rule(rank_pool: Callable[[int], RankPool]) -> None:
    results = rank_pool(2).run(ep_capacity_is_per_rank)
    assert all(diff < 1e-6 for diff, _ in results)


def test_ep_mismatched_capacity_names_the_ranks(rank_pool: Callable[[int], RankPool]) -> None:
    messages = rank_pool(2).run(ep_mismatch_fails_on_every_rank)
    for message in messages:
        assert "ranks disagree on capacity (rank 0: 4, rank 1: 6)" in message


def experts_moved_to_the_device(rank: int, world: int, cfg: Any) -> list[int]:
    """Experts in each expert weight of every module the training run moves to its device
    (``nn.Module.to``, spied on while ``launch.train.Run`` builds this rank's model)."""
    from launch.train import Run, rank_info

    moved: list[int] = []
    original = torch.nn.Module.to

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        moved.extend(p.shape[0] for n, p in self.named_parameters() if n.endswith("w_in_EDF"))
        return original(self, *args, **kwargs)

    torch.nn.Module.to = spy  # type: ignore[method-assign]
    try:
        with rank_info(cfg) as info:
            Run(cfg, "tiny", info)
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]
    return moved


def test_the_run_moves_only_its_shard_to_the_device(
    rank_pool: Callable[[int], RankPool], small_corpus: Path, tmp_path: Path
) -> None:
    """Every rank builds the whole model from one seed, on the CPU, and moves it to its
    device only once sharded: under ep=2 each moved expert weight holds 2 of the 4 experts
    (a GPU never holds the whole model, which at real scale it cannot)."""
    from launch.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", [
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
        "moe.num_experts=4", "moe.expert_ffn_dim=32", "train.batch_size=4", "data.val_tokens=256",
        "launch.threads=1", "parallel.dp=2", "parallel.ep=2", f"data.path={small_corpus}",
        f"train.run_dir={tmp_path / 'run'}"])
    for moved in rank_pool(2).run(experts_moved_to_the_device, cfg):
        assert moved and set(moved) == {2}, moved
