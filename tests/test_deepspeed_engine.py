"""DeepSpeed ZeRO-1/2 (parallel/deepspeed_engine.py) against one process and against megatron.

Every rank builds the same tiny MoE transformer from the same seed, shards its experts
over the EP group (``apply_expert_parallel``) and trains on its slice of a fixed global
batch, with the training loop's global-batch aux-loss pre-pass. The references are
``LocalEngine`` (torch AdamW) on the whole batch in this (the pytest) process, and
``MegatronEngine`` on the same layout in the same rank processes.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launch.config import load_config
from launch.train import check_layout
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from parallel.config import ParallelConfig
from parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_expert_ranks, register_expert_groups
from parallel.engine import MegatronEngine, OptimSettings
from parallel.expert_parallel import apply_expert_parallel
from parallel.groups import ParallelGroups, init_groups
from parallel.local_engine import LocalEngine
from parallel.reduce import mean_over, sum_over
from parallel.topology import BatchShape, Topology

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, aux_loss_scope="global_batch")
BATCH = 8
# clip 0.5 is below the first steps' gradient norm (~0.78), so clipping is exercised.
# lr 1e-3 and eps 1e-6 (not 3e-3 and 1e-8): some expert weights get gradients of ~1e-8
# whose last bits depend on the summation order, and Adam's m/sqrt(v) turns that into
# whole steps. In one process, the whole batch against its two halves already moves them
# by 3.0e-5 (relative to the tensor) at lr 3e-3, eps 1e-8, and by 2.0e-6 with these settings.
OPTIM = OptimSettings(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=0.5, eps=1e-6)
LRS = (1e-3, 7e-4, 4e-4)
TOL = 1e-5
STAGES = (1, 2)
# DeepSpeedCPUAdam is DeepSpeed's own C++ AdamW, vectorised for whatever SIMD the machine
# has when it is JIT-built, with its own operation order: its updates may differ from torch
# AdamW's in the last bits, which Adam's 1/sqrt(v) amplifies where a gradient is tiny. Here
# it agreed to 1.2e-6 (as close as torch AdamW under ZeRO); 1e-4 leaves room for other
# CPUs and still fails on any real error: a wrong gradient scale shows in the grad norm
# (compared at the same tolerance; Adam's update itself hardly sees a scale), a wrong
# group or partition moves parameters by a fair part of lr, >= 1e-3 of the tensor's size.
OFFLOAD_TOL = 1e-4
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")

Result = dict[str, Any]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _model(seed: int = 7) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL, MOE)


def _routers(model: Transformer) -> list[torch.nn.Parameter]:
    return [layer.router.weight_ED for layer in model.moe_layers()]


def _groups(rank: int, world: int, ep: int) -> ParallelGroups:
    # DeepSpeed insists on LOCAL_RANK (both launchers set it); every pool rank is local.
    os.environ.setdefault("LOCAL_RANK", str(rank))
    parallel = ParallelConfig(dp=world, ep=ep, engine="deepspeed")
    topology = Topology.build(parallel, MODEL, MOE, BatchShape(BATCH, BATCH // world), world)
    return init_groups(topology, timeout_minutes=2)


def _engine(groups: ParallelGroups, stage: int | None, offload: bool = False, seed: int = 7) -> Any:
    """The model (experts sharded when ep > 1) under ZeRO ``stage``, or megatron's engine (None)."""
    model = _model(seed)
    if groups.ep_size > 1:
        apply_expert_parallel(model, groups.ep)
    if stage is None:
        return MegatronEngine(model, groups, OPTIM)
    return DeepSpeedEngine(model, groups, OPTIM, stage, offload, watch_grads=_routers(model))


@torch.no_grad()
def _global_load(engine: Any, chunks: list[tuple[torch.Tensor, torch.Tensor]], groups: ParallelGroups) -> torch.Tensor:
    """The loop's ``_global_load``: assignment fractions per MoE layer over the global batch."""
    counts_LE = sum(torch.stack([s.tokens_per_expert_E for s in engine.module(x).moe_stats]).float() for x, _ in chunks)
    counts_LE = sum_over(counts_LE, groups.dp)
    return counts_LE / counts_LE.sum(dim=1, keepdim=True)


def _train(engine: Any, groups: ParallelGroups, steps: range, micro: int = 1) -> Result:
    """The loop's step on this rank's slice: dp-averaged losses, grad norms and the global
    router gradient (the local ones averaged over dp, as ``Run._router_grad_norm``)."""
    dp, rank = groups.dp_size, groups.dp_rank
    routers = _routers(engine.module.module)
    out: Result = {"losses": [], "norms": [], "router_grads": []}
    for step in steps:
        x, y = _batch(step)
        chunks = list(zip(x.chunk(dp)[rank].chunk(micro), y.chunk(dp)[rank].chunk(micro), strict=True))
        load_LE = _global_load(engine, chunks, groups)
        engine.zero_grad()
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(chunks):
            with engine.no_sync() if i < micro - 1 else nullcontext():
                loss = engine.module(xm, ym, load_LE).loss / micro
                loss.backward()
            total += loss.detach()
        local = torch.cat([engine.local_grad(w).reshape(-1) for w in routers])
        out["router_grads"].append(mean_over(local, groups.dp))
        out["norms"].append(engine.step(LRS[step]))
        out["losses"].append(mean_over(total, groups.dp).item())
    return out


def _full_params(engine: Any, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter, expert shards all-gathered over the EP group (single-process names)."""
    params = {}
    for name, p in engine.module.module.named_parameters():
        value = p.detach().clone()
        if getattr(p, "allreduce", True) is False and groups.ep_size > 1:
            shards = [torch.empty_like(value) for _ in range(groups.ep_size)]
            dist.all_gather(shards, value.contiguous(), group=groups.ep)
            value = torch.cat(shards)
        params[name] = value
    return params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element difference relative to the tensor's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _worst(params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert params.keys() == ref.keys()
    return max(_rel(params[k], ref[k]) for k in ref)


def _scalars(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


def _agreement(run: Result, ref: Result) -> dict[str, float]:
    """Largest relative differences of ``run`` against ``ref``."""
    return {
        "loss": _scalars(run["losses"], ref["losses"]),
        "grad_norm": _scalars(run["norms"], ref["norms"]),
        "router_grad": max(_rel(g, w) for g, w in zip(run["router_grads"], ref["router_grads"], strict=True)),
        "params": _worst(run["params"], ref["params"]),
    }


def _reference(steps: int = 3) -> Result:
    """One process, the whole batch, ``LocalEngine`` (the single-process path of the loop)."""
    model = _model()
    engine = LocalEngine(model, OPTIM)
    out: Result = {"losses": [], "norms": [], "router_grads": []}
    for step in range(steps):
        x, y = _batch(step)
        engine.zero_grad()
        loss = model(x, y).loss  # one forward sees the global batch: its own load is the global one
        loss.backward()
        out["router_grads"].append(torch.cat([engine.local_grad(w).reshape(-1) for w in _routers(model)]))
        out["norms"].append(engine.step(LRS[step]))
        out["losses"].append(loss.item())
    out["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def reference() -> Result:
    return _reference()


# -- rank tasks (top level: the pool pickles them by reference) ---------------------


def train_each_engine(rank: int, world: int, ep: int) -> dict[Any, Result]:
    """Three steps under megatron's engine and under ZeRO-1 and ZeRO-2, same layout."""
    groups = _groups(rank, world, ep)
    results = {}
    for stage in (None, *STAGES):
        engine = _engine(groups, stage)
        results[stage or "megatron"] = {**_train(engine, groups, range(3)), "params": _full_params(engine, groups)}
    return results


def accumulate_vs_not(rank: int, world: int, ep: int) -> dict[int, dict[int, Result]]:
    groups = _groups(rank, world, ep)
    results: dict[int, dict[int, Result]] = {}
    for stage in STAGES:
        results[stage] = {}
        for micro in (1, 2):
            engine = _engine(groups, stage)
            results[stage][micro] = {**_train(engine, groups, range(3), micro), "params": _full_params(engine, groups)}
    return results


def resume_after_two_steps(rank: int, world: int, ep: int, stage: int) -> Result:
    """Step 3 of an uninterrupted run, and step 3 after saving at step 2 (through the
    checkpoints' ``torch.save``/``torch.load(weights_only=True)``) into a fresh engine."""
    groups = _groups(rank, world, ep)
    whole = _engine(groups, stage)
    uninterrupted = _train(whole, groups, range(3))
    first = _engine(groups, stage)
    _train(first, groups, range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed = _engine(groups, stage, seed=123)  # a different init: everything must come from the checkpoint
    resumed.load_state_dict(saved)
    step3 = _train(resumed, groups, range(2, 3))
    bad = copy.deepcopy(saved)
    bad["layout"]["dp"] = (0, 99)
    try:
        resumed.load_state_dict(bad)
        message = ""
    except ValueError as err:
        message = str(err)
    whole_params, resumed_params = _full_params(whole, groups), _full_params(resumed, groups)
    return {
        "loss": (uninterrupted["losses"][2], step3["losses"][0]),
        "norm": (uninterrupted["norms"][2], step3["norms"][0]),
        "params_equal": all(torch.equal(whole_params[k], resumed_params[k]) for k in whole_params),
        "mismatch": message,
    }


def train_offloaded(rank: int, world: int, ep: int) -> Result:
    """ZeRO-2 with DeepSpeedCPUAdam: the one place the CPU Adam op is JIT-built (or loaded)."""
    groups = _groups(rank, world, ep)
    began = time.perf_counter()
    engine = _engine(groups, 2, offload=True)
    seconds = time.perf_counter() - began
    return {**_train(engine, groups, range(3)), "params": _full_params(engine, groups), "build_seconds": seconds,
            "optimizer": type(engine._runtime.basic_optimizer).__name__}


def expert_groups_are_megatrons(rank: int, world: int, ep: int) -> dict[str, Any]:
    """DeepSpeed's registry holds megatron's EP/EDP groups; swapped ones are refused."""
    from deepspeed.utils import groups as ds_groups

    groups = _groups(rank, world, ep)
    name = register_expert_groups(groups)
    registered = (
        ds_groups._get_expert_parallel_group(name) is groups.ep
        and ds_groups._get_expert_data_parallel_group(name) is groups.edp
    )
    ranks = (dist.get_process_group_ranks(groups.ep), dist.get_process_group_ranks(groups.edp))
    try:
        register_expert_groups(dataclasses.replace(groups, ep=groups.edp, edp=groups.ep))
        message = ""
    except RuntimeError as err:
        message = str(err)
    return {"name": name, "registered": registered, "ranks": ranks, "swapped": message}


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "ep"), [(2, 1), (2, 2), (4, 2)], ids=["dp2", "dp2-ep2", "dp4-ep2"])
def test_zero_matches_local_engine_and_megatron(
    rank_pool: Callable[[int], RankPool], reference: Result, world: int, ep: int
) -> None:
    results = rank_pool(world).run(train_each_engine, ep)
    for r in results:
        for stage in STAGES:
            vs_local, vs_megatron = _agreement(r[stage], reference), _agreement(r[stage], r["megatron"])
            assert max(vs_local.values()) < TOL, (stage, vs_local)
            assert max(vs_megatron.values()) < TOL, (stage, vs_megatron)
    # every rank holds the same full model (dense replicas and the gathered experts)
    for r in results[1:]:
        for stage in STAGES:
            assert all(torch.equal(r[stage]["params"][k], results[0][stage]["params"][k]) for k in reference["params"])


def test_gradient_accumulation_equals_one_batch(rank_pool: Callable[[int], RankPool], reference: Result) -> None:
    for r in rank_pool(2).run(accumulate_vs_not, 2):
        for stage in STAGES:
            one, two = r[stage][1], r[stage][2]
            assert max(_agreement(two, one).values()) < TOL, stage
            assert max(_agreement(two, reference).values()) < TOL, stage


@pytest.mark.parametrize("stage", STAGES)
def test_resume_is_bit_exact(rank_pool: Callable[[int], RankPool], stage: int) -> None:
    for r in rank_pool(2).run(resume_after_two_steps, 2, stage):
        assert r["loss"][0] == r["loss"][1] and r["norm"][0] == r["norm"][1]
        assert r["params_equal"]
        assert "saved with layout" in r["mismatch"] and "(0, 99)" in r["mismatch"]


def test_cpu_offload_trains_and_matches_loosely(rank_pool: Callable[[int], RankPool], reference: Result) -> None:
    results = rank_pool(2).run(train_offloaded, 2, timeout=600)
    agreement = [_agreement(r, reference) for r in results]
    print(f"\nZeRO-2 + CPU offload: engine built in {results[0]['build_seconds']:.1f} s (CPU Adam op JIT build, "
          f"or its load from the torch extensions cache); vs LocalEngine {agreement[0]}")
    for r, vs_local in zip(results, agreement, strict=True):
        assert r["optimizer"] == "DeepSpeedCPUAdam"
        assert max(vs_local.values()) < OFFLOAD_TOL, vs_local


def test_deepspeed_uses_megatrons_expert_groups(rank_pool: Callable[[int], RankPool]) -> None:
    for rank, r in enumerate(rank_pool(4).run(expert_groups_are_megatrons, 2)):
        assert r["name"] == "ep_size_2" and r["registered"]
        assert r["ranks"] == tuple(deepspeed_expert_ranks(rank, 4, 2))
        assert "DeepSpeed's MoE code assumes" in r["swapped"]
    assert deepspeed_expert_ranks(3, 4, 2) == ([2, 3], [1, 3])


def _layout_error(*overrides: str) -> str:
    cfg = load_config(TINY, ["moe.num_experts=4", *overrides])
    with pytest.raises(ConfigError) as err:
        check_layout(cfg)
    return str(err.value)


def test_unsupported_deepspeed_layouts_are_refused() -> None:
    assert "parallel.dp >= 2" in _layout_error("parallel.engine=deepspeed")
    assert "only through engine.backward" in _layout_error(
        "parallel.engine=deepspeed", "parallel.dp=2", "parallel.zero_stage=0"
    )
    assert "MoE not supported with Stage 3" in _layout_error(
        "parallel.engine=deepspeed", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=3"
    )
    assert "trains ep x dp layouts only" in _layout_error("parallel.engine=deepspeed", "parallel.tp=2", "parallel.dp=1")
    for stage in (1, 2):
        cfg = load_config(TINY, ["moe.num_experts=4", "parallel.engine=deepspeed", "parallel.dp=2", "parallel.ep=2",
                                 f"parallel.zero_stage={stage}"])
        assert check_layout(cfg).world_size == 2
