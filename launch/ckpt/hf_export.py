"""``moe ckpt export CKPT_OR_RUN_DIR --out HF_DIR [--arch A]``: our checkpoint as a
directory ``transformers`` loads (``AutoModelForCausalLM.from_pretrained(HF_DIR)``).

Reads the whole model in one process from a checkpoint saved under any layout
(``launch.ckpt.full_state``: per-rank files or a sharded dist checkpoint; no GPU, no
process group), checks that the target architecture expresses the config
(``launch.ckpt.hf_config.check_expressible``: gelu experts, capacity factors, hash or
sinkhorn routers, shared experts, Mixtral without renormalised gates or with dense layers
are refused by name; losses, jitter and kernels only shape training and pass), and writes::

    HF_DIR/config.json               # architectures, the conventions mapped back (hf_config.hf_config)
    HF_DIR/generation_config.json
    HF_DIR/model.safetensors         # or model-0000i-of-0000n.safetensors (5 GB each) + model.safetensors.index.json
    HF_DIR/tokenizer.json ...        # the files of the config's data.tokenizer, when it names a tokenizer.json

Tensors are written in transformers' saved layout (``moe.hf_weights.weight_table``),
converted one at a time; the directory is built under a temporary name beside ``--out``
and renamed at the end, so a failure leaves nothing at ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.full_state import read_model_state
from launch.ckpt.hf_config import check_expressible, default_architecture, hf_config
from launch.ckpt.hf_import import prepare_out
from launch.ckpt.safetensors_io import SHARD_BYTES, write_safetensors
from launch.config import build
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.hf_weights import HF_NAMES, Entry, weight_table
from parallel.checkpoint import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _configs(saved: dict[str, Any], found: Path) -> tuple[ModelConfig, MoEConfig]:
    try:
        return build(ModelConfig, saved["model"], "model"), build(MoEConfig, saved["moe"], "moe")
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(found)!r} records a config this version cannot read: {err}") from None


def _hf_tensors(state: dict[str, torch.Tensor], table: list[Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    for entry in table:
        yield from zip(entry.hf, entry.to_hf(state[entry.ours]), strict=True)


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


def export_hf(source: Path, out: Path, arch: str | None = None, max_shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write ``source``'s latest checkpoint into ``out`` as ``arch`` (default: the one whose
    layers match, ``hf_config.default_architecture``); a summary of what was written."""
    state, saved, found = read_model_state(source)
    model, moe = _configs(saved, found)
    arch = arch or default_architecture(model)
    check_expressible(model, moe, arch)
    tmp = prepare_out(out)
    dtype = str(state["embed.weight"].dtype).removeprefix("torch.")
    try:
        tmp.mkdir()
        files = write_safetensors(tmp, _hf_tensors(state, weight_table(arch, model, moe)), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(model, moe, arch, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2) + "\n")
        tokenizer = _copy_tokenizer(saved, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"architecture": arch, "checkpoint": str(found), "files": files, "tokenizer": tokenizer, "dtype": dtype}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moe ckpt export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a checkpoint, a checkpoints/ directory or a run directory (its latest)")
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the Hugging Face model")
    parser.add_argument("--arch", choices=sorted(HF_NAMES), default=None,
                        help="target architecture (default: Qwen3(-MoE) with q/k norms, else Mixtral/Llama)")
    args = parser.parse_args(argv)
    summary = export_hf(args.source, args.out, args.arch)
    print(f"exported {summary['checkpoint']} as {summary['architecture']} ({summary['dtype']}) -> {args.out}/: "
          + ", ".join(["config.json", "generation_config.json", *summary["files"], *summary["tokenizer"]]))
    return 0
