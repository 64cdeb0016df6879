"""All E experts as stacked weights, computed with one grouped GEMM per projection.

Legend: N expert-sorted rows, D model dim, F expert hidden dim, E experts.

Rows arrive contiguous per expert (``tokens_per_expert_E`` long each). ``torch._grouped_mm``
multiplies each segment by its expert's matrix in one call; where the installed torch
cannot do that on the device and dtype, a loop over the segments computes the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.config import Activation
from moe.mlp import activation_fn, input_width
from moe.recompute import activation_without_output


def grouped_mm_supported(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU fp32/bf16/fp16 or Hopper+ bf16, with
    every row stride a multiple of 16 bytes (its kernels load 16-byte vectors)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if any(width * x_ND.element_size() % 16 for width in (x_ND.shape[1], w_EDF.shape[2])):
        return False
    if x_ND.device.type == "cpu":
        return True
    if x_ND.device.type == "cuda":
        return x_ND.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device)[0] >= 9
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The CPU backward of ``torch._grouped_mm`` (torch 2.13) rejects expanded gradients
    (stride 0), e.g. the gradient of ``y.sum()``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_matmul(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` for every expert e.

    Under autocast both operands take the autocast dtype, as ``nn.Linear`` would:
    ``torch._grouped_mm`` has no autocast rule of its own.
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        x_ND = x_ND.to(torch.get_autocast_dtype(device_type))
    w_EDF = w_EDF.to(x_ND.dtype)
    if grouped_mm_supported(x_ND, w_EDF):
        offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF, offs=offsets_E))
    segments = x_ND.split(tokens_per_expert_E.tolist())
    return torch.cat([seg @ w_EDF[e] for e, seg in enumerate(segments)])


class GroupedExperts(nn.Module):
    """E independent MLPs ``y = act(x · W_in[e]) · W_out[e]`` over expert-sorted rows.

    ``recompute_act`` (``moe.recompute.apply_recompute``, selective): the activation's
    output rows are not kept for ``W_out``'s backward but computed again.
    """

    recompute_act: bool = False

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: Activation) -> None:
        super().__init__()
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, dim, input_width(ffn_dim, activation)))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.act = activation_fn(activation)

    @property
    def num_experts(self) -> int:
        return self.w_in_EDF.shape[0]

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        h_NF = grouped_matmul(x_ND, self.w_in_EDF, tokens_per_expert_E)
        if self.recompute_act:
            return activation_without_output(
                self.act, h_NF, lambda a_NF: grouped_matmul(a_NF, self.w_out_EFD, tokens_per_expert_E)
            )
        return grouped_matmul(self.act(h_NF), self.w_out_EFD, tokens_per_expert_E)
