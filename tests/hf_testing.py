"""Helpers shared by the Hugging Face interop tests: our model from a checkpoint, and logits
from either side."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.ckpt.full_state import read_model_state
from launch.config import build
from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer


def our_model(ckpt: Path) -> Transformer:
    """Our model from a checkpoint or run directory, with the config it recorded, in eval mode."""
    state, saved, _ = read_model_state(ckpt)
    net = Transformer(build(ModelConfig, saved["model"], "model"), build(MoEConfig, saved["moe"], "moe")).eval()
    net.load_state_dict(state)
    return net


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` logits of a transformers model or ours, without gradients."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.logits_BSV
