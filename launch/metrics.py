"""Where training metrics go: a JSONL file (the record), TensorBoard (for looking).

Everything a run writes as JSON is JSON (``to_json``): a non-finite number is written as
null, never as the bare ``NaN``/``Infinity`` Python's json module would write, which other
readers (``jq``, browsers, most JSON libraries) refuse.

The live collapse alarm (:class:`CollapseAlarm`) watches each log interval's expert
shares while the run goes: per MoE layer it reports the experts whose share of the
interval's routed assignments stayed below ``train.collapse_share`` for
``train.collapse_intervals`` consecutive intervals, with the layer's max/min share and the
coefficient of variation of its shares; the train record carries it as ``collapse``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from parallel.checkpoint import write_atomic_text

METRICS_FILE = "metrics.jsonl"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, however deep in dicts and lists, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (non-finite numbers as null)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


class MetricsLog:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl`` and mirrors the
    scalars to TensorBoard under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(to_json(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
            elif key == "expert_load" and isinstance(value, list):
                # Per layer, the least and most loaded experts' shares: the full vectors
                # are in the JSONL record; TensorBoard gets the two lines that show collapse.
                for layer, shares in enumerate(value):
                    self.tb.add_scalar(f"expert_load/layer{layer}/min_share", min(shares), step)
                    self.tb.add_scalar(f"expert_load/layer{layer}/max_share", max(shares), step)
            elif key == "collapse" and isinstance(value, dict):
                for layer, dead in enumerate(value["dead_experts"]):
                    self.tb.add_scalar(f"collapse/layer{layer}/dead_experts", len(dead), step)
                    for stat in ("max_share", "min_share", "cv"):
                        self.tb.add_scalar(f"collapse/layer{layer}/{stat}", value[stat][layer], step)

    def close(self) -> None:
        self.tb.close()


@dataclass
class CollapseAlarm:
    """Counts, per (MoE layer, expert), the consecutive log intervals in which the expert's
    share of the layer's routed assignments was below ``share``; an expert is dead once
    that streak reaches ``intervals``. ``fired`` keeps, in order, where and at which step
    each expert first became dead (an expert that recovers and collapses again fires again).

    Every rank keeps the same alarm (it takes the reduced shares); its state (streaks and
    firings, :meth:`state_dict`) is saved with the checkpoint's training state, so a resumed
    run continues the streaks it had at the checkpoint. The interval in progress at the
    checkpoint (when ``train.ckpt_every`` is not a multiple of ``train.log_every``) restarts
    at the resume, as the record's other interval metrics do.
    """

    share: float
    intervals: int
    streak_LE: np.ndarray | None = None
    fired: list[dict[str, int]] = field(default_factory=list)

    def update(self, step: int, shares_LE: np.ndarray) -> dict[str, Any]:
        """Take the interval ending at ``step`` (its shares, rows summing to 1 or all zero for
        a layer that routed nothing); return the record's ``collapse`` entry: per layer the
        dead experts, max/min share and the coefficient of variation of the shares
        (population std / mean), plus the experts that became dead at this interval."""
        if self.streak_LE is None:
            self.streak_LE = np.zeros(shares_LE.shape, dtype=np.int64)
        below_LE = shares_LE < self.share
        self.streak_LE = np.where(below_LE, self.streak_LE + 1, 0)
        dead_LE = self.streak_LE >= self.intervals
        new = [{"layer": int(layer), "expert": int(expert), "step": step}
               for layer, expert in zip(*np.nonzero(self.streak_LE == self.intervals))]
        self.fired += new
        means_L = shares_LE.mean(axis=1)
        cv_L = np.divide(shares_LE.std(axis=1), means_L, out=np.zeros_like(means_L), where=means_L > 0)
        return {
            "dead_experts": [np.nonzero(row)[0].tolist() for row in dead_LE],
            "max_share": shares_LE.max(axis=1).round(5).tolist(),
            "min_share": shares_LE.min(axis=1).round(5).tolist(),
            "cv": cv_L.round(5).tolist(),
            "new_dead": new,
        }

    def state_dict(self) -> dict[str, Any]:
        """The streaks (``[L][E]`` ints, None before the first interval) and the firings, as
        plain lists and ints (a ``weights_only`` checkpoint load takes them)."""
        streak = None if self.streak_LE is None else self.streak_LE.tolist()
        return {"streak_LE": streak, "fired": [dict(f) for f in self.fired]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (the thresholds stay this run's: a resume may change them)."""
        streak = state["streak_LE"]
        self.streak_LE = None if streak is None else np.array(streak, dtype=np.int64)
        self.fired = [dict(f) for f in state["fired"]]

    def message(self, entry: dict[str, Any]) -> str | None:
        """The console line for an interval's entry: None unless some expert just became dead."""
        if not entry["new_dead"]:
            return None
        named = ", ".join(f"layer {d['layer']} expert {d['expert']}" for d in entry["new_dead"])
        return (f"step {entry['new_dead'][0]['step']}: collapse alarm: {named} below {self.share:.4g} of the "
                f"layer's assignments for {self.intervals} log intervals in a row")

    def verdict(self) -> dict[str, Any]:
        """For ``summary.json``: the thresholds, every firing, and the experts dead at the end."""
        dead = [] if self.streak_LE is None else [np.nonzero(row >= self.intervals)[0].tolist() for row in self.streak_LE]
        return {"share": self.share, "intervals": self.intervals, "fired": self.fired, "dead_at_end": dead,
                "collapsed": any(dead)}


class NullLog:
    """The log of ranks other than 0: they compute the same reduced metrics and write none."""

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop records past ``step``: a resumed run recomputes them, and keeping both would
    leave two values for one step in the log."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    write_atomic_text(run_dir / METRICS_FILE, "".join(to_json(r) + "\n" for r in kept))
