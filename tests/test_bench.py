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
