"""megatron-core DDP + distributed optimizer (parallel/engine.py) against one process.

Every rank builds the same tiny dense transformer from the same seed and trains on its
slice of a fixed global batch; the reference is ``torch.optim.AdamW`` with
``launch/train.py``'s parameter groups on the whole batch in this (the pytest) process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from parallel.config import ParallelConfig
from parallel.engine import MegatronEngine, OptimSettings
from parallel.groups import ParallelGroups, init_groups
from parallel.topology import BatchShape, Topology

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=0)
MOE_MODEL = ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=1)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)
BATCH = 8
# clip 0.5 is below the first steps' gradient norm (~1.2), so clipping is exercised.
OPTIM = OptimSettings(lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=0.5)
LRS = (3e-3, 2e-3, 1e-3)
# Stand-in "expert" parameters (replicated; ep=1, so edp = dp): matrices and one norm gain,
# so both weight-decay groups of megatron's expert optimizer are exercised.
EXPERT_NAMES = ("blocks.0.ffn.w_in.weight", "blocks.1.ffn.w_out.weight", "blocks.1.ffn_norm.weight")
TOL = 1e-5


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _model() -> Transformer:
    torch.manual_seed(7)
    return Transformer(MODEL, MOE)


def _groups(world: int, ep: int = 1) -> ParallelGroups:
    model = MOE_MODEL if ep > 1 else MODEL
    topology = Topology.build(ParallelConfig(dp=world, ep=ep), model, MOE, BatchShape(BATCH, BATCH // world), world)
    return init_groups(topology, timeout_minutes=1)


def _engine(groups: ParallelGroups, experts: bool) -> MegatronEngine:
    model = _model()
    if experts:
        params = dict(model.named_parameters())
        for name in EXPERT_NAMES:
            params[name].allreduce = False
    return MegatronEngine(model, groups, OPTIM)


def _train(engine: MegatronEngine, groups: ParallelGroups, steps: range, micro: int = 1) -> tuple[list[float], list[float]]:
    """Run ``steps`` on this rank's slice; return the dp-averaged losses and the grad norms."""
    dp, rank = groups.dp_size, groups.dp_rank
    losses, norms = [], []
    for step in steps:
        x, y = _batch(step)
        x, y = x.chunk(dp)[rank], y.chunk(dp)[rank]
        engine.zero_grad()
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            ctx = engine.no_sync() if i < micro - 1 else nullcontext()
            with ctx:
                loss = engine.module(xm, ym).loss / micro
                loss.backward()
            total += loss.item()
        norms.append(engine.step(LRS[step]))
        mean = torch.tensor([total])
        dist.all_reduce(mean, group=groups.dp)
        losses.append(mean.item() / dp)
    return losses, norms


def _params(engine: MegatronEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.module.module.named_parameters()}


def _reference(steps: int = 3) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, whole batch, torch AdamW with make_optimizer's groups, torch clipping."""
    model = _model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIM.lr,
        betas=(OPTIM.beta1, OPTIM.beta2),
        eps=OPTIM.eps,
    )
    losses, norms = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        x, y = _batch(step)
        opt.zero_grad()
        loss = model(x, y).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms, {name: p.detach().clone() for name, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element difference relative to the tensor's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _worst(params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert params.keys() == ref.keys()
    return max(_rel(params[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    return _reference()


# -- rank tasks (top level: the pool pickles them by reference) ---------------------


def train_three_steps(rank: int, world: int, experts: bool) -> dict:
    groups = _groups(world)
    engine = _engine(groups, experts)
    buffers = (len(engine.module.buffers), len(engine.module.expert_parallel_buffers))
    losses, norms = _train(engine, groups, range(3))
    return {"losses": losses, "norms": norms, "params": _params(engine), "buffers": buffers}


def accumulate_vs_not(rank: int, world: int) -> dict:
    groups = _groups(world)
    results = {}
    for micro in (1, 2):
        engine = _engine(groups, experts=True)
        losses, norms = _train(engine, groups, range(3), micro=micro)
        results[micro] = {"losses": losses, "norms": norms, "params": _params(engine)}
    return results


def shard_sizes(rank: int, world: int) -> dict:
    groups = _groups(world)
    engine = _engine(groups, experts=True)
    _train(engine, groups, range(1))
    opts = engine.optimizer.chained_optimizers
    state = [
        sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.optimizer.state.values()) for opt in opts
    ]
    shards = [sum(p.numel() for g in opt.optimizer.param_groups for p in g["params"]) for opt in opts]
    dense = sum(p.numel() for p in engine.module.module.parameters() if getattr(p, "allreduce", True))
    expert = sum(p.numel() for p in engine.module.module.parameters() if not getattr(p, "allreduce", True))
    padded = [buf.numel for buf in engine.module.buffers + engine.module.expert_parallel_buffers]
    return {"shards": shards, "state": state, "dense": dense, "expert": expert, "padded": padded}


def checkpoint_resume(rank: int, world: int) -> dict:
    groups = _groups(world)
    first = _engine(groups, experts=True)
    _train(first, groups, range(2))
    saved = copy.deepcopy(first.state_dict())
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = Transformer(MODEL, MOE)
    params = dict(model.named_parameters())
    for name in EXPERT_NAMES:
        params[name].allreduce = False
    resumed = MegatronEngine(model, groups, OPTIM)
    resumed.load_state_dict(saved)
    losses, _ = _train(resumed, groups, range(2, 3))
    bad = copy.deepcopy(saved)
    bad["layout"]["dp"] = (0, 99)
    try:
        resumed.load_state_dict(bad)
        message = ""
    except ValueError as err:
        message = str(err)
    return {"losses": losses, "params": _params(resumed), "mismatch": message}


def replicas_start_equal(rank: int, world: int) -> dict[str, torch.Tensor]:
    groups = _groups(world)
    torch.manual_seed(rank)  # a different init on every rank
    model = Transformer(MODEL, MOE)
    params = dict(model.named_parameters())
    for name in EXPERT_NAMES:
        params[name].allreduce = False
    return _params(MegatronEngine(model, groups, OPTIM))


def reduced_grads(rank: int, world: int, ep: int) -> dict:
    """One backward on this rank's slice; return the reduced gradient shards this rank owns."""
    groups = _groups(world, ep)
    engine = _engine(groups, experts=True)
    x, y = _batch(0)
    x, y = x.chunk(world)[groups.dp_rank], y.chunk(world)[groups.dp_rank]
    engine.zero_grad()
    engine.module(x, y).loss.backward()
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([engine.module], pg_collection=engine._pg)
    names = {p: n for n, p in engine.module.module.named_parameters()}
    shards = {}
    for opt in engine.optimizer.chained_optimizers:
        for group in opt.model_fp32_groups:
            for param in group:
                rng = opt._get_model_param_range_map(param)["param"]
                shards[names[param]] = (rng.start, rng.end, param.main_grad.view(-1)[rng.start : rng.end].clone())
    return {
        "shards": shards,
        "dp_rank": groups.dp_rank,
        "edp_ranks": dist.get_process_group_ranks(groups.edp),
        "dp_size": groups.dp_size,
    }


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("experts", [False, True], ids=["dense", "stand-in-experts"])
def test_engine_matches_single_process_adamw(
    rank_pool: Callable[[int], RankPool], reference: tuple, world: int, experts: bool
) -> None:
    ref_losses, ref_norms, ref_params = reference
    results = rank_pool(world).run(train_three_steps, experts)
    for r in results:
        assert r["buffers"] == ((1, 1) if experts else (1, 0))
        for got, want in zip(r["losses"], ref_losses, strict=True):
            assert abs(got - want) / abs(want) < TOL
        for got, want in zip(r["norms"], ref_norms, strict=True):
            assert abs(got - want) / want < TOL
        assert _worst(r["params"], ref_params) < TOL
    # every replica holds the same parameters after the all-gather
    for r in results[1:]:
        assert all(torch.equal(r["params"][k], results[0]["params"][k]) for k in ref_params)


def test_gradient_accumulation_equals_one_batch(rank_pool: Callable[[int], RankPool], reference: tuple) -> None:
    _, _, ref_params = reference
    for r in rank_pool(2).run(accumulate_vs_not):
        one, two = r[1], r[2]
        for a, b in zip(one["losses"], two["losses"], strict=True):
            assert abs(a - b) / abs(a) < TOL
        assert _worst(two["params"], one["params"]) < TOL
        assert _worst(two["params"], ref_params) < TOL


def test_optimizer_state_is_sharded(rank_pool: Callable[[int], RankPool]) -> None:
    results = rank_pool(4).run(shard_sizes)
    dense, expert = results[0]["dense"], results[0]["expert"]
    padded_dense, padded_expert = results[0]["padded"]
    # the ranks' shards partition each buffer: no parameter element is held twice
    assert sum(r["shards"][0] for r in results) == dense
    assert sum(r["shards"][1] for r in results) == expert
    for r in results:
        # each rank holds at most its 1/dp slice of the (padded) buffer, and state for it only
        assert r["shards"][0] <= padded_dense // 4 < dense
        assert r["shards"][1] <= padded_expert // 4 < expert
        assert r["state"] == [2 * n for n in r["shards"]]


def test_checkpoint_round_trip_resumes_exactly(rank_pool: Callable[[int], RankPool], reference: tuple) -> None:
    ref_losses, _, ref_params = reference
    for r in rank_pool(2).run(checkpoint_resume):
        assert abs(r["losses"][0] - ref_losses[2]) / ref_losses[2] < TOL
        assert _worst(r["params"], ref_params) < TOL
        assert "saved with layout" in r["mismatch"] and "(0, 99)" in r["mismatch"]


def test_expert_grads_reduce_over_edp_scaled_by_dp(rank_pool: Callable[[int], RankPool]) -> None:
    """dp=4, ep=2 (edp=2): dense grads = mean over all 4 ranks; params marked
    ``allreduce=False`` = (1/dp) x sum over the rank's edp group only (megatron's rule,
    right for experts sharded over ep; a replicated param would get edp/dp of its gradient)."""
    results = rank_pool(4).run(reduced_grads, 2)
    world = len(results)
    local = []  # each rank's unreduced gradient, recomputed in one process
    for rank in range(world):
        model = _model()
        x, y = _batch(0)
        model(x.chunk(world)[rank], y.chunk(world)[rank]).loss.backward()
        local.append({n: p.grad.detach().clone().view(-1) for n, p in model.named_parameters()})
    checked = {"dense": 0, "expert": 0}
    for r in results:
        assert r["dp_size"] == 4 and len(r["edp_ranks"]) == 2
        for name, (start, end, got) in r["shards"].items():
            peers = r["edp_ranks"] if name in EXPERT_NAMES else range(world)
            want = sum(local[p][name][start:end] for p in peers) / world
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-8), name
            checked["expert" if name in EXPERT_NAMES else "dense"] += 1
    assert checked["dense"] > 0 and checked["expert"] > 0


def test_engine_broadcasts_rank_zero_parameters(rank_pool: Callable[[int], RankPool]) -> None:
    """Each rank initialises differently; the engine starts every replica from rank 0's."""
    results = rank_pool(2).run(replicas_start_equal)
    inits = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        inits.append({n: p.detach() for n, p in Transformer(MODEL, MOE).named_parameters()})
    assert not torch.equal(inits[0]["embed.weight"], inits[1]["embed.weight"])
    for r in results:
        assert all(torch.equal(r[k], inits[0][k]) for k in inits[0])
