"""Atomic training checkpoints.

Layout of a run's checkpoints::

    run_dir/checkpoints/step-00000200/state.pt         # single process: model, optimizer, step, RNG
    run_dir/checkpoints/step-00000200/state-rank1.pt   # multi-rank: one file per rank
    run_dir/checkpoints/step-00000200/COMPLETE         # written last: the ranks that wrote it
    run_dir/checkpoints/latest                         # text: "step-00000200"

A save writes into ``step-XXXXXXXX.tmp``, fsyncs, then renames the directory into place
and only then rewrites ``latest`` (itself by write-to-temp + rename). With several ranks,
each writes its own file into the temp directory; after a barrier rank 0 writes
``COMPLETE`` and renames. A process killed at any point leaves either the previous
checkpoint or the new one complete, never a half-written directory under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

STATE_FILE = "state.pt"
COMPLETE_FILE = "COMPLETE"
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


def state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"state-rank{rank}.pt"


def _no_barrier() -> None:
    """A single process has nobody to wait for."""


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _no_barrier,
) -> Path:
    """Write this rank's ``state`` into the checkpoint of ``step``; rank 0 publishes it
    once every rank has written, and keeps the newest ``keep`` checkpoints."""
    final = ckpt_dir / _step_name(step)
    tmp = ckpt_dir / f"{final.name}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with open(tmp / state_file(rank), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    barrier()
    if rank == 0:
        _write_atomic_text(tmp / COMPLETE_FILE, str(world_size))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _write_atomic_text(ckpt_dir / LATEST_FILE, final.name)
        _prune(ckpt_dir, keep)
    barrier()
    return final


def _is_complete(path: Path) -> bool:
    return ".tmp" not in path.name and (path / COMPLETE_FILE).is_file()


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step-*") if _is_complete(p)), key=lambda p: p.name)


def _prune(ckpt_dir: Path, keep: int) -> None:
    for old in _complete_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if that file is gone."""
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if _is_complete(named):
            return named
    complete = _complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Read this rank's part of a checkpoint written by ``save_checkpoint``."""
    if not _is_complete(path):
        raise CheckpointError(f"checkpoint {str(path)!r} has no {COMPLETE_FILE} marker; it is not a complete checkpoint")
    saved_world = int((path / COMPLETE_FILE).read_text().strip() or 0)
    if saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {saved_world} ranks but this run has {world_size}; "
            "resume with the layout it was saved under"
        )
    file = path / state_file(rank)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(file)!r} cannot be read ({type(err).__name__}: {err}); "
            "delete it to resume from the previous one"
        ) from None
