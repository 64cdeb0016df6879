"""Sweeps: many full moe-train runs over a grid, run as Ray Tune trials.

    moe sweep configs/sweeps/experts.yaml                  a local Ray cluster started for the sweep
    moe sweep configs/sweeps/experts.yaml --address auto   an existing cluster
    moe sweep report runs/sweeps/experts                   table, fit and plots from finished trials

A sweep config (``SweepConfig``, mirrored key for key by ``configs/sweeps/*.yaml``) names a
base training config, overrides for every trial (``fixed``), one or more grids of dotted
overrides (their Cartesian products, united), the token budget and what else is held
fixed as E varies (``hold``).

Every trial is checked before any starts: each grid key must be a config key, every grid
non-empty, and every trial's config must load and pass layout validation (the same
``load_config`` and ``check_layout`` as ``moe train``), so a bad value fails the sweep
with one message naming the trial instead of failing one trial an hour in.

A trial is keyed by a stable hash of its overrides and lives in ``out_dir/trials/<key>/``
(its ``train.run_dir``; ``trial.json`` holds the overrides). Resuming is by key: a trial
whose ``summary.json`` reports all its steps is never run again; one with a checkpoint is
resumed from it (``train.resume=true``: bit-exact); one without is started afresh.

Each trial runs ``launch.local_launcher.start``, as ``moe train`` does: a one-rank layout in
the trial's own process, a multi-rank one as a group of Ray actors (the Ray launcher, on
the sweep's cluster). The Tune trial reserves ``resources.cpus``/``gpus`` for a one-rank run;
for a multi-rank run it reserves almost nothing itself and its ranks ask for
``resources.cpus / world`` CPUs each (``launch.cpus_per_rank``, unless the config sets it)
and, on a cluster with GPUs, one GPU each (the Ray launcher's default). At most
``max_concurrent`` trials run at once (Tune's ``max_concurrent_trials``). ``out_dir/results.md``
and ``results.jsonl`` are rewritten, and a line printed, each time a trial finishes (a Tune
callback). Resumption is this module's, by trial key, not Tune's experiment restore: each
``moe sweep`` is a new Tune experiment over the unfinished trials only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from launch.config import Config, LaunchConfig, TrainConfig, build, load_config, locate, read_yaml, searched
from launch.data import DataConfig
from launch.dirlock import held_directory
from moe.accounting import param_counts, train_flops_per_token
from moe.config import ConfigError, ModelConfig, MoEConfig, require
from parallel.config import ParallelConfig

Hold = Literal["tokens", "active_params", "flops_per_token"]
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "moe": MoEConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig,
    "launch": LaunchConfig,
}


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves on the Ray cluster (fractions allowed)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        require(self.cpus > 0, "resources.cpus", self.cpus, "must be > 0 (fractions allowed)")
        require(self.gpus >= 0, "resources.gpus", self.gpus, "must be >= 0")


@dataclass(frozen=True)
class FitConfig:
    """How ``moe sweep report`` fits the law (``launch/scaling_fit.py``)."""

    loss: Literal["final_val_loss", "best_val_loss"] = "final_val_loss"
    huber_delta: float = 1e-3
    bootstrap: int = 200

    def __post_init__(self) -> None:
        require(self.huber_delta > 0, "fit.huber_delta", self.huber_delta, "must be > 0 (in log10 loss)")
        require(self.bootstrap >= 0, "fit.bootstrap", self.bootstrap, "must be >= 0 (0: no confidence intervals)")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: the base config, what every trial shares, the grids, what is held fixed.

    ``grid`` and each of ``extra_grids`` map an axis to its values. An axis is a dotted
    config key (``moe.num_experts: [1, 2, 4]``) or a name of your choice whose values are
    mappings of dotted keys, set together (``size: [{model.dim: 32, moe.expert_ffn_dim: 64}, ...]``).
    Trials are the union of the grids' Cartesian products (duplicates run once).

    ``hold``: ``tokens`` changes nothing beyond the grid: every trial trains on
    ``tokens`` tokens (also true of the other two); active parameters and FLOPs/token then
    grow with E by the router only (E·D weights per MoE layer). ``active_params`` and
    ``flops_per_token`` set each trial's ``moe.expert_ffn_dim`` to the width that gives it
    the non-embedding active parameters (resp. training FLOPs per token) of its dense
    baseline: the same config with one expert, top-1, learned router (a one-expert MoE layer
    computes exactly the dense MLP). For top-1 that narrows the experts by about E/2 to pay
    for the router; with top-k it divides the width by about k. A ``moe.granularity`` axis
    (fine-grained experts) is held against the same coarse dense baseline, the width a
    multiple of G; its routers (E·G·D) cost it a slightly narrower width.
    """

    base: str
    grid: dict[str, list[Any]]
    extra_grids: list[dict[str, list[Any]]] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None
    tokens: int | None = None
    hold: Hold = "tokens"
    max_concurrent: int = 2
    resources: TrialResources = field(default_factory=TrialResources)
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self) -> None:
        require(self.tokens is None or self.tokens >= 1, "tokens", self.tokens, "must be >= 1, or null for the base steps")
        require(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be >= 1")


# -- loading and checking the sweep config ---------------------------------------------


def _check_key(dotted: str, where: str) -> None:
    """``dotted`` must name a field of a config section (``train.steps``), else one error."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key or "." in key:
        close = difflib.get_close_matches(section, list(SECTIONS), n=1)
        hint = f" (did you mean '{close[0]}.{key}'?)" if close and key else ""
        raise ConfigError(
            f"{where}: unknown parameter '{dotted}'{hint}; parameters are section.key with section one of "
            f"{', '.join(SECTIONS)}"
        )
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown parameter '{dotted}'{hint}; allowed in '{section}': {', '.join(names)}")


def _check_grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: empty grid; give at least one axis, e.g. moe.num_experts: [1, 2, 4, 8]")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{axis}={values!r}: expected a non-empty list of values")
        if "." in str(axis):
            _check_key(str(axis), f"{where}.{axis}")
            continue
        for i, group in enumerate(values):
            if not isinstance(group, dict) or not group:
                raise ConfigError(
                    f"{where}.{axis}[{i}]={group!r}: axis '{axis}' is not a dotted config key, so its values must be "
                    "mappings of dotted keys set together, e.g. {model.dim: 64, moe.expert_ffn_dim: 128}"
                )
            for key in group:
                _check_key(str(key), f"{where}.{axis}[{i}]")
    return grid


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep config's own keys (not yet the trials: see ``plan``)."""
    path = Path(path)
    raw = read_yaml(path, "sweep config", "sweeps")
    names = [f.name for f in dataclasses.fields(SweepConfig)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in sweep config {str(path)!r}{hint}; allowed: {', '.join(names)}")
    require("base" in raw, "base", None, "name the base training config, e.g. base: configs/tiny.yaml")
    grid = _check_grid(raw.pop("grid", None), "grid")
    extra = raw.pop("extra_grids", None) or []
    if not isinstance(extra, list):
        raise ConfigError(f"extra_grids={extra!r}: expected a list of grids")
    extra = [_check_grid(g, f"extra_grids[{i}]") for i, g in enumerate(extra)]
    fixed = raw.pop("fixed", None) or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"fixed={fixed!r}: expected a mapping of dotted keys to values")
    for key in fixed:
        _check_key(str(key), f"fixed.{key}")
    rest = build(_SweepScalars, raw, "")
    return SweepConfig(
        base=rest.base, grid=grid, extra_grids=extra, fixed=fixed,
        out_dir=rest.out_dir or str(Path("runs") / "sweeps" / path.stem), tokens=rest.tokens, hold=rest.hold,
        max_concurrent=rest.max_concurrent, resources=rest.resources, fit=rest.fit,
    )


@dataclass(frozen=True)
class _SweepScalars:
    """The sweep config's keys that ``launch.config.build`` can check (all but the mappings)."""

    base: str
    out_dir: str | None = None
    tokens: int | None = None
    hold: Hold = "tokens"
    max_concurrent: int = 2
    resources: TrialResources = field(default_factory=TrialResources)
    fit: FitConfig = field(default_factory=FitConfig)


# -- planning the trials -------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One grid point: its key, its overrides (as given, then as run) and its config."""

    key: str
    axes: dict[str, Any]
    overrides: dict[str, Any]
    cfg: Config
    run_dir: str


def _expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of a grid, each point as {axis: value}."""
    axes = list(grid)
    return [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]


def _flatten(point: dict[str, Any]) -> dict[str, Any]:
    """{axis: value} -> {dotted key: value}; a key set by two axes is an error."""
    flat: dict[str, Any] = {}
    for axis, value in point.items():
        items = value.items() if "." not in axis else [(axis, value)]
        for key, v in items:
            if key in flat:
                raise ConfigError(f"grid point {point}: '{key}' is set by two axes; set each key on one axis only")
            flat[key] = v
    return flat


def _to_overrides(flat: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in flat.items()]


def _held_ffn_dim(cfg: Config, hold: Hold) -> int:
    """The ``moe.expert_ffn_dim`` that matches the trial's dense baseline (one expert,
    top-1, learned router, coarse: granularity 1) in active non-embedding params or
    FLOPs/token. Both are affine in the width, so two evaluations give the exact solution;
    rounded to a multiple of ``moe.granularity`` G (the width of each of the G fine-grained
    experts is ``expert_ffn_dim / G``). A granularity axis then holds the budget too: at
    equal width the fine-grained trial pays only for its router's ``E·G·D`` weights."""
    def metric(moe: MoEConfig) -> float:
        if hold == "active_params":
            return float(param_counts(cfg.model, moe).non_embedding_active)
        return train_flops_per_token(cfg.model, moe)

    g = cfg.moe.granularity
    dense = dataclasses.replace(cfg.moe, num_experts=1, top_k=1, router="topk", normalize_weights=False, granularity=1,
                                score="softmax", routed_scaling_factor=1.0, expert_bias_update_rate=0.0, n_groups=1,
                                topk_groups=None)
    width = cfg.moe.expert_ffn_dim
    at_w = metric(cfg.moe)
    slope = (metric(dataclasses.replace(cfg.moe, expert_ffn_dim=width + g)) - at_w) / g
    return g * round((width + (metric(dense) - at_w) / slope) / g)


def _trial_key(flat: dict[str, Any]) -> str:
    """Stable across runs and machines: the sorted overrides, as JSON, hashed."""
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def _absolute_paths(cfg: Config, run_dir: Path) -> Config:
    """Trials run in Ray workers whose working directory is Tune's: every path absolute."""
    data = cfg.data
    data = dataclasses.replace(
        data,
        cache_dir=str(Path(data.cache_dir).resolve()),
        path=None if data.path is None else str(Path(data.path).resolve()),
    )
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, run_dir=str(run_dir.resolve())))


def plan(sweep: SweepConfig) -> list[Trial]:
    """Every trial of the sweep, each config loaded and validated; raises ``ConfigError``
    naming the first bad trial before anything runs."""
    from launch.train import check_layout

    if not locate(sweep.base, "").is_file():
        raise ConfigError(
            f"base={sweep.base!r}: no such training config file (looked in: {searched(sweep.base, '')}); "
            "e.g. base: configs/tiny.yaml"
        )
    points = [p for g in [sweep.grid, *sweep.extra_grids] for p in _expand(g)]
    trials: dict[str, Trial] = {}
    for point in points:
        flat = {**sweep.fixed, **_flatten(point)}
        where = f"trial {json.dumps(point)}"
        try:
            cfg = load_config(sweep.base, _to_overrides(flat))
            if sweep.tokens is not None:
                tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
                flat["train.steps"] = max(1, round(sweep.tokens / tokens_per_step))
            if sweep.hold != "tokens":
                cfg = load_config(sweep.base, _to_overrides(flat))
                flat["moe.expert_ffn_dim"] = _held_ffn_dim(cfg, sweep.hold)
            cfg = load_config(sweep.base, _to_overrides(flat))
            check_layout(cfg)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        key = _trial_key(flat)
        # Absolute: trials run in Ray workers whose working directory is Tune's.
        run_dir = (Path(str(sweep.out_dir)) / "trials" / key).resolve()
        trials.setdefault(key, Trial(key, point, flat, _absolute_paths(cfg, run_dir), str(run_dir)))
    return list(trials.values())


# -- state of a trial on disk ---------------------------------------------------------


def finished(trial: Trial) -> bool:
    """Whether ``trial`` ran all its steps (its summary says so). An unreadable summary is one
    error naming it, before the sweep starts anything."""
    summary = Path(trial.run_dir) / "summary.json"
    if not summary.is_file():
        return False
    try:
        steps = json.loads(summary.read_text()).get("steps")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise ConfigError(
            f"{summary}: unreadable ({type(err).__name__}: {err}); fix it, or delete {trial.run_dir} and run the "
            "sweep again to rerun that trial"
        ) from None
    return steps == trial.cfg.train.steps


def _prepared(trial: Trial) -> Config:
    """The config to run: resumed from its checkpoint if it has one, else started in a
    clean directory (a trial killed before its first checkpoint leaves only logs)."""
    from parallel.checkpoint import latest_checkpoint

    run_dir = Path(trial.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return dataclasses.replace(trial.cfg, train=dataclasses.replace(trial.cfg.train, resume=True))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return trial.cfg


def _write_trial_json(trial: Trial) -> None:
    from launch.sweep_report import write_text_atomically

    run_dir = Path(trial.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"key": trial.key, "axes": trial.axes, "overrides": trial.overrides}
    write_text_atomically(run_dir / "trial.json", json.dumps(record, indent=2))


def write_sweep_json(sweep: SweepConfig, out_dir: Path) -> None:
    """``out_dir/sweep.json``: the sweep config the last ``moe sweep`` ran (the report reads
    its fit settings), replaced whole: a write that fails keeps the previous one."""
    from launch.sweep_report import write_text_atomically

    write_text_atomically(out_dir / "sweep.json", json.dumps(dataclasses.asdict(sweep), indent=2))


def run_trial(trial: Trial, resources: TrialResources) -> dict[str, Any]:
    """Run (or resume) one trial to the end, as ``moe train`` would; its summary. A
    multi-rank trial's ranks share ``resources`` (unless the config sets launch.cpus_per_rank)."""
    from launch.local_launcher import start
    from launch.train import check_layout

    cfg = _prepared(trial)
    _write_trial_json(trial)
    world = check_layout(cfg).world_size
    if world > 1 and cfg.launch.cpus_per_rank is None:
        cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, cpus_per_rank=resources.cpus / world))
    return start(cfg, f"sweep-{trial.key}")


# -- Ray Tune -------------------------------------------------------------------------


def _tune_trainable(config: dict[str, Any], trials: dict[str, Trial], resources: TrialResources) -> None:
    """Ray Tune's function trainable: one trial (by key), its headline figures reported once."""
    from ray import tune

    summary = run_trial(trials[config["key"]], resources)
    tune.report({"final_val_loss": summary["final_val_loss"], "tokens_per_s": summary["tokens_per_s"]})


def _trial_resources(trial: Trial, res: TrialResources) -> dict[str, float]:
    """A one-rank trial trains in the trial's process: it holds the resources. A
    multi-rank trial's ranks are Ray actors with their own reservations; the trial
    process itself only waits on them."""
    from launch.train import check_layout

    if check_layout(trial.cfg).world_size > 1:
        return {"cpu": 0.01, "gpu": 0.0}
    return {"cpu": res.cpus, "gpu": res.gpus}


def _callback(out_dir: Path, trials: list[Trial], finished_before: int) -> Any:
    from ray import tune

    from launch.sweep_report import write_results_table

    by_key = {t.key: t for t in trials}

    class ResultsTable(tune.Callback):
        """Rewrites results.md/jsonl and prints a line whenever a trial ends. The count is
        of the completions Tune reported, not of the summaries on disk: two trials ending
        together would otherwise both print the later count."""

        def __init__(self) -> None:
            super().__init__()
            self.finished = finished_before

        # Tune calls its hooks with keyword arguments only (iteration=, trials=, trial=).
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.finished += 1
            self._update(trial, "done")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._update(trial, "FAILED")

        def _update(self, tune_trial: Any, status: str) -> None:
            mine = by_key[tune_trial.config["key"]]
            write_results_table(out_dir)
            done = self.finished
            loss = tune_trial.last_result.get("final_val_loss") if tune_trial.last_result else None
            shown = f"val loss {loss:.4f}" if isinstance(loss, float) else "see its logs"
            print(f"[sweep] {status}: {mine.key} {json.dumps(mine.axes)} {shown} ({done}/{len(by_key)} finished)",
                  flush=True)

    return ResultsTable()


def _run_tune(pending: list[Trial], sweep: SweepConfig, out_dir: Path, trials: list[Trial]) -> set[str]:
    """The pending trials as Ray Tune trials; the keys of those that failed."""
    from ray import tune

    by_key = {t.key: t for t in pending}

    def bundle(spec: dict[str, Any]) -> Any:
        res = _trial_resources(by_key[spec["key"]], sweep.resources)
        return tune.PlacementGroupFactory([{"CPU": res["cpu"], **({"GPU": res["gpu"]} if res["gpu"] else {})}])

    trainable = tune.with_resources(
        tune.with_parameters(_tune_trainable, trials=by_key, resources=sweep.resources), bundle
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search(list(by_key))},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent),
        run_config=tune.RunConfig(
            name=f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(out_dir / "tune"),
            verbose=0,
            callbacks=[_callback(out_dir, trials, len(trials) - len(pending))],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return {r.config["key"] for r in tuner.fit() if r.error is not None}


def run_sweep(sweep: SweepConfig, address: str | None = None) -> list[Trial]:
    """Run every unfinished trial through Ray Tune; return the trials that failed. Every
    trial's config is checked before the first trial starts. The sweep holds its out_dir
    while it runs (``launch.dirlock``): a second ``moe sweep`` there would restart, and so
    delete, this one's trials that have no checkpoint yet."""
    from launch.sweep_report import make_sweep_dir

    trials = plan(sweep)
    out_dir = Path(str(sweep.out_dir)).resolve()
    make_sweep_dir(out_dir)
    with held_directory(out_dir, "out_dir"):
        return _run_unfinished(trials, sweep, out_dir, address)


def _run_unfinished(trials: list[Trial], sweep: SweepConfig, out_dir: Path, address: str | None) -> list[Trial]:
    from launch.ray_launcher import _session
    from launch.sweep_report import write_results_table

    pending = [t for t in trials if not finished(t)]
    write_sweep_json(sweep, out_dir)
    print(f"[sweep] {len(trials)} trials, {len(trials) - len(pending)} already finished, {len(pending)} to run "
          f"(Ray Tune, {sweep.max_concurrent} at a time); outputs in {out_dir}", flush=True)
    write_results_table(out_dir)
    if not pending:
        return []
    with _session(LaunchConfig(address=address, ray_temp_dir=str(out_dir / "ray")), out_dir):
        failed_keys = _run_tune(pending, sweep, out_dir, trials)
    return [t for t in pending if t.key in failed_keys]


# -- the command line ---------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``moe sweep CONFIG [--address A]`` or ``moe sweep report DIR``."""
    import argparse

    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="moe sweep report", description="table, fit and plots of a sweep")
        parser.add_argument("dir", type=Path, help="a sweep's out_dir, e.g. runs/sweeps/experts")
        args = parser.parse_args(argv[1:])
        from launch.sweep_report import write_report

        report = write_report(args.dir)
        print(f"report in {report}")
        return 0
    parser = argparse.ArgumentParser(
        prog="moe sweep",
        description="run a sweep of moe-train runs as Ray Tune trials; "
        "`moe sweep report DIR` makes the table, fit and plots of a sweep directory",
    )
    parser.add_argument("config", help="a sweep config, e.g. configs/sweeps/experts.yaml")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (auto, HOST:PORT); default: a local one")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.config)
    start_time = time.perf_counter()
    failed = run_sweep(sweep, args.address)
    from launch.sweep_report import write_report

    if failed:  # said first: with no trial finished, the report below fails too
        names = ", ".join(f"{t.key} ({t.run_dir}/logs)" for t in failed)
        print(f"error: {len(failed)} trial(s) failed: {names}; run the sweep again to retry them", file=sys.stderr)
    report = write_report(Path(str(sweep.out_dir)))
    print(f"[sweep] {time.perf_counter() - start_time:.0f}s; report in {report}", flush=True)
    return 1 if failed else 0
