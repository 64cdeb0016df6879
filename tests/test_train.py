"""The training loop end to end on a small prepared corpus: learning, resume, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.config import load_config
from launch.data import prepare, stdlib_sources
from launch.metrics import read_metrics
from launch.train import lr_at, train
from parallel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.normalize_weights=true", "moe.expert_ffn_dim=32",
    "train.batch_size=8", "train.warmup_steps=3", "train.log_every=1", "train.lr=1.0e-2",
    "data.val_tokens=2048", "launch.threads=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:60], out, val_fraction=0.2)
    return out


def _cfg(corpus: Path, run_dir: Path, *extra: str):  # noqa: ANN202
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"data.path={corpus}", f"train.run_dir={run_dir}", *extra])


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_smoke_run_learns_and_writes_its_outputs(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = train(_cfg(corpus, tmp_path / "run", "train.steps=30", "train.eval_every=15", "train.ckpt_every=15"), "tiny")
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "val"]
    assert len(vals) == 2 and vals[1] < vals[0]
    run = tmp_path / "run"
    for name in ("summary.json", "config.yaml", "loss_curve.png", "expert_load.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    saved = json.loads((run / "summary.json").read_text())
    assert saved["final_val_loss"] == summary["final_val_loss"] == vals[-1]
    assert len(saved["expert_load_tail"]["shares"]) == 2 and len(saved["expert_load_tail"]["shares"][0]) == 4
    from launch.cli import main

    assert main(["ckpt", "inspect", str(run), "--verify"]) == 0
    shown = capsys.readouterr().out
    assert "step 30; saved by 1 rank(s): ep=1, dp=1" in shown and "verified: every tensor matches its checksum" in shown
    record = read_metrics(run)[0]
    assert {"aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "dropped_fraction", "expert_load"} <= set(record)
    # one step of 8 sequences x 32 tokens, top-2: 512 assignments per MoE layer
    assert [sum(layer) for layer in record["expert_tokens"]] == [8 * 32 * 2] * 2


def test_resume_gives_the_identical_next_step_loss(corpus: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(_cfg(corpus, full, "train.steps=12", "train.ckpt_every=6", "train.eval_every=100", "moe.jitter_eps=0.1",
               "moe.capacity_factor=1.0"), "tiny")
    # The run as a crash after step 6 would leave it: newest checkpoint removed.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000012")
    (cut / "checkpoints" / "latest").unlink()
    train(_cfg(corpus, cut, "train.steps=12", "train.ckpt_every=6", "train.eval_every=100", "moe.jitter_eps=0.1",
               "moe.capacity_factor=1.0", "train.resume=true"), "tiny")
    a, b = _losses(full), _losses(cut)
    assert sorted(b) == list(range(1, 13))  # the log has each step once
    for step in range(7, 13):
        assert a[step] == b[step], (step, a[step], b[step])


def test_killed_run_resumes_to_the_same_final_loss(corpus: Path, tmp_path: Path) -> None:
    args = [*SMALL, f"data.path={corpus}", "train.steps=150", "train.ckpt_every=5", "train.eval_every=1000"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    cmd = [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *args]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"train.run_dir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = latest_checkpoint(killed / "checkpoints")
        if found is not None and found.name >= "step-00000010":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = latest_checkpoint(killed / "checkpoints")
    assert at_kill is not None and "step-00000010" <= at_kill.name < "step-00000150"
    resumed = subprocess.run([*cmd, f"train.run_dir={killed}", "train.resume=true"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    clean = tmp_path / "clean"
    train(load_config(ROOT / "configs" / "tiny.yaml", [*args, f"train.run_dir={clean}"]), "tiny")
    assert _losses(killed)[150] == _losses(clean)[150]
    assert sorted(_losses(killed)) == list(range(1, 151))


def test_resume_refuses_a_different_model(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(corpus, run, "train.steps=2", "train.ckpt_every=2", "train.eval_every=100"), "tiny")
    with pytest.raises(CheckpointError, match="moe.num_experts=4 but the config has moe.num_experts=8"):
        train(_cfg(corpus, run, "train.steps=4", "train.resume=true", "moe.num_experts=8"), "tiny")


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 5, {"step": 5, "w": torch.ones(2)}, keep=2)
    # A save killed half-way leaves only a temp dir: never taken as a checkpoint.
    (ckpt / "step-00000010.tmp").mkdir()
    (ckpt / "step-00000010.tmp" / "state.pt").write_bytes(b"partial")
    # Nor is a directory whose ranks did not all finish (no COMPLETE marker).
    (ckpt / "step-00000008").mkdir()
    (ckpt / "step-00000008" / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(ckpt).name == "step-00000005"
    (ckpt / "latest").unlink()
    assert latest_checkpoint(ckpt).name == "step-00000005"
    save_checkpoint(ckpt, 10, {"step": 10}, keep=2)
    save_checkpoint(ckpt, 15, {"step": 15}, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000008", "step-00000010", "step-00000015"]
    with pytest.raises(CheckpointError, match="written by 1 ranks but this run has 2"):
        load_checkpoint(ckpt / "step-00000015", rank=1, world_size=2)
    (ckpt / "step-00000015" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(ckpt / "step-00000015")


def test_resume_without_checkpoint_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        train(_cfg(corpus, tmp_path / "empty", "train.steps=2", "train.resume=true"), "tiny")


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_a_silently_altered_tensor_fails_its_checksum(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    path = save_checkpoint(ckpt, 3, {"engine": {"model": {"w": torch.arange(6.0)}}, "step": 3}, keep=1)
    state = torch.load(path / "state.pt", weights_only=True)
    state["engine"]["model"]["w"][2] += 1e-3  # still a valid file: only the checksum can tell
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match="tensor 'engine.model.w' does not match its recorded checksum"):
        load_checkpoint(path)


def test_duplicated_expert_shards_are_refused() -> None:
    from parallel.checkpoint import check_expert_shards

    def manifest(rank: int, ep_rank: int, crc: int) -> dict:
        shard = {"ep_rank": ep_rank, "ep": 2, "dp_rank": rank, "dp": 4, "expert_paths": ["e.w"]}
        return {"rank": rank, "shard": shard, "tensors": {"e.w": {"shape": [2], "dtype": "float32", "crc32": crc}}}

    check_expert_shards([manifest(0, 0, 11), manifest(1, 1, 22), manifest(2, 0, 11), manifest(3, 1, 22)])  # replicas agree
    with pytest.raises(CheckpointError, match="'e.w' is identical on expert-parallel ranks 0 and 1 \\(ranks 0 and 1\\)"):
        check_expert_shards([manifest(0, 0, 11), manifest(1, 1, 11)])


def test_metrics_truncation_on_resume_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run drops the log records past its checkpoint by replacing the file whole:
    killed before the replace, the old log is intact (never a half-written one)."""
    import parallel.checkpoint
    from launch.metrics import METRICS_FILE, truncate_after

    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in (10, 20, 30)))

    class Killed(Exception):
        pass

    def killed(src: str, dst: str) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(parallel.checkpoint.os, "replace", killed)
        with pytest.raises(Killed):
            truncate_after(tmp_path, 20)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]
    truncate_after(tmp_path, 20)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
