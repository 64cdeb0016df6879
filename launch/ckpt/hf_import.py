"""``moe ckpt import HF_DIR --out CKPT_DIR``: a Hugging Face model directory as our checkpoint.

Reads ``config.json`` and the safetensors weights (``model.safetensors`` or the shards of
``model.safetensors.index.json``) of a ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``,
``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` and writes::

    CKPT_DIR/config.yaml                              # our config, every key commented (launch.ckpt.hf_config)
    CKPT_DIR/checkpoints/step-00000000/state.pt ...   # a one-process checkpoint (parallel/checkpoint.py)
    CKPT_DIR/tokenizer/tokenizer.json ...             # HF_DIR's tokenizer files, when it has them
    CKPT_DIR/hf_config.json                           # HF_DIR's config.json, as read

``CKPT_DIR`` reads as a run directory: ``moe ckpt inspect``, ``moe ckpt export`` and
``train.init_from`` (which reshards it under any layout) all take it. Everything is
checked before a tensor is converted (the architecture, the config, every tensor's name
and shape against what the config implies, every shard present and whole); the weights
are then read one tensor at a time (``SafetensorsReader``) and converted by
``moe.hf_weights.weight_table``, exactly (reshapes and transposes: an export gives the
same bits back).

Streaming (``save_streamed``): the checkpoint file is the one ``parallel/checkpoint.py``
writes (``torch.save`` of ``{step, engine: {model}, config, source}``, a manifest of
CRC-32s), but laid out first with no tensor data (``torch.serialization.skip_data``, the
tensors allocated and never touched, so they cost address space, not memory), then
filled one table entry at a time through a shared memory map of the file, unmapped after
each entry (``moe ckpt upcycle`` writes the same way, a piece at a time). The importer holds one entry's source and converted tensors at a time (at
most one layer's experts), whatever the model's size. The directory is built beside ``--out`` under a temporary name and
renamed at the end: a failure leaves nothing at ``--out``.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.config_yaml import config_yaml
from launch.ckpt.hf_config import config_from_hf, read_hf_config
from launch.ckpt.safetensors_io import SafetensorsReader
from launch.config import Config, to_dict
from launch.data.config import DataConfig
from moe.config import ModelConfig, MoEConfig
from moe.hf_weights import Entry, weight_table
from moe.model import Transformer
from parallel.checkpoint import (
    CheckpointError,
    ShardInfo,
    manifest_file,
    state_file,
    tensor_checksums,
    write_atomically,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Tensors a transformers checkpoint may carry that our model recomputes (RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Our ``Transformer``'s tensor shapes for a config, without allocating it."""
    with torch.device("meta"):
        net = Transformer(model, moe)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def check_tensors(reader: SafetensorsReader, table: list[Entry], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every tensor the table needs is present with the shape the config implies, and no
    other tensor is there (a bias, a shared expert: a feature we would silently drop)."""
    wanted: set[str] = set()
    for entry in table:
        hf_shapes = [tuple(t.shape) for t in entry.to_hf(torch.empty(shapes[entry.ours], device="meta"))]
        for name, shape in zip(entry.hf, hf_shapes, strict=True):
            wanted.add(name)
            if name not in reader:
                raise CheckpointError(f"{source}: tensor {name!r}, which config.json implies, is not in the weights")
            if reader.shape(name) != shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} in {reader.file(name)} is {list(reader.shape(name))} but config.json "
                    f"implies {list(shape)}; the weights and config.json disagree"
                )
    extra = [k for k in reader.keys() if k not in wanted and not k.endswith(_IGNORED_SUFFIXES) and k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{source}: tensor {extra[0]!r} ({len(extra)} such) has no place in our model (a bias, a shared expert or "
            "another feature config.json does not describe); nothing was imported"
        )


Layout = dict[str, tuple[torch.Size, torch.dtype]]  # tensor name -> (shape, dtype)


def table_layout(reader: SafetensorsReader, table: list[Entry]) -> Layout:
    """Our tensors' shapes and dtypes as ``table`` converts ``reader``'s, from its metadata."""
    metas = {e.ours: e.to_ours([torch.empty(reader.shape(n), dtype=reader.dtype(n), device="meta") for n in e.hf])
             for e in table}
    return {name: (meta.shape, meta.dtype) for name, meta in metas.items()}


def table_tensors(reader: SafetensorsReader, table: list[Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors, converting one table entry (its few HF tensors) at a time."""
    for entry in table:
        yield entry.ours, entry.to_ours([reader.get(name) for name in entry.hf])


def _skeleton(layout: Layout, tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict's tensors, allocated but never written (their pages are never
    touched, so never resident)."""
    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _fill(file: Path, name: str, tensor: torch.Tensor) -> None:
    """Write ``tensor`` into the space ``file`` reserves for ``engine.model.<name>``: the
    file mapped shared (writes reach the file), the map released on return."""
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(file, mmap=True, weights_only=True)
    mapped["engine"]["model"][name].copy_(tensor)


def save_streamed(ckpt_dir: Path, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]], tied: bool,
                  extra: dict[str, Any]) -> None:
    """The one-process checkpoint of step 0 that ``save_checkpoint`` would write for
    ``{"step": 0, "engine": {"model": state}, **extra}``, where ``layout`` gives every tensor's
    shape and dtype (a tied LM head left out: it is the embedding) and ``tensors`` yields
    each of them once, written as it comes (the module docstring); published atomically."""

    def write(tmp: Path) -> None:
        file = tmp / state_file(0)
        with torch.serialization.skip_data():
            torch.save({"step": 0, "engine": {"model": _skeleton(layout, tied)}, **extra}, file)
        checksums: dict[str, dict[str, Any]] = {}
        for name, tensor in tensors:
            _fill(file, name, tensor)
            checksums |= tensor_checksums(tensor, f"engine.model.{name}")
        unwritten = sorted(set(layout) - {key.removeprefix("engine.model.") for key in checksums})
        if unwritten:  # their bytes would be whatever the disk held
            raise RuntimeError(f"save_streamed: {unwritten[0]!r} ({len(unwritten)} such) was never written")
        if tied:
            checksums["engine.model.lm_head.weight"] = checksums["engine.model.embed.weight"]
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {"step": 0, "rank": 0, "world_size": 1, "shard": asdict(ShardInfo()), "tensors": checksums,
                    "config": extra["config"]}
        (tmp / manifest_file(0)).write_text(json.dumps(manifest))

    write_atomically(ckpt_dir, 0, 1, 0, lambda: None, write, "1")


def data_config(tokenizer: Path | None) -> DataConfig:
    """The data section: the copied tokenizer in ``data.tokenizer`` (null: bytes), so training
    and evaluation tokenize as the model was trained."""
    return DataConfig(tokenizer=None if tokenizer is None else str(tokenizer))


def copy_tokenizer(hf_dir: Path, out: Path) -> list[str]:
    """Copy HF_DIR's tokenizer files into ``out/tokenizer/``; the names copied."""
    names = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if names:
        (out / "tokenizer").mkdir()
        for name in names:
            shutil.copy2(hf_dir / name, out / "tokenizer" / name)
    return names


def write_config(tmp: Path, final: Path, cfg: Config, source: str, notes: dict[str, str],
                 extra_yaml_header: str = "") -> None:
    """The YAML config of a converted checkpoint into ``tmp`` (to become ``final``)."""
    header = (f"{final.name}: {source}, converted by moe ckpt.\n"
              f"train.init_from starts a fresh run from these weights under any layout.{extra_yaml_header}")
    (tmp / "config.yaml").write_text(config_yaml(cfg, header, notes))


def prepare_out(out: Path) -> Path:
    """Refuse an existing ``--out``; the temporary directory beside it to build into."""
    if out.exists():
        raise CheckpointError(f"--out {str(out)!r} already exists; give a new directory (nothing is overwritten)")
    if not out.parent.is_dir():
        raise CheckpointError(f"--out {str(out)!r}: {str(out.parent)!r} is not a directory; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {str(out)!r}: {str(out.parent)!r} is not writable; give a path in a writable directory")
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def import_hf(hf_dir: Path, out: Path) -> dict[str, Any]:
    """Convert ``hf_dir`` into ``out``; a summary of what was written."""
    hf, arch = read_hf_config(hf_dir)
    model, moe, notes = config_from_hf(hf, arch)
    tmp = prepare_out(out)
    reader = SafetensorsReader(hf_dir)
    table = weight_table(arch, model, moe)
    check_tensors(reader, table, expected_shapes(model, moe), f"{hf_dir} ({arch})")
    try:
        tmp.mkdir()
        tokenizer = copy_tokenizer(hf_dir, tmp)
        final_tokenizer = (out / "tokenizer" / "tokenizer.json").resolve() if "tokenizer.json" in tokenizer else None
        cfg = replace(Config(model=model, moe=moe, data=data_config(final_tokenizer)),
                      train=replace(Config().train, init_from=str(out.resolve())))
        notes = notes | {"train.init_from": "these weights (a fresh run: step 0, new optimizer)"}
        if final_tokenizer is not None:
            notes["data.tokenizer"] = f"copied from {hf_dir}"
        source = f"imported from {hf_dir.resolve()} ({arch})"
        save_streamed(tmp / "checkpoints", table_layout(reader, table), table_tensors(reader, table), model.tie_embeddings,
                      {"config": to_dict(cfg), "source": source})
        write_config(tmp, out, cfg, source, notes)
        shutil.copy2(hf_dir / "config.json", tmp / "hf_config.json")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shapes = expected_shapes(model, moe)
    return {"architecture": arch, "tensors": len(table), "tokenizer": tokenizer,
            "parameters": sum(torch.Size(shapes[e.ours]).numel() for e in table)}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moe ckpt import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="a Hugging Face model directory (config.json + *.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="a new directory for our checkpoint and config")
    args = parser.parse_args(argv)
    summary = import_hf(args.hf_dir, args.out)
    print(f"imported {summary['architecture']}: {summary['parameters']:,} parameters in {summary['tensors']} tensors"
          f"{'; copied ' + ', '.join(summary['tokenizer']) if summary['tokenizer'] else ''} -> {args.out}/ "
          f"(config.yaml; train with train.init_from={json.dumps(str(args.out))})")
    return 0
