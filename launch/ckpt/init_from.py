"""``train.init_from``: a fresh run starting from a checkpoint's weights, under any layout.

Every rank reads the whole model (``launch.ckpt.full_state``) into the plain model it has
just built, before any parallelism is applied; expert, tensor and pipeline parallelism
then take each rank's shard of those weights by the same rules that shard a random
initialisation (``apply_expert_parallel`` keeps experts ``[ep_rank·E/ep, ...)``,
``apply_tensor_parallel`` its ``1/tp`` slices, ``split_stages`` its blocks), so the saved
layout never matters. Only the weights are taken: the optimizer, step, RNG and load
statistics start afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.ckpt.full_state import read_model_state
from parallel.checkpoint import CheckpointError, resolve_checkpoint


def resolve_init_from(value: str) -> Path:
    """The checkpoint ``train.init_from`` names (checked before any work starts)."""
    path = Path(value)
    if not path.exists():
        raise CheckpointError(
            f"train.init_from={value!r}: no such file or directory; name a checkpoint, a checkpoints/ directory or a "
            "run directory (e.g. moe ckpt import's --out)"
        )
    return resolve_checkpoint(path)


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    diffs = [f"{s}.{k}={saved[s].get(k)!r} there, {v!r} here" for s in ("model", "moe") for k, v in current[s].items()
             if k in saved.get(s, {}) and saved[s][k] != v]
    return "; ".join(diffs) if diffs else "no model/moe key differs"


def load_initial_weights(net: nn.Module, path: Path, current_config: dict[str, Any]) -> None:
    """Copy the checkpoint at ``path`` into ``net`` (the unsharded model); a tensor missing,
    extra or of another shape is one ``CheckpointError`` naming it and the config keys that differ."""
    state, saved_config, found = read_model_state(path)
    own = net.state_dict()
    problems = [f"{name!r} is missing" for name in own if name not in state]
    problems += [f"{name!r} has no place in this model" for name in state if name not in own]
    problems += [f"{name!r} is {list(state[name].shape)} there but {list(t.shape)} here"
                 for name, t in own.items() if name in state and state[name].shape != t.shape]
    if problems:
        raise CheckpointError(
            f"train.init_from: checkpoint {str(found)!r} does not fit model/moe config: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
            f"{_config_differences(saved_config, current_config)}: set those keys to the checkpoint's values"
        )
    with torch.no_grad():
        net.load_state_dict(state)
