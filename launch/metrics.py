"""Where training metrics go: a JSONL file (the record), TensorBoard (for looking).

Everything a run writes as JSON is JSON (``to_json``): a non-finite number is written as
null, never as the bare ``NaN``/``Infinity`` Python's json module would write, which other
readers (``jq``, browsers, most JSON libraries) refuse.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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

    def close(self) -> None:
        self.tb.close()


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
