"""Shared pieces of the tests that train a few steps under a layout and compare the run's
metrics with one process's (tests/test_pipeline.py, tests/test_tp_pp.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
RUN_OVERRIDES = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32", "moe.aux_loss_coeff=0.1",
    "moe.aux_loss_scope=global_batch", "train.batch_size=8", "train.micro_batch_size=2", "train.steps=3",
    "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3", "train.ckpt_every=3",
    "data.val_tokens=1024", "launch.threads=1", "launch.timeout_minutes=2",
]
RUN_KEYS = ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "router_grad_norm")


def run_config(corpus: Path, run_dir: Path, *overrides: str) -> Any:
    """configs/tiny.yaml shrunk by ``RUN_OVERRIDES``, on ``corpus``, writing to ``run_dir``."""
    from launch.config import load_config

    return load_config(TINY, [*RUN_OVERRIDES, f"data.path={corpus}", f"train.run_dir={run_dir}", *overrides])


def train_in_pool(rank: int, world: int, cfg: Any) -> dict[str, Any]:
    """One rank of ``cfg``'s layout, run by a ``rank_pool`` worker."""
    from launch.train import train_rank

    return train_rank(cfg, "tiny")


def _records(run_dir: Path) -> tuple[list[dict[str, Any]], list[float]]:
    from launch.metrics import read_metrics

    records = read_metrics(run_dir)
    return [r for r in records if r["kind"] == "train"], [r["val_loss"] for r in records if r["kind"] == "val"]


def assert_runs_agree(reference_dir: Path, run_dir: Path, rtol: float) -> None:
    """Every step's losses and norms within ``rtol``, tokens per expert equal, validation too."""
    (ref_steps, ref_val), (steps, val) = _records(reference_dir), _records(run_dir)
    assert len(ref_steps) == len(steps) == 3
    for ref, got in zip(ref_steps, steps, strict=True):
        for key in RUN_KEYS:
            assert got[key] == pytest.approx(ref[key], rel=rtol, abs=1e-9), (ref["step"], key)
        assert got["expert_tokens"] == ref["expert_tokens"]
    assert val == pytest.approx(ref_val, rel=rtol)
