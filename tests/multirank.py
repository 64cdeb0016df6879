"""A persistent pool of gloo ranks for multi-rank tests.

Starting a rank costs seconds (interpreter, torch, megatron-core imports, gloo rendezvous),
so a pool of ``world_size`` processes is started once per test session and runs one
function per test on every rank. A test function receives ``(rank, world_size, *args)``,
must be importable at module top level (it is pickled by reference), and returns
something picklable. A rank that raises, or a call that outlives its timeout, tears the
whole pool down (peers may be blocked in a collective) and the error is re-raised here
with the failing rank's traceback; the next call starts a fresh pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_megatron() -> None:
    """megatron-core keeps process-wide state between uses; clear it between tests."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        from parallel.groups import destroy_groups

        destroy_groups()  # also the groups a test made itself: each gloo group keeps threads


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            torch.manual_seed(0)
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # report everything, including assertion errors
            results.put((rank, False, traceback.format_exc()))
        finally:
            _reset_megatron()
    dist.destroy_process_group()


class RankPool:
    """``world_size`` gloo ranks that run test functions on demand."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[mp.process.BaseProcess] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results: mp.Queue = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        # Not daemonic: megatron's dist_checkpointing save starts writer processes, which a
        # daemonic process may not; close() (the fixture's teardown) stops the ranks.
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=False)
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the results by rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args))
        results: dict[int, Any] = {}
        while len(results) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(
                    f"{fn.__name__} did not finish on ranks {sorted(set(range(self.world_size)) - set(results))} "
                    f"within {timeout:.0f}s; the pool was torn down"
                ) from None
            if not ok:
                self.close()
                raise AssertionError(f"rank {rank} of {self.world_size} failed in {fn.__name__}:\n{value}")
            results[rank] = value
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Kill the ranks and what they started (dist_checkpointing's writer manager would
        outlive a killed rank)."""
        import psutil

        for proc in self._procs:
            if proc.is_alive():
                try:
                    children = psutil.Process(proc.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    children = []
                proc.kill()
                for child in children:
                    child.kill()
            proc.join(timeout=10)
        self._procs = []
