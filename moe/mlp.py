"""The dense feed-forward block (GeLU or SwiGLU), used by dense layers and shared experts.

Legend: T tokens, D model dim, F hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import Activation


def gelu(h_TF: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GeLU (GPT-2, GLaM)."""
    return F.gelu(h_TF, approximate="tanh")


def swiglu(h_T2F: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection: silu(gate) * up (Shazeer 2020)."""
    gate_TF, up_TF = h_T2F.chunk(2, dim=-1)
    return F.silu(gate_TF) * up_TF


def activation_fn(name: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"gelu": gelu, "swiglu": swiglu}[name]


def input_width(ffn_dim: int, activation: Activation) -> int:
    """Width of the input projection: SwiGLU projects to gate and up at once."""
    return 2 * ffn_dim if activation == "swiglu" else ffn_dim


class MLP(nn.Module):
    """``y = W_out · act(W_in · x)``; for SwiGLU ``W_in`` holds the gate and up halves."""

    def __init__(self, dim: int, ffn_dim: int, activation: Activation) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, input_width(ffn_dim, activation), bias=False)
        self.w_out = nn.Linear(ffn_dim, dim, bias=False)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x_TD)))
