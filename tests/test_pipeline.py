"""Pipeline parallelism (parallel/pipeline.py) with megatron-core's schedules against one process.

Every rank builds the same tiny MoE transformer from the same seed, keeps its pipeline
chunks and runs megatron's 1F1B or interleaved schedule over its data-parallel slice of a
fixed global batch. The reference runs the whole batch as micro-batches in this (the pytest)
process. Compared: LM/aux/z losses, per-expert counts, every parameter's gradient (the
global-batch mean), the gradient norm and the parameters after one AdamW step.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from parallel.config import ParallelConfig
from parallel.engine import MegatronEngine, OptimSettings
from parallel.expert_parallel import apply_expert_parallel
from parallel.groups import init_groups
from parallel.pipeline import PipelineRunner, pipeline_config, split_stages, stage_layers
from parallel.reduce import mean_over, sum_over
from parallel.topology import BatchShape, Topology
from run_testing import assert_runs_agree, run_config, train_in_pool

# Large routing-loss coefficients: a stage's aux/z loss that were dropped or mis-scaled
# would move the routers' gradients far beyond the tolerance (checked below).
MODEL = ModelConfig(dim=32, n_layers=4, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=1)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, aux_loss_coeff=0.5, z_loss_coeff=0.1)
BATCH = 8
MICRO = 2  # rows per micro-batch
OPTIM = OptimSettings(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
TOL = 1e-5
SEED = 7


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000)
    ids = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _micro_batches(dp: int, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _batch()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    return list(zip(x[rows].split(MICRO), y[rows].split(MICRO), strict=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _n_moe(model: ModelConfig = MODEL) -> int:
    return sum(model.is_moe_layer(i) for i in range(model.n_layers))


# -- the reference: one process, whole batch ------------------------------------------


def _reference(stage0_aux_scale: float = 1.0, model: ModelConfig = MODEL) -> dict[str, Any]:
    """Gradients of mean over micro-batches of ``lm + aux + z``; ``stage0_aux_scale`` scales
    the routing losses of the layers a pp=2 pipeline puts on its first stage (1 = correct)."""
    torch.manual_seed(SEED)
    net = Transformer(model, MOE)
    micro = _micro_batches(1, 0)
    stage0 = set(stage_layers(model.n_layers, 2, 1, 0)[0])
    sums = torch.zeros(3)
    counts_LE = torch.zeros(_n_moe(model), MOE.num_experts)
    for x, y in micro:
        out = net(x, y)
        routing = [(s.aux_loss + s.z_loss) * (stage0_aux_scale if i in stage0 else 1.0) for i, s in enumerate(out.moe_stats)]
        (out.lm_loss + sum(routing)).div(len(micro)).backward()
        sums += torch.stack([out.lm_loss, out.aux_loss, out.z_loss]).detach() / len(micro)
        counts_LE += torch.stack([s.tokens_per_expert_E for s in out.moe_stats])
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), OPTIM.grad_clip).item()
    decay = [p for p in net.parameters() if p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps,
    )
    opt.step()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    params["lm_head.weight"] = net.lm_head.weight.detach().clone()
    grads["lm_head.weight"] = grads["embed.weight"]
    return {"losses": sums, "counts": counts_LE, "grads": grads, "norm": norm, "params": params}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _reference()


# -- rank tasks (top level: the pool pickles them by reference) ------------------------


def pipeline_step(rank: int, world: int, layout: dict[str, int], n_layers: int = MODEL.n_layers) -> dict[str, Any]:
    """One training step through the schedule and the engine on this rank's chunks."""
    parallel = ParallelConfig(**layout)
    model = dataclasses.replace(MODEL, n_layers=n_layers)
    dp = parallel.dp
    topology = Topology.build(parallel, model, MOE, BatchShape(BATCH, MICRO), world)
    groups = init_groups(topology, timeout_minutes=1)
    torch.manual_seed(SEED)
    net = Transformer(model, MOE)
    if parallel.ep > 1:
        apply_expert_parallel(net, groups.ep)
    ends = (topology.first_stage_layers, topology.last_stage_layers)
    chunks = split_stages(net, groups.pp.rank(), parallel.pp, parallel.vpp, *ends)
    engine = MegatronEngine(chunks, groups, OPTIM, pipeline_config(model, parallel.pp, parallel.vpp, 1, *ends))
    runner = PipelineRunner(engine.modules, chunks, _n_moe(model), MOE.num_experts)
    micro = _micro_batches(dp, groups.dp_rank)
    engine.zero_grad()
    stats = runner.run(micro, None, forward_only=False)
    losses = mean_over(sum_over(stats.sums_4, groups.pp) / len(micro), groups.dp)[:3]
    counts = sum_over(sum_over(stats.counts_LE, groups.pp), groups.dp)
    grads = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            expert = getattr(param, "allreduce", True) is False
            grad = sum_over(engine.local_grad(param).clone(), groups.edp if expert else groups.dp) / dp
            if param is chunk.tied_weight() and parallel.pp > 1:
                grad = sum_over(grad, groups.embd)
            grads[name] = grad
    norm = engine.step(OPTIM.lr)
    params = {n: p.detach().clone() for chunk in chunks for n, p in chunk.named_parameters()}
    return {"losses": losses, "counts": counts, "grads": grads, "norm": norm, "params": params,
            "ep": (groups.ep_rank, parallel.ep), "layers": [list(c.blocks) for c in chunks]}


def _expected(name: str, ref: torch.Tensor, ep: tuple[int, int]) -> torch.Tensor:
    """The reference tensor for this rank's copy of ``name`` (its experts' rows under EP)."""
    ep_rank, ep_size = ep
    if name.endswith(("w_in_EDF", "w_out_EFD")) and ep_size > 1:
        return ref.chunk(ep_size)[ep_rank]
    return ref


def _check(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    seen = set()
    for r in results:
        assert _rel(r["losses"], ref["losses"]) <= TOL, (r["losses"], ref["losses"])
        assert torch.equal(r["counts"], ref["counts"])
        assert abs(r["norm"] - ref["norm"]) <= TOL * ref["norm"]
        for name, grad in r["grads"].items():
            assert _rel(grad, _expected(name, ref["grads"][name], r["ep"])) <= TOL, name
            assert _rel(r["params"][name], _expected(name, ref["params"][name], r["ep"])) <= TOL, name
        seen |= set(r["grads"])
    assert seen == set(ref["grads"])  # every parameter lives on some stage


# -- tests -------------------------------------------------------------------------------


def test_stage_assignment_is_megatrons_interleaving() -> None:
    assert stage_layers(8, 2, 2, 0) == [[0, 1], [4, 5]]
    assert stage_layers(8, 2, 2, 1) == [[2, 3], [6, 7]]
    assert stage_layers(4, 2, 1, 1) == [[2, 3]]
    # uneven: the first/last counts are the whole rank's, split evenly over its virtual stages
    assert [stage_layers(4, 2, 1, r, first=1) for r in range(2)] == [[[0]], [[1, 2, 3]]]
    assert [stage_layers(6, 2, 2, r, first=2) for r in range(2)] == [[[0], [3]], [[1, 2], [4, 5]]]
    qwen3_235b = [stage_layers(94, 8, 1, r, 11, 11)[0] for r in range(8)]  # 11, 12 x 6, 11
    assert [(layers[0], layers[-1]) for layers in qwen3_235b] == [(0, 10), *((11 + 12 * i, 22 + 12 * i) for i in range(6)), (83, 93)]
    assert [stage_layers(16, 3, 2, r, None, 4) for r in range(3)] == [
        [[0, 1, 2], [8, 9, 10]], [[3, 4, 5], [11, 12, 13]], [[6, 7], [14, 15]]]


def test_stage_split_is_megatron_cores() -> None:
    """Every split megatron-core builds (``get_transformer_layer_offset`` and
    ``get_num_layers_to_build``, from the config ``pipeline_config`` gives it) is ours, and
    the topology accepts exactly the splits megatron accepts with at least one layer per
    virtual stage."""
    import warnings

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from moe.config import ConfigError

    compared = 0
    for n, pp, vpp in [(n, pp, vpp) for n in (4, 6, 7, 9, 12) for pp in (2, 3, 4) for vpp in (1, 2)]:
        for first in (None, 1, 2, 3, 4):
            for last in (None, 1, 2, 4):
                model = ModelConfig(dim=8, n_layers=n, n_heads=2, ffn_dim=8)
                parallel = ParallelConfig(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
                try:
                    Topology.build(parallel, model, MOE, BatchShape(24, 1), pp)
                    ours = [stage_layers(n, pp, vpp, r, first, last) for r in range(pp)]
                except ConfigError:
                    ours = None
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        config = pipeline_config(model, pp, vpp, 1, first, last)
                    theirs = [[list(range(get_transformer_layer_offset(config, v if vpp > 1 else None, r),
                                          get_transformer_layer_offset(config, v if vpp > 1 else None, r)
                                          + get_num_layers_to_build(config, v if vpp > 1 else None, r)))
                               for v in range(vpp)] for r in range(pp)]
                    if not all(chunk for rank in theirs for chunk in rank):  # megatron accepts empty or negative counts
                        theirs = None
                except (ValueError, AssertionError):
                    theirs = None
                assert ours == theirs, (n, pp, vpp, first, last)
                compared += ours is not None
    assert compared > 100


@pytest.mark.parametrize("layout", [{"pp": 2}, {"pp": 2, "vpp": 2}], ids=["1f1b", "interleaved"])
def test_pipeline_matches_one_process(
    rank_pool: Callable[[int], RankPool], reference: dict[str, Any], layout: dict[str, int]
) -> None:
    results = rank_pool(2).run(pipeline_step, layout)
    _check(results, reference)
    if layout.get("vpp"):
        assert results[0]["layers"] == [["0"], ["2"]] and results[1]["layers"] == [["1"], ["3"]]


@pytest.mark.parametrize(
    ("layout", "n_layers", "layers"),
    [
        ({"pp": 2, "first_stage_layers": 1}, 4, [[["0"]], [["1", "2", "3"]]]),
        ({"pp": 2, "vpp": 2, "first_stage_layers": 2}, 6, [[["0"], ["3"]], [["1", "2"], ["4", "5"]]]),
    ],
    ids=["1f1b-first1", "interleaved-6layers-first2"],
)
def test_uneven_pipeline_matches_one_process(
    rank_pool: Callable[[int], RankPool], layout: dict[str, int], n_layers: int, layers: list[list[list[str]]]
) -> None:
    """Uneven stages (``parallel.first_stage_layers``): chunks of different sizes through
    megatron's schedules, each rank holding exactly the layers megatron-core would build."""
    results = rank_pool(2).run(pipeline_step, layout, n_layers)
    assert [r["layers"] for r in results] == layers
    _check(results, _reference(model=dataclasses.replace(MODEL, n_layers=n_layers)))


@pytest.mark.parametrize(
    ("layout", "n_layers"),
    [({"pp": 2, "first_stage_layers": 1}, 4), ({"pp": 2, "vpp": 2, "first_stage_layers": 2}, 6),
     ({"pp": 4, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 2}, 12), ({"pp": 4, "last_stage_layers": 1}, 7)],
)
def test_simulator_predicts_the_stages_training_builds(layout: dict[str, int], n_layers: int) -> None:
    """``moe simulate``'s per-rank parameters (``rank_params``: names, sizes, the chunk whose
    buffers hold them) are those ``split_stages`` gives each rank, uneven stages included."""
    from parallel.simulator.predict import Layout, rank_params

    parallel = ParallelConfig(**layout)
    model = dataclasses.replace(MODEL, n_layers=n_layers)
    lay = Layout.build(parallel, model, MOE, BATCH, MICRO)
    for rank in range(parallel.pp):
        chunks = split_stages(Transformer(model, MOE), rank, parallel.pp, parallel.vpp,
                              parallel.first_stage_layers, parallel.last_stage_layers)
        built = {(name, p.numel(), c) for c, chunk in enumerate(chunks) for name, p in chunk.named_parameters()}
        assert {(s.name, s.numel, s.chunk) for s in rank_params(model, MOE, lay, rank)} == built, rank


@pytest.mark.parametrize("layout", [{"pp": 2, "ep": 2, "dp": 2}, {"pp": 2, "dp": 2}], ids=["pp2-ep2", "pp2-dp2"])
def test_pipeline_with_expert_and_data_parallel_matches_one_process(
    rank_pool: Callable[[int], RankPool], reference: dict[str, Any], layout: dict[str, int]
) -> None:
    _check(rank_pool(4).run(pipeline_step, layout), reference)


def test_first_stage_aux_loss_reaches_its_routers_with_the_right_scale(reference: dict[str, Any]) -> None:
    """The comparison above is sensitive to a dropped or mis-scaled aux/z loss on stage 0:
    the routers of stage-0 MoE layers would be off by far more than the tolerance."""
    stage0 = [f"blocks.{i}.ffn.router.weight_ED" for i in stage_layers(MODEL.n_layers, 2, 1, 0)[0]]
    for wrong_scale in (0.0, len(_micro_batches(1, 0))):  # dropped; scaled 1 instead of 1/M
        wrong = _reference(stage0_aux_scale=wrong_scale)["grads"]
        assert min(_rel(wrong[n], reference["grads"][n]) for n in stage0) > 100 * TOL


# -- megatron_compat: the schedule's and p2p's CUDA assumptions ------------------------------

CUDA_ERROR = "Torch not compiled with CUDA enabled"


def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return ""


def _compat_ladder(rank: int, store: str, out: mp.Queue) -> None:
    """In a fresh interpreter (unpatched megatron-core), rank ``rank`` of a pp=2 pipeline:
    the schedule fails without each pipeline patch and runs with both."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        from parallel import megatron_compat

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
        torch.manual_seed(SEED)
        chunk = split_stages(Transformer(MODEL, MOE), rank, 2, 1)[0]
        chunk.config = pipeline_config(MODEL, 2, 1)  # what the schedule reads off a (DDP) chunk
        runner = PipelineRunner([chunk], [chunk], _n_moe(), MOE.num_experts)
        micro = _micro_batches(1, 0)
        report = {"unpatched": _error(lambda: runner.run(micro, None, forward_only=True))}
        megatron_compat.patch_pipeline_schedules_token_count()
        shape = (MODEL.seq_len, MICRO, MODEL.dim)
        p2p = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), chunk.config)
        # Both ranks fail while allocating the receive buffer, before any message is posted.
        report["schedules_only"] = _error(lambda: p2p.recv_forward(shape, is_first_stage=False))
        megatron_compat.patch_pipeline_p2p_device()
        with torch.no_grad():
            report["lm_losses"] = runner.run(micro, None, forward_only=True).lm_losses
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        out.put((rank, True, report))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def test_pipeline_compat_patches_each_needed(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_compat_ladder, args=(r, str(tmp_path / "store"), out), daemon=True) for r in (0, 1)]
    for proc in procs:
        proc.start()
    reports: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, ok, report = out.get(timeout=150)
            assert ok, f"rank {rank}:\n{report}"
            reports[rank] = report
    except queue.Empty:
        pytest.fail("the pipeline compat ladder did not finish within 150 s")
    finally:
        for proc in procs:
            proc.kill()
            proc.join(timeout=10)
    for report in reports.values():
        assert CUDA_ERROR in report["unpatched"]
        assert CUDA_ERROR in report["schedules_only"]
    torch.manual_seed(SEED)
    net = Transformer(MODEL, MOE)
    with torch.no_grad():
        expected = [net(x, y).lm_loss.item() for x, y in _micro_batches(1, 0)]
    assert reports[0]["lm_losses"] == []
    assert reports[1]["lm_losses"] == pytest.approx(expected, rel=1e-6)


# -- the training loop (launch/train.py Run) under pipeline layouts -----------------------

@pytest.mark.parametrize(
    ("model", "layout"),
    [
        ([], ["parallel.pp=2"]),
        ([], ["parallel.pp=2", "parallel.vpp=2"]),
        # hash routers on every stage read the token ids, not only the first stage's embedding
        (["moe.router=hash", "moe.top_k=1", "moe.normalize_weights=false"], ["parallel.pp=2"]),
        # uneven stages: 6 layers as [0] [3] on the first rank, [1, 2] [4, 5] on the last
        (["model.n_layers=6"], ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=2"]),
    ],
    ids=["pp2", "pp2-vpp2", "pp2-hash-router", "pp2-vpp2-6layers-first2"],
)
def test_run_trains_like_one_process(
    rank_pool: Callable[[int], RankPool], small_corpus: Path, tmp_path: Path, model: list[str], layout: list[str]
) -> None:
    from launch.train import train

    train(run_config(small_corpus, tmp_path / "single", *model), "tiny")
    rank_pool(2).run(train_in_pool, run_config(small_corpus, tmp_path / "pp", *model, *layout), timeout=240)
    assert_runs_agree(tmp_path / "single", tmp_path / "pp", TOL)
