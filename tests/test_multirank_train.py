"""Multi-rank training through the launchers (Ray, the default, on the session's local
cluster; and the local one): the layout-invariance harness, resume, and what happens when
a rank fails."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launch.check_layouts import Layout, compare, main as check_layouts, parse_layouts
from launch.config import load_config
from launch.data import prepare, stdlib_sources
from launch.local_launcher import LaunchError
from launch.metrics import read_metrics
from parallel.dist_checkpoint import read_manifest
from moe.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.normalize_weights=true", "moe.expert_ffn_dim=32",
    "moe.aux_loss_scope=global_batch", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
    "data.val_tokens=1024", "launch.threads=1", "launch.timeout_minutes=2",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:40], out, val_fraction=0.2)
    return out


def test_check_layouts_agree_across_ep_dp_and_accumulation(
    ray_cluster: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = check_layouts([
        str(TINY), *SMALL, f"data.path={corpus}",
        "--layouts", "dp=1;ep=2;dp=2,micro=2;ep=4", "--steps", "2", "--out", str(tmp_path),
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("PASS") == 8 and "FAIL" not in out
    assert "all layouts agree" in out


def test_harness_fails_on_a_difference() -> None:
    record = {"lm_loss": 2.0, "aux_loss": 0.01, "z_loss": 0.001, "router_grad_norm": 0.5, "expert_tokens": [[3, 5]]}
    off = {**record, "aux_loss": 0.0101}
    layouts = [Layout("dp=1", []), Layout("dp=2", [])]
    lines, ok = compare([[record], [off]], layouts, rtol=1e-5)
    assert not ok and lines[-1].endswith("FAIL")
    _, ok = compare([[record], [{**record, "expert_tokens": [[4, 4]]}]], layouts, rtol=1e-5)
    assert not ok
    _, ok = compare([[record], [dict(record)]], layouts, rtol=1e-5)
    assert ok


def test_layout_strings() -> None:
    layouts = parse_layouts("ep=2; dp=2,micro=4 ;tp=2")
    assert layouts[0].overrides == ["parallel.ep=2", "parallel.dp=2"]
    assert layouts[1].overrides == ["parallel.dp=2", "train.micro_batch_size=4"]
    assert layouts[2].overrides == ["parallel.tp=2", "parallel.dp=1"]
    with pytest.raises(ConfigError, match="'xp=2' is not key=value with a key in"):
        parse_layouts("xp=2")


def test_unsupported_layouts_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="layout 'engine=deepspeed,zero=3' is refused: .*MoE not supported with Stage 3"):
        check_layouts([str(TINY), *SMALL, "--layouts", "dp=1;engine=deepspeed,zero=3", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def _cfg(corpus: Path, run_dir: Path, *extra: str):  # noqa: ANN202
    return load_config(TINY, [*SMALL, f"data.path={corpus}", "parallel.dp=2", "parallel.ep=2",
                              f"train.run_dir={run_dir}", "train.steps=4", "train.ckpt_every=2", "train.eval_every=100", *extra])


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_multirank_resume_is_bit_exact_and_a_failing_rank_stops_the_group(
    ray_cluster: Path, corpus: Path, tmp_path: Path, launcher: str, start_within: Callable[..., dict[str, Any]]
) -> None:
    full = tmp_path / "full"
    summary = start_within(_cfg(corpus, full, f"launch.launcher={launcher}"))
    assert summary["layout"] == {"world_size": 2, "ep": 2, "dp": 2, "micro_batches": 1}
    assert (full / "logs" / "rank-1.log").is_file()
    saved = full / "checkpoints" / "step-00000002"  # sharded: megatron dist_checkpointing
    assert {"COMPLETE", "manifest.json", "common.pt", "metadata.json"} <= {p.name for p in saved.iterdir()}
    tensors = read_manifest(saved)["tensors"]
    experts = [k for k in tensors if ".experts." in k and not k.startswith("optimizer.")]
    assert len(experts) == 2 * 2  # 2 MoE layers x (w_in, w_out)
    for key in experts:  # each EP rank saved its own experts
        first, second = tensors[key]["shards"]
        assert first["offset"] != second["offset"] and first["crc32"] != second["crc32"]

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").unlink()
    start_within(_cfg(corpus, cut, "train.resume=true", f"launch.launcher={launcher}"))
    assert _losses(cut) == _losses(full)

    # A shard file is damaged: the ranks find it by its CRC-32 and fail together; the
    # launcher stops the group and names the rank that failed first.
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    sorted((broken / "checkpoints" / "step-00000004").glob("*.distcp"))[-1].write_bytes(b"damaged")
    began = time.perf_counter()
    with pytest.raises(LaunchError, match=r"rank \d of 2 failed first \(CheckpointError: .*does not match its recorded CRC-32.*the other ranks were stopped"):
        start_within(_cfg(corpus, broken, "train.resume=true", "train.steps=6", f"launch.launcher={launcher}"))
    assert time.perf_counter() - began < 60
    assert "does not match its recorded CRC-32" in (broken / "logs" / "rank-1.log").read_text()
