"""Start a multi-rank run on a Ray cluster: one actor per rank.

    moe train configs/tiny.yaml parallel.dp=2 parallel.ep=2   a Ray cluster on this machine, for this run
    moe train configs/glam-64e.yaml --address auto            an existing cluster (ray start, ray up, KubeRay)

Plain actors rather than Ray Train's TorchTrainer (docs/launching.md): the rank code is the
same function the local launcher runs (``launch/rank.py``), around the same entry point
(``launch.rank.RankEntry``: training, or ``moe eval``'s ranks), so both launchers share one
rendezvous, one log layout and one failure report; restarts resume from this project's
sharded, atomic checkpoints rather than through a second checkpoint system; and the
placement (rank order by node, ``num_gpus`` per actor, the CUDA_VISIBLE_DEVICES policy)
stays in view, in this file.

Every step before training fails with one message (``LaunchError``):

1. connect: to ``launch.address`` (checked to be reachable first), or start a local
   cluster that listens on 127.0.0.1 only, keeps its files under ``run_dir/ray`` (or
   ``launch.ray_temp_dir``) and uses this process's token; it is shut down afterwards;
2. check that ``world × (cpus_per_rank CPU, gpus_per_rank GPU, gpu_type)`` fits the
   cluster (a local cluster cannot grow: at once; a remote one may be autoscaling: after
   ``launch.start_timeout_s``);
3. a placement group of one bundle per rank, PACK; ranks are numbered node by node so
   that consecutive ranks (tensor- and expert-parallel groups) share a node;
4. one actor per rank in its bundle (``num_gpus=1`` on GPU ranks); the data set is prepared
   once per node (by the driver when the cluster is this machine, else by the first actor
   on each node); rank 0's actor picks MASTER_ADDR (its node's address) and MASTER_PORT,
   which the driver hands to the others.

One process may start any number of local clusters, one after the other (``moe
check-layouts`` and ``moe bench layouts`` start one per multi-rank layout, a Python caller
one per call). They share one token, drawn when the process starts its first and kept for
the process's life: Ray reads a token once per process and keeps it, so a second cluster
with a fresh token would refuse this process (``InvalidAuthToken``). A cluster per run,
rather than one held for a whole command, keeps each run's Ray files in its own run
directory and leaves nothing running between runs.

Supervision: the driver waits on every actor and echoes rank 0's log (progress bar,
metrics) to its console; when one fails it kills the whole group at once, names the rank
that failed first and why, and with ``launch.max_restarts`` starts the group again from
the latest complete checkpoint.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from launch.config import Config, LaunchConfig
from launch.data import DataConfig
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

# A Unix socket path has at most 107 bytes; Ray puts its sockets at
# <temp dir>/session_<date>_<time>_<micros>_<pid>/sockets/plasma_store (~65 bytes past the temp dir).
MAX_TEMP_DIR_CHARS = 40
GRACE_S = 1.0  # how long a failure waits for near-simultaneous ones, so the first one is named
POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class Slot:
    """A rank's place: its bundle in the placement group, its node, its rank on that node."""

    bundle: int
    node: str
    local_rank: int
    local_world_size: int


def order_ranks(bundle_nodes: dict[int, str]) -> list[Slot]:
    """Slots for ranks 0..N-1 from the placement group's bundle -> node map: grouped by
    node (nodes in the order of their first bundle), so consecutive ranks share a node."""
    nodes = list(dict.fromkeys(bundle_nodes[b] for b in sorted(bundle_nodes)))
    slots = []
    for node in nodes:
        bundles = sorted(b for b, n in bundle_nodes.items() if n == node)
        slots += [Slot(b, node, i, len(bundles)) for i, b in enumerate(bundles)]
    return slots


def rank_resources(launch: LaunchConfig, cluster: dict[str, float], world_size: int) -> dict[str, float]:
    """One rank's bundle. GPU ranks default to one GPU and one CPU; CPU ranks to an even
    share of the cluster's CPUs (fractions: 4 ranks on 2 cores get 0.5 each)."""
    gpus = launch.gpus_per_rank
    if gpus is None:
        gpus = int(cluster.get("GPU", 0) > 0 or launch.gpu_type is not None)
    cpus = launch.cpus_per_rank
    if cpus is None:
        cpus = 1.0 if gpus else max(int(cluster.get("CPU", 0) / world_size * 1e4) / 1e4, 1e-4)
    bundle = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = float(gpus)
    if launch.gpu_type is not None:
        bundle[f"accelerator_type:{launch.gpu_type}"] = 1e-3
    return bundle


def shortfall(bundle: dict[str, float], world_size: int, cluster: dict[str, float]) -> str | None:
    """What the cluster lacks for ``world_size`` bundles, in words; None if it has enough."""
    missing = []
    for key, amount in bundle.items():
        if key.startswith("accelerator_type:"):
            if key not in cluster:
                types = sorted(k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:"))
                missing.append(
                    f"launch.gpu_type={key.split(':', 1)[1]!r}: the cluster has no GPU of that type "
                    f"(it has: {', '.join(types) or 'no GPU type'})"
                )
        elif amount * world_size > cluster.get(key, 0) + 1e-9:
            missing.append(
                f"{world_size} ranks x {amount:g} {key} = {amount * world_size:g} {key}, "
                f"but the cluster has {cluster.get(key, 0):g}"
            )
    return "; ".join(missing) or None


def _too_big(missing: str) -> LaunchError:
    return LaunchError(
        f"the layout asks for more than the Ray cluster has: {missing}. Use fewer ranks (parallel.dp, ep), "
        f"smaller ranks (launch.cpus_per_rank, gpus_per_rank, gpu_type), or a bigger cluster"
    )


# -- connecting -------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` or ``ray://HOST:PORT`` address; None for ``auto``."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    return (match.group(1), int(match.group(2))) if match else None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, with the address in the message, when nothing answers there (Ray
    itself keeps retrying before it reports a GCS timeout)."""
    host_port = _host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=timeout_s).close()
    except OSError as err:
        raise LaunchError(
            f"launch.address={address!r}: nothing answers at {host_port[0]}:{host_port[1]} ({err}); "
            "start the cluster (ray start --head) or check the address, the port (6379 by default) and firewalls"
        ) from None


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the Ray processes started in it inherit
    them); restore the previous values afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _short_path(path: Path) -> Iterator[Path]:
    """``path``, or a short symbolic link to it when Ray's socket paths under it would
    exceed the Unix limit (a run directory deep inside a project or a pytest tmp dir)."""
    if len(str(path)) <= MAX_TEMP_DIR_CHARS:
        yield path
        return
    holder = Path(tempfile.mkdtemp(prefix="moe-ray-"))
    link = holder / "r"
    link.symlink_to(path, target_is_directory=True)
    try:
        yield link
    finally:
        shutil.rmtree(holder)


def _has_token() -> bool:
    """Whether this machine holds a Ray token, where Ray looks for one."""
    in_environment = bool({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ))
    return in_environment or (Path.home() / ".ray" / "auth_token").is_file()


@functools.cache
def _process_token() -> str:
    """The token of every local cluster this process starts. Ray reads a token once per
    process and keeps it (its token loader caches the first one it finds), so a second
    local cluster with a token of its own would reject this process as its client."""
    return secrets.token_hex(32)


def _local_env() -> dict[str, str]:
    """Loopback only (Ray's own switch for single-machine clusters, read when ray is
    imported), and this process's token in the environment for the token authentication
    Ray turns on for new local clusters, so ~/.ray/auth_token is neither needed nor written.
    RAY_AUTH_MODE is Ray's to set (it refreshes its cached mode when it does)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        env["RAY_AUTH_TOKEN"] = _process_token()
    return env


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger's warnings for the block (Ray's notice that token
    authentication is on: docs/launching.md says so once, not every run)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _make_temp_dir(temp_dir: Path) -> None:
    """Create the local cluster's directory, or one ``LaunchError`` naming the setting."""
    try:
        temp_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(
            f"cannot create the local Ray cluster's directory {temp_dir} ({err.strerror}): set "
            "launch.ray_temp_dir (by default <train.run_dir>/ray) to a writable directory"
        ) from None


def _first_sentence(text: str) -> str:
    """``text`` up to its first full stop, without it (Ray's errors go on with generic advice)."""
    end = text.find(". ")
    return (text if end < 0 else text[:end]).rstrip(".")


@contextmanager
def local_cluster(temp_dir: Path) -> Iterator[None]:
    """A Ray cluster on this machine for the duration of the block: listening on
    127.0.0.1 only, its session files under ``temp_dir``, shut down afterwards. A
    cluster that does not start is one ``LaunchError``."""
    _make_temp_dir(temp_dir)
    with _environment(_local_env()), _short_path(temp_dir.resolve()) as short:
        import ray

        try:
            with _quiet("ray._private.authentication.authentication_token_setup"):
                ray.init(
                    "local", include_dashboard=False, _temp_dir=str(short),
                    log_to_driver=False, logging_level=logging.WARNING,
                )
        except Exception as err:  # noqa: BLE001 (whatever stopped Ray: one message)
            ray.shutdown()  # the part of the cluster that did start
            raise LaunchError(
                f"the local Ray cluster did not start ({_first_sentence(_error_line(err))}); fix what Ray names "
                f"(its logs: {temp_dir}/session_latest/logs; with neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH "
                "set, the launcher gives the cluster a token of its own), or run the ranks without Ray: "
                "launch.launcher=local"
            ) from None
        try:
            address = ray.util.get_node_ip_address()
            if address != "127.0.0.1":
                print(f"warning: ray was imported before the launcher; the local Ray cluster listens on {address}",
                      file=sys.stderr)
            yield
        finally:
            ray.shutdown()


@contextmanager
def _connected(address: str) -> Iterator[None]:
    """Connected to the existing cluster at ``address`` for the block (the cluster stays
    up). Ray turns token authentication on by itself only for ``auto``; for an explicit
    address it is turned on here too when this machine holds a token (a cluster without
    authentication accepts a client that sends one)."""
    auth = {"RAY_AUTH_MODE": "token"} if "RAY_AUTH_MODE" not in os.environ and _has_token() else {}
    with _environment(auth):
        import ray

        try:
            ray.init(address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as err:  # noqa: BLE001 (whatever stopped the connection: one message)
            raise LaunchError(
                f"launch.address={address!r}: cannot connect to a Ray cluster there ({_error_line(err)}). "
                "If it uses token authentication, set RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
            ) from None
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def _session(launch: LaunchConfig, run_dir: Path) -> Iterator[bool]:
    """Connected to Ray for the block; yields whether the cluster is a fixed local one.
    A connection this process already holds (a test session's cluster) is used as is."""
    if launch.address is None and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield True
    elif launch.address is None:
        with local_cluster(Path(launch.ray_temp_dir) if launch.ray_temp_dir else run_dir / "ray"):
            yield True
    else:
        with _connected(launch.address):
            yield False


# -- the ranks --------------------------------------------------------------------


def _ray_gpu() -> int | None:
    """This actor's CUDA device: Ray's GPU id when every GPU is visible
    (``launch.cuda_visible_devices=all``), else device 0 of the one Ray left visible."""
    import ray
    import torch

    ids = ray.get_gpu_ids()
    if not ids:
        return None
    return int(ids[0]) if torch.cuda.device_count() > 1 else 0


class RankActor:
    """One rank's process, started by Ray in its bundle of the placement group."""

    def prepare_data(self, data: DataConfig) -> None:
        """Prepare the data set on this node (the driver calls it on one actor per node,
        before any rank reads: concurrent first-time preparations would race)."""
        from launch.data import ensure_dataset

        ensure_dataset(data)

    def rendezvous(self, wanted_port: int | None) -> tuple[str, int]:
        """Rank 0's address as the other nodes reach it, and a port free on it."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, pick_port(host, wanted_port)

    def run(self, entry: RankEntry, cfg: Config, config_name: str, env: RankEnv) -> dict[str, Any]:
        """Run ``entry`` as rank ``env.rank`` until it returns; rank 0 returns the launch's result."""
        return run_rank(entry, cfg, config_name, dataclasses.replace(env, gpu=_ray_gpu()), echo=False)


class _LogEcho:
    """Copies what rank 0 appends to its log to this console: the progress bar and the
    metrics, as a single-process run shows them (rank 0 may run on another node; the
    run directory is shared there anyway, for the checkpoints)."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out = path, out
        self.offset = path.stat().st_size if path.is_file() else 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self) -> None:
        """Write out whatever the log gained since the last call."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        if data:
            self.out.write(self.decoder.decode(data))
            self.out.flush()


def _death_reason(err: Exception) -> str:
    """Why Ray says an actor's process ended (it cannot know the signal)."""
    text = str(err)
    because = re.search(r"The actor is dead because (.*?)\.", text)
    kind = re.search(r"Worker exit type: (\w+)", text)
    detail = because.group(1) if because else text.splitlines()[0]
    exit_type = f", {kind.group(1)}" if kind else ""
    return f"actor died: {detail}{exit_type}; killed by a signal, the OOM killer, a crash or a lost node"


def _error_line(err: Exception) -> str:
    """``Type: first line`` of a rank's own error (a ``RayTaskError`` wraps it)."""
    cause = getattr(err, "cause", None) or err
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}"[:300]


def _outcomes(refs: list[Any], ranks: dict[Any, int]) -> tuple[dict[int, str], dict[int, str]]:
    """Of finished calls, the ranks whose actor died and those that raised."""
    import ray
    from ray.exceptions import RayActorError

    died, exited = {}, {}
    for ref in refs:
        try:
            ray.get(ref)
        except RayActorError as err:
            died[ranks[ref]] = _death_reason(err)
        except Exception as err:  # noqa: BLE001 (the rank's own error, reported by rank)
            exited[ranks[ref]] = _error_line(err)
    return died, exited


def _supervise(refs: list[Any], run_dir: Path, echo: _LogEcho) -> dict[str, Any]:
    """Wait for every rank; on the first failure (after a grace second for the ones
    failing with it) raise ``RankFailure`` naming the rank that failed first."""
    import ray

    ranks = {ref: rank for rank, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        echo.pump()
        died, exited = _outcomes(ready, ranks)
        if died or exited:
            late, _ = ray.wait(pending, num_returns=len(pending), timeout=GRACE_S) if pending else ([], [])
            more_died, more_exited = _outcomes(late, ranks)
            echo.pump()
            raise group_failure(run_dir, len(refs), {**died, **more_died}, {**exited, **more_exited})
    return ray.get(refs[0])


def _placement_group(bundle: dict[str, float], world_size: int, launch: LaunchConfig) -> Any:
    """One bundle per rank, PACK (as few nodes as possible), ready within
    ``launch.start_timeout_s`` or one ``LaunchError`` saying what is missing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([bundle] * world_size, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=launch.start_timeout_s)
    if not ready:
        remove_placement_group(pg)
        missing = shortfall(bundle, world_size, ray.cluster_resources())
        raise LaunchError(
            f"the Ray cluster did not place {world_size} ranks of {bundle} within launch.start_timeout_s="
            f"{launch.start_timeout_s}: {missing or 'it has enough in total, but not free, or no node holds a whole bundle'}"
        )
    return pg


def _start_actors(pg: Any, slots: list[Slot], bundle: dict[str, float], launch: LaunchConfig) -> list[Any]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict[str, Any] = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)}
    extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    if extra:
        options["resources"] = extra
    if launch.cuda_visible_devices == "all":
        options["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    actor_class = ray.remote(RankActor)
    return [
        actor_class.options(
            **options, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=s.bundle)
        ).remote()
        for s in slots
    ]


def _get_before_start(refs: list[Any], what: str, timeout_s: int) -> list[Any]:
    """``ray.get`` for the steps before training, any failure as one ``LaunchError``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except RayTaskError as err:
        if isinstance(err.cause, LaunchError):
            raise LaunchError(str(err.cause)) from None
        raise LaunchError(f"{what} failed: {_error_line(err)}") from None
    except GetTimeoutError:
        raise LaunchError(f"{what} did not finish within launch.start_timeout_s={timeout_s}") from None
    except Exception as err:  # noqa: BLE001 (an actor that could not start: one message)
        raise LaunchError(f"{what} failed: {_error_line(err)}") from None


def _prepare_data(cfg: Config, actors: list[Any], slots: list[Slot]) -> None:
    """Prepare the data set once per node before any rank reads it: here when this machine
    is the cluster (its console shows the progress), else by the first actor on each node."""
    if cfg.launch.address is None:
        from launch.data import ensure_dataset

        ensure_dataset(cfg.data)
        return
    first_on_node = [a.prepare_data.remote(cfg.data) for a, s in zip(actors, slots) if s.local_rank == 0]
    _get_before_start(first_on_node, "preparing the data", cfg.launch.start_timeout_s)


def _attempt(
    entry: RankEntry, cfg: Config, config_name: str, world_size: int, bundle: dict[str, float]
) -> dict[str, Any]:
    """One start of the whole group; rank 0's result. The group is gone when it returns."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    launch, run_dir = cfg.launch, Path(str(cfg.train.run_dir))
    clear_failures(run_dir, world_size)
    pg = _placement_group(bundle, world_size, launch)
    actors: list[Any] = []
    try:
        slots = order_ranks(placement_group_table(pg)["bundles_to_node_id"])
        actors = _start_actors(pg, slots, bundle, launch)
        _prepare_data(cfg, actors, slots)
        rendezvous = actors[0].rendezvous.remote(launch.master_port)
        [(host, port)] = _get_before_start([rendezvous], "rank 0's rendezvous", launch.start_timeout_s)
        threads = launch.threads or max(1, int(bundle["CPU"]))
        envs = [RankEnv(r, world_size, s.local_rank, s.local_world_size, host, port, threads) for r, s in enumerate(slots)]
        echo = _LogEcho(log_path(run_dir, 0), sys.stderr)
        return _supervise([a.run.remote(entry, cfg, config_name, env) for a, env in zip(actors, envs)], run_dir, echo)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)


def launch_ray(cfg: Config, config_name: str, world_size: int, entry: RankEntry | None = None) -> dict[str, Any]:
    """Run ``entry`` (default: ``launch.train.train_rank``) on ``world_size`` Ray actors;
    return rank 0's result. ``cfg.train.run_dir`` must be set and, on several nodes, on a
    filesystem they share."""
    from launch.train import train_rank

    launch = cfg.launch
    if launch.address is not None:
        check_reachable(launch.address)
    with _session(launch, Path(str(cfg.train.run_dir))) as fixed:
        import ray

        cluster = ray.cluster_resources()
        bundle = rank_resources(launch, cluster, world_size)
        missing = shortfall(bundle, world_size, cluster)
        if missing and fixed:
            raise _too_big(missing)
        if missing:
            print(f"waiting up to {launch.start_timeout_s}s for the cluster to grow: {missing}", file=sys.stderr)
        return with_restarts(cfg, lambda c: _attempt(entry or train_rank, c, config_name, world_size, bundle))
