"""``moe ckpt export CKPT_OR_RUN_DIR --out HF_DIR [--arch A] [--dtype D]``: our checkpoint
as a directory ``transformers`` loads (``AutoModelForCausalLM.from_pretrained(HF_DIR)``).

Reads the model in one process, one piece (embedding, block, norm, LM head) at a time, from
a checkpoint saved under any layout (``launch.ckpt.full_state``: per-rank files or a
sharded dist checkpoint; no GPU, no process group), checks that the target architecture expresses the config
(``launch.ckpt.hf_config.check_expressible``: gelu experts, capacity factors, hash or
sinkhorn routers, shared experts, Mixtral without renormalised gates or with dense layers
are refused by name; losses, jitter and kernels only shape training and pass), and writes::

    HF_DIR/config.json               # architectures, the conventions mapped back (hf_config.hf_config)
    HF_DIR/generation_config.json    # bos/eos: the end-of-document id the model was trained with
    HF_DIR/model.safetensors         # or model-0000i-of-0000n.safetensors (5 GB each) + model.safetensors.index.json
    HF_DIR/tokenizer.json ...        # the files of the config's data.tokenizer, when it names a tokenizer.json

The model saw documents as ``doc EOD doc EOD ...`` (``launch.data``): EOD is the token it
learned to emit at a document's end and to start the next one after, so ``config.json`` and
``generation_config.json`` name it as both ``eos_token_id`` (``generate`` stops there) and
``bos_token_id``, as GPT-2's configs do with ``<|endoftext|>``. It is the byte tokenizer's
256, or the end-of-text id of the tokenizer (``data.tokenizer``) or dataset (``data.path``)
the config names; when neither can be read any more both are written as null (unknown)
rather than the architecture's defaults (Mixtral's 1 and 2), which would be wrong. A model
imported from published weights (``moe ckpt import`` keeps their generation_config.json
beside the tokenizer) keeps that file, its sampling settings and ids, with EOD added to its
``eos_token_id`` when it is not there.

Tensors are written in transformers' saved layout (``moe.hf_weights.weight_table``), in
``--dtype`` (default: the checkpoint's, fp32 masters for a bf16 run; ``bfloat16`` halves
the files, as published models ship), converted one at a time into 5 GB shards, each
written when full: the process holds one piece and one shard, never the whole model (a
Qwen3-235B is 940 GB in fp32). The directory is built under a temporary name beside
``--out`` and renamed at the end, so a failure leaves nothing at ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.full_state import ModelState, open_model_state, piece_of
from launch.ckpt.hf_config import check_expressible, default_architecture, hf_config
from launch.ckpt.hf_import import prepare_out
from launch.ckpt.safetensors_io import SHARD_BYTES, write_safetensors
from launch.config import build
from launch.data import ByteTokenizer, DataError, load_hf_tokenizer, read_meta
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.hf_weights import HF_NAMES, Entry, weight_table
from parallel.checkpoint import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _configs(saved: dict[str, Any], found: Path) -> tuple[ModelConfig, MoEConfig]:
    try:
        return build(ModelConfig, saved["model"], "model"), build(MoEConfig, saved["moe"], "moe")
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(found)!r} records a config this version cannot read: {err}") from None


def _hf_tensors(state: ModelState, table: list[Entry], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' tensors of ``table`` in order, in ``dtype``, reading one piece of the
    model at a time (the table runs piece by piece: embedding, block 0, 1, ..., norm, head)."""
    held, weights = None, {}
    for entry in table:
        if piece_of(entry.ours) != held:
            held, weights = piece_of(entry.ours), {}  # the previous piece goes before the next comes
            weights = state.read(e.ours for e in table if piece_of(e.ours) == held)
        yield from zip(entry.hf, (t.to(dtype) for t in entry.to_hf(weights[entry.ours])), strict=True)


def _copy_tokenizer(saved: dict[str, Any], tmp: Path) -> list[str]:
    """The tokenizer the checkpoint's config names (``data.tokenizer``: a tokenizer.json or its
    directory), with its sibling files, so the exported directory tokenizes as training did."""
    named = (saved.get("data") or {}).get("tokenizer")
    if not named:
        return []
    path = Path(named)
    directory = path if path.is_dir() else path.parent
    names = [n for n in _TOKENIZER_FILES if (directory / n).is_file()]
    for name in names:
        shutil.copy2(directory / name, tmp / name)
    return names


def _eod(saved: dict[str, Any]) -> int | None:
    """The end-of-document id ``saved``'s model was trained with, None when the tokenizer
    or dataset its config names cannot be read here."""
    data = saved.get("data") or {}
    try:
        if data.get("tokenizer"):
            return load_hf_tokenizer(data["tokenizer"], "data.tokenizer").eod
        if data.get("path"):
            return int(read_meta(Path(data["path"]))["eod"])
    except DataError:
        return None
    return ByteTokenizer.eod


def _generation_config(saved: dict[str, Any], eod: int | None) -> dict[str, Any]:
    """generation_config.json: the published one ``moe ckpt import`` kept beside the
    tokenizer, with ``eod`` among its end ids; else bos = eos = ``eod``."""
    named = (saved.get("data") or {}).get("tokenizer")
    published = None
    if named:
        path = Path(named)
        try:
            published = json.loads(((path if path.is_dir() else path.parent) / "generation_config.json").read_text())
        except (OSError, ValueError):
            published = None
    if not isinstance(published, dict):
        return {"_from_model_config": True, "bos_token_id": eod, "eos_token_id": eod}
    ends = published.get("eos_token_id")
    ends = list(ends) if isinstance(ends, list) else [] if ends is None else [ends]
    if eod is not None and eod not in ends:
        ends.append(eod)
    return {**published, "eos_token_id": ends[0] if len(ends) == 1 else ends or None}


def export_hf(source: Path, out: Path, arch: str | None = None, max_shard_bytes: int = SHARD_BYTES,
              dtype: str | None = None) -> dict[str, Any]:
    """Write ``source``'s latest checkpoint into ``out`` as ``arch`` (default: the one whose
    layers match, ``hf_config.default_architecture``), its tensors in ``dtype`` (a name of
    ``EXPORT_DTYPES``; default: the checkpoint's); a summary of what was written."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype}: not one of {', '.join(EXPORT_DTYPES)}; bfloat16 is what published models ship")
    state = open_model_state(source)
    saved, found = state.config, state.found
    model, moe = _configs(saved, found)
    arch = arch or default_architecture(model)
    check_expressible(model, moe, arch)
    tmp = prepare_out(out)
    dtype = dtype or str(state.dtypes["embed.weight"]).removeprefix("torch.")
    try:
        tmp.mkdir()
        tensors = _hf_tensors(state, weight_table(arch, model, moe), getattr(torch, dtype))
        files = write_safetensors(tmp, tensors, max_shard_bytes)
        eod = _eod(saved)
        generation = _generation_config(saved, eod)
        special = {"bos_token_id": generation.get("bos_token_id"), "eos_token_id": generation["eos_token_id"]}
        (tmp / "config.json").write_text(json.dumps({**hf_config(model, moe, arch, dtype), **special}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer = _copy_tokenizer(saved, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"architecture": arch, "checkpoint": str(found), "files": files, "tokenizer": tokenizer, "dtype": dtype,
            "eod": eod}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moe ckpt export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a checkpoint, a checkpoints/ directory or a run directory (its latest)")
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the Hugging Face model")
    parser.add_argument("--arch", choices=sorted(HF_NAMES), default=None,
                        help="target architecture (default: Qwen3(-MoE) with q/k norms, else Mixtral/Llama)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                        help="the tensors' dtype (default: the checkpoint's; a bf16 run keeps fp32 masters)")
    args = parser.parse_args(argv)
    summary = export_hf(args.source, args.out, args.arch, dtype=args.dtype)
    print(f"exported {summary['checkpoint']} as {summary['architecture']} ({summary['dtype']}) -> {args.out}/: "
          + ", ".join(["config.json", "generation_config.json", *summary["files"], *summary["tokenizer"]]))
    if summary["eod"] is None:
        print("note: the tokenizer or dataset the checkpoint's config names is not readable here, so "
              "bos_token_id and eos_token_id are written as null; set them in config.json and "
              "generation_config.json to the end-of-document id the model was trained with")
    return 0
