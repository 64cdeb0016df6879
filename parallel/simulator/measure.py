"""What an emulated rank measures about itself: model-state bytes from the engine's own
buffers, and the peak of live CPU tensor bytes during one step.

State bytes are counted from the tensors that hold them (no estimate): megatron's DDP
buffers (``param_data``/``grad_data`` of the dense and the expert buffers) and the
distributed optimizer's AdamW state; for the one-process ``LocalEngine`` the parameters,
their ``.grad`` and torch AdamW's state.

The peak: the profiler's allocator accounting (``profile_memory=True``: every CPU
allocation and free reports the running total) gives the largest increase of live tensor
bytes during the step; the measured peak is that plus the state bytes live at its start.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def engine_state_bytes(engine: Any) -> dict[str, int]:
    """``params``, ``grads``, ``optimizer`` bytes this rank holds (see module doc)."""
    module = engine.module
    if hasattr(module, "buffers") and hasattr(module, "expert_parallel_buffers"):  # megatron DDP (one per chunk)
        chunks = getattr(engine, "modules", [module])
        buffers = [b for m in chunks for b in (*m.buffers, *m.expert_parallel_buffers)]
        optim = sum(_optimizer_bytes(o.optimizer) for o in engine.optimizer.chained_optimizers)
        return {
            "params": sum(_bytes(b.param_data) for b in buffers),
            "grads": sum(_bytes(b.grad_data) for b in buffers),
            "optimizer": optim,
        }
    if hasattr(engine, "optimizer") and isinstance(engine.optimizer, torch.optim.Optimizer):  # LocalEngine
        params = list(module.parameters())
        return {
            "params": sum(_bytes(p) for p in params),
            "grads": sum(_bytes(p.grad) for p in params),
            "optimizer": _optimizer_bytes(engine.optimizer),
        }
    raise TypeError(f"engine_state_bytes: no state accounting for {type(engine).__name__}")


def peak_increase_bytes(fn: Callable[[], Any]) -> int:
    """Largest rise of live CPU tensor bytes while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *totals])
