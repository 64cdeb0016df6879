"""The ``moe`` command line.

    moe train CONFIG [section.key=value ...]     train (e.g. moe.num_experts=16 train.steps=50)
    moe train CONFIG --address auto              ... on an existing Ray cluster (launch.address)
    moe data prepare PATHS... --out DIR          tokenize text/JSONL files into .bin/.idx (--overwrite: replace one)
    moe data prepare PATHS... --out DIR --tokenizer PATH   ... with a Hugging Face tokenizer.json
    moe data tokenizer train [FILES...] --vocab-size N --out PATH   train a byte-level BPE tokenizer
    moe check-layouts CONFIG --layouts "ep=1;ep=2;dp=2"   same training under several layouts, compared
    moe bench kernels | layer                    speed tables (printed, and JSON under runs/bench/)
    moe bench layouts CONFIG --layouts "dp=1;ep=2"   step time, tokens/s, peak memory per rank per layout
    moe bench memory CONFIG --recompute none,full    measured vs predicted memory per rank (layouts x modes x dtypes)
    moe eval CKPT_OR_RUN_DIR [k=v ...] [--data PATH]   loss and perplexity on held-out text (JSON), any layout
    moe ckpt inspect DIR [--verify]              a checkpoint's layout, step, tensors and checksums
    moe ckpt import HF_DIR --out DIR             a Hugging Face Mixtral/Qwen3-MoE/Llama/Qwen3 model as our checkpoint
    moe ckpt export RUN_OR_CKPT --out HF_DIR     any checkpoint, any layout, as a transformers model directory
    moe ckpt upcycle DENSE --experts E --top-k K --out DIR   a dense model made MoE, same first forward
    moe simulate CONFIG [k=v ...] --cluster HW   emulate a layout here, predict memory/comm/time on HW
    moe simulate calibrate                       measure this machine (configs/hardware/this-machine.yaml)
    moe sweep CONFIG [--address A]               a grid of training runs as Ray Tune trials (configs/sweeps/)
    moe sweep report DIR                         a sweep's table, scaling-law fit and plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.config import LaunchError, load_config
from launch.data import DataError
from moe.config import ConfigError
from parallel.config import CheckpointError


def _train(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"launch.address={args.address}"] if args.address is not None else [])]
    cfg = load_config(args.config, overrides)  # a bad config is refused before the heavy imports
    from launch.local_launcher import start  # torch, megatron-core, tensorboard: only when training

    summary = start(cfg, Path(args.config).stem)
    run_dir = summary["run_dir"]
    load = summary["expert_load_tail"]
    balance = (
        f"; expert shares over the last 10% of steps {load['min_share']:.3f}-{load['max_share']:.3f} "
        f"(collapse below {load['collapse_threshold']:.3f})"
        if load["min_share"] is not None
        else ""
    )
    print(
        f"done: {summary['steps']} steps, final validation loss {summary['final_val_loss']:.4f} nats/token "
        f"on {summary['val_tokens']} held-out tokens, {summary['tokens_per_s']:.0f} tokens/s{balance}"
    )
    print(f"outputs in {run_dir}/: " + ", ".join(summary["outputs"].values()) + ", summary.json, config.yaml")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="moe-train: Mixture-of-Experts training")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="a YAML file, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. moe.num_experts=16")
    train.add_argument(
        "--address", default=None,
        help="an existing Ray cluster: auto (the one this machine belongs to, or RAY_ADDRESS), HOST:PORT or "
        "ray://HOST:PORT; same as launch.address=... (default: a local Ray cluster started for the run)",
    )
    train.set_defaults(run=_train)
    data = sub.add_parser("data", help="data: moe data prepare PATHS... --out DIR | moe data tokenizer train (see --help)")
    data.add_argument("action", choices=["prepare", "tokenizer"])
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(run=_data)
    check = sub.add_parser("check-layouts", help="train under several layouts and compare (see --help)", add_help=False)
    check.add_argument("rest", nargs=argparse.REMAINDER)
    check.set_defaults(run=_check_layouts)
    ckpt = sub.add_parser("ckpt", help="checkpoints: moe ckpt inspect | import | export | upcycle (see --help)", add_help=False)
    ckpt.add_argument("rest", nargs=argparse.REMAINDER)
    ckpt.set_defaults(run=_ckpt)
    bench = sub.add_parser("bench", help="benchmarks: moe bench kernels | layer | layouts | memory (see --help)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    sweep = sub.add_parser("sweep", help="sweeps: moe sweep CONFIG | moe sweep report DIR (see --help)", add_help=False)
    sweep.add_argument("rest", nargs=argparse.REMAINDER)
    sweep.set_defaults(run=_sweep)
    evaluate = sub.add_parser("eval", help="a checkpoint's loss and perplexity (see --help)", add_help=False)
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    evaluate.set_defaults(run=_eval)
    simulate = sub.add_parser("simulate", help="emulate and predict a layout (see --help)", add_help=False)
    simulate.add_argument("rest", nargs=argparse.REMAINDER)
    simulate.set_defaults(run=_simulate)
    return parser


def _data(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        from launch.data.corpus import prepare_main

        return prepare_main(args.rest)
    from launch.data.bpe import main as tokenizer_main

    return tokenizer_main(args.rest)


def _eval(args: argparse.Namespace) -> int:
    from launch.eval.evaluate import main as eval_main

    return eval_main(args.rest)


def _simulate(args: argparse.Namespace) -> int:
    from launch.simulate import main as simulate_main

    return simulate_main(args.rest)


def _ckpt(args: argparse.Namespace) -> int:
    from launch.ckpt.cli import ckpt_main

    return ckpt_main(args.rest)


def _bench(args: argparse.Namespace) -> int:
    from launch.bench import main as bench_main

    return bench_main(args.rest)


def _sweep(args: argparse.Namespace) -> int:
    from launch.sweep import main as sweep_main

    return sweep_main(args.rest)


def _check_layouts(args: argparse.Namespace) -> int:
    from launch.check_layouts import main as check_main

    return check_main(args.rest)


# Subcommands whose arguments all go to their own parser (its --help included).
PASS_THROUGH = ("check-layouts", "bench", "sweep", "simulate", "ckpt", "eval")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in PASS_THROUGH:  # `moe bench --help`: REMAINDER does not take a leading option
        args.rest, extra = [*extra, *args.rest], []
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides after an option (moe train CONFIG --address auto k=v): argparse stops at the option
        args.overrides += extra
    try:
        return args.run(args)
    except (ConfigError, DataError, CheckpointError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console-script entry point: exit with ``main``'s status."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
