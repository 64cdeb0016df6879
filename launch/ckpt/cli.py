"""``moe ckpt ACTION ...``: one parser per action.

    moe ckpt inspect DIR [--verify]            a checkpoint's layout, step, tensors and checksums
    moe ckpt import HF_DIR --out CKPT_DIR      a Hugging Face Mixtral/Qwen3-MoE/Llama/Qwen3 model as our checkpoint
    moe ckpt export CKPT_OR_RUN_DIR --out HF_DIR [--arch A] [--dtype D]   our checkpoint (any layout) for transformers
    moe ckpt upcycle DENSE --experts E --top-k K [--granularity G] --out CKPT_DIR   a dense model made MoE
"""

from __future__ import annotations

import argparse
from pathlib import Path

from parallel.checkpoint import CheckpointError


def _inspect(argv: list[str]) -> int:
    from parallel.checkpoint import describe_checkpoint, resolve_checkpoint
    from parallel.dist_checkpoint import describe_dist_checkpoint, is_dist_checkpoint

    parser = argparse.ArgumentParser(prog="moe ckpt inspect", description="a checkpoint's layout, step, tensors and checksums")
    parser.add_argument("path", type=Path, help="a checkpoint, a checkpoints directory or a run directory")
    parser.add_argument("--verify", action="store_true", help="read every rank's file and check its checksums")
    args = parser.parse_args(argv)
    if not args.path.exists():
        raise CheckpointError(
            f"{str(args.path)!r}: no such file or directory; give a checkpoint, a checkpoints/ directory or a run directory"
        )
    describe = describe_dist_checkpoint if is_dist_checkpoint(resolve_checkpoint(args.path)) else describe_checkpoint
    print(describe(args.path, args.verify))
    return 0


def _import(argv: list[str]) -> int:
    from launch.ckpt.hf_import import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from launch.ckpt.hf_export import main

    return main(argv)


def _upcycle(argv: list[str]) -> int:
    from launch.ckpt.upcycle import main

    return main(argv)


ACTIONS = {"inspect": _inspect, "import": _import, "export": _export, "upcycle": _upcycle}


def ckpt_main(argv: list[str]) -> int:
    """Dispatch ``moe ckpt ACTION ARGS...`` to the action's own parser (its ``--help`` included)."""
    parser = argparse.ArgumentParser(prog="moe ckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=sorted(ACTIONS), help="then the action's own arguments (moe ckpt ACTION --help)")
    args = parser.parse_args(argv[:1])
    return ACTIONS[args.action](argv[1:])
