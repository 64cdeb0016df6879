"""Atomic training checkpoints.

Layout of a run's checkpoints::

    run_dir/checkpoints/step-00000200/state.pt         # single process: model, optimizer, step, RNG
    run_dir/checkpoints/step-00000200/state-rank1.pt   # multi-rank: one file per rank
    run_dir/checkpoints/step-00000200/manifest-rank0.json  # layout, step, every tensor's shape, dtype, CRC-32
    run_dir/checkpoints/step-00000200/COMPLETE         # written last: the ranks that wrote it
    run_dir/checkpoints/latest                         # text: "step-00000200"

A save writes into ``step-XXXXXXXX.tmp``, fsyncs, then renames the directory into place
and only then rewrites ``latest`` (itself by write-to-temp + rename). With several ranks,
each writes its own file into the temp directory; after a barrier rank 0 writes
``COMPLETE`` and renames. A process killed at any point leaves either the previous
checkpoint or the new one complete, never a half-written directory under a final name.

Pruning keeps the newest ``keep`` checkpoints, the one ``latest`` names always among them
(never a dangling ``latest``). A damaged ``latest`` (not a step name) is ignored: the newest
complete checkpoint is taken.

Integrity: each rank's manifest records a CRC-32 of every tensor it saved (and the run's
config, which a resume compares without reading the state). Before a
checkpoint is published every rank checks that the expert shards differ across
expert-parallel ranks (identical shards mean experts were duplicated, not sharded: the
silent failure peers shipped); on load each rank recomputes its tensors' checksums. Either
failure is a ``CheckpointError`` that names the tensor and the ranks or the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from parallel.config import CheckpointError

STATE_FILE = "state.pt"
COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
STEP_NAME = re.compile(r"step-\d{8,}")  # what ``latest`` holds


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def read_json(file: Path) -> Any:
    """A checkpoint's JSON file (manifest, metadata). Damaged (truncated, not JSON, not
    text) it is a ``CheckpointError`` naming the file and the fix, as every reader of a
    checkpoint (a resume, ``moe ckpt inspect``) reports it."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is damaged (not valid JSON: {err}); delete {str(file.parent)!r} to "
            "resume from the previous checkpoint, or start a new run if it is the only one"
        ) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a process killed at any point leaves either
    the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # after a failed write (a full disk): no temporary file left beside path
        tmp.unlink(missing_ok=True)


def state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"state-rank{rank}.pt"


def manifest_file(rank: int) -> str:
    return f"manifest-rank{rank}.json"


@dataclass(frozen=True)
class ShardInfo:
    """Where a rank's part sits in the layout, and which of its tensors are expert shards
    (state paths, e.g. ``engine.model.blocks.0.ffn.experts.w_in_EDF``)."""

    ep_rank: int = 0
    ep: int = 1
    dp_rank: int = 0
    dp: int = 1
    expert_paths: list[str] = field(default_factory=list)


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_checksums(state: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{path: {shape, dtype, crc32}}`` for every tensor in a nest of dicts and lists."""
    if isinstance(state, torch.Tensor):
        return {prefix: {"shape": list(state.shape), "dtype": str(state.dtype).removeprefix("torch."), "crc32": _crc(state)}}
    items: Any = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out: dict[str, dict[str, Any]] = {}
    for key, value in items:
        out.update(tensor_checksums(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _write_manifest(directory: Path, step: int, rank: int, world_size: int, shard: ShardInfo, state: dict[str, Any]) -> None:
    """Layout, checksums and ``state["config"]`` (the run's config, if the state holds one)."""
    manifest = {"step": step, "rank": rank, "world_size": world_size, "shard": asdict(shard),
                "tensors": tensor_checksums(state), "config": state.get("config", {})}
    (directory / manifest_file(rank)).write_text(json.dumps(manifest))


def read_manifests(path: Path) -> list[dict[str, Any]]:
    """Every rank's manifest of a checkpoint directory, by rank."""
    files = sorted(path.glob("manifest-rank*.json"), key=lambda f: int(f.stem.removeprefix("manifest-rank")))
    return [read_json(f) for f in files]


def check_expert_shards(manifests: list[dict[str, Any]]) -> None:
    """Raise if a rank holds the same expert shard as a rank of another EP position."""
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    for manifest in manifests:
        shard = manifest["shard"]
        for path in shard["expert_paths"]:
            crc = manifest["tensors"][path]["crc32"]
            other = seen.setdefault((path, crc), (shard["ep_rank"], manifest["rank"]))
            if other[0] != shard["ep_rank"]:
                raise CheckpointError(
                    f"expert shard {path!r} is identical on expert-parallel ranks {other[0]} and {shard['ep_rank']} "
                    f"(ranks {other[1]} and {manifest['rank']}): the experts were duplicated, not sharded; "
                    "the checkpoint was not published"
                )


def _no_barrier() -> None:
    """A single process has nobody to wait for."""


def write_atomically(
    ckpt_dir: Path,
    step: int,
    keep: int,
    rank: int,
    barrier: Callable[[], None],
    write: Callable[[Path], None],
    complete: str,
) -> Path:
    """The atomic-directory protocol every checkpoint format shares: rank 0 makes
    ``step-XXXXXXXX.tmp``; every rank runs ``write(tmp)`` (its files and checks; it may
    use collectives); then rank 0 writes ``COMPLETE`` (text ``complete``), renames the
    directory into place, rewrites ``latest`` and keeps the newest ``keep``, this one among
    them. A process killed at any point leaves the previous checkpoint the latest complete one."""
    final = ckpt_dir / _step_name(step)
    tmp = ckpt_dir / f"{final.name}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()  # nobody still reads or writes the temp directory when rank 0 renames it
    if rank == 0:
        write_atomic_text(tmp / COMPLETE_FILE, complete)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        write_atomic_text(ckpt_dir / LATEST_FILE, final.name)
        _prune(ckpt_dir, keep, final)
    barrier()
    return final


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _no_barrier,
    shard: ShardInfo = ShardInfo(),
) -> Path:
    """Write this rank's ``state`` and manifest into the checkpoint of ``step``; once every
    rank has written, all check the expert shards and rank 0 publishes the checkpoint and
    keeps the newest ``keep``."""

    def write(tmp: Path) -> None:
        with open(tmp / state_file(rank), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_manifest(tmp, step, rank, world_size, shard, state)
        barrier()
        check_expert_shards(read_manifests(tmp))  # on every rank: all fail alike, none waits

    return write_atomically(ckpt_dir, step, keep, rank, barrier, write, str(world_size))


def _is_complete(path: Path) -> bool:
    return ".tmp" not in path.name and (path / COMPLETE_FILE).is_file()


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step-*") if _is_complete(p)), key=lambda p: p.name)


def _prune(ckpt_dir: Path, keep: int, latest: Path) -> None:
    """Keep ``latest`` (the checkpoint just published) and the newest ``keep - 1`` others.
    By name alone a checkpoint of a later step left in the directory (copied in, another
    run's) would outrank ``latest``, which would then name a deleted directory, and a
    resume would fall back to that other checkpoint."""
    others = [p for p in _complete_checkpoints(ckpt_dir) if p != latest]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if that file is gone."""
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if STEP_NAME.fullmatch(name) and _is_complete(ckpt_dir / name):
            return ckpt_dir / name
    complete = _complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Read this rank's part of a checkpoint written by ``save_checkpoint``. The tensors are
    memory-mapped from the file: pages come in as they are read, from the page cache that
    the ranks of a machine share (``train.init_from`` of an imported model reads the whole
    state on every rank, and copies only each piece it keeps)."""
    if not _is_complete(path):
        raise CheckpointError(f"checkpoint {str(path)!r} has no {COMPLETE_FILE} marker; it is not a complete checkpoint")
    saved_world = saved_world_size(path)
    if saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {saved_world} ranks but this run has {world_size}; "
            "resume with the layout it was saved under"
        )
    file = path / state_file(rank)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(file)!r} cannot be read ({type(err).__name__}: {err}); "
            "delete it to resume from the previous one"
        ) from None
    _verify(path, rank, state)
    return state


def saved_world_size(path: Path) -> int:
    """The number of ranks that wrote a complete checkpoint (its ``COMPLETE`` marker)."""
    marker = path / COMPLETE_FILE
    text = marker.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(
            f"checkpoint file {str(marker)!r} is damaged (it holds {text[:20]!r}, not the number of ranks that "
            f"wrote the checkpoint); delete {str(path)!r} to resume from the previous checkpoint"
        )
    return int(text)


def _verify(path: Path, rank: int, state: dict[str, Any]) -> None:
    """Recompute every tensor's checksum and compare with the manifest written beside it."""
    manifest_path = path / manifest_file(rank)
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {manifest_file(rank)}; it cannot be verified")
    recorded = read_json(manifest_path)["tensors"]
    actual = tensor_checksums(state)
    if recorded.keys() != actual.keys():
        missing = sorted(recorded.keys() ^ actual.keys())[:3]
        raise CheckpointError(f"checkpoint {str(path / state_file(rank))!r} does not hold the tensors its manifest lists: {missing}")
    for name, entry in recorded.items():
        if entry != actual[name]:
            raise CheckpointError(
                f"checkpoint {str(path / state_file(rank))!r}: tensor {name!r} does not match its recorded checksum "
                f"({actual[name]} != {entry}); the file is corrupt, delete this checkpoint to resume from the previous one"
            )


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from itself, a ``checkpoints/`` directory or a run directory
    (the latest complete checkpoint of the latter two)."""
    if _is_complete(path):
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"{str(path)!r} is not a checkpoint, a checkpoints directory or a run directory with one")


def describe_checkpoint(path: Path, verify: bool) -> str:
    """What ``moe ckpt inspect`` prints: layout, step, each rank's tensors and checksums;
    with ``verify``, every rank's file is read and checked against its manifest."""
    path = resolve_checkpoint(path)
    manifests = read_manifests(path)
    if not manifests:
        raise CheckpointError(f"checkpoint {str(path)!r} has no manifests (written before checksums were recorded?)")
    world = manifests[0]["world_size"]
    shard = manifests[0]["shard"]
    lines = [
        f"checkpoint {path}",
        f"step {manifests[0]['step']}; saved by {world} rank(s): ep={shard['ep']}, dp={shard['dp']}",
    ]
    for manifest in manifests:
        tensors = manifest["tensors"]
        shard = manifest["shard"]
        numel = sum(int(torch.tensor(t["shape"]).prod()) for t in tensors.values())
        lines.append(
            f"rank {manifest['rank']} (ep_rank {shard['ep_rank']}, dp_rank {shard['dp_rank']}): "
            f"{len(tensors)} tensors, {numel:,} elements, {len(shard['expert_paths'])} expert shards"
        )
        if verify:
            load_checkpoint(path, manifest["rank"], world)
            lines.append("  verified: every tensor matches its checksum")
    check_expert_shards(manifests)
    lines.append(f"{'tensor (rank 0)':<72}{'shape':<22}{'dtype':<10}crc32")
    for name, entry in manifests[0]["tensors"].items():
        lines.append(f"{name:<72}{str(entry['shape']):<22}{entry['dtype']:<10}{entry['crc32']:08x}")
    return "\n".join(lines)
