"""What both launchers share: one rank's setup, and the supervisor's failure bookkeeping.

A rank, whether a local process (``launch/local_launcher.py``) or a Ray actor
(``launch/ray_launcher.py``), runs :func:`run_rank` around the launch's entry point
(:data:`RankEntry`: ``launch.train.train_rank`` for training, ``moe eval``'s rank for an
evaluation): its output goes to
``run_dir/logs/rank-K.log``; it exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and the NCCL options, picks its device and thread count, and
initialises torch.distributed with an explicit timeout (a peer that never arrives fails
the rank instead of blocking it for gloo's default 30 minutes). A rank that raises writes
when and why to ``logs/rank-K.error.json`` before it exits.

Each launcher waits on its ranks in its own way; when one fails it stops the whole group
and asks :func:`first_failure` which rank failed first: once one rank is gone, its peers
fail too (their collectives lose a peer), and the report must name the cause, not the
loudest casualty. :func:`with_restarts` then starts the group again from the latest
complete checkpoint, up to ``launch.max_restarts`` times; except after a :class:`NonFiniteStop`,
which a restart would only reach again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.config import Config, LaunchConfig, LaunchError

# What a launcher runs on every rank: ``entry(cfg, config_name)`` with torch.distributed
# initialised (or in the driver's process for a one-rank layout: ``launch.local_launcher.start``),
# returning rank 0's result (``{}`` elsewhere). It travels to the ranks pickled: a module-level
# function, or a ``functools.partial`` of one with picklable arguments.
RankEntry = Callable[[Config, str], dict[str, Any]]


class RankFailure(LaunchError):
    """A rank failed after the group started: what a restart from a checkpoint can get past
    (a start-up problem such as a port in use would only fail again)."""


class NonFiniteStop(LaunchError):
    """Training stopped at a non-finite loss or gradient norm (``launch/train.py``). Every
    rank stops at the same step, and a restart would reach it again (resuming is bit-exact):
    the launchers report it as it is, without restarting."""


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """Where one rank sits and how it reaches rank 0; ``gpu`` is its CUDA device index,
    or None for a CPU rank (gloo)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    threads: int
    gpu: int | None = None

    def variables(self) -> dict[str, str]:
        """The environment torch.distributed's ``env://`` rendezvous reads."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def pick_port(host: str, wanted: int | None) -> int:
    """``wanted`` if nothing listens on it at ``host``, else a free port the OS picks.

    Raises ``LaunchError`` when ``wanted`` (``launch.master_port``) is taken: found here,
    before training, rather than as a rendezvous timeout minutes later.
    """
    with socket.socket() as sock:
        try:
            sock.bind((host, wanted or 0))
        except OSError as err:
            raise LaunchError(
                f"launch.master_port={wanted} is in use on {host} (rank 0's node): {err.strerror}; "
                "choose another port, or null to let rank 0 pick a free one"
            ) from None
        return sock.getsockname()[1]


def log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank-{rank}.log"


class _Tee:
    """A text stream writing to several streams (rank 0 of the local launcher: the console and its log)."""

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


def redirect_output(path: Path, echo: bool) -> None:
    """Send this process's output (file descriptors too: megatron's and gloo's C++ logs)
    to its log file; with ``echo`` the console keeps receiving it as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    if echo:
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
        return
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log


def _export(launch: LaunchConfig, env: RankEnv) -> None:
    """The rank's environment; NCCL options only when configured, so a cluster's own
    settings (e.g. exported by its setup commands) stay in force otherwise."""
    os.environ.update(env.variables())
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser would compile for ~16 s per rank
    for name, value in (("NCCL_SOCKET_IFNAME", launch.nccl_socket_ifname), ("NCCL_IB_HCA", launch.nccl_ib_hca)):
        if value is not None:
            os.environ[name] = value


def init_distributed(launch: LaunchConfig, env: RankEnv) -> None:
    """Environment, threads and device first, then the process group (gloo on CPU, NCCL
    on a GPU), with ``launch.timeout_minutes`` as the timeout of every collective."""
    _export(launch, env)
    torch.set_num_threads(env.threads)
    if env.gpu is not None:
        torch.cuda.set_device(env.gpu)
    backend = "gloo" if env.gpu is None else "nccl"
    timeout = timedelta(minutes=launch.timeout_minutes)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def run_rank(entry: RankEntry, cfg: Config, config_name: str, env: RankEnv, echo: bool) -> dict[str, Any]:
    """Run ``entry`` as one rank of the group; return its result (rank 0's result: the
    launch's). ``cfg.train.run_dir`` must be set and the same for every rank."""
    run_dir = Path(str(cfg.train.run_dir))
    redirect_output(log_path(run_dir, env.rank), echo)
    device = "cpu" if env.gpu is None else f"cuda:{env.gpu}"
    print(
        f"rank {env.rank} of {env.world_size}: pid {os.getpid()} on {socket.gethostname()}, local rank "
        f"{env.local_rank} of {env.local_world_size}, {device}, {env.threads} threads, "
        f"rendezvous {env.master_addr}:{env.master_port}",
        flush=True,
    )
    try:
        init_distributed(cfg.launch, env)
        return entry(cfg, config_name)
    except BaseException as err:
        _record_failure(run_dir, env.rank, err)
        traceback.print_exc()  # into the rank's log: a Ray actor hands its error to the driver only
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure_file(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank-{rank}.error.json"


def _record_failure(run_dir: Path, rank: int, err: BaseException) -> None:
    record = {"time": time.time(), "error": f"{type(err).__name__}: {err}", "restartable": not isinstance(err, NonFiniteStop)}
    _failure_file(run_dir, rank).write_text(json.dumps(record))


def _recorded(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """``rank``'s failure record (time, error, restartable), if it wrote one."""
    file = _failure_file(run_dir, rank)
    return json.loads(file.read_text()) if file.is_file() else None


def clear_failures(run_dir: Path, world_size: int) -> None:
    """Forget the records of an earlier attempt, which would otherwise compete for "first"."""
    for rank in range(world_size):
        _failure_file(run_dir, rank).unlink(missing_ok=True)


def first_failure(run_dir: Path, world_size: int, died: dict[int, str], exited: dict[int, str]) -> tuple[int, str]:
    """The rank that failed first and why.

    ``died``: ranks whose process ended, before the supervisor stopped the group, without
    being able to record why (a signal, the OOM killer, a lost node); they come first,
    since their peers only fail once a collective loses them. Otherwise the earliest
    recorded failure; otherwise the lowest rank in ``exited`` (failed without a record).
    """
    if died:
        rank = min(died)
        return rank, died[rank]
    recorded = [(record, r) for r in range(world_size) if (record := _recorded(run_dir, r)) is not None]
    if recorded:
        first, rank = min(recorded, key=lambda item: item[0]["time"])
        return rank, first["error"].splitlines()[0][:300]
    rank = min(exited)
    return rank, exited[rank]


def group_failure(run_dir: Path, world_size: int, died: dict[int, str], exited: dict[int, str]) -> LaunchError:
    """The error a supervisor raises once it has stopped every rank: a ``RankFailure``
    (restartable), or the ``NonFiniteStop`` every rank agreed on."""
    rank, why = first_failure(run_dir, world_size, died, exited)
    record = None if rank in died else _recorded(run_dir, rank)
    if record is not None and not record.get("restartable", True):
        stop = record["error"].removeprefix(f"{NonFiniteStop.__name__}: ")
        return NonFiniteStop(f"{stop} (on every rank; their logs: {log_path(run_dir, rank).parent})")
    return RankFailure(
        f"rank {rank} of {world_size} failed first ({why}); the other ranks were stopped. "
        f"Its log: {log_path(run_dir, rank)}"
    )


def _resume_point(cfg: Config) -> tuple[Config, str]:
    """The config that continues from the latest complete checkpoint (or from scratch,
    dropping the metrics of the lost steps, when none was written yet)."""
    from launch.metrics import truncate_after
    from parallel.checkpoint import latest_checkpoint

    run_dir = Path(str(cfg.train.run_dir))
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        truncate_after(run_dir, 0)
    train = dataclasses.replace(cfg.train, resume=found is not None)
    return dataclasses.replace(cfg, train=train), str(found) if found else "the first step (no checkpoint yet)"


def with_restarts(cfg: Config, attempt: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """``attempt(cfg)``; after a rank failure, up to ``launch.max_restarts`` more attempts,
    each resuming from the latest complete checkpoint. Resuming is bit-exact, so a run
    that was restarted ends with the losses of one that was not."""
    restarts, done = cfg.launch.max_restarts, 0
    while True:
        try:
            return attempt(cfg)
        except RankFailure as err:
            if done == restarts:
                if restarts:
                    raise RankFailure(f"{err}; gave up after {restarts} restart(s)") from err
                raise
            done += 1
            cfg, where = _resume_point(cfg)
            print(f"{err}\nrestart {done} of {restarts}: resuming the group from {where}", file=sys.stderr, flush=True)
