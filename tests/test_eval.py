"""``moe eval``: the validation loss a run logged, reproduced from its checkpoint under the
run's layout and under others (the checkpoint is resharded on load), on another prepared
dataset, and on a text file; the JSON result never overwrites a file; bad inputs are one error."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_testing import run_config

from launch.data import DataError, prepare, stdlib_sources
from launch.data.bpe import main as tokenizer_main
from launch.eval.evaluate import evaluate, file_tokens
from launch.data.tokenizer import ByteTokenizer
from launch.metrics import read_metrics
from moe.config import ConfigError
from parallel.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def dp2_ep2_run(
    corpus: Path, tmp_path_factory: pytest.TempPathFactory, start_within: Callable[..., dict[str, Any]]
) -> tuple[Path, float]:
    """The default run's layout (Makefile: parallel.dp=2 parallel.ep=2), 3 steps, a sharded
    checkpoint at the end; its run directory and the final validation loss it logged."""
    run_dir = tmp_path_factory.mktemp("runs") / "dp2-ep2"
    cfg = run_config(corpus, run_dir, "parallel.dp=2", "parallel.ep=2", "launch.launcher=local")
    summary = start_within(cfg)
    logged = [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "val"]
    assert summary["final_val_loss"] == logged[-1]
    return run_dir, logged[-1]


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp=2", "parallel.ep=2"],  # the run's own
        [],  # one process (the checkpoint's layout is kept unless overridden: this says dp=1, ep=1)
        ["parallel.tp=2"],
    ],
    ids=["dp2-ep2", "one-process", "tp2"],
)
def test_eval_reproduces_the_logged_validation_loss(
    dp2_ep2_run: tuple[Path, float], tmp_path: Path, layout: list[str]
) -> None:
    run_dir, logged = dp2_ep2_run
    overrides = layout or ["parallel.dp=1", "parallel.ep=1"]
    record, written = evaluate(run_dir, overrides, None, str(tmp_path / "eval.json"))
    assert abs(record["loss"] - logged) <= 1e-6, (record["loss"], logged)
    assert record["perplexity"] == pytest.approx(math.exp(logged), rel=1e-6)
    assert record["step"] == 3 and record["tokens"] == 1024
    assert json.loads(written.read_text()) == record


def test_a_per_rank_checkpoint_evaluates_under_another_layout(corpus: Path, tmp_path: Path) -> None:
    """One process saves per-rank files (state.pt), not a sharded checkpoint; dp=2·ep=2 reads
    the whole model on every rank and shards it (train.init_from's load)."""
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
