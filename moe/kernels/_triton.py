"""Shared helpers for the Triton kernels: where they can run, and launch-size arithmetic.

Triton runs compiled on CUDA tensors. On a machine without a GPU it can run the same
kernels on CPU tensors through its interpreter, which it enables only when
``TRITON_INTERPRET=1`` is set *before triton is first imported* in the process: the
variable decides, once, whether every ``@triton.jit`` function (Triton's own
``tl.max``/``tl.cumsum`` included) is compiled or interpreted.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl

Impl = Literal["auto", "triton", "torch"]


def interpreter_requested() -> bool:
    """Whether the environment asks for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_loaded() -> bool:
    """Whether Triton's jit functions were built for the interpreter, i.e. whether
    ``TRITON_INTERPRET=1`` was already set when triton was imported."""
    return not isinstance(tl.max, triton.JITFunction)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA, or CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_requested())


def use_triton(device: torch.device, impl: Impl) -> bool:
    """Resolve ``impl`` for tensors on ``device``: True for the Triton path, False for torch.

    ``"auto"`` takes Triton where it can run (see ``triton_runs_on``). Asking for Triton
    where it cannot run, or asking for the interpreter after triton was imported without
    it, raises rather than failing inside Triton with a less helpful message.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    if not triton_runs_on(device):
        if impl == "triton":
            raise RuntimeError(
                f"Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors; got {device}"
            )
        return False
    if device.type == "cpu" and not interpreter_loaded():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
            "import of triton (e.g. in the environment of the process)"
        )
    return True


def num_programs(size: int, block: int) -> int:
    """``ceil(size / block)``, at least 1: a kernel over an empty tensor still runs one
    fully masked program, which writes its (empty) share of the per-program partials."""
    return max(1, triton.cdiv(size, block))


def pow2_at_least(size: int, floor: int = 1) -> int:
    """Smallest power of two ``>= max(size, floor)`` (``tl.arange`` needs powers of two)."""
    return triton.next_power_of_2(max(size, floor))


def clamp_pow2(value: int, low: int, high: int) -> int:
    """``value`` rounded down to a power of two, then clamped to ``[low, high]`` (powers of two)."""
    rounded = 1 << (max(value, 1).bit_length() - 1)
    return min(max(rounded, low), high)
