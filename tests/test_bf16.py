"""bf16 training states: bf16 parameters and activations, fp32 master weights, fp32
gradient accumulation, fp32 Adam state (``train.dtype: bfloat16``).

Each engine is checked for the dtypes it holds and for what they imply: gradients summed
over micro-batches in fp32 (not bf16), parameters equal to their rounded masters after a
step, masters that keep what bf16 cannot, resumes bit for bit. ``LocalEngine`` in this
process, ``MegatronEngine`` and ``DeepSpeedEngine`` (ZeRO-1 and 2) on two gloo ranks; the
simulator's model-state bytes against the engines' tensors; the training loop end to end on
a shrunk ``configs/tiny.yaml`` against its fp32 run, and across two ranks against one.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launch.config import load_config
from launch.data import prepare, stdlib_sources
from launch.metrics import read_metrics
from launch.train import train
from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from parallel.checkpoint import latest_checkpoint, load_checkpoint
from parallel.config import ParallelConfig
from parallel.dist_checkpoint import load_dist_checkpoint, read_manifest, save_dist_checkpoint
from parallel.engine import MegatronEngine, OptimSettings, cast_parameters
from parallel.groups import ParallelGroups, init_groups
from parallel.local_engine import LocalEngine
from parallel.simulator.predict import Layout, state_memory
from parallel.topology import BatchShape, Topology

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=1)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)
BATCH = 8
OPTIM = OptimSettings(lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=0.5)
LRS = (3e-3, 2e-3, 1e-3)
BF16 = torch.bfloat16

Result = dict[str, Any]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _model(seed: int = 7) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL, MOE)


def _step(engine: Any, x: torch.Tensor, y: torch.Tensor, lr: float, micro: int = 1) -> tuple[float, float]:
    """One update over (x, y) in ``micro`` micro-batches: (this rank's loss, grad norm)."""
    engine.zero_grad()
    total = 0.0
    for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
        loss = engine.module(xm, ym).loss / micro
        loss.backward()
        total += loss.item()
    return total, engine.step(lr)


# -- LocalEngine ------------------------------------------------------------------------


def test_local_engine_holds_bf16_params_and_fp32_masters_grads_and_adam_state() -> None:
    model = _model()
    engine = LocalEngine(model, OPTIM, BF16)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {BF16}
    assert model.rope_cos_SF.dtype == torch.float32  # buffers stay fp32
    masters = engine.main_params()
    assert masters.keys() == params.keys()
    assert all(m.dtype == torch.float32 and torch.equal(m, params[n].float()) for n, m in masters.items())

    # Two micro-batches: main_grad is the fp32 sum of each backward's bf16 gradient.
    x, y = _batch(0)
    engine.zero_grad()
    for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
        (engine.module(xm, ym).loss / 2).backward()
    twin = _model()
    cast_parameters([twin], BF16)
    micro_grads = []
    for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
        twin.zero_grad(set_to_none=True)
        (twin(xm, ym).loss / 2).backward()
        micro_grads.append({n: p.grad.clone() for n, p in twin.named_parameters()})
    bf16_sum_differs = False
    for name, param in params.items():
        grad = engine.local_grad(param)
        assert param.grad is None  # freed once added into main_grad
        assert grad.dtype == torch.float32 and grad is param.main_grad
        g1, g2 = micro_grads[0][name], micro_grads[1][name]
        assert g1.dtype == BF16
        assert torch.equal(grad, g1.float() + g2.float()), name
        bf16_sum_differs |= not torch.equal(grad, (g1 + g2).float())
    assert bf16_sum_differs  # summing in bf16 would have lost bits: the check above can tell

    engine.step(LRS[0])
    states = engine.optimizer.state
    for name, main in masters.items():
        assert states[main]["exp_avg"].dtype == states[main]["exp_avg_sq"].dtype == torch.float32
        assert states[main]["exp_avg"].shape == params[name].shape
        assert torch.equal(params[name], main.to(BF16))  # the parameter is its rounded master
    # The masters keep the part of the update that bf16 rounds away.
    assert any(not torch.equal(m, params[n].float()) for n, m in masters.items())


def test_local_engine_bf16_resume_is_bit_exact() -> None:
    whole = LocalEngine(_model(), OPTIM, BF16)
    uninterrupted = [_step(whole, *_batch(s), LRS[s], micro=2) for s in range(3)]
    first = LocalEngine(_model(), OPTIM, BF16)
    for s in range(2):
        _step(first, *_batch(s), LRS[s], micro=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {m.dtype for m in saved["main_params"].values()} == {torch.float32}
    assert {v.dtype for v in saved["model"].values()} == {BF16}
    resumed = LocalEngine(_model(seed=123), OPTIM, BF16)  # another init: all from the checkpoint
    resumed.load_state_dict(saved)
    assert _step(resumed, *_batch(2), LRS[2], micro=2) == uninterrupted[2]
    for (name, a), b in zip(whole.main_params().items(), resumed.main_params().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="with the train.dtype that saved it"):
        LocalEngine(_model(), OPTIM).load_state_dict(saved)


def test_engines_refuse_non_fp32_parameters_and_other_dtypes() -> None:
    with pytest.raises(ValueError, match="dtype torch.float16 is not one of"):
        LocalEngine(_model(), OPTIM, torch.float16)
    model = _model()
    cast_parameters([model], BF16)
    with pytest.raises(ValueError, match="parameters must arrive as fp32"):
        LocalEngine(model, OPTIM, BF16)


# -- MegatronEngine on two ranks ---------------------------------------------------------


def _groups(world: int) -> ParallelGroups:
    topology = Topology.build(ParallelConfig(dp=world), MODEL, MOE, BatchShape(BATCH, BATCH // world), world)
    return init_groups(topology, timeout_minutes=1)


def _megatron(groups: ParallelGroups, seed: int = 7) -> MegatronEngine:
    return MegatronEngine(_model(seed), groups, OPTIM, dtype=BF16)


def _rank_slice(groups: ParallelGroups, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(step)
    return x.chunk(groups.dp_size)[groups.dp_rank], y.chunk(groups.dp_size)[groups.dp_rank]


def _train(engine: MegatronEngine, groups: ParallelGroups, steps: range) -> list[tuple[float, float]]:
    """(dp-mean loss, grad norm) per step, two micro-batches each."""
    out = []
    for s in steps:
        loss, norm = _step(engine, *_rank_slice(groups, s), LRS[s], micro=2)
        mean = torch.tensor([loss])
        dist.all_reduce(mean, group=groups.dp)
        out.append((mean.item() / groups.dp_size, norm))
    return out


def megatron_dtypes(rank: int, world: int) -> Result:
    groups = _groups(world)
    engine = _megatron(groups)
    params = list(engine.module.module.parameters())
    out: Result = {"params": {p.dtype for p in params}}
    engine.zero_grad()
    x, y = _rank_slice(groups, 0)
    for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
        with engine.no_sync():
            (engine.module(xm, ym).loss / 2).backward()
    out["main_grads"] = {engine.local_grad(p).dtype for p in params}
    engine.step(LRS[0])
    shards = engine.optimizer_shards()
    out["shards"] = {s.dtype for s in shards}
    out["main_numel"] = sum(m.numel() for opt in engine.main_shards() for m in opt)
    out["shard_numel"] = sum(s.numel() for s in shards)
    out["total_numel"] = sum(p.numel() for p in params)
    out["adam"] = {t.dtype for opt in engine.optimizer.chained_optimizers for state in opt.optimizer.state.values()
                   for k, t in state.items() if k != "step"}
    # every parameter's slice owned by this rank is its rounded fp32 main shard
    rounded = True
    for opt in engine.optimizer.chained_optimizers:
        for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups, strict=True):
            for param, main in zip(model_group, main_group, strict=True):
                rng = opt._get_model_param_range_map(param)["param"]
                rounded &= torch.equal(param.detach().view(-1)[rng.start:rng.end], main.to(BF16))
    out["rounded"] = rounded
    return out


def megatron_resume(rank: int, world: int) -> Result:
    """Step 3 of an uninterrupted run, and step 3 after ``state_dict`` at step 2 into a fresh engine."""
    groups = _groups(world)
    uninterrupted = _train(_megatron(groups), groups, range(3))
    first = _megatron(groups)
    _train(first, groups, range(2))
    saved = copy.deepcopy(first.state_dict())
    resumed = _megatron(groups, seed=123)
    resumed.load_state_dict(saved)
    return {"uninterrupted": uninterrupted, "resumed": _train(resumed, groups, range(2, 3))[0],
            "main_dtypes": {m.dtype for opt in saved["main_params"] for m in opt}}


CONFIG = {"model": {"dim": 32, "n_layers": 2}, "moe": {"num_experts": 4}}


def megatron_dist_checkpoint(rank: int, world: int, ckpt: str) -> Result:
    """Two steps, a sharded checkpoint (the training loop's format across ranks), two more;
    then the two after loading that checkpoint into a fresh engine."""
    groups = _groups(world)
    engine = _megatron(groups)
    net = engine.module.module
    _train(engine, groups, range(1))
    save_dist_checkpoint(Path(ckpt), 1, engine, net, groups, {"step": 1, "config": CONFIG}, keep=2)
    uninterrupted = _train(engine, groups, range(1, 3))
    fresh = _megatron(groups, seed=123)
    load_dist_checkpoint(latest_checkpoint(Path(ckpt)), fresh, fresh.module.module, groups, CONFIG)
    return {"uninterrupted": uninterrupted, "resumed": _train(fresh, groups, range(1, 3))}


def test_megatron_bf16_dist_checkpoint_holds_fp32_masters_and_resumes_bit_exact(
    rank_pool: Callable[[int], RankPool], tmp_path: Path,
) -> None:
    for r in rank_pool(2).run(megatron_dist_checkpoint, str(tmp_path)):
        assert r["resumed"] == r["uninterrupted"]
    tensors = read_manifest(latest_checkpoint(tmp_path))["tensors"]
    assert tensors["blocks.0.attn.qkv.weight"]["dtype"] == "bfloat16"
    masters = {k: t["dtype"] for k, t in tensors.items() if k.startswith("optimizer.state.param.")}
    assert "optimizer.state.param.blocks.0.attn.qkv.weight" in masters
    assert set(masters.values()) == {"float32"}


def test_megatron_engine_holds_bf16_params_and_fp32_main_shards_grads_and_adam_state(
    rank_pool: Callable[[int], RankPool],
) -> None:
    results = rank_pool(2).run(megatron_dtypes)
    for r in results:
        assert r["params"] == {BF16}
        assert r["main_grads"] == {torch.float32}
        assert r["shards"] == {torch.float32} and r["adam"] == {torch.float32}
        assert r["main_numel"] == r["shard_numel"] > 0  # AdamW steps the main copies only
        assert r["rounded"]
    # the ranks' main shards partition the model (the distributed optimizer's 1/dp each)
    assert sum(r["main_numel"] for r in results) == results[0]["total_numel"]


def test_megatron_engine_bf16_resume_is_bit_exact(rank_pool: Callable[[int], RankPool]) -> None:
    for r in rank_pool(2).run(megatron_resume):
        assert r["resumed"] == r["uninterrupted"][2]
        assert r["main_dtypes"] == {torch.float32}


# -- model-state bytes: the simulator's formula against the engines' tensors ---------------------


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adam_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _nbytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def _predicted_states(world: int, rank: int) -> dict[str, int]:
    layout = Layout.build(ParallelConfig(dp=world), MODEL, MOE, BATCH, None, "bfloat16")
    memory, _ = state_memory(MODEL, MOE, layout, "megatron", rank)
    return {"params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer}


def megatron_state_bytes(rank: int, world: int) -> dict[str, int]:
    groups = _groups(world)
    engine = _megatron(groups)
    _train(engine, groups, range(1))
    buffers = [*engine.module.buffers, *engine.module.expert_parallel_buffers]
    chained = engine.optimizer.chained_optimizers
    return {
        "params": _nbytes(b.param_data for b in buffers),
        "grads": _nbytes(b.grad_data for b in buffers),
        "optimizer": _nbytes(m for shards in engine.main_shards() for m in shards) + sum(_adam_bytes(o.optimizer) for o in chained),
    }


def test_state_bytes_of_bf16_states_are_the_simulators(rank_pool: Callable[[int], RankPool]) -> None:
    """bf16 parameters 2 B, fp32 main grads 4 B, fp32 masters 4 B and Adam 8 B per element
    (megatron: masters and Adam over each rank's shard of the padded buffers)."""
    model = _model()
    engine = LocalEngine(model, OPTIM, BF16)
    _step(engine, *_batch(0), LRS[0])
    params = list(model.parameters())
    local = {"params": _nbytes(params), "grads": _nbytes(p.main_grad for p in params),
             "optimizer": _nbytes(engine.main_params().values()) + _adam_bytes(engine.optimizer)}
    assert local == _predicted_states(1, 0)
    assert local["params"] * 2 == local["grads"]  # a bf16 parameter, an fp32 gradient
    for rank, measured in enumerate(rank_pool(2).run(megatron_state_bytes)):
        assert measured == _predicted_states(2, rank), rank


# -- the training loop ------------------------------------------------------------------------

# configs/tiny.yaml shrunk to train 80 steps in seconds on a CPU (top-1 MoE in both layers).
TINY_SHRUNK = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64", "model.ffn_dim=128",
    "moe.expert_ffn_dim=64", "train.batch_size=8", "train.warmup_steps=10", "train.steps=80",
    "train.log_every=10", "train.eval_every=40", "train.ckpt_every=40", "data.val_tokens=8192",
    "launch.threads=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:60], out, val_fraction=0.2)
    return out


def _tiny(corpus: Path, run_dir: Path, *extra: str) -> Any:
    return load_config(ROOT / "configs" / "tiny.yaml", [*TINY_SHRUNK, f"data.path={corpus}", f"train.run_dir={run_dir}",
                                                         *extra])


def _records(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r["kind"] == kind}


def test_tiny_bf16_trains_within_3_percent_of_fp32_and_resumes_bit_exact(corpus: Path, tmp_path: Path) -> None:
    fp32 = train(_tiny(corpus, tmp_path / "fp32", "train.dtype=float32"), "tiny")["final_val_loss"]
    bf16 = train(_tiny(corpus, tmp_path / "bf16", "train.dtype=bfloat16"), "tiny")["final_val_loss"]
    print(f"\nshrunk tiny.yaml, 80 steps: val loss fp32 {fp32:.4f}, bf16 {bf16:.4f} ({(bf16 - fp32) / fp32:+.2%})")
    assert fp32 < 3.6  # it learned (uniform over 257 bytes: 5.55 nats), so the comparison means something
    assert bf16 != fp32  # the bf16 run did compute in bf16
    assert abs(bf16 - fp32) / fp32 < 0.03

    state = load_checkpoint(latest_checkpoint(tmp_path / "bf16" / "checkpoints"))
    assert {v.dtype for v in state["engine"]["model"].values()} == {BF16}
    assert {v.dtype for v in state["engine"]["main_params"].values()} == {torch.float32}

    # Resume the bf16 run from its step-40 checkpoint: steps 41-80 repeat bit for bit.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "bf16", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000080")
    (cut / "checkpoints" / "latest").unlink()
    train(_tiny(corpus, cut, "train.dtype=bfloat16", "train.resume=true"), "tiny")
    a, b = _records(tmp_path / "bf16", "train", "lm_loss"), _records(cut, "train", "lm_loss")
    assert [a[s] for s in (50, 60, 70, 80)] == [b[s] for s in (50, 60, 70, 80)]
    assert _records(tmp_path / "bf16", "val", "val_loss")[80] == _records(cut, "val", "val_loss")[80]


# -- DeepSpeedEngine on two ranks (ep=2) ---------------------------------------------------------


def _ds_groups(rank: int, world: int) -> ParallelGroups:
    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed insists on it; every pool rank is local
    parallel = ParallelConfig(dp=world, ep=2, engine="deepspeed")
    return init_groups(Topology.build(parallel, MODEL, MOE, BatchShape(BATCH, BATCH // world), world), timeout_minutes=2)


def _deepspeed(groups: ParallelGroups, stage: int, seed: int = 7) -> Any:
    from parallel.deepspeed_engine import DeepSpeedEngine
    from parallel.expert_parallel import apply_expert_parallel

    model = _model(seed)
    apply_expert_parallel(model, groups.ep)
    routers = [layer.router.weight_ED for layer in model.moe_layers()]
    return DeepSpeedEngine(model, groups, OPTIM, stage, False, watch_grads=routers, dtype=BF16)


def deepspeed_dtypes_and_resume(rank: int, world: int, stage: int) -> Result:
    groups = _ds_groups(rank, world)
    whole = _deepspeed(groups, stage)
    model = whole.module.module
    out: Result = {"params": {p.dtype for p in model.parameters()},
                   "buffers": {b.dtype for b in model.buffers() if b.is_floating_point()}}
    uninterrupted = _train(whole, groups, range(1))
    # After a step's backwards, before the next update: gradient accumulators and local grads.
    whole.zero_grad()
    x, y = _rank_slice(groups, 1)
    for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
        (whole.module(xm, ym).loss / 2).backward()
    opt = whole._runtime.optimizer
    if stage == 1:  # BF16_Optimizer: flat fp32 accumulation buffers
        accumulators = opt.fp32_groups_gradients_flat
    else:  # ZeRO-2: each group's reduced gradient partition
        accumulators = [t for v in opt.averaged_gradients.values() for t in (v if isinstance(v, list) else [v])]
    out["n_accumulators"] = len(accumulators)
    out["optimizer"] = type(opt).__name__
    out["accumulators"] = {a.dtype for a in accumulators}
    out["local_grads"] = {whole.local_grad(layer.router.weight_ED).dtype for layer in model.moe_layers()}
    whole.step(LRS[1])
    out["masters"] = {p.dtype for p in whole.fp32_partitions()}
    out["adam"] = {t.dtype for state in opt.optimizer.state.values() for k, t in state.items() if k != "step"}
    uninterrupted += _train(whole, groups, range(2, 3))

    first = _deepspeed(groups, stage)
    _train(first, groups, range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _deepspeed(groups, stage, seed=123)  # another init: all from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    out["uninterrupted"], out["resumed"] = uninterrupted[-1], _train(resumed, groups, range(2, 3))[0]
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_bf16_holds_fp32_masters_accumulators_and_adam_state_and_resumes_bit_exact(
    rank_pool: Callable[[int], RankPool], stage: int,
) -> None:
    for r in rank_pool(2).run(deepspeed_dtypes_and_resume, stage):
        assert r["params"] == {BF16} and r["buffers"] == {torch.float32}
        assert r["optimizer"] == ("BF16_Optimizer" if stage == 1 else "DeepSpeedZeroOptimizer")
        assert r["n_accumulators"] > 0 and r["accumulators"] == r["local_grads"] == {torch.float32}
        assert r["masters"] == r["adam"] == {torch.float32}
        assert r["resumed"] == r["uninterrupted"]


@pytest.mark.parametrize("layout", [
    ["parallel.dp=2", "parallel.ep=2"],
    ["parallel.tp=2"],
    ["parallel.pp=2", "train.micro_batch_size=2"],
    ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2"],
], ids=["dp2-ep2", "tp2", "pp2", "deepspeed-zero2"])
def test_bf16_layouts_train_like_one_process(
    corpus: Path, tmp_path: Path, start_within: Callable[..., dict[str, Any]], layout: list[str],
) -> None:
    """The training loop in bf16 across two ranks (the pipeline exchanging bf16 activations
    at pp=2) follows the one-process bf16 run: the same losses up to reduction order."""
    small = ["train.steps=4", "train.eval_every=4", "train.ckpt_every=4", "train.log_every=1", "train.batch_size=8",
             "launch.launcher=local", "train.dtype=bfloat16"]
    one = train(_tiny(corpus, tmp_path / "one", *small), "tiny")
    start_within(_tiny(corpus, tmp_path / "two", *small, *layout))
    a, b = _records(tmp_path / "one", "train", "lm_loss"), _records(tmp_path / "two", "train", "lm_loss")
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) / a[step] < 2e-3, (step, a[step], b[step])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert abs(summary["final_val_loss"] - one["final_val_loss"]) / one["final_val_loss"] < 2e-3
