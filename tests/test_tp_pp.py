"""Tensor (+ sequence, + expert, + expert-tensor) parallelism inside pipeline stages, against
one process.

World 4: tp=2 x pp=2 (and pp=2 x dp=2 with etp=2). Every rank builds the reference model from one seed, shards it
(``apply_expert_parallel``, ``apply_tensor_parallel``), keeps its pipeline chunks
(``split_stages``) and runs megatron's schedule over a fixed batch; the reference runs the
whole batch as micro-batches in this (the pytest) process. Compared: LM/aux/z losses,
per-expert counts, every parameter's gradient (after the reductions the engine performs,
shards gathered back, padded vocabulary rows dropped and checked zero), the gradient norm
and the parameters after one AdamW step; and a 3-step ``Run`` against the single-process run.

The model has a vocabulary not divisible by tp (padded rows), tied embeddings (first and
last stage hold copies of one vocabulary shard), a shared expert, dense and MoE layers on
each stage, and large routing-loss coefficients (a dropped or mis-scaled stage-0 aux loss
fails the router-gradient comparison).
"""

from __future__ import annotations

from collections.abc import Callable
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
from parallel.groups import ParallelGroups, init_groups
from parallel.pipeline import PipelineRunner, pipeline_config, split_stages
from parallel.reduce import mean_over, sum_over
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import BatchShape, Topology
from run_testing import assert_runs_agree, run_config, train_in_pool

MODEL = ModelConfig(dim=32, n_layers=4, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=63, moe_every=2,
                    activation="swiglu", tie_embeddings=True)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, activation="swiglu",
                aux_loss_coeff=0.5, z_loss_coeff=0.1)
BATCH = 8
MICRO = 2  # rows per micro-batch: one sequence per TP rank inside MoE layers / with SP
OPTIM = OptimSettings(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
TOL = 1e-5
SEED = 7
N_MOE = sum(MODEL.is_moe_layer(i) for i in range(MODEL.n_layers))


def _micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000)
    ids = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=gen)
    return list(zip(ids[:, :-1].split(MICRO), ids[:, 1:].split(MICRO), strict=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _reference() -> dict[str, Any]:
    """Gradients of the mean over micro-batches of ``lm + aux + z``, then one AdamW step."""
    torch.manual_seed(SEED)
    net = Transformer(MODEL, MOE)
    micro = _micro_batches()
    sums = torch.zeros(3)
    counts_LE = torch.zeros(N_MOE, MOE.num_experts)
    for x, y in micro:
        out = net(x, y)
        (out.loss / len(micro)).backward()
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
    params["lm_head.weight"], grads["lm_head.weight"] = params["embed.weight"], grads["embed.weight"]
    return {"losses": sums, "counts": counts_LE, "grads": grads, "norm": norm, "params": params}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _reference()


# -- rank task (top level: the pool pickles it by reference) ------------------------------


def _gather(shard: torch.Tensor, param: torch.nn.Parameter, groups: ParallelGroups) -> torch.Tensor:
    """The full tensor of a (expert-)tensor-parallel shard; experts stay split over ep."""
    expert = getattr(param, "allreduce", True) is False
    group = groups.etp if expert else groups.tp
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(group.size())]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _reduced_grad(engine: MegatronEngine, param: torch.nn.Parameter, chunk: Any, groups: ParallelGroups) -> torch.Tensor:
    """This rank's gradient after the engine's reductions: embedding-group sum of tied copies,
    tp sum of sequence-parallel-marked parameters, dp mean (experts: edp sum over dp)."""
    grad = engine.local_grad(param).clone()
    if param is chunk.tied_weight():
        grad = sum_over(grad, groups.embd)
    if getattr(param, "sequence_parallel", False):
        grad = sum_over(grad, groups.tp)
    expert = getattr(param, "allreduce", True) is False
    return sum_over(grad, groups.edp if expert else groups.dp) / groups.dp_size


def tp_pp_step(rank: int, world: int, layout: dict[str, Any]) -> dict[str, Any]:
    """One training step through the schedule and the engine at ``layout``; full tensors back."""
    parallel = ParallelConfig(**layout)
    topology = Topology.build(parallel, MODEL, MOE, BatchShape(BATCH, MICRO), world)
    groups = init_groups(topology, timeout_minutes=1)
    torch.manual_seed(SEED)
    net = Transformer(MODEL, MOE)
    if parallel.ep > 1:
        apply_expert_parallel(net, groups.ep)
    apply_tensor_parallel(net, groups, parallel.sequence_parallel)
    chunks = split_stages(net, groups.pp.rank(), parallel.pp, parallel.vpp)
    engine = MegatronEngine(chunks, groups, OPTIM, pipeline_config(MODEL, parallel.pp, parallel.vpp, parallel.tp))
    runner = PipelineRunner(engine.modules, chunks, N_MOE, MOE.num_experts, parallel.tp, parallel.sequence_parallel)
    micro = _micro_batches()[groups.dp_rank :: groups.dp_size]
    engine.zero_grad()
    stats = runner.run(micro, None, forward_only=False)
    losses = mean_over(sum_over(stats.sums_4, groups.pp) / len(micro), groups.dp)[:3]
    counts = sum_over(sum_over(stats.counts_LE, groups.pp), groups.dp)
    named = [(n, p, c) for c in chunks for n, p in c.named_parameters()]
    grads = {n: _gather(_reduced_grad(engine, p, c, groups), p, groups) for n, p, c in named}
    norm = engine.step(OPTIM.lr)
    params = {n: _gather(p.detach(), p, groups) for n, p, _ in named}
    return {"losses": losses, "counts": counts, "grads": grads, "norm": norm, "params": params,
            "ep": (groups.ep_rank, parallel.ep)}


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
            want = _expected(name, ref["grads"][name], r["ep"])
            assert torch.all(grad[want.shape[0] :] == 0), f"{name}: padded vocabulary rows got a gradient"
            assert _rel(grad[: want.shape[0]], want) <= TOL, name
            # AdamW's first step moves each weight by about lr·g/(|g| + eps): where |g| is near
            # eps (1e-8) the summation-order noise of a TP-split gradient shows, so the update
            # is compared in units of lr rather than relative to the weights.
            want = _expected(name, ref["params"][name], r["ep"])
            assert (r["params"][name][: want.shape[0]] - want).abs().max() <= 1e-2 * OPTIM.lr, name
        seen |= set(r["grads"])
    assert seen == set(ref["grads"])  # every parameter lives on some stage


@pytest.mark.parametrize(
    "layout",
    [
        {"tp": 2, "pp": 2},
        {"tp": 2, "pp": 2, "sequence_parallel": True},
        {"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True},
        {"tp": 2, "pp": 2, "ep": 2},
        {"tp": 2, "pp": 2, "etp": 2, "sequence_parallel": True},
        {"pp": 2, "dp": 2, "etp": 2},
    ],
    ids=["tp2-pp2", "tp2-pp2-sp", "tp2-pp2-vpp2-sp", "tp2-pp2-ep2", "tp2-pp2-etp2-sp", "pp2-dp2-etp2"],
)
def test_tensor_and_pipeline_parallel_match_one_process(
    rank_pool: Callable[[int], RankPool], reference: dict[str, Any], layout: dict[str, Any]
) -> None:
    _check(rank_pool(4).run(tp_pp_step, layout), reference)


# -- the training loop (launch/train.py Run) at tp=2 x pp=2 --------------------------------

def test_run_at_tp2_pp2_trains_like_one_process(
    rank_pool: Callable[[int], RankPool], small_corpus: Path, tmp_path: Path
) -> None:
    from launch.train import train

    train(run_config(small_corpus, tmp_path / "single"), "tiny")
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]
    rank_pool(4).run(train_in_pool, run_config(small_corpus, tmp_path / "tp-pp", *layout), timeout=300)
    assert_runs_agree(tmp_path / "single", tmp_path / "tp-pp", TOL)
