"""The whole (unsharded) model of any checkpoint, in one process: what ``moe ckpt export``
converts, and what ``train.init_from`` reads piece by piece (``open_model_state``: shapes
first, from the metadata; then only the tensors asked for) as each rank builds its share.

Two formats (``docs/checkpoints.md``):

- per-rank files (``parallel/checkpoint.py``: one process, DeepSpeed, ``moe ckpt import``):
  each rank's ``state*.pt`` holds ``engine.model``, the full model's ``state_dict`` except
  the expert tensors (``ShardInfo.expert_paths``), which hold the experts
  ``[ep_rank·E/ep, (ep_rank+1)·E/ep)``; they are concatenated along dim 0, from the first
  rank of each expert-parallel position, in expert-parallel order. fp32 master weights
  (``engine.main_params``, a bf16 run) take the place of the bf16 parameters.
- sharded (``parallel/dist_checkpoint.py``, megatron runs across ranks): a torch DCP
  checkpoint whose keys are the full model's parameter names with their global shapes, so
  one process reads each whole tensor (``torch.distributed.checkpoint`` with
  ``no_dist=True``) whatever tp/pp/ep/etp/vpp wrote it; a tied LM head is saved only as
  ``embed.weight``. The sharded tensors are parameters only: the sigmoid routers' expert
  bias (a persistent buffer, ``blocks.i.ffn.router.expert_bias_E``) is in the extras
  (``common.pt``: ``expert_bias``, ``[L_moe, E]``, row ``l`` the ``l``-th MoE layer, the
  same on every rank), from which it is put back under its name.

Every file is checked against its recorded checksums first. Tensors are keyed like
``Transformer.state_dict()`` (a tied ``lm_head.weight`` present, equal to the embedding).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.hf_import import expected_shapes
from launch.config import build
from moe.config import ModelConfig, MoEConfig
from parallel.checkpoint import CheckpointError, load_checkpoint, read_manifests, resolve_checkpoint, saved_world_size
from parallel.dist_checkpoint import is_dist_checkpoint, read_manifest, verify_files

_MODEL_PREFIX = "engine.model."


@dataclass(frozen=True)
class ModelState:
    """A checkpoint's whole model, opened without reading its tensors: ``shapes`` (keyed like
    ``Transformer.state_dict()``, a tied ``lm_head.weight`` included) comes from the
    checkpoint's metadata, and ``read`` loads only the tensors it names, so a training rank
    holds one piece of the model at a time, never the whole of it (``train.init_from``)."""

    found: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    _read: Callable[[list[str]], dict[str, torch.Tensor]]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each a name of ``shapes``), read now."""
        return self._read(list(names))

    def whole(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model."""
        return self.read(self.shapes)


def piece_of(name: str) -> str:
    """The model piece (``moe.model.model_pieces``) a tensor name belongs to: ``blocks.3``
    for ``blocks.3.attn.qkv.weight``, ``embed`` for ``embed.weight``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def _tied_name(config: dict[str, Any], name: str) -> str:
    """The stored tensor behind ``name``: a tied LM head is stored as the embedding."""
    return "embed.weight" if name == "lm_head.weight" and config["model"]["tie_embeddings"] else name


def _expert_bias(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The sigmoid routers' expert bias of a sharded checkpoint, from its extras (empty when
    the model has no such buffer, or when the checkpoint predates bias balancing: then the
    tensor stays missing and a reader of the whole model names it)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    model = build(ModelConfig, config["model"], "model")
    names = [n for n in expected_shapes(model, build(MoEConfig, config["moe"], "moe")) if n.endswith(".router.expert_bias_E")]
    if not names:
        return {}
    extras = load_common_state_dict(str(path))["extras"]
    if "expert_bias" not in extras:
        return {}
    bias_LE = extras["expert_bias"]
    moe_row = {b: sum(model.is_moe_layer(i) for i in range(b)) for b in range(model.n_layers)}  # Transformer.moe_layer_index
    return {name: bias_LE[moe_row[int(name.split(".")[1])]].clone() for name in names}


def _open_dist(path: Path) -> ModelState:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    manifest = read_manifest(path)
    verify_files(path, manifest)
    config = manifest["config"]
    stored = {key: meta for key, meta in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
              if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}
    bias = _expert_bias(path, config)  # a few floats per layer, from the extras: read now
    shapes = {**{key: tuple(meta.size) for key, meta in stored.items()}, **{n: tuple(b.shape) for n, b in bias.items()}}
    dtypes = {**{key: meta.properties.dtype for key, meta in stored.items()}, **{n: b.dtype for n, b in bias.items()}}
    if config["model"]["tie_embeddings"] and "embed.weight" in shapes:
        shapes["lm_head.weight"], dtypes["lm_head.weight"] = shapes["embed.weight"], dtypes["embed.weight"]

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        wanted = {_tied_name(config, n) for n in names} - set(bias)
        state = {key: torch.empty(tuple(stored[key].size), dtype=stored[key].properties.dtype) for key in wanted}
        if state:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
        return {n: bias[n] if n in bias else state[_tied_name(config, n)] for n in names}

    return ModelState(path, config, shapes, dtypes, read)


def _open_per_rank(path: Path) -> ModelState:
    """Each rank's file memory-mapped (``load_checkpoint``); an expert tensor saved across
    expert-parallel ranks is concatenated only when it is read."""
    manifests = read_manifests(path)
    if not manifests:
        raise CheckpointError(f"checkpoint {str(path)!r} has no manifests (written before checksums were recorded?)")
    world = saved_world_size(path)
    states = {m["rank"]: load_checkpoint(path, m["rank"], world)["engine"] for m in manifests}
    config = manifests[0]["config"]
    tensors = {r: {**s["model"], **s.get("main_params", {})} for r, s in states.items()}
    holder: dict[int, int] = {}  # expert-parallel rank -> the first rank holding its experts
    for m in sorted(manifests, key=lambda m: m["rank"]):
        holder.setdefault(m["shard"]["ep_rank"], m["rank"])
    if sorted(holder) != list(range(manifests[0]["shard"]["ep"])):
        raise CheckpointError(f"checkpoint {str(path)!r}: the manifests hold expert-parallel ranks {sorted(holder)} of "
                              f"ep={manifests[0]['shard']['ep']}; it is incomplete")
    experts = {p.removeprefix(_MODEL_PREFIX) for p in manifests[0]["shard"]["expert_paths"]}
    ep_order = [r for _, r in sorted(holder.items())]
    shapes = {name: tuple(t.shape) for name, t in tensors[0].items()}
    dtypes = {name: t.dtype for name, t in tensors[0].items()}
    for name in experts:
        parts = [tensors[r][name].shape for r in ep_order]
        shapes[name] = (sum(p[0] for p in parts), *parts[0][1:])
    if config["model"]["tie_embeddings"]:
        shapes["lm_head.weight"], dtypes["lm_head.weight"] = shapes["embed.weight"], dtypes["embed.weight"]

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        def one(name: str) -> torch.Tensor:
            stored = _tied_name(config, name)
            if stored in experts:
                return torch.cat([tensors[r][stored] for r in ep_order], dim=0)
            return tensors[0][stored]

        return {n: one(n) for n in names}

    return ModelState(path, config, shapes, dtypes, read)


def open_model_state(path: Path) -> ModelState:
    """The model of the checkpoint at ``path`` (a checkpoint, a checkpoints directory or a
    run directory: its latest one), checked against its checksums, its tensors unread."""
    if not path.exists():
        raise CheckpointError(f"{str(path)!r}: no such file or directory; give a checkpoint, a checkpoints/ directory or a run directory")
    found = resolve_checkpoint(path)
    state = _open_dist(found) if is_dist_checkpoint(found) else _open_per_rank(found)
    if "model" not in state.config or "moe" not in state.config:
        raise CheckpointError(f"checkpoint {str(found)!r} records no model config; it was not written by moe train or moe ckpt import")
    return state


def read_model_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(state_dict, config dict, checkpoint directory)`` of the checkpoint at ``path``, the
    whole model read (``open_model_state``)."""
    state = open_model_state(path)
    return state.whole(), state.config, state.found
