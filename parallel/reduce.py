"""Reductions of training metrics across ranks.

Metrics are reduced over the data-parallel group, which holds every rank that sees
different tokens (expert-parallel ranks are data-parallel ranks for everything but the
experts): losses are averaged, routed-token counts summed. Without a group (a single
process) these return their input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of ``values`` over the ranks of ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def mean_over(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mean of ``values`` over the ranks of ``group`` (equal weights: every data-parallel
    rank holds the same number of tokens)."""
    if group is None:
        return values
    return sum_over(values, group) / dist.get_world_size(group)
