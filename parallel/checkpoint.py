"""Atomic training checkpoints.

Layout of a run's checkpoints::

    run_dir/checkpoints/step-00000200/state.pt   # model, optimizer, step, RNG states
    run_dir/checkpoints/latest                    # text: "step-00000200"

A save writes into ``step-XXXXXXXX.tmp-<pid>``, fsyncs, then renames the directory into
place and only then rewrites ``latest`` (itself by write-to-temp + rename). A process
killed at any point leaves either the previous checkpoint or the new one complete, never
a half-written directory under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
LATEST_FILE = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep`` checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / _step_name(step)
    tmp = ckpt_dir / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    _write_atomic_text(ckpt_dir / LATEST_FILE, final.name)
    _prune(ckpt_dir, keep)
    return final


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [p for p in ckpt_dir.glob("step-*") if ".tmp-" not in p.name and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(ckpt_dir: Path, keep: int) -> None:
    for old in _complete_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if that file is gone."""
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = _complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint directory written by ``save_checkpoint``."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {STATE_FILE}; it is not a complete checkpoint")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(state_file)!r} cannot be read ({type(err).__name__}: {err}); "
            "delete it to resume from the previous one"
        ) from None
