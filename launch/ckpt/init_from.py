"""``train.init_from``: a fresh run starting from a checkpoint's weights, under any layout.

Every rank reads the whole model (``launch.ckpt.full_state``) and checks it against the
shapes its config implies before any work starts (``read_initial_weights``); the run then
loads it into the plain model it has just built, before any parallelism is applied.
Expert, tensor and pipeline parallelism then take each rank's shard of those weights by
the same rules that shard a random initialisation (``apply_expert_parallel`` keeps experts
``[ep_rank·E/ep, ...)``, ``apply_tensor_parallel`` its ``1/tp`` slices, ``split_stages``
its blocks), so the saved layout never matters. Only the weights are taken: the
optimizer, step, RNG and load statistics start afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launch.ckpt.full_state import read_model_state
from launch.ckpt.hf_import import expected_shapes
from moe.config import ModelConfig, MoEConfig
from parallel.checkpoint import CheckpointError


def _config_differences(saved: dict[str, Any], model: ModelConfig, moe: MoEConfig) -> str:
    current = {"model": vars(model), "moe": vars(moe)}
    diffs = [f"{s}.{k}={saved[s].get(k)!r} there, {v!r} here" for s in ("model", "moe") for k, v in current[s].items()
             if k in saved.get(s, {}) and saved[s][k] != v]
    return "; ".join(diffs) if diffs else "no model/moe key differs"


def read_initial_weights(value: str, model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    """The whole model of the checkpoint ``train.init_from`` names, checked against the
    shapes of ``Transformer(model, moe)``: a tensor missing, extra or of another shape is
    one ``CheckpointError`` naming it and the config keys that differ."""
    path = Path(value)
    if not path.exists():
        raise CheckpointError(
            f"train.init_from={value!r}: no such file or directory; name a checkpoint, a checkpoints/ directory or a "
            "run directory (e.g. moe ckpt import's --out)"
        )
    state, saved, found = read_model_state(path)
    own = expected_shapes(model, moe)
    problems = [f"{name!r} is {list(state[name].shape)} there but {list(shape)} here"
                for name, shape in own.items() if name in state and tuple(state[name].shape) != shape]
    problems += [f"{name!r} is missing" for name in own if name not in state]
    problems += [f"{name!r} has no place in this model" for name in state if name not in own]
    if problems:
        raise CheckpointError(
            f"train.init_from: checkpoint {str(found)!r} does not fit the model/moe config: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
            f"{_config_differences(saved, model, moe)}: set those keys to the checkpoint's values"
        )
    return state
