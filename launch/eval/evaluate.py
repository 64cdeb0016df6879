"""``moe eval CKPT_OR_RUN_DIR [section.key=value ...] [--data PATH] [--out FILE]``: a
checkpoint's loss (nats per token) and perplexity on the validation split of its run's
dataset, of another prepared dataset, or of a source file (text, JSON lines, Parquet)
tokenized with the checkpoint's tokenizer.

What is evaluated, and how, is the training run's own validation (``launch.train.Run``):
the checkpoint's saved config with the overrides applied, ``train.init_from`` = the
checkpoint (every rank reads the whole model, then takes its shard: any saved layout
loads under any other), and ``Run.evaluate`` over ``Run.make_val_batches``, so under the
run's config it reports the validation loss the run logged at that step.

    loss = Σ_batches Σ_ranks lm_loss·targets / Σ targets,   perplexity = exp(loss)

A file is every one of its complete ``model.seq_len`` windows (each document followed by
EOD, as prepared data is), in batches of the run's validation batch size; a smaller last
batch is dropped, as in training.

The ranks run as ``moe train``'s do, through ``launch.local_launcher.start`` with
:func:`evaluate_rank` as the entry point: a one-rank layout in this process, a multi-rank
one through the launcher the config names (``launch.launcher``, from the checkpoint's
config unless overridden: Ray by default, a local Ray cluster or ``launch.address``'s;
``local`` for processes on this machine), with the same pre-checks (data against the
model, memory), supervision, failure records and logs. Rank 0 shows the progress bar
(stderr) and returns the result.

The launch's run directory (``train.run_dir``: rank logs, a local Ray cluster's files) is a
new temporary directory, removed after a successful evaluation and kept, with a note,
after a failed one; ``train.run_dir=DIR`` names another (on a multi-node cluster: one on
a filesystem the nodes share), kept. It never is the evaluated run's directory: a
directory holding a run is refused (``launch.train.claimed_run_dir``).

The result is printed as JSON and written to ``--out`` (default
``runs/eval/<run>-step<N>-<time>.json``), never over an existing file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from launch.config import Config, apply_overrides, build
from launch.data import DataError, TokenStream, load_hf_tokenizer, read_meta
from launch.data.corpus import _documents, collect_sources
from launch.data.tokenizer import ByteTokenizer, HFTokenizer
from moe.config import ConfigError
from parallel.checkpoint import CheckpointError, read_manifests, resolve_checkpoint
from parallel.dist_checkpoint import is_dist_checkpoint, read_manifest
from parallel.topology import Topology

Tokenizer = ByteTokenizer | HFTokenizer
# What moe eval sets itself: the run starts from the checkpoint, and never resumes one.
FORCED_KEYS = ("train.init_from", "train.resume")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and what its manifest records."""

    path: Path
    config: dict[str, Any]
    step: int

    @property
    def run_name(self) -> str:
        """The run directory's name for ``<run>/checkpoints/step-N``, else the checkpoint's."""
        return self.path.parent.parent.name if self.path.parent.name == "checkpoints" else self.path.name


def find_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint ``path`` names (itself, a checkpoints/ directory or a run directory: its
    latest), with the config and step its manifest records; no tensor is read."""
    if not path.exists():
        raise CheckpointError(
            f"{str(path)!r}: no such file or directory; give a checkpoint, a checkpoints/ directory or a run directory"
        )
    found = resolve_checkpoint(path)
    if is_dist_checkpoint(found):
        manifest = read_manifest(found)
    else:
        manifests = read_manifests(found)
        if not manifests:
            raise CheckpointError(f"checkpoint {str(found)!r} has no manifests; it cannot be evaluated")
        manifest = manifests[0]
    config = manifest.get("config") or {}
    if "model" not in config or "moe" not in config:
        raise CheckpointError(
            f"checkpoint {str(found)!r} records no model config; it was not written by moe train or moe ckpt import"
        )
    return Checkpoint(found, config, int(manifest["step"]))


def model_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer the checkpoint's model reads: ``data.tokenizer``, else the one its
    ``data.path`` dataset was prepared with, else bytes (the embedded corpus)."""
    if cfg.data.tokenizer is not None:
        return load_hf_tokenizer(cfg.data.tokenizer, "data.tokenizer")
    if cfg.data.path is None:
        return ByteTokenizer()
    meta = read_meta(Path(cfg.data.path))
    if meta["tokenizer"] == ByteTokenizer.name:
        return ByteTokenizer()
    record = meta["tokenizer_file"]
    tokenizer = load_hf_tokenizer(record["path"], f"the tokenizer of data.path={cfg.data.path}")
    if tokenizer.sha256 != record["sha256"]:
        raise DataError(
            f"{record['path']} changed since data.path={cfg.data.path} was prepared with it (sha256 "
            f"{record['sha256'][:12]}, now {tokenizer.sha256[:12]}); name the original with data.tokenizer=PATH"
        )
    return tokenizer


def _identity(tokenizer: Tokenizer) -> str:
    return tokenizer.name if isinstance(tokenizer, ByteTokenizer) else f"{tokenizer.path} (sha256 {tokenizer.sha256[:12]})"


def check_dataset_tokenizer(data_dir: Path, tokenizer: Tokenizer) -> None:
    """``--data DIR`` must hold ids of the model's tokenizer: same kind, same file hash."""
    meta = read_meta(data_dir)
    record = meta.get("tokenizer_file") or {}
    same = (
        meta["tokenizer"] == ByteTokenizer.name
        if isinstance(tokenizer, ByteTokenizer)
        else record.get("sha256") == tokenizer.sha256
    )
    if not same:
        found = ByteTokenizer.name if meta["tokenizer"] == ByteTokenizer.name else f"{record.get('path')} (sha256 {str(record.get('sha256'))[:12]})"
        fix = "" if isinstance(tokenizer, ByteTokenizer) else f" --tokenizer {tokenizer.path}"
        raise DataError(
            f"--data {data_dir} was prepared with tokenizer {found}, but the checkpoint's model reads "
            f"{_identity(tokenizer)}; prepare it again with `moe data prepare PATHS{fix} --out DIR`"
        )


def file_tokens(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """A source file (``launch.data.sources``) as one token stream, each document followed by EOD (int64)."""
    sources = collect_sources([path])
    texts = [text for _, text in _documents(sources, [source.name for source in sources])]
    if not texts:
        raise DataError(f"--data {path}: no text to evaluate; give a file with some")
    parts: list[np.ndarray] = []
    for ids in tokenizer.encode_batch(texts):
        parts += [ids.astype(np.int64), np.array([tokenizer.eod], dtype=np.int64)]
    return np.concatenate(parts)


def eval_config(ckpt: Checkpoint, overrides: list[str]) -> Config:
    """The checkpoint's config with ``overrides`` (e.g. a layout), starting from its weights;
    ``train.run_dir`` is the checkpoint's run's until :func:`evaluate` sets the launch's."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in FORCED_KEYS:
            raise ConfigError(f"override {item!r}: moe eval sets {key} itself; leave it out")
    forced = [f"train.init_from={ckpt.path}", "train.resume=false"]
    return build(Config, apply_overrides(copy.deepcopy(ckpt.config), [*overrides, *forced]), "")


def evaluate_rank(cfg: Config, config_name: str, stream: TokenStream | None = None) -> dict[str, Any]:
    """One rank of the evaluation (a ``launch.rank.RankEntry``; ``stream`` bound with
    ``functools.partial``): the run built from the checkpoint, its validation windows (or
    those of a file's ``stream``), evaluated; the loss and token count (the same on every rank)."""
    from tqdm import tqdm

    from launch.train import Run, rank_info

    with rank_info(cfg) as info:
        run = Run(cfg, config_name, info)
        if stream is not None:
            run.val_batches = run.make_val_batches(stream)
        if not run.val_batches:
            raise DataError(
                f"nothing to evaluate: fewer than one validation batch of {cfg.train.batch_size} windows of "
                f"model.seq_len={cfg.model.seq_len} tokens; give more text or a smaller train.batch_size"
            )
        bar = tqdm(total=len(run.val_batches), desc="eval", unit="batch", file=sys.stderr, mininterval=1.0,
                   dynamic_ncols=True, disable=not info.is_main)
        loss = run.evaluate(bar.update)
        bar.close()
        return {"loss": loss, "tokens": run.val_token_count}


def check_windows(cfg: Config, topology: Topology, stream: TokenStream | None) -> None:
    """The text evaluated (a file's ``stream``, else the val split of ``data.path`` as its
    meta.json counts it) must fill at least one validation batch (``Run.make_val_batches``:
    a micro-batch of ``model.seq_len`` windows per data-parallel rank); checked here, before
    any rank starts. The embedded corpus's split, thousands of batches, is not counted."""
    meta = read_meta(Path(cfg.data.path)) if stream is None and cfg.data.path is not None else {}
    if stream is not None:
        tokens, what = len(stream), "--data"
    elif "val" in meta:
        tokens, what = int(meta["val"]["tokens"]), f"the val split of {cfg.data.path}"
    else:
        return
    rows = cfg.train.batch_size // topology.dp // topology.micro_batches * topology.dp
    windows = max(tokens - 1, 0) // cfg.model.seq_len
    if windows < rows:
        raise DataError(
            f"nothing to evaluate in {what}: {windows} window(s) of model.seq_len={cfg.model.seq_len} tokens, fewer "
            f"than one validation batch of {rows} under this layout; give more text or a smaller train.batch_size"
        )


def _work_dir(cfg: Config, overrides: list[str]) -> tuple[Path, bool]:
    """The launch's run directory: ``train.run_dir`` when an override names it, else a new
    temporary one; and whether it is temporary (removed after success)."""
    if any(item.split("=", 1)[0].strip() == "train.run_dir" for item in overrides):
        return Path(str(cfg.train.run_dir)), False
    return Path(tempfile.mkdtemp(prefix="moe-eval-")), True


def _out_path(arg: str | None, ckpt: Checkpoint) -> Path:
    """``--out``, refused now if it exists or cannot be written; else a new name under runs/eval/."""
    if arg is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / "eval" / f"{ckpt.run_name}-step{ckpt.step}-{stamp}.json"
    path = Path(arg)
    if path.exists() or path.is_symlink():
        raise ConfigError(f"--out {arg}: exists; choose another path (moe eval never overwrites a file)")
    existing = Path(os.path.abspath(path)).parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {arg}: {existing} is not a writable directory; give a path in one")
    return path


def write_new(path: Path, text: str, numbered: bool) -> Path:
    """Write ``text`` to ``path`` atomically (temp file, then a hard link, which never replaces
    a file); ``numbered``: take ``name-2.json``, ``-3``... when ``path`` exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    temp.write_text(text)
    try:
        for n in range(1, 1000):
            candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                os.link(temp, candidate)
                return candidate
            except FileExistsError:
                if not numbered:
                    raise ConfigError(f"--out {path}: appeared meanwhile; choose another path") from None
        raise ConfigError(f"{path}: 999 results of that name already; give --out")
    finally:
        temp.unlink()


def _data_choice(data: str | None, tokenizer: Tokenizer) -> tuple[list[str], TokenStream | None]:
    """What ``--data`` changes: a prepared dataset is ``data.path`` (checked to hold the model's
    tokens); a file becomes a token stream, all of it evaluated (``data.val_tokens``)."""
    if data is None:
        return [], None
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: not found; give a prepared dataset directory or a text, .jsonl(.gz/.zst) or .parquet file")
    if path.is_dir():
        check_dataset_tokenizer(path, tokenizer)
        return [f"data.path={path.resolve()}"], None
    tokens = file_tokens(path, tokenizer)
    return [f"data.val_tokens={tokens.size}"], TokenStream(tokens, tokenizer.vocab_size, tokenizer.eod)


def evaluate(ckpt_arg: Path, overrides: list[str], data: str | None, out: str | None) -> tuple[dict[str, Any], Path]:
    """Evaluate the checkpoint ``ckpt_arg`` names; (the result, the file it was written to)."""
    from launch.local_launcher import start
    from launch.train import check_layout

    ckpt = find_checkpoint(ckpt_arg)
    out_path = _out_path(out, ckpt)
    tokenizer = model_tokenizer(eval_config(ckpt, []))
    data_overrides, stream = _data_choice(data, tokenizer)
    cfg = eval_config(ckpt, [*overrides, *data_overrides])
    topology = check_layout(cfg)
    check_windows(cfg, topology, stream)
    work_dir, temporary = _work_dir(cfg, overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(work_dir)))
    try:
        began = time.perf_counter()
        result = start(cfg, "eval", functools.partial(evaluate_rank, stream=stream))
        seconds = time.perf_counter() - began
    except BaseException:
        if temporary and (work_dir / "logs").is_dir():  # ranks ran: their logs say why (the error names the first)
            print(f"(moe eval's rank logs are kept in {work_dir / 'logs'})", file=sys.stderr)
        elif temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    if temporary:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "data": {"kind": "file", "path": str(data)} if stream is not None
        else {"kind": "dataset", "path": str(cfg.data.path or "embedded corpus"), "split": "val"},
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
        "layout": {key: getattr(topology, key) for key in ("world_size", "dp", "ep", "tp", "pp", "etp", "vpp", "micro_batches")},
        "tokens": result["tokens"],
        "loss": result["loss"],
        "perplexity": math.exp(result["loss"]),
        "seconds": round(seconds, 3),
    }
    text = json.dumps(record, indent=2) + "\n"
    return record, write_new(out_path, text, numbered=out is None)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe eval",
        description="Loss (nats/token) and perplexity of a checkpoint on held-out text, as JSON. Overrides "
        "(section.key=value) change the checkpoint's config, e.g. the layout: parallel.ep=2.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CKPT_OR_RUN_DIR",
                        help="a checkpoint, a checkpoints/ directory or a run directory (its latest checkpoint)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.dp=2 parallel.ep=2")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="a prepared dataset (its val split) or a text, .jsonl(.gz/.zst) or .parquet file (all of it); "
                        "default: the run's dataset, val split")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the JSON result (never overwritten; default runs/eval/<run>-step<N>-<time>.json)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    """`moe eval`; errors propagate to the ``moe`` command line, which prints them as one line."""
    try:
        args = _parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    record, path = evaluate(args.checkpoint, args.overrides, args.data, args.out)
    print(json.dumps(record, indent=2))
    print(f"loss {record['loss']:.6f} nats/token, perplexity {record['perplexity']:.4f} on {record['tokens']} tokens; "
          f"written to {path}", file=sys.stderr)
    return 0
