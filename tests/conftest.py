"""Shared test settings: deterministic CPU runs, few threads (CI has 2 cores)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from multirank import RankPool

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Without a GPU the Triton kernels run under the interpreter; triton reads this when it is
# first imported, so it is set before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def rank_pool() -> Iterator[Callable[[int], RankPool]]:
    """``rank_pool(world_size)``: a persistent gloo pool of that size, shared by the session."""
    from multirank import RankPool

    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray cluster for the session (starting one costs 2-5 s and 0.7 GB): the
    Ray launcher uses the connection this process holds. Yields its temp directory.
    No test module may import ray at collection: the cluster is bound to loopback by an
    environment variable that ray reads when it is first imported."""
    from launch.ray_launcher import local_cluster

    temp_dir = tmp_path_factory.mktemp("ray")
    with local_cluster(temp_dir):
        yield temp_dir


def _start_within(cfg: Any, seconds: float = 240.0, config_name: str = "tiny") -> dict[str, Any]:
    from launch.local_launcher import start

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["summary"] = start(cfg, config_name)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test's thread)
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run did not finish within {seconds:.0f}s"
    if "error" in box:
        raise box["error"]
    return box["summary"]


@pytest.fixture(scope="session")
def start_within() -> Callable[..., dict[str, Any]]:
    """``start_within(cfg, seconds=240)``: ``launch.local_launcher.start`` in a thread with a
    deadline, so that a hung group of ranks fails its test instead of the whole suite."""
    return _start_within


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-file slice of the embedded corpus, prepared once per session."""
    from launch.data import prepare, stdlib_sources

    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out
