"""The root config: per-component dataclasses composed into one, loaded from YAML.

Each component owns its dataclass (model and MoE in ``moe/``, the layout in
``parallel/``, data, training and launching here). This module owns the YAML mapping:
files in ``configs/`` mirror these dataclasses key for key, and ``section.key=value``
overrides from the command line are applied before anything is constructed, so every
bad key, type or value is rejected with one message before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from launch.data import DataConfig
from moe.config import ConfigError, ModelConfig, MoEConfig, UniqueKeyLoader, require
from parallel.config import ParallelConfig


class LaunchError(RuntimeError):
    """The run could not start, or a rank failed; the message says which and where to look.
    (Here, not in ``launch.rank``, so the command line catches it without importing torch.)"""

@dataclass(frozen=True)
class TrainConfig:
    """The optimisation run: AdamW with linear warmup then cosine decay to ``min_lr_ratio·lr``."""

    steps: int = 1000
    batch_size: int = 16
    micro_batch_size: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    run_dir: str | None = None
    resume: bool = False
    init_from: str | None = None
    peak_tflops: float | None = None
    record_routing: bool = False
    max_nonfinite_steps: int = 0
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_layers: int | None = None
    collapse_share: float | None = None
    collapse_intervals: int = 3

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_checkpoints",
                    "collapse_intervals"):
            value = getattr(self, key)
            require(value >= 1, f"train.{key}", value, "must be >= 1")
        micro = self.micro_batch_size
        require(
            micro is None or (micro >= 1 and self.batch_size % micro == 0),
            "train.micro_batch_size",
            micro,
            f"must divide train.batch_size={self.batch_size} (or be null for no accumulation)",
        )
        require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"train.{key}", value, "must be in [0, 1)")
        require(self.grad_clip > 0, "train.grad_clip", self.grad_clip, "must be > 0")
        require(
            self.init_from is None or self.init_from.strip() != "",
            "train.init_from",
            self.init_from,
            "must name a checkpoint, a checkpoints/ directory or a run directory (moe ckpt import's --out), "
            "or be null for random initialisation",
        )
        require(
            self.max_nonfinite_steps >= 0,
            "train.max_nonfinite_steps",
            self.max_nonfinite_steps,
            "must be >= 0: the steps with a non-finite loss or gradient norm to skip (no update) before "
            "training stops; 0 stops at the first",
        )
        require(
            self.recompute_layers is None or self.recompute_layers >= 1,
            "train.recompute_layers",
            self.recompute_layers,
            "must be >= 1 (blocks recomputed at the start of each pipeline chunk), or null for all of them",
        )
        require(
            self.recompute_layers is None or self.recompute == "full",
            "train.recompute_layers",
            self.recompute_layers,
            f"counts whole recomputed blocks: it needs train.recompute=full (train.recompute={self.recompute!r}); "
            "set it to null",
        )
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "train.peak_tflops",
            self.peak_tflops,
            "must be > 0, or null when the device's peak is unknown (no MFU is logged)",
        )
        require(
            self.collapse_share is None or 0 < self.collapse_share < 1,
            "train.collapse_share",
            self.collapse_share,
            "must be in (0, 1): the share of an expert's assignments below which it counts as collapsing "
            "(null = 1/(4·moe.num_experts))",
        )

    @property
    def micro_batches(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclass(frozen=True)
class LaunchConfig:
    """How ranks are started and supervised (see launch/rank.py).

    ``ray`` (the default): one Ray actor per rank, on a Ray cluster started for the run on
    this machine (``address`` null) or on an existing one. ``local``: one process per rank
    on this machine, without Ray. A layout of one rank trains in the calling process
    unless ``address`` names a cluster. The ``nccl_*`` options are exported to every rank
    before its process group exists; null leaves the environment's value alone.
    """

    launcher: Literal["ray", "local"] = "ray"
    address: str | None = None
    threads: int | None = None
    timeout_minutes: int = 10
    max_restarts: int = 0
    cpus_per_rank: float | None = None
    gpus_per_rank: int | None = None
    gpu_type: str | None = None
    master_port: int | None = None
    start_timeout_s: int = 300
    ray_temp_dir: str | None = None
    cuda_visible_devices: Literal["per_rank", "all"] = "per_rank"
    nccl_socket_ifname: str | None = None
    nccl_ib_hca: str | None = None

    def __post_init__(self) -> None:
        require(
            self.timeout_minutes >= 1,
            "launch.timeout_minutes",
            self.timeout_minutes,
            "must be >= 1 (a collective waiting longer than this fails instead of hanging)",
        )
        require(
            self.threads is None or self.threads >= 1,
            "launch.threads",
            self.threads,
            "must be >= 1, or null: one per CPU given to each rank (torch's default in a single process)",
        )
        require(
            self.address is None or (self.address.strip() != "" and self.launcher == "ray"),
            "launch.address",
            self.address,
            "must be a Ray cluster's address (auto, HOST:PORT, ray://HOST:PORT) with launch.launcher=ray, "
            "or null for a local Ray cluster started for the run",
        )
        require(
            self.max_restarts >= 0,
            "launch.max_restarts",
            self.max_restarts,
            "must be >= 0 (group restarts from the latest checkpoint after a rank fails)",
        )
        require(
            self.cpus_per_rank is None or self.cpus_per_rank > 0,
            "launch.cpus_per_rank",
            self.cpus_per_rank,
            "must be > 0 (fractions allowed), or null for an even share of the cluster's CPUs (1 on GPU ranks)",
        )
        require(
            self.gpus_per_rank in (None, 0, 1),
            "launch.gpus_per_rank",
            self.gpus_per_rank,
            "must be 0 (CPU ranks, gloo), 1 (one GPU per rank, NCCL), or null for 1 when the cluster has GPUs",
        )
        require(
            self.gpu_type is None or (self.gpu_type.strip() != "" and self.gpus_per_rank != 0),
            "launch.gpu_type",
            self.gpu_type,
            "must name a Ray accelerator type (e.g. H100, A100) for GPU ranks (launch.gpus_per_rank 1 or null), or be null",
        )
        require(
            self.master_port is None or 1024 <= self.master_port <= 65535,
            "launch.master_port",
            self.master_port,
            "must be in [1024, 65535], or null for a free port picked by rank 0",
        )
        require(
            self.start_timeout_s >= 1,
            "launch.start_timeout_s",
            self.start_timeout_s,
            "must be >= 1 (seconds to wait for the cluster to place and start the ranks)",
        )
        require(
            self.ray_temp_dir is None or self.ray_temp_dir.strip() != "",
            "launch.ray_temp_dir",
            self.ray_temp_dir,
            "must be a directory, or null for <run_dir>/ray",
        )
        for key in ("nccl_socket_ifname", "nccl_ib_hca"):
            value = getattr(self, key)
            require(
                value is None or value.strip() != "",
                f"launch.{key}",
                value,
                "must be a non-empty NCCL setting, or null to leave the environment's value",
            )


@dataclass(frozen=True)
class Config:
    """The root: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in that type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), key)
    elif tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it spells.
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(number, key)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def _finite(value: float, key: str) -> float:
    """inf passes range checks such as ``> 0`` and fails a run hours in; nan fails them with
    a misleading message ("must be > 0"). Refused here, once for every float-typed key of
    every section, with a message that says what is wrong."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number, not nan or inf")
    return value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types
    are errors; missing keys take the dataclass defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"unknown key '{dotted}'{_suggest(str(key), names)}; "
                f"allowed in '{prefix or 'config'}': {', '.join(names)}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. moe.num_experts=16")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a YAML section left empty (`model:`)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: PyYAML's own message spans several, with context."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return str(err).replace("\n", " ")


def shipped_configs() -> Path:
    """The ``configs/`` directory shipped with the package, found from this module's own
    location, so that ``configs/tiny.yaml`` or ``--cluster h100-ib`` work from any
    directory, not only the repository's root."""
    return Path(__file__).resolve().parent.parent / "configs"


def locate(path: str | Path, kind: str) -> Path:
    """``path`` as given if it exists; else, for a relative path, the shipped file it names:
    ``configs/tiny.yaml`` under the package, or a bare name (``h100-ib``, ``.yaml`` optional)
    in ``configs/<kind>/``. A path found nowhere is returned as given (the caller's
    reader then says where it looked, see ``searched``)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    for candidate in _candidates(path, kind):
        if candidate.exists():
            return candidate
    return path


def _candidates(path: Path, kind: str) -> list[Path]:
    """Where ``locate`` looks for a relative path after the current directory: only inside
    the shipped configs/ (a mistyped ``runs/...`` must not find the repository's own)."""
    shipped = shipped_configs()
    if path.parts[:1] == (shipped.name,):
        return [shipped.parent / path]
    names = [path] if path.suffix else [path, path.with_suffix(".yaml")]
    return [shipped / kind / name for name in names]


def searched(path: str | Path, kind: str) -> str:
    """The places ``locate`` tried, for a not-found message."""
    path = Path(path)
    if path.is_absolute():
        return str(path)
    places = [str(Path.cwd() / path), *(str(c) for c in _candidates(path, kind))]
    return ", ".join(dict.fromkeys(places))


def read_yaml(path: str | Path, what: str, kind: str = "") -> dict[str, Any]:
    """The top-level mapping of a YAML file the user named (``what``: "config file",
    "sweep config", ...), looked up as ``locate`` does; anything else is one
    ``ConfigError`` saying what is wrong with the file and where it was looked for."""
    found = locate(path, kind)
    name = repr(str(path))
    if found.is_dir():
        raise ConfigError(f"{what} {name} is a directory; give a YAML file in it (e.g. {_example(found)})")
    if not found.is_file():
        shipped = shipped_configs() / kind
        raise ConfigError(f"{what} {name} not found (looked in: {searched(path, kind)}); shipped ones are in {shipped}/")
    try:
        data = found.read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {name} cannot be read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {name} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{what} {name}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {name} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"{what} {name} is empty (or only comments): nothing to load; is it the file you meant?")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {name}: expected a mapping of keys at the top, got a {type(raw).__name__}")
    return raw


def check_output_file(path: Path, flag: str, command: str, ours: Callable[[Path], bool]) -> None:
    """A file written at the end of minutes of work (a benchmark's JSON, a calibration):
    refuse now, not then, a path that is a directory, whose directory cannot be made, or
    that holds a file ``command`` did not write (``ours`` says which it did)."""
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file path")
    if path.is_file() and not ours(path):
        raise ConfigError(f"{flag} {str(path)!r} exists and was not written by `{command}`; choose another path")
    check_creatable(path, Path(os.path.abspath(path)).parent, flag, "a path in a writable directory")


@contextmanager
def output_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given``, or a new temporary directory named ``prefix...``, which is removed again
    when the block fails before writing into it: a config refused at validation leaves no
    empty directory behind (one that holds a failed run's logs stays)."""
    out = given if given is not None else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield out
    except BaseException:
        if given is None and not any(out.iterdir()):
            out.rmdir()
        raise


def check_creatable(path: Path, directory: Path, flag: str, fix: str) -> None:
    """``directory`` (``path``'s, or ``path`` itself) exists or can be made: its nearest
    existing ancestor is a directory this user can write into; else one error ending in ``fix``."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: {existing} is a file, not a directory; give {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: {existing} is not writable; give {fix}")


def _example(directory: Path) -> str:
    """A YAML file inside ``directory`` to suggest, or a placeholder."""
    files = sorted(directory.glob("*.yaml"))
    return str(files[0]) if files else f"{directory}/NAME.yaml"


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read a YAML config, apply overrides, validate everything; raise ``ConfigError``."""
    raw = read_yaml(path, "config file")
    return build(Config, apply_overrides(raw, list(overrides)), "")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
