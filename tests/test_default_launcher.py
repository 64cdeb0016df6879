"""Commands that train more than once per process, through the default (Ray) launcher:
``moe check-layouts`` starts one local Ray cluster per multi-rank layout, one after the
other, in the same process (as ``moe bench layouts`` does: tests/test_bench.py), and
``moe sweep`` starts one for the sweep, on which a multi-rank trial's ranks are actors.

They run as the real command line in a subprocess, without the test session's Ray
cluster (which the launcher would reuse, starting none) and without its token in the
environment: each local cluster is started by the command itself, as a user's would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.data import prepare, stdlib_sources
from test_layouts import SMALL

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
TIMEOUT_S = 420
# Set by a Ray cluster this test session may hold: the command must find none of them.
RAY_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out


def _moe(*args: str) -> subprocess.CompletedProcess[str]:
    """``moe ARGS`` in a fresh process that holds no Ray cluster or token."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_check_layouts_runs_multi_rank_layouts_through_the_default_launcher(corpus: Path, tmp_path: Path) -> None:
    """Two multi-rank layouts, each on a local Ray cluster of its own: expert parallelism
    (the all-to-all) and pipeline parallelism (send/recv). dp and tp through Ray add a
    cluster each (~10 s) and no launcher code; test_multirank_train and test_tp_pp run them locally."""
    out = tmp_path / "check"
    done = _moe("check-layouts", str(TINY), *SMALL, f"data.path={corpus}", "--layouts", "dp=1;ep=2;pp=2",
                "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    assert "all layouts agree" in done.stdout
    result = json.loads((out / "check-layouts.json").read_text())
    assert result["ok"] and result["engines"] == ["local", "megatron", "megatron"]
    assert all(len(records) == 2 for records in result["records"])
    # Each multi-rank layout started a local Ray cluster of its own, with its files in its run.
    runs = sorted(p.name for p in out.iterdir() if (p / "ray").is_dir())
    assert runs == ["1-ep2", "2-pp2"]


def test_a_sweep_trains_a_multi_rank_trial_through_the_default_launcher(corpus: Path, tmp_path: Path) -> None:
    """``moe sweep`` starts its local cluster; the trial's ranks are actors on it."""
    fixed = {
        "model.n_layers": 1, "model.n_heads": 2, "model.dim": 32, "moe.expert_ffn_dim": 64, "model.seq_len": 32,
        "train.batch_size": 4, "train.warmup_steps": 1, "train.eval_every": 1000, "train.ckpt_every": 1000,
        "train.log_every": 1, "data.val_tokens": 256, "data.path": str(corpus), "launch.threads": 1,
        "parallel.dp": 2, "parallel.ep": 2,
    }
    sweep = {"base": str(TINY), "out_dir": str(tmp_path / "out"), "tokens": 2 * 4 * 32, "fixed": fixed,
             "grid": {"moe.num_experts": [4]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    done = _moe("sweep", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "[sweep] done:" in done.stdout and "(1/1 finished)" in done.stdout
    [trial] = (tmp_path / "out" / "trials").iterdir()
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["layout"]["world_size"] == 2
    assert sorted(p.name for p in (trial / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
