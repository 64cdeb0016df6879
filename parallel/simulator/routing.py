"""Routing histograms: per step, per forward, per MoE layer, per rank, tokens per expert.

``RoutingRecorder`` hooks the router of every ``MoELayer`` of a (possibly sharded) model and
keeps what it asked for on this rank: ``counts[l][e]`` assignments of the tokens this rank
routes to global expert ``e`` in MoE layer ``l`` (before capacity). The router's own output
is read, not the layer's statistics, which tensor parallelism sums over the TP group. One record per
forward (a training micro-batch, or a no-gradient routing pre-pass), written as JSON lines
(``routing-rank-K.jsonl``) that ``replay`` turns back into per-rank row counts.

Legend: L MoE layers, E experts, P ranks of an EP group, El = E/P experts per EP rank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe.layer import MoELayer
from moe.recompute import in_backward
from parallel.checkpoint import write_atomic_text


@dataclass(frozen=True)
class ForwardRouting:
    """One forward on one rank: ``counts_LE[l][e]`` assignments, ``tokens`` routed tokens."""

    rank: int
    step: int
    grad: bool
    tokens: int
    counts_LE: list[list[int]]

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "step": self.step, "grad": self.grad, "tokens": self.tokens,
                           "counts": self.counts_LE})

    @classmethod
    def from_json(cls, line: str) -> ForwardRouting:
        raw = json.loads(line)
        return cls(raw["rank"], raw["step"], raw["grad"], raw["tokens"], raw["counts"])


class RoutingRecorder:
    """Forward hooks on every MoE layer; ``step`` is set by the caller before each step.

    ``paused()`` leaves forwards unrecorded (evaluation); ``append_to`` moves the records
    to a file, so a long run (``train.record_routing``) keeps none in memory.
    """

    def __init__(self, model: nn.Module, rank: int) -> None:
        self.rank = rank
        self.step = 0
        self.records: list[ForwardRouting] = []
        self._layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self._pending: list[list[int]] = []
        self._paused = False
        self._handles = [layer.router.register_forward_hook(self._hook) for layer in self._layers]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], routing: Any) -> None:
        if self._paused or in_backward():  # a recomputed block (train.recompute=full) routed already
            return
        self._pending.append(routing.counts_E.long().tolist())
        if len(self._pending) == len(self._layers):
            tokens = routing.experts_TK.shape[0]
            self.records.append(ForwardRouting(self.rank, self.step, torch.is_grad_enabled(), tokens, self._pending))
            self._pending = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def write(self, path: Path) -> None:
        path.write_text("".join(r.to_json() + "\n" for r in self.records))

    def append_to(self, path: Path) -> None:
        with path.open("a") as f:
            f.write("".join(r.to_json() + "\n" for r in self.records))
        self.records = []


def truncate_routing(path: Path, step: int) -> None:
    """Keep the records of steps before ``step`` (a run resumed from its step-``step``
    checkpoint records the later steps again)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and ForwardRouting.from_json(line).step < step]
        write_atomic_text(path, "".join(line + "\n" for line in kept))  # killed: the old file stays whole


def read_routing(paths: list[Path]) -> list[ForwardRouting]:
    return [ForwardRouting.from_json(line) for p in paths for line in p.read_text().splitlines() if line]


def kept_counts(counts_E: list[int], capacity: int | None) -> list[int]:
    """Rows a source rank sends per expert: capacity is applied per source rank and expert
    (``moe.capacity``: an expert keeps its first C assignments), so ``min(count, C)``."""
    return list(counts_E) if capacity is None else [min(c, capacity) for c in counts_E]


def expert_capacity_or_none(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    return None if capacity_factor is None else math.ceil(capacity_factor * tokens * top_k / num_experts)


@dataclass(frozen=True)
class GroupRows:
    """For one EP group, one forward, one layer: rows each member sends off-rank and
    receives from other ranks, and the rows its experts compute (own rows included)."""

    send_off_P: list[int]
    recv_off_P: list[int]
    computed_P: list[int]


def group_rows(kept_PE: list[list[int]]) -> GroupRows:
    """``kept_PE[p][e]``: rows source ``p`` keeps for global expert ``e``; expert ``e``
    lives on member ``e // El``."""
    n = len(kept_PE)
    local = len(kept_PE[0]) // n
    owned = [[sum(kept_PE[src][dst * local:(dst + 1) * local]) for dst in range(n)] for src in range(n)]
    send_off = [sum(owned[src]) - owned[src][src] for src in range(n)]
    recv_off = [sum(owned[src][dst] for src in range(n)) - owned[dst][dst] for dst in range(n)]
    computed = [sum(owned[src][dst] for src in range(n)) for dst in range(n)]
    return GroupRows(send_off, recv_off, computed)


def load_imbalance(shares_E: list[float], ep: int) -> float:
    """Rows on the most loaded of ``ep`` ranks over the mean (1 = balanced), experts in
    contiguous blocks of E/ep per rank, for one layer's expert shares."""
    local = len(shares_E) // ep
    total = sum(shares_E) or 1.0
    per_rank = [sum(shares_E[r * local:(r + 1) * local]) / total for r in range(ep)]
    return max(per_rank) * ep
