"""The routing menu under the layout-invariance harness: sigmoid scores with aux-loss-free
bias balancing, group-limited routing and fine-grained experts (granularity 2) together,
trained in one process, ``dp=2``, ``dp=2,ep=2``, ``tp=2,ep=2`` and ``pp=2`` through
``launch.check_layouts``' code path, and compared on the LM, aux and z-losses, the routers'
gradient norm, the routed tokens per expert and the expert bias of every MoE layer
(``compare`` requires the bias to be identical: it moves by +-u on integer counts)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.check_layouts import Layout, compare, layout_configs, parse_layouts, train_records
from launch.config import Config
from launch.data import prepare, stdlib_sources
from launch.train import train, train_rank
from multirank import RankPool

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 4
RTOL = 1e-5  # moe check-layouts' default
# 4 coarse experts top-1 at granularity 2: 8 experts of width 16, 2 per token, in 4 groups
# of 2 of which the best 2 are eligible. u = 1e-2: after 3 updates the bias is as large as
# the spread of the sigmoid scores of a freshly initialised router (std 0.02 weights), so it
# takes part in the choice of the last steps.
ROUTING = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
    "model.vocab_size=257", "moe.num_experts=4", "moe.top_k=1", "moe.granularity=2", "moe.expert_ffn_dim=32",
    "moe.normalize_weights=true", "moe.score=sigmoid", "moe.routed_scaling_factor=2.5",
    "moe.expert_bias_update_rate=1e-2", "moe.n_groups=4", "moe.topk_groups=2", "moe.aux_loss_scope=global_batch",
    "train.batch_size=8", "train.warmup_steps=2", "train.lr=1e-3", "train.grad_clip=0.5", "data.val_tokens=256",
    "launch.threads=1", "launch.timeout_minutes=2",
]
LAYOUTS = "dp=1;dp=2;dp=2,ep=2;tp=2,ep=2;pp=2"


def _train_layout(rank: int, world_size: int, cfg: Config) -> None:
    """One rank of a layout, as a launcher's rank runs it."""
    os.environ["LOCAL_RANK"] = str(rank)
    train_rank(cfg, "tiny")


def test_sigmoid_bias_groups_granularity_agree_across_layouts(
    tmp_path: Path, rank_pool: Callable[[int], RankPool]
) -> None:
    corpus = tmp_path / "stdlib-small"
    prepare(stdlib_sources()[:20], corpus, val_fraction=0.2)
    layouts, configs = layout_configs(
        TINY, [*ROUTING, f"data.path={corpus}"], parse_layouts(LAYOUTS), STEPS, tmp_path / "runs"
    )
    results = []
    for cfg in configs:
        if cfg.parallel.world_size == 1:
            train(cfg, "tiny")
        else:
            rank_pool(cfg.parallel.world_size).run(_train_layout, cfg, timeout=240)
        results.append(train_records(Path(str(cfg.train.run_dir))))
    lines, ok = compare(results, layouts, RTOL)
    print("\n".join(lines))
    assert ok, "\n".join(lines)
    reference = results[0]
    assert all(len(r["expert_tokens"]) == 4 and len(r["expert_tokens"][0]) == 8 for r in reference)
    assert all(len(records) == STEPS and all("expert_bias" in r for r in records) for records in results)
    last_bias = reference[-1]["expert_bias"]
    assert {abs(b) for row in last_bias for b in row} - {0.0}, "the bias never moved"
    # Each token takes 2 experts from its 2 eligible groups of 2, so group limiting decides.
    assert all(sum(row) == 8 * 16 * 2 for r in reference for row in r["expert_tokens"])


def test_compare_fails_on_a_differing_expert_bias() -> None:
    """``compare`` (``moe check-layouts``) requires the logged expert bias to be identical."""
    record = {"lm_loss": 5.0, "aux_loss": 0.01, "z_loss": 1e-3, "router_grad_norm": 0.1, "expert_tokens": [[4, 4]],
              "expert_bias": [[0.01, -0.01]]}
    layouts = [Layout("dp=1", [], "local"), Layout("dp=2", [], "megatron")]
    assert compare([[record], [dict(record)]], layouts, RTOL)[1]
    assert not compare([[record], [{**record, "expert_bias": [[-0.01, 0.01]]}]], layouts, RTOL)[1]


def test_expert_bias_survives_a_resume_into_another_layout(tmp_path: Path, rank_pool: Callable[[int], RankPool]) -> None:
    """The bias rides in the sharded checkpoint's extras: a dp=2,ep=2 run cut after step 2
    and resumed under tp=2,ep=2 logs the bias of the uninterrupted run at steps 3 and 4."""
    corpus = tmp_path / "stdlib-small"
    prepare(stdlib_sources()[:20], corpus, val_fraction=0.2)
    (_, full), (_, other) = zip(*layout_configs(
        TINY, [*ROUTING, f"data.path={corpus}"], parse_layouts("dp=2,ep=2;tp=2,ep=2"), STEPS, tmp_path / "runs"))
    full = dataclasses.replace(full, train=dataclasses.replace(full.train, ckpt_every=2))
    rank_pool(2).run(_train_layout, full, timeout=240)
    cut = tmp_path / "cut"
    shutil.copytree(Path(str(full.train.run_dir)), cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").unlink()
    resumed = dataclasses.replace(other, train=dataclasses.replace(
        other.train, ckpt_every=2, run_dir=str(cut), resume=True))
    rank_pool(2).run(_train_layout, resumed, timeout=240)
    want = {r["step"]: r["expert_bias"] for r in train_records(Path(str(full.train.run_dir)))}
    got = {r["step"]: r["expert_bias"] for r in train_records(cut)}
    assert sorted(got) == [1, 2, 3, 4] and got == want
