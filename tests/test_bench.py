"""`moe bench`: the tables are produced and the JSON holds every row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.bench import Shape, main


def test_bench_kernels_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--shapes", "256,64,6,2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["copy_gb_per_s"] > 0
    rows = payload["rows"]
    assert {(r["kernel"], r["impl"]) for r in rows} == {
        (k, i) for k in ("gating", "permute", "unpermute") for i in ("fused", "torch", "megatron")
    }
    for row in rows:
        if row["impl"] == "fused" and not torch.cuda.is_available():
            assert row["ms"] is None and "not timed on CPU" in row["note"]
        else:
            assert row["ms"] > 0 and 0 < row["copy_fraction"]
    assert "measured copy bandwidth" in capsys.readouterr().out


def test_bench_shapes_are_validated() -> None:
    assert Shape.parse_many("4096,1024,8,2;16,8,4,4") == [Shape(4096, 1024, 8, 2), Shape(16, 8, 4, 4)]
    with pytest.raises(ValueError, match="expected T,H,E,K with K <= E"):
        Shape.parse_many("4096,1024,8,9")


def test_bench_layer_runs_all_three_layers(tmp_path: Path) -> None:
    out = tmp_path / "layer.json"
    argv = ["layer", "--tokens", "128", "--hidden", "32", "--ffn", "64", "--experts", "4", "--top-k", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"moe-train", "megatron-core", "deepspeed"}
    for name, row in rows.items():
        assert row["ms"] is not None and row["ms"] > 0, (name, row.get("note"))
        assert row["peak_mb"] is not None


def test_bench_layouts_measures_every_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.data import prepare, stdlib_sources

    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:10], corpus, val_fraction=0.2)
    out = tmp_path / "layouts.json"
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
                 "moe.num_experts=4", "moe.expert_ffn_dim=32", "train.batch_size=8", "data.val_tokens=256",
                 f"data.path={corpus}", "launch.threads=1"]
    # One process, then one multi-rank layout through the default launcher (a local Ray cluster).
    argv = ["layouts", str(tiny), *overrides, "--layouts", "dp=1;ep=2", "--steps", "2", "--warmup", "1",
            "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["engine"], r["world_size"]) for r in rows] == [
        ("dp=1", "local", 1), ("ep=2", "megatron", 2)]
    for row in rows:
        assert len(row["step_seconds"]) == 2 and all(s > 0 for s in row["step_seconds"])
        assert row["median_step_ms"] > 0 and row["tokens_per_s"] == pytest.approx(8 * 16 / (row["median_step_ms"] / 1e3))
        memory = row["peak_memory_mb_per_rank"]
        # one figure per rank, each a whole process's peak (torch alone needs > 100 MB)
        assert len(memory) == row["world_size"] and all(mb > 100 for mb in memory)
        assert row["memory_kind"] == ("cuda_max_allocated" if torch.cuda.is_available() else "peak_rss")
    assert "peak memory per rank" in capsys.readouterr().out


def test_bench_layouts_refuses_a_bad_layout_before_running(tmp_path: Path) -> None:
    from moe.config import ConfigError

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="layout 'engine=deepspeed,zero=0' is refused"):
        main(["layouts", str(tiny), "--layouts", "dp=1;engine=deepspeed,zero=0", "--runs", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def _tiny_overrides(corpus: Path) -> list[str]:
    return ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
            "moe.num_experts=4", "moe.expert_ffn_dim=32", "train.batch_size=4", "data.val_tokens=256",
            f"data.path={corpus}", "launch.threads=1"]


def test_bench_memory_measures_and_predicts_every_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.data import prepare, stdlib_sources

    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:10], corpus, val_fraction=0.2)
    out = tmp_path / "memory.json"
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    argv = ["memory", str(tiny), *_tiny_overrides(corpus), "--layouts", "dp=1", "--recompute", "none,full",
            "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["recompute"]: r for r in payload["rows"]}
    assert set(rows) == {"none", "full"}
    for row in rows.values():
        assert (row["layout"], row["dtype"], row["world_size"], row["note"]) == ("dp=1", "float32", 1, "")
        [rank] = row["ranks"]
        for key in ("states", "activations", "peak"):
            assert rank[f"{key}_measured"] > 0 and rank[f"{key}_predicted"] > 0
        # the peak is reached with the states and (at least) the activations a backward starts from
        assert rank["peak_measured"] >= rank["states_measured"] + rank["activations_measured"]
        assert rank["peak_ratio"] == rank["peak_predicted"] / rank["peak_measured"]
    assert rows["full"]["ranks"][0]["activations_measured"] < rows["none"]["ranks"][0]["activations_measured"]
    [ratio] = payload["activation_ratios"]
    assert ratio["recompute"] == "full" and 0 < ratio["activations_vs_none"] < 1
    printed = capsys.readouterr().out
    assert "peak meas" in printed and "measured activations with full" in printed


@pytest.mark.parametrize("flags, message", [
    (["--recompute", "none,partial"], "--recompute 'none,partial': 'partial' is unknown"),
    (["--dtype", "float32,fp16"], "--dtype 'float32,fp16': 'fp16' is unknown"),
    (["--layouts", "garbage"], "layout 'garbage': 'garbage' is not key=value"),
    (["--steps", "1"], "--steps 1: at least 2"),
])
def test_bench_memory_bad_arguments_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flags: list[str], message: str) -> None:
    from launch.cli import main as cli_main

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    assert cli_main(["bench", "memory", str(tiny), *flags, "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_bench_layouts_refuses_a_used_runs_dir_before_running(tmp_path: Path) -> None:
    """An earlier benchmark's run in ``--runs`` is refused before the first layout trains:
    a one-rank layout would otherwise train over its metrics and checkpoints."""
    from moe.config import ConfigError

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    earlier = tmp_path / "runs" / "1-dp2" / "metrics.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match=r"--runs '.*runs' already holds 1-dp2/, an earlier run's"):
        main(["layouts", str(tiny), "--layouts", "dp=1;dp=2", "--runs", str(tmp_path / "runs"),
              "--out", str(tmp_path / "layouts.json")])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1-dp2", "metrics.jsonl", "runs"]
    assert earlier.read_text() == '{"kind": "train", "step": 1}\n'


def test_bench_output_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails after the new table is half on disk leaves the earlier table whole."""
    import os

    from launch.bench import _write

    out = tmp_path / "layouts.json"
    _write(out, {"device": "cpu", "rows": [1]})

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        _write(out, {"device": "cpu", "rows": [2] * 1000})
    assert json.loads(out.read_text()) == {"device": "cpu", "rows": [1]}
