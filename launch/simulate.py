"""``moe simulate``: emulate a layout on this machine and predict it on a cluster.

    moe simulate CONFIG [section.key=value ...] --cluster configs/hardware/h100-ib.yaml
                 [--steps N] [--no-emulate] [--routing DIR] [--out DIR]
    moe simulate calibrate [--out configs/hardware/this-machine.yaml] [--gpu BASE --out FILE]
    moe simulate plan CONFIG [section.key=value ...] --cluster h100-ib --gpus N [--dispatcher NAME]
                 [--global-batch B] [--top K] [--json FILE]

Emulation runs the layout's W ranks as W processes on this machine's CPU with gloo, each
running the real training step (``launch.train.Run.train_step``), so its numerics are
those of a real multi-rank CPU run by construction. Each rank counts the bytes of every
collective (``parallel.simulator.comm_counter``), records its routing
(``parallel.simulator.routing``), its model-state bytes and its peak live tensor bytes
(``parallel.simulator.measure``) and its step times. The predictor then gives, for the
cluster file: per rank memory, communication and step time (``parallel.simulator.predict``),
and the comparison of its bytes and memory with what the emulation measured.

Nothing is scaled silently: the config's values are used as given; overrides the user
passes (``model.n_layers=2``) are listed in the report as what was scaled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.config import Config, check_output_file, load_config, locate, read_yaml, shipped_configs
from moe.config import ConfigError


def emulate_rank(cfg: Config, steps: int, out_dir: Path, memory_step: int = 1) -> dict[str, Any]:
    """One rank of an emulated run; torch.distributed is initialised by the caller (gloo).

    Runs ``steps`` real training steps; step ``memory_step`` runs under the allocator
    profiler, the first step (lazy optimizer state, first-call costs) is a warm-up, the
    others are timed. Writes
    ``routing-rank-K.jsonl`` to ``out_dir``; returns what this rank measured.
    """
    from launch.train import Run, RankInfo, check_layout
    from parallel.groups import destroy_groups, init_groups
    from parallel.simulator.comm_counter import CommCounter
    from parallel.simulator.measure import StepMemory, engine_state_bytes, measure_step
    from parallel.simulator.routing import RoutingRecorder

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    topology = check_layout(cfg)
    groups = init_groups(topology, cfg.launch.timeout_minutes) if world > 1 else None
    try:
        run = Run(cfg, "simulate", RankInfo(rank, world, groups))
        names = {} if groups is None else {"dp": groups.dp, "ep": groups.ep, "edp": groups.edp, "tp": groups.tp,
                                            "pp": groups.pp, "embd": groups.embd,
                                            "world": dist.group.WORLD}
        counter = CommCounter(names)
        recorder = RoutingRecorder(run.net, rank)
        times, cpu_times, records, memory, states_before = [], [], [], StepMemory(0, 0), {}
        for step in range(steps):
            recorder.step = step
            if world > 1:
                dist.barrier()
            with counter.active():
                if step == memory_step:
                    states_before = engine_state_bytes(run.engine)
                    box: dict[str, Any] = {}
                    memory = measure_step(lambda: box.update(values=run.train_step()[0]), run.device)
                    values = box["values"]
                else:
                    t0, c0 = time.perf_counter(), time.process_time()
                    values, _, _ = run.train_step()
                    if step > 0:
                        times.append(time.perf_counter() - t0)
                        cpu_times.append(time.process_time() - c0)
            records.append(values)
        recorder.remove()
        out_dir.mkdir(parents=True, exist_ok=True)
        recorder.write(out_dir / f"routing-rank-{rank}.jsonl")
        states = engine_state_bytes(run.engine)
        return {"rank": rank, "comm": counter.totals(), "states": states,
                "states_before_memory_step": states_before, "peak_increase": memory.peak_increase,
                "activations": memory.activations,
                "step_seconds": times, "step_cpu_seconds": cpu_times, "values": records}
    finally:
        if groups is not None:
            destroy_groups()


def _rank_process(cfg: Config, rank: int, world: int, port: int, threads: int, steps: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=cfg.launch.timeout_minutes))
    try:
        result = emulate_rank(cfg, steps, out_dir)
        (out_dir / f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def emulate(cfg: Config, steps: int, out_dir: Path) -> list[dict[str, Any]]:
    """Run the layout as W gloo processes on this machine; each rank's measurements.

    Threads per rank: ``launch.threads``, else ``max(1, cores // W)`` (as the launchers)."""
    from launch.data import ensure_dataset
    from launch.rank import LaunchError, pick_port

    world = cfg.parallel.world_size
    ensure_dataset(cfg.data)  # once, before the ranks (they would race preparing it)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.launch.threads or max(1, (os.cpu_count() or 1) // world)
    port = pick_port("127.0.0.1", None)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_process, args=(cfg, r, world, port, threads, steps, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs) and all(p.exitcode in (None, 0) for p in procs):
        time.sleep(0.2)
    failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    if failed:
        raise LaunchError(f"emulated rank {failed[0]} of {world} failed (exit code {procs[failed[0]].exitcode}); "
                          "its traceback is above")
    return [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(world)]


def compare(pred: Any, cfg: Config, results: list[dict[str, Any]], routing: list[Any]) -> tuple[list[str], dict[str, Any]]:
    """Lines and a JSON record: counted vs predicted bytes and state bytes (exact), peak
    and step time (relative error)."""
    from parallel.simulator.predict import measured_categories, recorded_comm, state_memory

    lay = pred.layout
    predicted_comm = recorded_comm(cfg.model, cfg.moe, lay, routing)
    lines, record = [], {"ranks": []}
    for rank, result in enumerate(results):
        measured = measured_categories(result["comm"])
        want = {k: int(v) for k, v in predicted_comm[rank].__dict__.items()}
        bytes_ok = measured == want
        states, _ = state_memory(cfg.model, cfg.moe, lay, cfg.parallel.engine, rank)
        want_states = {"params": states.params, "grads": states.grads, "optimizer": states.optimizer}
        states_ok = result["states"] == want_states
        measured_peak = sum(result["states_before_memory_step"].values()) + result["peak_increase"]
        predicted_peak = pred.ranks[rank].memory.peak
        step = statistics_median(result["step_seconds"])
        predicted_step = pred.summary["step_time_s"]
        lines.append(
            f"  rank {rank}: bytes {'EQUAL' if bytes_ok else 'DIFFER'} ({sum(measured.values())} counted), "
            f"states {'EQUAL' if states_ok else 'DIFFER'} ({sum(result['states'].values())} B), "
            f"peak {measured_peak / 2**20:.1f} MiB measured vs {predicted_peak / 2**20:.1f} predicted "
            f"({(predicted_peak - measured_peak) / measured_peak:+.1%}), step {step * 1e3:.1f} ms measured vs "
            f"{predicted_step * 1e3:.1f} predicted ({(predicted_step - step) / step:+.1%})")
        if not bytes_ok:
            lines += [f"    {k}: counted {measured.get(k)} predicted {want.get(k)}"
                      for k in sorted(set(measured) | set(want)) if measured.get(k) != want.get(k)]
        record["ranks"].append({"rank": rank, "bytes_equal": bytes_ok, "counted": measured, "predicted": want,
                                "states_equal": states_ok, "states": result["states"],
                                "peak_measured": measured_peak, "peak_predicted": predicted_peak,
                                "activations_measured": result["activations"],
                                "memory_predicted": dataclasses.asdict(pred.ranks[rank].memory),
                                "step_measured_s": step, "step_predicted_s": predicted_step,
                                "step_cpu_s": statistics_median(result["step_cpu_seconds"]),
                                "values": result["values"]})
    return lines, record


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe simulate", description=__doc__.split("\n\n")[0],
        epilog="also: moe simulate calibrate [--out FILE]; moe simulate validate CONFIG [k=v ...] --layouts \"dp=1;ep=2\"; "
        "moe simulate plan CONFIG --gpus N [--cluster HW]",
    )
    parser.add_argument("config", help="a YAML config, or 'calibrate'")
    parser.add_argument("overrides", nargs="*", help="section.key=value; anything that scales the model down is listed")
    parser.add_argument("--cluster", default="h100-ib",
                        help="hardware file to predict for: a path, or a name in the shipped configs/hardware/ "
                        "(default %(default)s)")
    parser.add_argument("--steps", type=int, default=5,
                        help="emulated steps (step 0 warms up, step 1 measures memory, the rest are timed)")
    parser.add_argument("--no-emulate", action="store_true", help="predict only (uniform routing unless --routing)")
    parser.add_argument("--routing", type=Path, default=None, help="a directory of routing-rank-K.jsonl to replay")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="activation/matmul dtype of the cluster run (default: bfloat16 on a GPU cluster)")
    parser.add_argument("--recompute", action="store_true",
                        help="predict with full activation recomputation of every block (train.recompute=full); "
                        "without it the config's train.recompute and train.recompute_layers are predicted "
                        "(e.g. the override train.recompute=selective)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/simulate-<config>-<time>)")
    return parser.parse_args(argv)


def _calibrate(argv: list[str]) -> int:
    from parallel.simulator.calibrate import calibrate, calibrate_gpu

    cal = argparse.ArgumentParser(prog="moe simulate calibrate")
    cal.add_argument("--out", type=Path, default=None,
                     help=f"the hardware file to write (default {_this_machine_path()}; required with --gpu)")
    cal.add_argument("--gpu", default=None, metavar="BASE",
                     help="measure this node's GPU instead (bf16 GEMM roofline, grouped GEMM, flash attention, copy "
                     "bandwidth, kernel overhead) over a copy of the cluster file BASE (e.g. h100-ib)")
    args = cal.parse_args(argv)
    if args.gpu is not None and args.out is None:
        raise ConfigError("moe simulate calibrate --gpu BASE needs --out FILE (e.g. configs/hardware/h100-measured.yaml)")
    path = args.out or _this_machine_path()
    check_output_file(path, "--out", "moe simulate calibrate", _is_calibration)
    if args.gpu is not None:
        base = _hardware(args.gpu, "--gpu")
        gpu = calibrate_gpu(path, base)
        print(f"wrote {path}: GEMM {gpu.matmul_efficiency:.2f} of peak, grouped {gpu.kernel_efficiency['grouped_mm']:.2f} "
              f"and attention {gpu.kernel_efficiency['attention']:.2f} of that, copy {gpu.memory_efficiency:.2f} of HBM, "
              f"{gpu.op_overhead_s * 1e6:.1f} us per kernel")
        return 0
    hw = calibrate(path)
    print(f"wrote {path}: matmul {hw.peak_flops['float32'] / 1e9:.1f} GFLOP/s per core, memory "
          f"{hw.memory_bandwidth / 1e9:.1f} GB/s, op overhead {hw.op_overhead_s * 1e6:.1f} us, gloo all-to-all "
          f"{hw.intra_node.bandwidth / 1e9:.2f} GB/s + {hw.intra_node.latency_s * 1e6:.0f} us")
    return 0


def _is_calibration(path: Path) -> bool:
    """Whether ``path`` starts with the comment ``calibrate`` heads every file it writes
    with (so a shipped hardware file is never replaced by a measurement)."""
    try:
        with path.open(encoding="utf-8") as stream:
            line = stream.readline()
            return line.startswith("# This machine, measured by `moe simulate calibrate`") or (
                "measured by `moe simulate calibrate --gpu" in line)
    except (OSError, UnicodeDecodeError):
        return False


def _this_machine_path() -> Path:
    """Where this machine's hardware file is read and written: configs/hardware/ under the
    current directory if it has one, else the shipped configs/ (not wherever the command
    happens to run)."""
    found = locate(THIS_MACHINE, "hardware")
    return found if found.is_file() else shipped_configs() / "hardware" / Path(THIS_MACHINE).name


def _this_machine() -> Any:
    path = _this_machine_path()
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `moe simulate calibrate` first")
    return _hardware(str(path), "this machine's hardware file")


def _hardware(name: str, what: str) -> Any:
    """A hardware file by path or shipped name (``h100-ib``), validated; one ``ConfigError``
    naming ``what`` (the option that gave it) and where it was looked for otherwise."""
    from parallel.simulator.hardware import parse_hardware

    raw = read_yaml(name, what, "hardware")
    return parse_hardware(raw, str(locate(name, "hardware")))


def _check_out_dir(out: Path) -> None:
    """``--out``: new, empty or an earlier simulation's, then created; a directory holding
    other files is refused, so a mistyped path never mixes outputs into someone's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if foreign:
        raise ConfigError(
            f"--out {str(out)!r} holds {foreign[0]}, which `moe simulate` did not write; choose a new or empty directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {str(out)!r}: cannot create it ({err.strerror}); choose a writable directory") from None


def _check_emulation_args(args: argparse.Namespace) -> None:
    """``--steps`` and ``--routing`` against whether the layout is emulated."""
    if not args.no_emulate:
        _check_emulated_steps(args.steps)
    if args.routing is not None and not args.no_emulate:
        raise ConfigError(
            "--routing replays recorded routing in a prediction without emulation, and an emulation records "
            "and replays its own: add --no-emulate, or drop --routing"
        )


def _check_emulated_steps(steps: int) -> None:
    if steps < 3:
        raise ConfigError(
            f"--steps {steps}: an emulation needs at least 3 (step 0 warms up, step 1 measures memory, "
            "later steps are timed)"
        )


def _recorded_routing(directory: Path, cfg: Config) -> list[Any]:
    """``--routing DIR``'s records, checked against the config they are replayed on."""
    from parallel.simulator.routing import read_routing

    if not directory.is_dir():
        raise ConfigError(f"--routing {str(directory)!r}: no such directory")
    paths = sorted(directory.glob("routing-rank-*.jsonl"))
    if not paths:
        raise ConfigError(
            f"--routing {str(directory)!r} holds no routing-rank-K.jsonl files; they are written by "
            "`moe simulate` (<out>/emulation/) and by `moe train` with train.record_routing=true (<run_dir>/routing/)"
        )
    try:
        routing = read_routing(paths)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--routing {str(directory)!r}: unreadable records ({type(err).__name__}: {err})") from None
    experts = {len(counts) for record in routing for counts in record.counts_LE}
    if experts - {cfg.moe.num_experts}:
        raise ConfigError(
            f"--routing {str(directory)!r} was recorded with {sorted(experts)} experts per layer, but "
            f"moe.num_experts={cfg.moe.num_experts}: replay routing recorded on this config"
        )
    return routing


def emulate_and_compare(cfg: Config, steps: int, out: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """Emulate ``cfg``'s layout here; compare with the prediction for this machine
    (``configs/hardware/this-machine.yaml``) replaying the emulation's own routing."""
    from parallel.simulator.predict import Layout, predict
    from parallel.simulator.routing import read_routing

    emu_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(out.resolve())))
    results = emulate(emu_cfg, steps, out)
    routing = read_routing(sorted(out.glob("routing-rank-*.jsonl")))
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                          emulated_dtype(cfg), cfg.train.recompute, threads=cfg.launch.threads,
                          recompute_layers=cfg.train.recompute_layers)
    local = predict(cfg.model, cfg.moe, layout, _with_rate(_this_machine(), layout.dtype), cfg.parallel.engine, routing)
    lines, record = compare(local, cfg, results, routing)
    return routing, lines, record


def emulated_dtype(cfg: Config) -> str:
    """The activation dtype an emulated rank computes in (``launch.train.train_dtype``):
    what its prediction must assume for the memory to compare."""
    from launch.train import resolve_device

    auto_bf16 = cfg.train.dtype == "auto" and resolve_device(cfg.train).type == "cuda"
    return "bfloat16" if cfg.train.dtype == "bfloat16" or auto_bf16 else "float32"


def _with_rate(hw: Any, dtype: str) -> Any:
    """``hw`` with a matmul rate for ``dtype``: ``calibrate`` measures fp32 only, so a bf16
    emulation's step time is predicted at the fp32 rate (as the MFU is, ``predict._summary``)."""
    if dtype in hw.peak_flops:
        return hw
    return dataclasses.replace(hw, peak_flops={**hw.peak_flops, dtype: hw.peak_flops["float32"]})


def run_step_time(config: str, overrides: list[str], steps: int, out: Path) -> tuple[float, list[float]]:
    """Train the layout as ``moe train`` does (local launcher, its own processes, no counting
    or hooks besides ``train.record_routing``) for ``steps`` steps into ``out``; return the
    median and all of the step times of its log intervals after the first (the warm-up).
    The emulation's instrumented steps run slower than this, so step time is judged here."""
    import statistics
    import subprocess
    import sys

    log_every = max(steps // 6, 1)
    cmd = [sys.executable, "-m", "launch.cli", "train", config, *overrides, "launch.launcher=local",
           f"train.steps={steps}", f"train.log_every={log_every}", f"train.eval_every={steps}",
           f"train.ckpt_every={steps}", "train.record_routing=true", f"train.run_dir={out.resolve()}"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"the timed run failed: {' '.join(cmd)}; see {out / 'train.log'}")
    cfg = load_config(config, overrides)
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [tokens_per_step / r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    return statistics.median(seconds), seconds


def timed_run(config: str, overrides: list[str], cfg: Config, steps: int, out: Path) -> dict[str, Any]:
    """``run_step_time`` of the layout, and this machine's prediction replaying that run's
    recorded routing, in the run's dtype (a bf16 run at the fp32 rate: ``_with_rate``)."""
    from parallel.simulator.predict import Layout, predict
    from parallel.simulator.routing import read_routing

    step_s, intervals = run_step_time(config, overrides, steps, out)
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                          emulated_dtype(cfg), cfg.train.recompute, threads=cfg.launch.threads,
                          recompute_layers=cfg.train.recompute_layers)
    routing = read_routing(sorted((out / "routing").glob("routing-rank-*.jsonl")))
    hw = _with_rate(_this_machine(), layout.dtype)
    predicted = predict(cfg.model, cfg.moe, layout, hw, cfg.parallel.engine, routing)
    return {"step_s": step_s, "interval_step_s": intervals, "step_predicted_s": predicted.summary["step_time_s"]}


def _check_validated_layout(name: str, cfg: Config) -> None:
    """The checks an emulated rank and ``moe train`` make of ``cfg``'s layout
    (``launch.train.check_layout``), here, once: one ``ConfigError`` naming the layout
    rather than a traceback from each of its ranks after the layouts before it ran."""
    from launch.train import check_layout

    try:
        check_layout(cfg)
    except ConfigError as err:
        raise ConfigError(f"--layouts: layout {name!r}: {err} (in --layouts, micro=N sets train.micro_batch_size); "
                          "nothing was run") from None


def _validate(argv: list[str]) -> int:
    """``moe simulate validate CONFIG [k=v ...] --layouts "dp=1;dp=2;..."``: emulate each
    layout, print counted-vs-predicted bytes and states and the peak error; then train it
    plainly (``--run-steps``) and compare its step time with the prediction replaying
    that run's own routing."""
    from launch.check_layouts import parse_layouts

    parser = argparse.ArgumentParser(prog="moe simulate validate")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--layouts", required=True, help='e.g. "dp=1;dp=2;ep=2,dp=2;dp=2,micro=2"')
    parser.add_argument("--steps", type=int, default=6, help="emulated steps (bytes, states, peak memory)")
    parser.add_argument("--run-steps", type=int, default=120,
                        help="steps of the plain timed run per layout (0: none, step time from the emulation only)")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"simulate-validate-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    _check_emulated_steps(args.steps)
    if args.run_steps < 0 or args.run_steps == 1:
        raise ConfigError(
            f"--run-steps {args.run_steps}: 0 for no timed run, or at least 2 (the first logged interval warms up)"
        )
    layouts = parse_layouts(args.layouts)
    configs = [load_config(args.config, [*args.overrides, *layout.overrides]) for layout in layouts]
    for layout, cfg in zip(layouts, configs):  # every layout before any runs: minutes each
        _check_validated_layout(layout.name, cfg)
    _this_machine()
    rows, records = [], []
    header = (f"{'layout':<22} {'bytes':>6} {'states':>6} {'peak err':>9} {'emu ms':>8} {'pred ms':>8} {'err':>7} "
              f"{'run ms':>8} {'pred ms':>8} {'err':>7} {'load':>5}")
    for layout, cfg in zip(layouts, configs):
        load = os.getloadavg()[0]
        name = layout.name.replace(",", "_").replace("=", "")
        _, lines, record = emulate_and_compare(cfg, args.steps, args.out / name)
        ranks = record["ranks"]
        peak_err = max((r["peak_predicted"] - r["peak_measured"]) / r["peak_measured"] for r in ranks)
        step = max(r["step_measured_s"] for r in ranks)
        pred = ranks[0]["step_predicted_s"]
        run_cols = f"{'-':>8} {'-':>8} {'-':>7}"
        if args.run_steps:
            record["run"] = timed_run(args.config, [*args.overrides, *layout.overrides], cfg, args.run_steps,
                                      args.out / name / "run")
            run_s, run_pred = record["run"]["step_s"], record["run"]["step_predicted_s"]
            run_cols = f"{run_s * 1e3:>8.1f} {run_pred * 1e3:>8.1f} {(run_pred - run_s) / run_s:>+7.1%}"
        row = (f"{layout.name:<22} {'EQUAL' if all(r['bytes_equal'] for r in ranks) else 'DIFFER':>6} "
               f"{'EQUAL' if all(r['states_equal'] for r in ranks) else 'DIFFER':>6} {peak_err:>+9.1%} "
               f"{step * 1e3:>8.1f} {pred * 1e3:>8.1f} {(pred - step) / step:>+7.1%} {run_cols} {load:>5.1f}")
        print(row, flush=True)
        rows.append(row)
        records.append({"layout": layout.name, "load_before": load, **record})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps(records, indent=2))
    (args.out / "validation.txt").write_text("\n".join([header, *rows]) + "\n")
    print(header, *rows, f"written to {args.out}/validation.txt and validation.json", sep="\n")
    return 0


def _plan(argv: list[str]) -> int:
    """``moe simulate plan``: rank the megatron-core layouts of a model on N GPUs of a cluster
    (``parallel.simulator.plan``); a table, and the whole ranking as JSON with ``--json``."""
    from parallel.simulator.plan import plan, plan_table

    parser = argparse.ArgumentParser(prog="moe simulate plan", description=_plan.__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--cluster", default="h100-ib", help="a GPU hardware file: a path or a shipped name")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the layouts use (tp x pp x dp)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default train.batch_size)")
    parser.add_argument("--dispatcher", default=None, help="one dispatcher profile of the hardware file (default: each)")
    parser.add_argument("--top", type=int, default=20, help="rows of the table (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write every fitting layout, ranked, to this file")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.top < 1:
        raise ConfigError(f"--top {args.top}: give at least 1 row")
    if args.json is not None:
        check_output_file(args.json, "--json", "moe simulate plan", _is_plan)
    hw = _hardware(args.cluster, "--cluster")
    cfg = load_config(args.config, args.overrides)
    global_batch = args.global_batch or cfg.train.batch_size
    if global_batch < 1:
        raise ConfigError(f"--global-batch {global_batch}: give at least 1 sequence")
    result = plan(cfg.model, cfg.moe, hw, args.gpus, global_batch, args.dispatcher)
    print("\n".join(plan_table(result, args.top)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps({"plan": result.to_dict()}, indent=1))
        os.replace(temporary, args.json)
        print(f"written to {args.json}")
    return 0


def _is_plan(path: Path) -> bool:
    """Whether ``path`` is a ranking ``plan --json`` wrote (it may be replaced)."""
    try:
        return path.read_text(encoding="utf-8").startswith('{\n "plan"')
    except (OSError, UnicodeDecodeError):
        return False


def _cluster_model(cfg: Config, hw: Any) -> tuple[list[str], dict[str, Any] | None]:
    """On a GPU cluster: the megatron-core bf16 run of the config's layout as the cluster
    model predicts it (``parallel.simulator.cluster``; NCCL all-to-all dispatcher, megatron's
    even layer split, no overlap of the expert all-to-all), or why it cannot."""
    from parallel.simulator.cluster import ClusterLayout, predict_cluster
    from parallel.simulator.report import cluster_lines

    p, train = cfg.parallel, cfg.train
    layout = ClusterLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp, dp=p.dp,
                           micro_batch=train.micro_batch_size or max(1, train.batch_size // p.dp),
                           global_batch=train.batch_size, seq_len=cfg.model.seq_len, recompute=train.recompute)
    try:
        prediction = predict_cluster(cfg.model, cfg.moe, layout, hw)
    except ConfigError as err:
        return [f"megatron-core bf16 run of this layout: not predicted ({err})"], None
    return cluster_lines(prediction), prediction.to_dict()


def main(argv: list[str]) -> int:
    """``moe simulate ...``; returns the exit status."""
    from parallel.simulator.predict import Layout, predict
    from parallel.simulator.report import plot_breakdown, text_report, write_json

    if argv[:1] == ["calibrate"]:
        return _calibrate(argv[1:])
    if argv[:1] == ["validate"]:
        return _validate(argv[1:])
    if argv[:1] == ["plan"]:
        return _plan(argv[1:])
    args = _parse(argv)
    _check_emulation_args(args)
    hw = _hardware(args.cluster, "--cluster")  # a bad hardware file fails before any work
    cfg = load_config(args.config, args.overrides)
    recorded = _recorded_routing(args.routing, cfg) if args.routing is not None else None
    scaled = [o for o in args.overrides if o.split("=")[0] in SCALING_KEYS]
    dtype = args.dtype or ("bfloat16" if hw.kind == "gpu" else "float32")
    recompute = "full" if args.recompute else cfg.train.recompute
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                          dtype, recompute, threads=cfg.launch.threads,
                          recompute_layers=None if args.recompute else cfg.train.recompute_layers)
    out = args.out or Path("runs") / f"simulate-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_dir(out)
    if not args.no_emulate:
        _this_machine()  # the emulation is compared with this machine's prediction: fail now, not after it
    print("scaled by the user: " + (", ".join(scaled) if scaled else "nothing (the config as given)"))
    routing, comparison, extra = recorded, None, {"scaled": scaled}
    if not args.no_emulate:
        print(f"emulating {cfg.parallel.world_size} ranks as gloo processes on this machine, {args.steps} steps ...")
        routing, comparison, extra["emulation"] = emulate_and_compare(cfg, args.steps, out / "emulation")
    pred = predict(cfg.model, cfg.moe, layout, hw, cfg.parallel.engine, routing)
    report = text_report(pred, scaled, comparison)
    if hw.kind == "gpu":
        lines, extra["cluster_model"] = _cluster_model(cfg, hw)
        report += "\n" + "\n".join(lines)
    (out / "report.txt").write_text(report + "\n")
    write_json(pred, out / "prediction.json", extra)
    plot_breakdown(pred, out / "breakdown.png")
    print(report)
    print(f"outputs in {out}/: report.txt, prediction.json, breakdown.png" + ("" if args.no_emulate else ", emulation/"))
    return 0


THIS_MACHINE = "configs/hardware/this-machine.yaml"
OUTPUTS = ("report.txt", "prediction.json", "breakdown.png", "emulation")
SCALING_KEYS = {"model.n_layers", "model.seq_len", "model.dim", "model.n_heads", "model.ffn_dim", "model.vocab_size",
                "moe.num_experts", "moe.expert_ffn_dim", "train.batch_size", "train.micro_batch_size"}
