"""A run directory holds one run, and what a run leaves behind can be trusted.

The data-loss cases of issue 15, each through ``moe train`` as a user runs it (the CLI's
``main`` in this process): a run directory reused without ``train.resume=true``; pruning
with ``keep_checkpoints=1``; a resume under a different config; training that goes
non-finite (a huge learning rate or aux-loss coefficient: the config loader refuses inf
itself). Also a bad ``train.run_dir``, a run that fails before its first step, and damaged
checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.cli import main as cli
from launch.config import load_config
from launch.dirlock import LOCK_FILE, held_directory
from launch.rank import LaunchError, RankFailure, _record_failure, group_failure, with_restarts
from launch.train import train_rank
from moe.config import ConfigError
from parallel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, write_atomic_text

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
    "model.vocab_size=257", "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32", "train.batch_size=8",
    "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=1", "train.eval_every=2", "data.val_tokens=256",
    "launch.threads=1", "launch.timeout_minutes=2",
]


def _train(corpus: Path, run_dir: Path, *extra: str) -> int:
    return cli(["train", str(TINY), *SMALL, f"data.path={corpus}", f"train.run_dir={run_dir}", *extra])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``moe train`` printed to stderr for a refused or stopped run."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(run_dir: Path) -> dict[str, bytes | None]:
    """Every file's bytes (None for a directory) under ``run_dir``, by relative path."""
    return {str(p.relative_to(run_dir)): None if p.is_dir() else p.read_bytes() for p in sorted(run_dir.rglob("*"))}


def _strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity, which JSON does not have."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _strict_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [_strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with its checkpoint at step 2 (tests copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert _train(small_corpus, run, "train.steps=2", "train.ckpt_every=2") == 0
    return run


# -- one run per directory -------------------------------------------------------------------


def test_a_reused_run_dir_without_resume_is_refused_and_left_untouched(
    small_corpus: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=2", "train.ckpt_every=2", "train.seed=7") == 2
    error = _error(capsys)
    assert f"train.run_dir={str(run)!r} already holds a run" in error
    assert "train.resume=true" in error and "another train.run_dir" in error
    assert _snapshot(run) == before


def test_a_run_dir_holding_other_files_only_is_used(small_corpus: Path, tmp_path: Path) -> None:
    """What blocks a start is a run's outputs, not any file: a sweep writes its trial.json
    into the trial's directory before the trial starts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "trial.json").write_text("{}")
    assert _train(small_corpus, run, "train.steps=1") == 0
    assert (run / "trial.json").read_text() == "{}" and (run / "summary.json").is_file()


def test_a_run_dir_in_use_is_refused_until_its_holder_ends(
    small_corpus: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume started while the run still goes (its hold taken here, as the running
    command's would be) is one error naming the holder and writes nothing; once the hold
    ends the resume runs. A lock file left by a killed holder (no lock on it) stops nothing."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)
    with held_directory(run, "train.run_dir"):
        capsys.readouterr()
        assert _train(small_corpus, run, "train.steps=3", "train.resume=true") == 2
        assert f"train.run_dir={str(run)!r} is in use by moe pid {os.getpid()} on " in _error(capsys)
    assert _snapshot(run) == before
    (run / LOCK_FILE).write_text("moe pid 1 on a-killed-host\n")
    assert _train(small_corpus, run, "train.steps=3", "train.resume=true") == 0
    assert not (run / LOCK_FILE).exists()


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "latest"
    write_atomic_text(target, "old")

    def full_disk(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomic_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"] and target.read_text() == "old"


def test_keep_one_checkpoint_never_prunes_the_one_latest_names(tmp_path: Path) -> None:
    """A checkpoint of a later step already in the directory (another run's) is pruned, not
    the one just saved: ``latest`` never names a deleted checkpoint."""
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 100, {"step": 100, "w": torch.ones(2)}, keep=1)
    save_checkpoint(ckpt, 50, {"step": 50, "w": torch.zeros(2)}, keep=1)
    assert (ckpt / "latest").read_text() == "step-00000050"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000050"]
    assert latest_checkpoint(ckpt) == ckpt / "step-00000050"
    assert load_checkpoint(ckpt / "step-00000050")["step"] == 50


def test_a_resume_under_a_changed_config_is_refused_naming_every_changed_key(
    small_corpus: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)
    capsys.readouterr()
    code = _train(small_corpus, run, "train.steps=4", "train.resume=true", "train.lr=2e-3", "train.seed=7")
    assert code == 2
    error = _error(capsys)
    assert "was saved with train.lr=0.001 but the config has train.lr=0.002" in error
    assert "train.seed=1234 but the config has train.seed=7" in error
    assert "train.steps" not in error.split("; ")[0]  # a resume may change the step count
    assert _snapshot(run) == before
    # What a resume may change (more steps, logging, checkpointing, threads) continues the run.
    assert _train(small_corpus, run, "train.steps=3", "train.resume=true", "train.log_every=2",
                  "train.keep_checkpoints=1", "launch.threads=2") == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


# -- a bad run directory ------------------------------------------------------------------------


def _read_only(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except PermissionError:
        return path / "run"
    (path / "probe").unlink()
    path.chmod(0o755)
    pytest.skip("this user writes into read-only directories (root): permissions cannot be tested")


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_run_dir_is_one_error_before_any_work(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (tmp_path / "file").write_text("not a directory")
    run = {"a file": lambda: tmp_path / "file", "under a file": lambda: tmp_path / "file" / "run",
           "read-only": lambda: _read_only(tmp_path / "locked")}[where]()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=1") == 2
    error = _error(capsys)
    assert f"train.run_dir={str(run)!r}" in error and "Traceback" not in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_a_run_failing_before_its_first_step_leaves_no_run_dir(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "new" / "run"
    assert _train(small_corpus, run, "train.steps=1", "model.vocab_size=64") == 2  # the corpus has 257 ids
    assert "model.vocab_size=64 is smaller than the dataset's vocabulary" in _error(capsys)
    assert not (tmp_path / "new").exists()
    made = tmp_path / "made"
    made.mkdir()  # a directory the user made stays, empty
    assert _train(small_corpus, made, "train.steps=1", "model.vocab_size=64") == 2
    assert list(made.iterdir()) == []
    assert _train(small_corpus, run, "train.steps=1") == 0  # the retry is not refused


def test_a_run_failing_in_its_first_step_leaves_no_outputs(
    small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash during step 1 (after config.yaml and the TensorBoard log were written, before
    any record): nothing of the run remains, and the retry starts."""
    from parallel.local_engine import LocalEngine

    class Crash(Exception):
        pass

    def crash(self: LocalEngine, lr: float) -> float:
        raise Crash

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(LocalEngine, "step", crash)
        with pytest.raises(Crash):
            _train(small_corpus, run, "train.steps=2")
    assert not run.exists()
    assert _train(small_corpus, run, "train.steps=2") == 0


# -- damaged checkpoint metadata ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "not JSON"])
def test_a_damaged_manifest_is_one_clear_error_on_resume_and_inspect(
    small_corpus: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    manifest = run / "checkpoints" / "step-00000002" / "manifest-rank0.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2] if damage == "truncated" else "\x00garbage")
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=3", "train.resume=true") == 2
    error = _error(capsys)
    assert f"checkpoint file {str(manifest)!r} is damaged" in error
    assert f"delete {str(manifest.parent)!r}" in error
    assert cli(["ckpt", "inspect", str(run)]) == 2
    assert _error(capsys) == error


def test_a_damaged_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 1, {"step": 1}, keep=2)
    save_checkpoint(ckpt, 2, {"step": 2}, keep=2)
    for damage in (b"\xff\x00\xfe", b"../../elsewhere", b""):
        (ckpt / "latest").write_bytes(damage)
        assert latest_checkpoint(ckpt) == ckpt / "step-00000002", damage
    (ckpt / "step-00000002" / "COMPLETE").write_bytes(b"\xff")
    with pytest.raises(CheckpointError, match="COMPLETE' is damaged"):
        load_checkpoint(ckpt / "step-00000002")


# -- non-finite training ------------------------------------------------------------------------


def test_deepspeed_cannot_skip_non_finite_steps() -> None:
    from launch.train import check_layout

    cfg = load_config(TINY, ["parallel.engine=deepspeed", "parallel.dp=2", "train.max_nonfinite_steps=1"])
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps=1 with parallel.engine=deepspeed"):
        check_layout(cfg)


def _finite(state: Any) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return all(_finite(v) for v in values)


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step_keeping_the_last_good_checkpoint(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr 1e30: step 1's update leaves finite weights of ~1e29 (checkpointed); step 2's
    gradients are NaN. The run stops there, before the update, and exits 2."""
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=4", "train.lr=1e30", "train.ckpt_every=1") == 2
    error = _error(capsys)
    assert "training stopped at step 2: the gradient norm is non-finite" in error
    assert "train.max_nonfinite_steps=0" in error
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert _finite(load_checkpoint(run / "checkpoints" / "step-00000001"))
    records = _strict_metrics(run)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2)]
    assert records[1]["skipped_steps"] == 1 and records[1]["grad_norm"] is None and records[1]["lm_loss"] is None
    assert not (run / "summary.json").exists()  # the run did not finish


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2's update leaves a weight infinite (injected) while its loss and gradients were
    finite: the checkpoint of step 2 is not written, step 1's stays the latest."""
    from parallel.local_engine import LocalEngine

    step, updates = LocalEngine.step, []

    def inf_after_update_2(self: LocalEngine, lr: float) -> float:
        grad_norm = step(self, lr)
        updates.append(lr)
        if len(updates) == 2:
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = float("inf")
        return grad_norm

    monkeypatch.setattr(LocalEngine, "step", inf_after_update_2)
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=3", "train.ckpt_every=1", "train.eval_every=100") == 2
    error = _error(capsys)
    assert "training stopped at step 2: the weights are non-finite" in error
    assert "latest checkpoint: step-00000001, the last with finite weights" in error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert [(r["kind"], r["step"]) for r in _strict_metrics(run)] == [("train", 1), ("train", 2)]


def test_a_huge_aux_loss_coefficient_stops_at_step_one(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=3", "moe.aux_loss_coeff=1e30", "train.ckpt_every=1") == 2
    assert "training stopped at step 1: the gradient norm is non-finite" in _error(capsys)
    assert latest_checkpoint(run / "checkpoints") is None
    assert [r["step"] for r in _strict_metrics(run)] == [1]


def test_skipped_non_finite_steps_apply_no_update_and_their_count_is_bounded(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.max_nonfinite_steps=2: steps 1 and 2 (every step's gradient is inf) are skipped,
    their checkpoints hold the same weights and optimizer state; step 3 stops the run."""
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=5", "moe.aux_loss_coeff=1e30", "train.ckpt_every=1",
                  "train.keep_checkpoints=5", "train.max_nonfinite_steps=2") == 2
    error = _error(capsys)
    assert "training stopped at step 3: the gradient norm is non-finite" in error
    assert "(non-finite step 3 of this run; train.max_nonfinite_steps=2)" in error
    first, second = (load_checkpoint(run / "checkpoints" / f"step-0000000{s}") for s in (1, 2))
    assert (first["step"], second["step"], second["nonfinite_steps"]) == (1, 2, 2)
    for key, tensor in first["engine"]["model"].items():
        assert torch.equal(tensor, second["engine"]["model"][key]), key
    assert second["engine"]["optimizer"]["state"] == {}  # AdamW never stepped
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000002"
    assert [r.get("skipped_steps") for r in _strict_metrics(run) if r["kind"] == "train"] == [1, 1, 1]


@pytest.mark.parametrize("allowed", [0, 1])
def test_a_transient_non_finite_loss_is_skipped_or_stops_the_run(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    allowed: int,
) -> None:
    """Step 2's loss is NaN (injected); with one step allowed it is skipped, without an
    update, and the run finishes with valid JSON outputs; with none allowed it stops there."""
    from moe.model import Transformer

    forward, calls = Transformer.forward, []

    def nan_at_step_2(self: Transformer, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 2:
                nan = torch.tensor(float("nan"))
                return dataclasses.replace(out, lm_loss=out.lm_loss * nan)
        return out

    monkeypatch.setattr(Transformer, "forward", nan_at_step_2)
    run = tmp_path / "run"
    capsys.readouterr()
    code = _train(small_corpus, run, "train.steps=3", "train.ckpt_every=1", "train.keep_checkpoints=3",
                  f"train.max_nonfinite_steps={allowed}")
    if not allowed:
        assert code == 2
        assert "training stopped at step 2: the loss is non-finite (lm_loss=nan)" in _error(capsys)
        assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000001"
        return
    assert code == 0
    first, second = (load_checkpoint(run / "checkpoints" / f"step-0000000{s}") for s in (1, 2))
    for key, tensor in first["engine"]["model"].items():
        assert torch.equal(tensor, second["engine"]["model"][key]), key
    records = {r["step"]: r for r in _strict_metrics(run) if r["kind"] == "train"}
    assert records[2]["skipped_steps"] == 1 and records[2]["lm_loss"] is None
    assert all(isinstance(records[s]["lm_loss"], float) for s in (1, 3))
    summary = _strict_json((run / "summary.json").read_text())
    assert summary["steps"] == 3


def test_a_non_finite_validation_loss_stops_the_run_and_is_written_as_null(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation loss is NaN (injected into every forward without gradients): the run
    stops at its first evaluation, before that step's checkpoint; the record holds null."""
    from moe.model import Transformer

    forward = Transformer.forward

    def nan_in_eval(self: Transformer, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        return out if self.training else dataclasses.replace(out, lm_loss=out.lm_loss * float("nan"))

    monkeypatch.setattr(Transformer, "forward", nan_in_eval)
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(small_corpus, run, "train.steps=4", "train.ckpt_every=1") == 2
    assert "training stopped at step 2: the validation loss is non-finite" in _error(capsys)
    val = [r for r in _strict_metrics(run) if r["kind"] == "val"]
    assert [(r["step"], r["val_loss"]) for r in val] == [(2, None)]
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000001"


def test_metrics_records_write_non_finite_values_as_null(tmp_path: Path) -> None:
    from launch.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    log.write({"kind": "val", "step": 1, "val_loss": float("nan"), "best_val_loss": float("inf"),
               "expert_load": [[0.5, float("-inf")]]})
    log.close()
    assert _strict_metrics(tmp_path) == [
        {"kind": "val", "step": 1, "val_loss": None, "best_val_loss": None, "expert_load": [[0.5, None]]}]


def _stop_error(rank: int, world_size: int, cfg: Any) -> str:
    """One rank of a run that goes non-finite; the error it stopped with."""
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        train_rank(cfg, "tiny")
    except Exception as err:  # noqa: BLE001 (the test compares every rank's error)
        return f"{type(err).__name__}: {err}"
    return "finished"


def test_every_rank_stops_at_the_same_non_finite_step(rank_pool: Any, small_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY, [*SMALL, f"data.path={small_corpus}", f"train.run_dir={run}", "train.steps=4",
                             "train.lr=1e30", "train.ckpt_every=1", "parallel.dp=2", "parallel.ep=2"])
    errors = rank_pool(2).run(_stop_error, cfg)
    assert errors[0] == errors[1]
    assert errors[0].startswith("NonFiniteStop: training stopped at step 2: the gradient norm is non-finite"), errors[0]
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-00000001"
    assert not (run / "checkpoints" / "step-00000002").exists()
    assert [r["step"] for r in _strict_metrics(run)] == [1, 2]


def test_a_non_finite_stop_is_not_restarted(tmp_path: Path) -> None:
    """A stop at a non-finite step would recur after a restart (resuming is bit-exact): the
    launcher reports it as it is, without the restarts launch.max_restarts allows."""
    from launch.rank import NonFiniteStop

    (tmp_path / "logs").mkdir()
    _record_failure(tmp_path, 1, NonFiniteStop("training stopped at step 2: the loss is non-finite (lm_loss=nan)"))
    err = group_failure(tmp_path, 2, {}, {0: "exit code 1", 1: "exit code 1"})
    assert not isinstance(err, RankFailure) and isinstance(err, LaunchError)
    assert str(err).startswith("training stopped at step 2: the loss is non-finite (lm_loss=nan) (on every rank")
    cfg = load_config(TINY, ["launch.max_restarts=2", f"train.run_dir={tmp_path}"])
    attempts = []

    def attempt(c: Any) -> dict[str, Any]:
        attempts.append(c)
        raise err

    with pytest.raises(LaunchError, match="training stopped at step 2"):
        with_restarts(cfg, attempt)
    assert len(attempts) == 1
