"""``moe eval``: the validation loss a run logged, reproduced from its checkpoint under the
run's layout and under others (the checkpoint is resharded on load), through the launcher
the config names (the default, Ray: the session's local cluster, or one the command starts
itself; ``launch.launcher=local``), on another prepared dataset, and on a text file; the
JSON result never overwrites a file; nothing is written into the evaluated run; bad inputs
are one error.

No module-level ``import ray`` (see conftest.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_testing import run_config

from launch.data import DataError, prepare, stdlib_sources
from launch.rank import RankFailure
from launch.data.bpe import main as tokenizer_main
from launch.eval.evaluate import evaluate, file_tokens
from launch.data.tokenizer import ByteTokenizer
from launch.metrics import read_metrics
from moe.config import ConfigError
from parallel.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
# Set by the Ray cluster this test session holds: a command run as a user runs it finds none of them.
RAY_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def dp2_ep2_run(
    corpus: Path, tmp_path_factory: pytest.TempPathFactory, start_within: Callable[..., dict[str, Any]],
    ray_cluster: Path,
) -> tuple[Path, float]:
    """The default run's layout (Makefile: parallel.dp=2 parallel.ep=2) through the default
    launcher (Ray: the session's cluster), 3 steps, a sharded checkpoint at the end; its run
    directory and the final validation loss it logged. Its config names the Ray launcher, so
    does every evaluation of it that does not override ``launch.launcher``."""
    run_dir = tmp_path_factory.mktemp("runs") / "dp2-ep2"
    cfg = run_config(corpus, run_dir, "parallel.dp=2", "parallel.ep=2")
    assert cfg.launch.launcher == "ray"
    summary = start_within(cfg)
    logged = [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "val"]
    assert summary["final_val_loss"] == logged[-1]
    return run_dir, logged[-1]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp=2", "parallel.ep=2"],  # the run's own, through its config's launcher: Ray (the default)
        [],  # one process (the checkpoint's layout is kept unless overridden: this says dp=1, ep=1)
        ["parallel.tp=2", "launch.launcher=local"],
    ],
    ids=["dp2-ep2-ray", "one-process", "tp2-local"],
)
def test_eval_reproduces_the_logged_validation_loss(
    dp2_ep2_run: tuple[Path, float], tmp_path: Path, layout: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    run_dir, logged = dp2_ep2_run
    before = _tree(run_dir)
    overrides = layout or ["parallel.dp=1", "parallel.ep=1"]
    record, written = evaluate(run_dir, overrides, None, str(tmp_path / "eval.json"))
    assert abs(record["loss"] - logged) <= 1e-6, (record["loss"], logged)
    assert record["perplexity"] == pytest.approx(math.exp(logged), rel=1e-6)
    assert record["step"] == 3 and record["tokens"] == 1024
    assert json.loads(written.read_text()) == record
    assert _tree(run_dir) == before  # the launch's logs went to a directory of its own
    if layout:
        assert "eval: 100%" in capfd.readouterr().err  # rank 0's progress bar, echoed by the launcher


def test_a_failing_rank_is_the_launchers_one_report_and_its_logs_are_kept(
    dp2_ep2_run: tuple[Path, float], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A rank that fails (here: reading a checkpoint file cut in half, which only the ranks
    read) is reported by the Ray launcher as the first failure, with its log; eval keeps the
    logs and says where; nothing is written at --out."""
    run_dir, _ = dp2_ep2_run
    ckpt = tmp_path / "step-00000003"
    shutil.copytree(run_dir / "checkpoints" / "step-00000003", ckpt)
    largest = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    out = tmp_path / "eval.json"
    with pytest.raises(RankFailure, match=r"rank \d of 2 failed first \(.+\); the other ranks were stopped") as err:
        evaluate(ckpt, ["parallel.dp=2", "parallel.ep=2"], None, str(out))
    log = Path(str(err.value).rsplit("Its log: ", 1)[1])
    assert log.is_file() and log.parent.name == "logs"
    assert f"rank logs are kept in {log.parent}" in capfd.readouterr().err
    assert not out.exists()
    shutil.rmtree(log.parent.parent)


def test_moe_eval_starts_its_own_local_ray_cluster(dp2_ep2_run: tuple[Path, float], tmp_path: Path) -> None:
    """``moe eval`` as a user runs it, in a process holding no Ray cluster or token: the
    multi-rank layout runs on a local Ray cluster the command starts (its files in the
    launch's temporary directory, removed afterwards) and reproduces the logged loss."""
    run_dir, logged = dp2_ep2_run
    before = _tree(run_dir)
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    with tempfile.TemporaryDirectory(dir="/tmp") as temp:  # short: Ray's socket paths live under it
        env["TMPDIR"] = temp
        out = tmp_path / "eval.json"
        done = subprocess.run([sys.executable, "-m", "launch.cli", "eval", str(run_dir), "--out", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert list(Path(temp).iterdir()) == []  # the launch's directory (logs, the cluster's files) is gone
    assert "Traceback" not in done.stderr
    record = json.loads(out.read_text())
    assert record["layout"]["world_size"] == 2 and abs(record["loss"] - logged) <= 1e-6
    assert _tree(run_dir) == before


def test_a_per_rank_checkpoint_evaluates_under_another_layout(corpus: Path, tmp_path: Path, ray_cluster: Path) -> None:
    """One process saves per-rank files (state.pt), not a sharded checkpoint; dp=2·ep=2 reads
    the whole model on every rank and shards it (train.init_from's load), on Ray actors."""
    from launch.train import train

    summary = train(run_config(corpus, tmp_path / "one"), "tiny")
    assert (tmp_path / "one" / "checkpoints" / "step-00000003" / "state.pt").is_file()
    record, _ = evaluate(tmp_path / "one", ["parallel.dp=2", "parallel.ep=2"], None, str(tmp_path / "eval.json"))
    assert abs(record["loss"] - summary["final_val_loss"]) <= 1e-6, (record["loss"], summary["final_val_loss"])
    assert record["layout"]["world_size"] == 2


def test_eval_on_a_file_and_on_another_dataset(dp2_ep2_run: tuple[Path, float], tmp_path: Path) -> None:
    run_dir, _ = dp2_ep2_run
    text = tmp_path / "held-out.txt"
    text.write_text("".join(path.read_text() for path in stdlib_sources()[40:44]))
    record, _ = evaluate(run_dir, ["parallel.dp=1", "parallel.ep=1"], str(text), str(tmp_path / "file.json"))
    n_tokens = file_tokens(text, ByteTokenizer()).size
    windows = (n_tokens - 1) // 32
    assert record["data"] == {"kind": "file", "path": str(text)}
    # whole validation batches of micro_batch_size (2) x dp (1) windows of seq_len (32) targets
    assert record["tokens"] == windows // 2 * 2 * 32
    assert 0 < record["loss"] < math.log(257) + 1
    other = tmp_path / "other"
    prepare(stdlib_sources()[40:60], other, val_fraction=0.2)
    record, _ = evaluate(run_dir, ["parallel.dp=1", "parallel.ep=1"], str(other), str(tmp_path / "other.json"))
    assert record["data"]["path"] == str(other.resolve()) and record["tokens"] == 1024


def test_results_are_never_overwritten(dp2_ep2_run: tuple[Path, float], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = dp2_ep2_run
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*taken.json: exists; choose another path"):
        evaluate(run_dir, ["parallel.dp=1", "parallel.ep=1"], None, str(taken))
    assert taken.read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    first = evaluate(run_dir, ["parallel.dp=1", "parallel.ep=1"], None, None)[1]
    second = evaluate(run_dir, ["parallel.dp=1", "parallel.ep=1"], None, None)[1]
    assert first != second and first.parent == second.parent == Path("runs/eval")
    assert json.loads(first.read_text())["loss"] == json.loads(second.read_text())["loss"]


def test_bad_inputs(dp2_ep2_run: tuple[Path, float], corpus: Path, tmp_path: Path) -> None:
    run_dir, _ = dp2_ep2_run
    with pytest.raises(CheckpointError, match="is not a checkpoint, a checkpoints directory or a run directory"):
        evaluate(corpus, [], None, None)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        evaluate(tmp_path / "nowhere", [], None, None)
    tokenizer = tmp_path / "tok.json"
    assert tokenizer_main(["train", *map(str, stdlib_sources()[:10]), "--vocab-size", "300", "--out", str(tokenizer)]) == 0
    bpe_data = tmp_path / "bpe"
    from launch.data import load_hf_tokenizer

    prepare(stdlib_sources()[:20], bpe_data, 0.2, tokenizer=load_hf_tokenizer(tokenizer))
    with pytest.raises(DataError, match=r"--data .*bpe was prepared with tokenizer .*tok.json \(sha256 \w{12}\), but the "
                                        r"checkpoint's model reads bytes"):
        evaluate(run_dir, [], str(bpe_data), None)
    with pytest.raises(ConfigError, match="moe eval sets train.init_from itself"):
        evaluate(run_dir, ["train.init_from=x"], None, None)
    # before any rank starts: a file shorter than one validation batch of the layout, a launch
    # directory that holds a run (the evaluated one)
    before = _tree(run_dir)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(DataError, match=r"nothing to evaluate in --data: 3 window\(s\) of model.seq_len=32 tokens, "
                                        r"fewer than one validation batch of 4 under this layout"):
        evaluate(run_dir, ["parallel.dp=2", "parallel.ep=2"], str(short), None)
    with pytest.raises(ConfigError, match=r"train.run_dir=.*dp2-ep2' already holds a run"):
        evaluate(run_dir, ["parallel.dp=2", "parallel.ep=2", f"train.run_dir={run_dir}"], None, None)
    assert _tree(run_dir) == before
