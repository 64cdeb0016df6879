"""Peak memory of this process, and of every rank of a run.

On a GPU: the most memory the CUDA caching allocator has handed to tensors on the
device (``torch.cuda.max_memory_allocated``), what the model, activations, gradients and
optimizer state need. On a CPU: the process's peak resident set size (``VmHWM`` in
``/proc/self/status``, ``getrusage``'s ``ru_maxrss`` where there is no /proc), which also
counts the interpreter and the imported libraries (torch, megatron-core: ~0.4-0.7 GB).
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
import torch.distributed as dist

STATUS = Path("/proc/self/status")


def memory_kind(device: torch.device) -> str:
    """What :func:`peak_memory_bytes` measures on ``device``."""
    return "cuda_max_allocated" if device.type == "cuda" else "peak_rss"


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory on ``device`` so far (see the module docstring)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if STATUS.is_file():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def peak_memory_per_rank(device: torch.device, world_size: int) -> list[int]:
    """Every rank's :func:`peak_memory_bytes`, by rank; a collective over the default group
    when ``world_size > 1`` (every rank must call it), this process's alone otherwise."""
    mine = torch.tensor([peak_memory_bytes(device)], dtype=torch.int64)
    if world_size == 1:
        return mine.tolist()
    # gloo gathers CPU tensors, NCCL device tensors
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]
