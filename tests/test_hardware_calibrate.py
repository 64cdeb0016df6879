"""GPU hardware files: the cluster fields round-trip, bad dispatcher profiles are refused,
and ``moe simulate calibrate --gpu``'s fitting recovers a known roofline from timings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError
from parallel.simulator.calibrate import GEMM_DIM, GEMM_ROWS, GemmPoint, calibrate_gpu, fit_roofline
from parallel.simulator.cluster import gemm_time
from parallel.simulator.hardware import hardware_dict, load_hardware, parse_hardware

H100 = load_hardware(Path(__file__).resolve().parent.parent / "configs" / "hardware" / "h100-ib.yaml")


def test_fit_recovers_the_roofline_of_synthetic_timings() -> None:
    """Timings made by the cluster model's own roofline (efficiency 0.63, memory 0.81) give
    those two back: small m is memory-bound, large m compute-bound."""
    hw = dataclasses.replace(H100, matmul_efficiency=0.63, memory_efficiency=0.81)
    points = [GemmPoint(m, GEMM_DIM, GEMM_DIM, gemm_time(hw, m, GEMM_DIM, GEMM_DIM)) for m in GEMM_ROWS]
    efficiency, memory = fit_roofline(points, hw.peak_flops["bfloat16"], hw.memory_bandwidth)
    assert efficiency == pytest.approx(0.63) and memory == pytest.approx(0.81)
    grouped = [dataclasses.replace(p, seconds=8 * p.seconds / 0.9, experts=8) for p in points]
    assert fit_roofline(grouped, hw.peak_flops["bfloat16"], hw.memory_bandwidth)[0] == pytest.approx(0.63 * 0.9)
    with pytest.raises(ValueError, match="at least one"):
        fit_roofline([], 1.0, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the GPU when there is one")
def test_gpu_calibration_needs_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA device here"):
        calibrate_gpu(tmp_path / "h100-measured.yaml", H100)
    assert not list(tmp_path.iterdir())


def test_cluster_fields_round_trip_and_bad_profiles() -> None:
    raw = hardware_dict(H100)
    assert parse_hardware(raw, "x.yaml") == H100
    assert H100.dispatchers["deepep"].node_dedup and not H100.dispatchers["alltoall"].node_dedup
    deepep = raw["dispatchers"]["deepep"]
    with pytest.raises(ConfigError, match="node_dedup='yes' must be true or false"):
        parse_hardware({**raw, "dispatchers": {"deepep": {**deepep, "node_dedup": "yes"}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"dispatchers.deepep: unknown field\(s\) \['bandwidth'\]"):
        parse_hardware({**raw, "dispatchers": {"deepep": {**deepep, "bandwidth": 1}}}, "x.yaml")
    with pytest.raises(ConfigError, match="memory_efficiency=1.5 is a share"):
        parse_hardware({**raw, "memory_efficiency": 1.5}, "x.yaml")


def test_a_key_given_twice_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys; a hardware file pasted over (here: a second
    ``matmul_efficiency``, and one nested in a dispatcher profile) is refused instead."""
    shipped = (Path(__file__).resolve().parent.parent / "configs" / "hardware" / "h100-ib.yaml").read_text()
    first = next(i for i, line in enumerate(shipped.splitlines(), 1) if line.startswith("matmul_efficiency:"))
    top = tmp_path / "top.yaml"
    top.write_text(shipped + "matmul_efficiency: 0.1\n")
    with pytest.raises(ConfigError, match=rf"hardware file '{top}': key 'matmul_efficiency' is given twice "
                                          rf"\(lines {first} and {shipped.count(chr(10)) + 1}\); keep one"):
        load_hardware(top)
    nested = tmp_path / "nested.yaml"
    nested.write_text(shipped.replace("\n  deepep:", "\n  deepep:\n    latency_s: 1.0\n  #", 1))
    with pytest.raises(ConfigError, match="nested.yaml': key 'latency_s' is given twice"):
        load_hardware(nested)


def test_an_unreadable_hardware_file_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that exists but cannot be read (permissions; simulated: the tests may run as root)."""
    path = tmp_path / "h100.yaml"
    path.write_text("kind: gpu\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=rf"hardware file '{path}' cannot be read: Permission denied"):
        load_hardware(path)
