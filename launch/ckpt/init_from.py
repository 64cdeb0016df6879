"""``train.init_from``: a fresh run starting from a checkpoint's weights, under any layout.

Every rank opens the checkpoint (``launch.ckpt.full_state``) and checks its tensors'
shapes, read from its metadata, against the ones its config implies before any work starts
(``read_initial_weights``). As the run builds its pieces of the plain model
(``moe.model.build_streamed``: the embedding, each of its pipeline stages' blocks, the
final norm, the LM head), it reads each piece's whole tensors, loads them, and shards the
piece at once; so a rank holds one whole piece at a time, never the whole model. Expert,
tensor and pipeline parallelism take each rank's shard of those weights by the same rules
that shard a random initialisation (``apply_expert_parallel`` keeps experts
``[ep_rank·E/ep, ...)``, ``apply_tensor_parallel`` its ``1/tp`` slices, the pipeline
stages their blocks), so the saved layout never matters. Only the weights are taken: the
optimizer, step, RNG and load statistics start afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launch.ckpt.full_state import ModelState, open_model_state
from launch.ckpt.hf_import import expected_shapes
from moe.config import ModelConfig, MoEConfig
from parallel.checkpoint import CheckpointError


def _config_differences(saved: dict[str, Any], model: ModelConfig, moe: MoEConfig) -> str:
    current = {"model": vars(model), "moe": vars(moe)}
    diffs = [f"{s}.{k}={saved[s].get(k)!r} there, {v!r} here" for s in ("model", "moe") for k, v in current[s].items()
             if k in saved.get(s, {}) and saved[s][k] != v]
    return "; ".join(diffs) if diffs else "no model/moe key differs"


def read_initial_weights(value: str, model: ModelConfig, moe: MoEConfig) -> ModelState:
    """The model of the checkpoint ``train.init_from`` names, opened (no tensor read yet) and
    checked against the shapes of ``Transformer(model, moe)``: a tensor missing, extra or of
    another shape is one ``CheckpointError`` naming it and the config keys that differ."""
    path = Path(value)
    if not path.exists():
        raise CheckpointError(
            f"train.init_from={value!r}: no such file or directory; name a checkpoint, a checkpoints/ directory or a "
            "run directory (e.g. moe ckpt import's --out)"
        )
    state = open_model_state(path)
    saved, found, there = state.config, state.found, state.shapes
    own = expected_shapes(model, moe)
    problems = [f"{name!r} is {list(there[name])} there but {list(shape)} here"
                for name, shape in own.items() if name in there and there[name] != shape]
    problems += [f"{name!r} is missing" for name in own if name not in there]
    problems += [f"{name!r} has no place in this model" for name in there if name not in own]
    if problems:
        raise CheckpointError(
            f"train.init_from: checkpoint {str(found)!r} does not fit the model/moe config: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
            f"{_config_differences(saved, model, moe)}: set those keys to the checkpoint's values"
        )
    return state
