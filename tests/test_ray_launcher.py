"""The Ray launcher: ranks as Ray actors on a local cluster (one per test session), the
group torn down and restarted from a checkpoint when a rank fails, one clear message for
each thing that prevents a start, and the cluster configs.

No module-level ``import ray``: the session cluster is bound to loopback by an environment
variable that ray reads when it is first imported (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.config import Config, load_config
from launch.data import prepare, stdlib_sources
from launch.metrics import read_metrics
from launch.rank import LaunchError
from launch.ray_launcher import order_ranks, rank_resources, shortfall
from moe.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
CLUSTER = ROOT / "configs" / "cluster"
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.normalize_weights=true", "moe.expert_ffn_dim=32",
    "moe.aux_loss_scope=global_batch", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
    "data.val_tokens=1024", "launch.timeout_minutes=2", "parallel.dp=2", "parallel.ep=2",
    "train.steps=40", "train.ckpt_every=8", "train.eval_every=1000",
]
RUN_TIMEOUT_S = 240
Start = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:40], out, val_fraction=0.2)
    return out


def _cfg(corpus: Path, run_dir: Path, *extra: str) -> Config:
    return load_config(TINY, [*SMALL, f"data.path={corpus}", f"train.run_dir={run_dir}", *extra])


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _pids(run_dir: Path, rank: int) -> list[int]:
    """The process ids rank ``rank`` had, one per start of the group (from its log's header)."""
    text = (run_dir / "logs" / f"rank-{rank}.log").read_text()
    return [int(pid) for pid in re.findall(rf"^rank {rank} of \d+: pid (\d+)", text, re.MULTILINE)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the pieces, without a cluster ------------------------------------------------------


def test_ranks_are_numbered_node_by_node() -> None:
    slots = order_ranks({0: "b", 1: "a", 2: "b", 3: "a", 4: "c"})
    assert [(s.bundle, s.node, s.local_rank, s.local_world_size) for s in slots] == [
        (0, "b", 0, 2), (2, "b", 1, 2), (1, "a", 0, 2), (3, "a", 1, 2), (4, "c", 0, 1),
    ]


def test_rank_resources_share_the_cpus_and_name_what_is_missing() -> None:
    cpu_cluster = {"CPU": 2.0, "memory": 1e10}
    launch = load_config(TINY).launch
    assert rank_resources(launch, cpu_cluster, 4) == {"CPU": 0.5}
    assert rank_resources(launch, cpu_cluster, 3) == {"CPU": 0.6666}
    assert shortfall(rank_resources(launch, cpu_cluster, 3), 3, cpu_cluster) is None
    gpu_cluster = {"CPU": 384.0, "GPU": 16.0, "accelerator_type:H100": 2.0}
    assert rank_resources(launch, gpu_cluster, 16) == {"CPU": 1.0, "GPU": 1.0}
    assert shortfall({"CPU": 1.0, "GPU": 1.0}, 32, gpu_cluster) == "32 ranks x 1 GPU = 32 GPU, but the cluster has 16"
    h200 = load_config(TINY, ["launch.gpu_type=H200"]).launch
    assert shortfall(rank_resources(h200, gpu_cluster, 8), 8, gpu_cluster) == (
        "launch.gpu_type='H200': the cluster has no GPU of that type (it has: H100)"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launch.launcher=slurm"], "launch.launcher='slurm': expected one of 'ray', 'local'"),
        (["launch.launcher=local", "launch.address=auto"], "launch.address='auto': must be a Ray cluster's address"),
        (["launch.max_restarts=-1"], "launch.max_restarts=-1: must be >= 0"),
        (["launch.cpus_per_rank=0"], "launch.cpus_per_rank=0.0: must be > 0 (fractions allowed)"),
        (["launch.gpus_per_rank=2"], "launch.gpus_per_rank=2: must be 0 (CPU ranks, gloo), 1"),
        (["launch.gpus_per_rank=0", "launch.gpu_type=H100"], "launch.gpu_type='H100': must name a Ray accelerator type"),
        (["launch.master_port=80"], "launch.master_port=80: must be in [1024, 65535]"),
        (["launch.start_timeout_s=0"], "launch.start_timeout_s=0: must be >= 1"),
        (["launch.nccl_socket_ifname="], "launch.nccl_socket_ifname='': must be a non-empty NCCL setting"),
        (["launch.cuda_visible_devices=some"], "launch.cuda_visible_devices='some': expected one of 'per_rank', 'all'"),
    ],
)
def test_launch_options_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_reports_an_unreachable_address_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from launch.cli import main

    port = _free_port()
    began = time.perf_counter()
    code = main(["train", str(TINY), "--address", f"127.0.0.1:{port}", "parallel.dp=2", "parallel.ep=2",
                 f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: launch.address='127.0.0.1:{port}': nothing answers at 127.0.0.1:{port}")
    assert time.perf_counter() - began < 10
    assert not (tmp_path / "run").exists()


def test_a_local_cluster_that_does_not_start_is_one_message(tmp_path: Path) -> None:
    """Ray refusing to start (here: a token file that does not exist) is one line naming
    what failed and what to do, in a process that holds no Ray cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    cmd = [sys.executable, "-m", "launch.cli", "train", str(TINY), *SMALL, f"train.run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: the local Ray cluster did not start (AuthenticationError: RAY_AUTH_TOKEN_PATH is "
                          f"set but file cannot be opened or is empty: {tmp_path / 'no-token'}); fix what Ray names")
    assert err.endswith("or run the ranks without Ray: launch.launcher=local")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_local_cluster_directory_that_cannot_be_made_is_one_message(tmp_path: Path) -> None:
    from launch.ray_launcher import local_cluster

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LaunchError, match=rf"cannot create the local Ray cluster's directory {blocker}/ray \(.*\): "
                                          r"set launch.ray_temp_dir \(by default <train.run_dir>/ray\) to a writable"):
        with local_cluster(blocker / "ray"):
            pass


# -- on the session's local cluster --------------------------------------------------------


def test_local_cluster_is_loopback_only_token_authenticated_and_keeps_its_files(ray_cluster: Path) -> None:
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    assert any(ray_cluster.glob("session_*/logs"))


@pytest.fixture(scope="module")
def reference(ray_cluster: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory, start_within: Start) -> Path:
    """An uninterrupted 2-rank run (ep=2, dp=2)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    summary = start_within(_cfg(corpus, run_dir))
    assert summary["layout"] == {"world_size": 2, "ep": 2, "dp": 2, "micro_batches": 1}
    return run_dir


def test_two_and_four_ranks_train_through_ray_and_agree(
    reference: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], start_within: Start
) -> None:
    run_2 = reference
    assert sorted(p.name for p in (run_2 / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    header = (run_2 / "logs" / "rank-1.log").read_text().splitlines()[0]
    assert re.match(r"rank 1 of 2: pid \d+ on .*, local rank 1 of 2, cpu, 1 threads, rendezvous 127\.0\.0\.1:\d+$", header)
    assert len(_losses(run_2)) == 40

    run_4 = tmp_path / "four"
    capsys.readouterr()
    summary = start_within(_cfg(corpus, run_4, "parallel.dp=4", "parallel.ep=4", "train.steps=4"))
    assert summary["layout"] == {"world_size": 4, "ep": 4, "dp": 4, "micro_batches": 1}
    assert "rank 0 of 4: pid" in capsys.readouterr().err  # the driver echoes rank 0's log
    assert "rank 3 of 4: pid" in (run_4 / "logs" / "rank-3.log").read_text()
    # Steps 1-4 see the same learning rates whatever the run's length: the layouts agree.
    four, two = _losses(run_4), _losses(run_2)
    assert all(abs(four[s] - two[s]) <= 1e-5 * abs(two[s]) for s in range(1, 5)), (four, two)


def _kill_after_checkpoint(run_dir: Path, step: int, rank: int, times: dict[str, float]) -> threading.Thread:
    """SIGKILL ``rank``'s process once checkpoint ``step`` is complete, then note when the
    restarted group has resumed."""

    def kill() -> None:
        marker = run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(_pids(run_dir, rank)[-1], signal.SIGKILL)
        times["killed"] = time.monotonic()
        log = run_dir / "logs" / "rank-0.log"
        while "resumed from" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        times["resumed"] = time.monotonic()

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_rank_restarts_the_group_from_the_checkpoint_and_ends_as_if_uninterrupted(
    reference: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], start_within: Start
) -> None:
    run_dir = tmp_path / "killed"
    times: dict[str, float] = {}
    killer = _kill_after_checkpoint(run_dir, 8, 1, times)
    start_within(_cfg(corpus, run_dir, "launch.max_restarts=1"))
    killer.join(5)
    err = capsys.readouterr().err
    assert re.search(r"rank 1 of 2 failed first \(actor died: .*\); the other ranks were stopped", err), err
    assert "restart 1 of 1: resuming the group from" in err
    resumed = re.search(r"resumed from \S+ at step (\d+)", (run_dir / "logs" / "rank-0.log").read_text())
    assert resumed and int(resumed.group(1)) >= 8 and int(resumed.group(1)) % 8 == 0
    assert len(_pids(run_dir, 1)) == 2
    assert _losses(run_dir) == _losses(reference)  # every step once, bit for bit
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
    print(f"recovery: {times['resumed'] - times['killed']:.1f}s from the kill to the resumed group")


def test_a_failing_rank_stops_the_group_within_seconds_and_restarts_give_up(
    reference: Path, corpus: Path, tmp_path: Path, start_within: Start
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    # Rank 1's shard of the sharded checkpoint; its CRC check fails on the rank that
    # verifies it, and the load shares that error so that every rank raises it.
    (broken / "checkpoints" / "step-00000040" / "__1_0.distcp").write_bytes(b"damaged")
    began = time.perf_counter()
    with pytest.raises(LaunchError) as err:
        start_within(_cfg(corpus, broken, "train.resume=true", "train.steps=48", "launch.max_restarts=1"))
    assert re.search(r"rank [01] of 2 failed first \(CheckpointError: checkpoint file .*__1_0\.distcp.* does not match "
                     r"its recorded CRC-32.*the other ranks were stopped", str(err.value))
    assert str(err.value).endswith("gave up after 1 restart(s)")
    assert time.perf_counter() - began < 90
    pids = [pid for rank in (0, 1) for pid in _pids(broken, rank)[-1:]]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a rank outlived its group"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["launch.cpus_per_rank=100"], r"more than the Ray cluster has: 2 ranks x 100 CPU = 200 CPU, but the cluster has \d+"),
        (["launch.gpus_per_rank=1"], r"2 ranks x 1 GPU = 2 GPU, but the cluster has 0"),
        (["launch.gpu_type=H100"], r"launch.gpu_type='H100': the cluster has no GPU of that type \(it has: no GPU type\)"),
        (["launch.master_port={busy}"], r"launch.master_port={busy} is in use on 127\.0\.0\.1 \(rank 0's node\)"),
    ],
    ids=["cpus", "gpus", "gpu-type", "port-in-use"],
)
def test_what_prevents_a_start_is_one_message_before_training(
    ray_cluster: Path, corpus: Path, tmp_path: Path, extra: list[str], message: str, start_within: Start
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=message.format(busy=port)):
            start_within(_cfg(corpus, tmp_path / "run", *(e.format(busy=port) for e in extra)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- an existing cluster (ray start) ----------------------------------------------------------


@pytest.fixture
def token_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A `ray start` cluster with token authentication on loopback, in its own process
    group (stopped by that group's id); yields its address and a client environment that
    holds the token but does not set RAY_AUTH_MODE."""
    temp_dir = Path(tempfile.mkdtemp(prefix="moe-ray-"))
    port = _free_port()
    client = {**os.environ, "RAY_AUTH_TOKEN": "f" * 64, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    client.pop("RAY_AUTH_MODE", None)
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={temp_dir}"],
        env={**client, "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", client
    finally:
        # SIGINT asks `ray start --block` to stop its processes; it often takes longer than the
        # test did (30 s measured), and the group's SIGKILL below leaves nothing behind either.
        os.killpg(head.pid, signal.SIGINT)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_token_authenticated_ray_start_cluster_through_address(
    token_cluster: tuple[str, dict[str, str]], corpus: Path, tmp_path: Path
) -> None:
    address, env = token_cluster
    cmd = [sys.executable, "-m", "launch.cli", "train", str(TINY), "--address", address, *SMALL,
           f"data.path={corpus}", f"train.run_dir={tmp_path / 'run'}", "train.steps=4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 4 steps" in done.stdout
    assert not (tmp_path / "run" / "ray").exists()  # an existing cluster's files stay where it keeps them


# -- cluster configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aws-gpu", "onprem"])
def test_ray_up_cluster_configs_validate_against_rays_schema(name: str) -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(raw))  # what `ray up` runs: defaults filled in, cross-field checks
    commands = " ".join(raw["setup_commands"])
    assert "pip install -q -c constraints.txt -e ." in commands and "torch==2.13.0" in commands
    assert all("RAY_AUTH_MODE=token" in c for c in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:])
    if name == "aws-gpu":
        types = raw["available_node_types"]
        assert types[raw["head_node_type"]]["resources"] == {"GPU": 0}
        assert [t["resources"]["GPU"] for n, t in types.items() if n != raw["head_node_type"]] == [8]
    else:
        assert raw["provider"]["type"] == "local" and raw["provider"]["worker_ips"]
        assert "--num-gpus=0" in raw["head_start_ray_commands"][1]


def test_kuberay_rayjob_manifest_is_well_formed() -> None:
    import ray

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("moe train configs/") and "--address auto" in spec["entrypoint"]
    load_config(ROOT / spec["entrypoint"].split()[2], [a for a in spec["entrypoint"].split()[3:] if "=" in a])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}

    def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
        pod = group["template"]["spec"]
        mounted = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["name"] and c["image"]
            assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted
            assert any(m["mountPath"] == "/shared" for m in c["volumeMounts"])
        return pod["containers"]

    head = containers(cluster["headGroupSpec"])
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in containers(group):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 == c["resources"]["requests"]["nvidia.com/gpu"]
