"""Hardware descriptions (``configs/hardware/*.yaml``), validated once on load.

A cluster is ``nodes`` nodes of ``devices_per_node`` identical devices. Per device: peak
matmul rate per dtype (FLOP/s), the achievable share of it (``matmul_efficiency``),
memory bandwidth (bytes/s) and capacity (bytes), and a fixed cost per launched
operation (``op_overhead_s``: kernel launch on a GPU, Python/ATen dispatch on a CPU).
``kernel_efficiency`` (optional): the experts' grouped GEMM and attention as shares of the
matmul rate (1 when absent). ``collective_efficiency`` (optional): the bandwidth a
reduce-scatter, all-gather or all-reduce achieves under the ring model, as a share of the
link's (1 when absent; gloo on a CPU reaches a quarter to two thirds of its all-to-all
rate). Links follow the alpha-beta model: moving ``n`` bytes costs ``latency_s + n / bandwidth``,
with ``intra_node`` links between devices of one node and ``inter_node`` links between
nodes (per device: each GPU of an H100 node has its own 400G NIC).

``sync_wait_s`` (optional, 0 when absent): the mean time a blocking collective adds, beyond
its alpha-beta cost, when the ranks reach it after computing: they arrive at different
times and the early ones wait (on a shared CPU a waiting rank also has to be woken).
``sync_wait_oversubscribed_s``: the same with more ranks than cores (CPU), where a peer may
be descheduled when the collective starts. ``moe simulate calibrate`` measures both.

``residual_s_per_element`` (optional, CPU, 0 when absent): seconds per element of the
residual stream ``[T, D]`` that one RMSNorm and one residual add cost, forward and backward,
on one core (``moe simulate calibrate`` times the chain). The matmul efficiency's fit folds
this work into the FLOP rate, which tensor parallelism divides; TP ranks still do it on every
token (``predict.tp_replicated_time``).

GPU clusters (``parallel.simulator.cluster``, optional for a CPU): ``memory_efficiency``
(the share of ``memory_bandwidth`` fused elementwise kernels reach), ``reserved_bytes`` (per
device: CUDA context, NCCL and dispatcher buffers, cuBLAS workspaces), ``fragmentation``
(the caching allocator's unusable share on top of activations), and ``dispatchers``: per
token-dispatcher profile (``alltoall``: NCCL all-to-all; ``deepep``: DeepEP-class kernels)
the bandwidth per GPU its many-peer all-to-all reaches within a node
(``intra_node_bandwidth``) and across nodes (``inter_node_bandwidth``), and its per-call
``latency_s``.

``cores`` is set only for a CPU "device" (``kind: cpu``): every rank of a CPU emulation
runs on the same cores, so ranks share them (see ``predict.rank_compute_share``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from moe.config import ConfigError, UniqueKeyLoader

DTYPES = ("float32", "bfloat16")
KERNELS = ("grouped_mm", "attention")
COLLECTIVES = ("reduce_scatter", "all_gather", "all_reduce")


@dataclass(frozen=True)
class Link:
    """Alpha-beta link: ``time(n bytes) = latency_s + n / bandwidth`` (bytes/s per device)."""

    bandwidth: float
    latency_s: float

    def time(self, n_bytes: float) -> float:
        return self.latency_s + n_bytes / self.bandwidth


@dataclass(frozen=True)
class Dispatcher:
    """A token dispatcher's many-peer all-to-all: bytes/s per GPU within a node and across
    nodes, and seconds per call."""

    intra_node_bandwidth: float
    inter_node_bandwidth: float
    latency_s: float
    node_dedup: bool = False  # a token crosses to a node once, then NVLink forwards it (DeepEP)
    compute_share: float = 1.0  # share of the GPU's compute left to kernels overlapped with it (SMs it takes)
    host_s: float = 0.0  # host seconds per MoE layer forward: from its token-count sync (the host waits for the counts) to the next


@dataclass(frozen=True)
class Hardware:
    """One cluster description; see the module docstring for the fields' meaning."""

    name: str
    kind: str  # gpu | cpu
    nodes: int
    devices_per_node: int
    peak_flops: dict[str, float]
    matmul_efficiency: float
    memory_bandwidth: float
    memory_capacity: float
    op_overhead_s: float
    intra_node: Link
    inter_node: Link
    cores: int = 0
    kernel_efficiency: dict[str, float] = field(default_factory=dict)
    collective_efficiency: dict[str, float] = field(default_factory=dict)
    sync_wait_s: float = 0.0
    sync_wait_oversubscribed_s: float = 0.0
    residual_s_per_element: float = 0.0
    memory_efficiency: float = 0.0
    reserved_bytes: float = 0.0
    fragmentation: float = 0.0
    dispatchers: dict[str, Dispatcher] = field(default_factory=dict)

    def sync_wait(self, world: int) -> float:
        """Seconds one blocking collective call waits for its peers (see the module doc)."""
        if self.kind == "cpu" and world > self.cores:
            return self.sync_wait_oversubscribed_s
        return self.sync_wait_s

    def kernel_rate(self, kernel: str, dtype: str) -> float:
        """Achievable FLOP/s of ``kernel`` (matmul | grouped_mm | attention): the matmul rate
        times the kernel's share of it (1 where the file gives none)."""
        return self.matmul_rate(dtype) * self.kernel_efficiency.get(kernel, 1.0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def matmul_rate(self, dtype: str) -> float:
        """Achievable matmul FLOP/s of one device in ``dtype``."""
        return self.peak_flops[dtype] * self.matmul_efficiency


def _number(raw: dict[str, Any], key: str, where: str, minimum: float = 0.0, strict: bool = True) -> float:
    if key not in raw:
        raise ConfigError(f"{where}: missing field '{key}'; every hardware file needs it (see configs/hardware/h100-ib.yaml)")
    value = raw[key]
    if isinstance(value, str):  # YAML 1.1 reads 67.0e12 (no exponent sign) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key}={value!r} is not a number")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {key}={value!r} must be a finite number, not nan or inf")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{where}: {key}={value!r} is nonsensical; it must be {bound}")
    return float(value)


def _link(raw: dict[str, Any], key: str, where: str) -> Link:
    section = raw.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: missing section '{key}' with bandwidth (bytes/s) and latency_s")
    return Link(_number(section, "bandwidth", f"{where}: {key}"), _number(section, "latency_s", f"{where}: {key}", strict=False))


def parse_hardware(raw: Any, where: str) -> Hardware:
    """Validate a parsed YAML mapping; one ``ConfigError`` naming the field and file otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a hardware file must be a mapping of fields, got {type(raw).__name__}")
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    kind = raw.get("kind")
    if kind not in ("gpu", "cpu"):
        raise ConfigError(f"{where}: kind={kind!r} must be 'gpu' or 'cpu'")
    peak = raw.get("peak_flops")
    if not isinstance(peak, dict) or not peak:
        raise ConfigError(f"{where}: missing section 'peak_flops' (FLOP/s per dtype: {', '.join(DTYPES)})")
    bad = sorted(set(peak) - set(DTYPES))
    if bad:
        raise ConfigError(f"{where}: peak_flops has unknown dtype(s) {bad}; allowed: {list(DTYPES)}")
    peak_flops = {d: _number(peak, d, f"{where}: peak_flops") for d in DTYPES if d in peak or d == "float32"}
    efficiency = _number(raw, "matmul_efficiency", where)
    if efficiency > 1:
        raise ConfigError(f"{where}: matmul_efficiency={efficiency} is a share of the peak and must be in (0, 1]")
    cores = int(_number(raw, "cores", where)) if kind == "cpu" else 0
    efficiency_of = _shares(raw, "kernel_efficiency", KERNELS, "the matmul rate", where)
    collective_of = _shares(raw, "collective_efficiency", COLLECTIVES, "the link bandwidth", where)
    return Hardware(
        name=str(raw.get("name") or Path(where).stem),
        kind=kind,
        nodes=int(_number(raw, "nodes", where)),
        devices_per_node=int(_number(raw, "devices_per_node", where)),
        peak_flops=peak_flops,
        matmul_efficiency=efficiency,
        memory_bandwidth=_number(raw, "memory_bandwidth", where),
        memory_capacity=_number(raw, "memory_capacity", where),
        op_overhead_s=_number(raw, "op_overhead_s", where, strict=False),
        intra_node=_link(raw, "intra_node", where),
        inter_node=_link(raw, "inter_node", where),
        cores=cores,
        kernel_efficiency=efficiency_of,
        collective_efficiency=collective_of,
        sync_wait_s=_optional_number(raw, "sync_wait_s", where),
        sync_wait_oversubscribed_s=_optional_number(raw, "sync_wait_oversubscribed_s", where),
        residual_s_per_element=_optional_number(raw, "residual_s_per_element", where),
        memory_efficiency=_optional_share(raw, "memory_efficiency", where),
        reserved_bytes=_optional_number(raw, "reserved_bytes", where),
        fragmentation=_optional_number(raw, "fragmentation", where),
        dispatchers=_dispatchers(raw, where),
    )


def _optional_share(raw: dict[str, Any], key: str, where: str) -> float:
    """A share in (0, 1] that may be absent (0: not given)."""
    if key not in raw:
        return 0.0
    value = _number(raw, key, where)
    if value > 1:
        raise ConfigError(f"{where}: {key}={value} is a share and must be in (0, 1]")
    return value


def _dispatchers(raw: dict[str, Any], where: str) -> dict[str, Dispatcher]:
    """The optional ``dispatchers`` mapping: name -> {intra_node_bandwidth, inter_node_bandwidth, latency_s}."""
    section = raw.get("dispatchers", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: dispatchers must map profile names to "
                          "{intra_node_bandwidth, inter_node_bandwidth, latency_s[, node_dedup, compute_share, host_s]}")
    out = {}
    for name, profile in section.items():
        at = f"{where}: dispatchers.{name}"
        if not isinstance(profile, dict):
            raise ConfigError(f"{at} must be a mapping with intra_node_bandwidth, inter_node_bandwidth, latency_s")
        unknown = sorted(set(profile) - {f.name for f in fields(Dispatcher)})
        if unknown:
            raise ConfigError(f"{at}: unknown field(s) {unknown}; allowed: {[f.name for f in fields(Dispatcher)]}")
        dedup = profile.get("node_dedup", False)
        if not isinstance(dedup, bool):
            raise ConfigError(f"{at}: node_dedup={dedup!r} must be true or false")
        share = _optional_share(profile, "compute_share", at) or 1.0
        out[str(name)] = Dispatcher(_number(profile, "intra_node_bandwidth", at), _number(profile, "inter_node_bandwidth", at),
                                    _number(profile, "latency_s", at, strict=False), dedup, share,
                                    _optional_number(profile, "host_s", at))
    return out


def _optional_number(raw: dict[str, Any], key: str, where: str) -> float:
    """A non-negative field that may be absent (0: not modelled)."""
    return _number(raw, key, where, strict=False) if key in raw else 0.0


def _shares(raw: dict[str, Any], key: str, names: tuple[str, ...], of: str, where: str) -> dict[str, float]:
    """An optional mapping of some of ``names`` to shares of ``of`` in (0, 1]."""
    section = raw.get(key, {})
    if not isinstance(section, dict) or set(section) - set(names):
        raise ConfigError(f"{where}: {key} must map some of {list(names)} to shares in (0, 1]")
    shares = {k: _number(section, k, f"{where}: {key}") for k in section}
    if any(v > 1 for v in shares.values()):
        raise ConfigError(f"{where}: {key} {shares} are shares of {of}, in (0, 1]")
    return shares


def load_hardware(path: str | Path) -> Hardware:
    """Read and validate ``path``; a missing or unreadable file, or a key given twice, is a
    ``ConfigError`` too. (``moe simulate`` reads hardware files through
    ``launch.config.read_yaml``, which also finds shipped names.)"""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hardware file {str(path)!r}: {'a directory' if path.is_dir() else 'no such file'}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except OSError as err:  # unreadable: permissions, I/O
        raise ConfigError(f"hardware file {str(path)!r} cannot be read: {err.strerror}") from None
    except ConfigError as err:
        raise ConfigError(f"hardware file {str(path)!r}: {err}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        problem = " ".join(str(err).split())
        raise ConfigError(f"hardware file {str(path)!r} is not UTF-8 YAML: {problem}") from None
    return parse_hardware(raw, str(path))


def hardware_dict(hw: Hardware) -> dict[str, Any]:
    """The YAML mapping of ``hw`` (what ``parse_hardware`` reads back)."""
    out: dict[str, Any] = {}
    for f in fields(Hardware):
        value = getattr(hw, f.name)
        out[f.name] = {"bandwidth": value.bandwidth, "latency_s": value.latency_s} if isinstance(value, Link) else value
    out["dispatchers"] = {name: asdict(d) for name, d in hw.dispatchers.items()}
    if hw.kind != "cpu":
        out.pop("cores")
    for key in ("kernel_efficiency", "collective_efficiency", "sync_wait_s", "sync_wait_oversubscribed_s",
                "residual_s_per_element", "memory_efficiency", "reserved_bytes", "fragmentation", "dispatchers"):
        if not out[key]:
            out.pop(key)
    return out
