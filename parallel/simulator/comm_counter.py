"""Count the bytes every collective moves, at the process-group calls, in a rank process.

``CommCounter`` patches the ``torch.distributed`` functions (and the aliases megatron-core
binds at import, ``param_and_grad_buffer.dist_*_func``) for the duration of a ``with``
block and records one ``CommRecord`` per call. The byte convention is the predictor's
(``predict.py``), per calling rank:

- ``all_to_all_single``: bytes this rank sends to *other* ranks (its own split stays local);
- ``reduce_scatter_tensor`` / ``all_gather_into_tensor``: bytes of the full (unsharded)
  buffer; a ring moves ``(n-1)/n`` of it through each rank, the time model applies that;
- ``all_reduce`` / ``broadcast``: bytes of the tensor; ``send``/``recv``: bytes of the tensor.

megatron-core binds some collectives to module globals at import
(``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` in its DDP buffers and
tensor-parallel mappings), where patching ``torch.distributed`` alone would miss them: every
loaded ``megatron.*`` module global that *is* one of the patched functions is patched too.

Groups are named by identity against a mapping the caller gives (``{"dp": group, ...}``);
a group not in it is named by its ranks. Only calls made while the block is active count.
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# (torch.distributed function, index of the tensor whose bytes count, rule)
_PATCHED = {
    "all_to_all_single": "a2a",
    "all_reduce": "arg0",
    "broadcast": "arg0",
    "reduce_scatter_tensor": "arg1",
    "_reduce_scatter_base": "arg1",
    "all_gather_into_tensor": "arg0",
    "_all_gather_base": "arg0",
    "send": "arg0",
    "recv": "arg0",
    "isend": "arg0",
    "irecv": "arg0",
}


@dataclass(frozen=True)
class CommRecord:
    """One collective call on this rank: operation, group name, dtype, bytes (see module doc)."""

    op: str
    group: str
    dtype: str
    bytes: int


def _group_of(args: tuple[Any, ...], kwargs: dict[str, Any], op: str) -> dist.ProcessGroup | None:
    if "group" in kwargs:
        return kwargs["group"]
    position = {"all_to_all_single": 5, "all_reduce": 2, "broadcast": 2, "send": 2, "recv": 2, "isend": 2, "irecv": 2}
    index = position.get(op, 3)
    return args[index] if len(args) > index else None


def _a2a_bytes(args: tuple[Any, ...], kwargs: dict[str, Any], group: dist.ProcessGroup | None) -> int:
    """Bytes sent off-rank: the input minus this rank's own split."""
    inp = args[1] if len(args) > 1 else kwargs["input"]
    in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
    n = dist.get_world_size(group)
    me = dist.get_rank(group)
    rows = inp.shape[0] if inp.dim() else 1
    row_bytes = inp.numel() * inp.element_size() // max(rows, 1)
    own = in_splits[me] if in_splits else rows // n
    return (rows - int(own)) * row_bytes


class CommCounter:
    """Records every patched collective called inside ``with counter.active():``."""

    def __init__(self, groups: dict[str, dist.ProcessGroup | None]) -> None:
        self.groups = groups
        self.records: list[CommRecord] = []
        self._on = False

    def _name(self, group: dist.ProcessGroup | None) -> str:
        for name, candidate in self.groups.items():
            if candidate is not None and candidate is group:
                return name
        if group is None:
            return "world"
        return "ranks" + ",".join(map(str, dist.get_process_group_ranks(group)))

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        rule = _PATCHED[op]

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._on:
                group = _group_of(args, kwargs, op)
                if rule == "a2a":
                    n_bytes = _a2a_bytes(args, kwargs, group)
                    tensor = args[1] if len(args) > 1 else kwargs["input"]
                else:
                    tensor = args[int(rule[-1])] if len(args) > int(rule[-1]) else next(
                        v for v in kwargs.values() if isinstance(v, torch.Tensor)
                    )
                    n_bytes = tensor.numel() * tensor.element_size()
                self.records.append(CommRecord(op, self._name(group), str(tensor.dtype).removeprefix("torch."), n_bytes))
            return fn(*args, **kwargs)

        return counted

    @contextmanager
    def active(self) -> Iterator[CommCounter]:
        """Patch, count, restore (also on error)."""
        saved: list[tuple[Any, str, Any]] = []
        targets: list[tuple[Any, str]] = [(dist, name) for name in _PATCHED]
        originals = {id(getattr(dist, name)): name for name in _PATCHED}
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("megatron.") and module is not None:
                for attr, value in list(vars(module).items()):
                    if callable(value) and id(value) in originals and not attr.startswith("__"):
                        targets.append((module, attr))
        for module, attr in targets:
            original = getattr(module, attr)
            op = attr if module is dist else originals[id(original)]
            saved.append((module, attr, original))
            setattr(module, attr, self._wrap(op, original))
        self._on = True
        try:
            yield self
        finally:
            self._on = False
            for module, attr, original in saved:
                setattr(module, attr, original)

    def totals(self) -> dict[str, int]:
        """Bytes per ``op@group[dtype]`` key, summed over the recorded calls."""
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            out[f"{r.op}@{r.group}[{r.dtype}]"] += r.bytes
        return dict(out)
