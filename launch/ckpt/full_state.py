"""The whole (unsharded) model of any checkpoint, read in one process: what ``moe ckpt
export`` converts and what ``train.init_from`` loads before the run shards it.

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

Every file is checked against its recorded checksums first. The result is keyed like
``Transformer.state_dict()`` (a tied ``lm_head.weight`` present, equal to the embedding).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.hf_import import expected_shapes
from launch.config import build
from moe.config import ModelConfig, MoEConfig
from parallel.checkpoint import CheckpointError, load_checkpoint, read_manifests, resolve_checkpoint, saved_world_size
from parallel.dist_checkpoint import is_dist_checkpoint, read_manifest, verify_files

_MODEL_PREFIX = "engine.model."


def _tie(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    if config["model"]["tie_embeddings"]:
        state["lm_head.weight"] = state["embed.weight"]
    return state


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


def _read_dist(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    manifest = read_manifest(path)
    verify_files(path, manifest)
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    state.update(_expert_bias(path, manifest["config"]))
    return _tie(state, manifest["config"]), manifest["config"]


def _read_per_rank(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    manifests = read_manifests(path)
    if not manifests:
        raise CheckpointError(f"checkpoint {str(path)!r} has no manifests (written before checksums were recorded?)")
    world = saved_world_size(path)
    states = {m["rank"]: load_checkpoint(path, m["rank"], world)["engine"] for m in manifests}
    config = manifests[0]["config"]
    model = dict(states[0]["model"])
    model.update(states[0].get("main_params", {}))
    holder: dict[int, int] = {}  # expert-parallel rank -> the first rank holding its experts
    for m in sorted(manifests, key=lambda m: m["rank"]):
        holder.setdefault(m["shard"]["ep_rank"], m["rank"])
    if sorted(holder) != list(range(manifests[0]["shard"]["ep"])):
        raise CheckpointError(f"checkpoint {str(path)!r}: the manifests hold expert-parallel ranks {sorted(holder)} of "
                              f"ep={manifests[0]['shard']['ep']}; it is incomplete")
    for path_name in manifests[0]["shard"]["expert_paths"]:
        name = path_name.removeprefix(_MODEL_PREFIX)
        parts = [{**states[r]["model"], **states[r].get("main_params", {})}[name] for _, r in sorted(holder.items())]
        model[name] = torch.cat(parts, dim=0)
    return model, config


def read_model_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(state_dict, config dict, checkpoint directory)`` of the checkpoint at ``path`` (a
    checkpoint, a checkpoints directory or a run directory: its latest one)."""
    if not path.exists():
        raise CheckpointError(f"{str(path)!r}: no such file or directory; give a checkpoint, a checkpoints/ directory or a run directory")
    found = resolve_checkpoint(path)
    state, config = _read_dist(found) if is_dist_checkpoint(found) else _read_per_rank(found)
    if "model" not in config or "moe" not in config:
        raise CheckpointError(f"checkpoint {str(found)!r} records no model config; it was not written by moe train or moe ckpt import")
    return state, config, found
