"""The dense feed-forward block (GeLU or SwiGLU), used by dense layers and shared experts.

Legend: T tokens, D model dim, F hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import Activation
from moe.recompute import activation_without_output


def gelu(h_TF: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GeLU (GPT-2, GLaM)."""
    return F.gelu(h_TF, approximate="tanh")


def swiglu(h_T2F: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused projection whose columns interleave (gate, up) pairs:
    silu(gate) * up (Shazeer 2020).

    Interleaved rather than [gate | up] halves so that any contiguous slice of the
    projection's columns (a tensor- or expert-tensor-parallel shard) holds whole pairs.
    """
    # [..., 2F] -> [..., F, 2] -> gate, up: [..., F]
    gate_TF, up_TF = h_T2F.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate_TF) * up_TF


def activation_fn(name: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"gelu": gelu, "swiglu": swiglu}[name]


def input_width(ffn_dim: int, activation: Activation) -> int:
    """Width of the input projection: SwiGLU projects to gate and up at once."""
    return 2 * ffn_dim if activation == "swiglu" else ffn_dim


class MLP(nn.Module):
    """``y = W_out · act(W_in · x)``; for SwiGLU ``W_in`` holds interleaved gate and up rows.

    ``recompute_act`` (``moe.recompute.apply_recompute``, selective): ``act(W_in · x)`` is not
    kept for ``W_out``'s backward but computed again from ``W_in · x``.
    """

    recompute_act: bool = False

    def __init__(self, dim: int, ffn_dim: int, activation: Activation) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, input_width(ffn_dim, activation), bias=False)
        self.w_out = nn.Linear(ffn_dim, dim, bias=False)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = self.w_in(x_TD)
        if self.recompute_act:
            return activation_without_output(self.act, h_TF, self.w_out)
        return self.w_out(self.act(h_TF))
