"""Start a multi-rank run as local processes (gloo on CPU, one process per GPU on GPUs).

The driver prepares the data and the run directory once, then spawns one process per
rank. Every rank sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT and initialises torch.distributed with an explicit timeout. Rank 0 prints
to the console; every rank's output also goes to ``run_dir/logs/rank-K.log``.

Supervision: the driver polls all ranks; when one exits with an error, it kills the
rest at once (a dead rank otherwise leaves its peers blocked in a collective until the
timeout) and reports which rank failed, its exit code and its log.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.config import Config


class LaunchError(RuntimeError):
    """A rank failed; the message names it and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tee:
    """A text stream writing to several streams (rank 0: the console and its log)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return bool(self.streams[0].isatty())


def _redirect_output(log_path: Path, echo: bool) -> None:
    """Send this process's output to its log file; rank 0 keeps the console as well."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    if echo:
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
        return
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log


def _rank_main(cfg: Config, config_name: str, rank: int, world_size: int, port: int) -> None:
    from launch.train import train_rank  # imported in the child: torch state is per process

    run_dir = Path(str(cfg.train.run_dir))
    _redirect_output(run_dir / "logs" / f"rank-{rank}.log", echo=rank == 0)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE=os.environ.get("TORCHDYNAMO_DISABLE", "1"),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=cfg.launch.timeout_minutes)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
        train_rank(cfg, config_name)
    except BaseException as err:
        _record_failure(run_dir, rank, err)
        raise
    finally:
        dist.destroy_process_group()


def _failure_file(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank-{rank}.error.json"


def _record_failure(run_dir: Path, rank: int, err: BaseException) -> None:
    """When and why this rank failed: once one rank fails, its peers fail too (their
    collectives lose a peer), and the supervisor must name the first, not the loudest."""
    _failure_file(run_dir, rank).write_text(json.dumps({"time": time.time(), "error": f"{type(err).__name__}: {err}"}))


def _first_failure(run_dir: Path, exit_codes: list[int | None]) -> tuple[int, str]:
    """The rank that failed first and why: a rank killed by a signal before the
    supervisor stopped the group (it could record nothing), else the earliest recorded
    failure, else the first non-zero exit. ``exit_codes`` are as seen before the stop."""
    for rank, code in enumerate(exit_codes):
        if code is not None and code < 0:
            return rank, f"killed by signal {-code}"
    recorded = [(json.loads(f.read_text()), r) for r in range(len(exit_codes)) if (f := _failure_file(run_dir, r)).is_file()]
    if recorded:
        first, rank = min(recorded, key=lambda item: item[0]["time"])
        return rank, first["error"].splitlines()[0][:300]
    rank = next(r for r, code in enumerate(exit_codes) if code)
    return rank, f"exit code {exit_codes[rank]}"


def _supervise(procs: list[mp.process.BaseProcess], run_dir: Path) -> None:
    """Wait for every rank; on the first failure stop them all and name the culprit."""
    while any(p.is_alive() for p in procs) and all(p.exitcode in (None, 0) for p in procs):
        time.sleep(0.2)
    if all(p.exitcode == 0 for p in procs):
        return
    died_on_their_own = [p.exitcode for p in procs]  # None: still running, stopped below
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()
    rank, why = _first_failure(run_dir, died_on_their_own)
    raise LaunchError(
        f"rank {rank} of {len(procs)} failed first ({why}); the other ranks were stopped. "
        f"Its log: {run_dir / 'logs' / f'rank-{rank}.log'}"
    )


def launch_local(cfg: Config, config_name: str, world_size: int) -> dict[str, Any]:
    """Run ``train_rank`` on ``world_size`` local processes; return rank 0's summary.
    ``cfg.train.run_dir`` must be set (every rank writes there)."""
    run_dir = Path(str(cfg.train.run_dir))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(cfg, config_name, r, world_size, port)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        _supervise(procs, run_dir)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    return json.loads((run_dir / "summary.json").read_text())


def start(cfg: Config, config_name: str) -> dict[str, Any]:
    """Train with as many local processes as the layout has ranks (this one if a single).

    The data set and the run directory are settled here, once, before any rank starts:
    ranks preparing the corpus at the same time would race, and each rank computing its
    own timestamped run directory would scatter the run.
    """
    from launch.data import ensure_dataset
    from launch.train import check_layout, resolve_run_dir, train

    topology = check_layout(cfg)
    if topology.world_size == 1:
        return train(cfg, config_name)
    ensure_dataset(cfg.data)
    run_dir = resolve_run_dir(cfg.train, config_name)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
    return launch_local(cfg, config_name, topology.world_size)
