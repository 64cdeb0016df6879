"""Where every run starts (:func:`start`), and the launcher without Ray.

``start`` validates the layout and the data against the model, runs a one-rank layout in
this process (no launcher: nothing to rendezvous or supervise, and what most tests and
debugging sessions run), and hands a multi-rank layout to the launcher that
``launch.launcher`` names: ``ray`` (the default, ``launch/ray_launcher.py``; also a
one-rank layout when ``launch.address`` names a cluster) or ``local``, this module's: one
spawned process per rank on this machine (gloo on CPU, one process per GPU on GPUs),
rendezvous on 127.0.0.1. What runs on each rank is the entry point
(``launch.rank.RankEntry``): training (``launch.train.train_rank``) unless the caller
names another (``moe eval``'s ranks), under the same supervision, logs and failure records.

Supervision (local): the driver polls all ranks; when one exits with an error, it kills
the rest at once (a dead rank otherwise leaves its peers blocked in a collective until
the timeout) and reports which rank failed first, why, and its log
(``launch/rank.py`` holds what both launchers share).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from launch.config import Config
from launch.rank import (
    LaunchError,
    RankEntry,
    RankEnv,
    clear_failures,
    group_failure,
    log_path,
    pick_port,
    run_rank,
    with_restarts,
)

__all__ = ["LaunchError", "launch_local", "start"]

LOCALHOST = "127.0.0.1"


def _rank_main(entry: RankEntry, cfg: Config, config_name: str, env: RankEnv, result: Connection | None) -> None:
    """One rank's process; rank 0 sends its result to the driver through ``result``."""
    gpu = env.local_rank % torch.cuda.device_count() if torch.cuda.is_available() else None
    try:
        out = run_rank(entry, cfg, config_name, dataclasses.replace(env, gpu=gpu), echo=env.rank == 0)
    except Exception:
        raise SystemExit(1) from None  # run_rank logged and recorded it; exit without a second traceback
    if result is not None:
        result.send(out)
        result.close()


def _receive(result: Connection, into: list[dict[str, Any]]) -> bool:
    """Append rank 0's result to ``into`` if it has been sent; whether the pipe is done
    (the result received, or rank 0 closed its end without sending: it failed)."""
    if not result.poll():
        return False
    try:
        into.append(result.recv())
    except EOFError:
        pass
    return True


def _supervise(procs: list[mp.process.BaseProcess], run_dir: Path, result: Connection) -> dict[str, Any]:
    """Wait for every rank, receiving rank 0's result as it is sent (a result larger than the
    pipe's buffer holds rank 0 in ``send`` until it is read); on the first failure stop them
    all and name the culprit."""
    received: list[dict[str, Any]] = []
    done = False
    while any(p.is_alive() for p in procs) and all(p.exitcode in (None, 0) for p in procs):
        done = done or _receive(result, received)
        time.sleep(0.2)
    if all(p.exitcode == 0 for p in procs):
        if not done:
            _receive(result, received)
        if received:
            return received[0]
        raise LaunchError(f"rank 0 exited without sending its result; its log: {log_path(run_dir, 0)}")
    codes = [p.exitcode for p in procs]  # as seen before the stop; None: still running
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()
    died = {r: f"killed by signal {-code}" for r, code in enumerate(codes) if code is not None and code < 0}
    exited = {r: f"exit code {code}" for r, code in enumerate(codes) if code}
    raise group_failure(run_dir, len(procs), died, exited)


def _attempt(entry: RankEntry, cfg: Config, config_name: str, world_size: int) -> dict[str, Any]:
    """One start of the whole group; rank 0's result."""
    run_dir = Path(str(cfg.train.run_dir))
    clear_failures(run_dir, world_size)
    port = pick_port(LOCALHOST, cfg.launch.master_port)
    threads = cfg.launch.threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    envs = [RankEnv(r, world_size, r, world_size, LOCALHOST, port, threads) for r in range(world_size)]
    procs = [ctx.Process(target=_rank_main, args=(entry, cfg, config_name, env, writer if env.rank == 0 else None))
             for env in envs]
    for p in procs:
        p.start()
    writer.close()  # rank 0 holds its own copy
    try:
        return _supervise(procs, run_dir, reader)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    finally:
        reader.close()


def launch_local(cfg: Config, config_name: str, world_size: int, entry: RankEntry | None = None) -> dict[str, Any]:
    """Run ``entry`` (default: ``launch.train.train_rank``) on ``world_size`` local
    processes; return rank 0's result. ``cfg.train.run_dir`` must be set (every rank writes
    there). The data set is prepared here, once: ranks preparing the corpus at the same
    time would race."""
    from launch.data import ensure_dataset
    from launch.train import train_rank

    ensure_dataset(cfg.data)
    return with_restarts(cfg, lambda c: _attempt(entry or train_rank, c, config_name, world_size))


def start(cfg: Config, config_name: str, entry: RankEntry | None = None) -> dict[str, Any]:
    """Run ``entry`` on every rank of ``cfg``'s layout with the configured launcher; return
    rank 0's result. The default entry, ``launch.train.train_rank``, trains (its result:
    the run's summary); ``moe eval`` passes its own. A one-rank layout calls ``entry`` in
    this process, without torch.distributed.

    The data is checked against the model, then a layout whose model states cannot fit is
    refused (``launch.preflight``), before any rank starts. The run
    directory is settled here, once, for every layout, before any work starts
    (each rank computing its own timestamped directory would scatter the run): a directory
    that holds another run is refused unless resuming, one that cannot be created and
    written is one error, and a resume's checkpoint is found and its config checked
    (``launch.train.check_resume``) before any rank starts. A run that fails before it
    recorded anything leaves no outputs behind (``launch.train.claimed_run_dir``). Across
    ranks the directory is made absolute: ranks may not share the driver's working directory.
    """
    from launch.preflight import check_data, check_memory
    from launch.train import check_layout, check_resume, claimed_run_dir, resolve_run_dir, train_rank

    entry = entry or train_rank
    topology = check_layout(cfg)
    check_data(cfg)
    check_memory(cfg, topology)
    one_process = topology.world_size == 1 and cfg.launch.address is None
    run_dir = resolve_run_dir(cfg.train, config_name)
    run_dir = run_dir if one_process else run_dir.resolve()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
    if cfg.train.resume:
        check_resume(cfg, run_dir)
    with claimed_run_dir(run_dir, cfg.train.resume):
        if one_process:
            return entry(cfg, config_name)
        if cfg.launch.launcher == "local":
            return launch_local(cfg, config_name, topology.world_size, entry)
        from launch.ray_launcher import launch_ray

        return launch_ray(cfg, config_name, topology.world_size, entry)
