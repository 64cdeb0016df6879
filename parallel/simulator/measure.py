"""What an emulated rank measures about itself: model-state bytes from the engine's own
buffers, and the live tensor bytes of one step: its peak and the activations its backward
starts from.

State bytes are counted from the tensors that hold them (no estimate): megatron's DDP
buffers (``param_data``/``grad_data`` of the dense and the expert buffers) and the
distributed optimizer's AdamW state; for the one-process ``LocalEngine`` the parameters,
their ``.grad`` and torch AdamW's state. With bf16 parameters the fp32 masters count as
optimizer state (megatron's main shards, ``LocalEngine.main_params``) and the fp32
``main_grad`` accumulators as the gradients.

The peak: the profiler's allocator accounting (``profile_memory=True``: every CPU
allocation and free reports the running total) gives the largest increase of live tensor
bytes during the step; the measured peak is that plus the state bytes live at its start.
On a GPU the same figures come from the CUDA caching allocator (``max_memory_allocated``
for the peak, the profiler's CUDA memory events for the activations).

The activations: the live bytes (over the step's start) when a backward pass begins, the
most over the step's backward passes. The forward has then built everything autograd keeps
and the backward has freed nothing yet: what ``train.recompute`` changes, separated from
the step's transients (the loss gradient, AdamW's temporaries), which the peak includes.
"""

from __future__ import annotations

import bisect
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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
        optim += sum(_bytes(m) for shards in engine.main_shards() for m in shards)  # bf16: fp32 masters
        return {
            "params": sum(_bytes(b.param_data) for b in buffers),
            "grads": sum(_bytes(b.grad_data) for b in buffers),
            "optimizer": optim,
        }
    if hasattr(engine, "optimizer") and isinstance(engine.optimizer, torch.optim.Optimizer):  # LocalEngine
        params = list(module.parameters())
        masters = list(engine.main_params().values()) if engine.mixed else []
        return {
            "params": sum(_bytes(p) for p in params),
            "grads": sum(_bytes(getattr(p, "main_grad", p.grad)) for p in params),
            "optimizer": _optimizer_bytes(engine.optimizer) + sum(_bytes(m) for m in masters),
        }
    raise TypeError(f"engine_state_bytes: no state accounting for {type(engine).__name__}")


@dataclass(frozen=True)
class StepMemory:
    """Live tensor bytes during one step, over those live at its start (see module doc)."""

    peak_increase: int
    activations: int


BACKWARD_OP = "autograd::engine::evaluate_function:"  # the profiler's name of each backward node


def measure_step(fn: Callable[[], Any], device: torch.device) -> StepMemory:
    """Run ``fn`` (one training step) under the profiler's memory accounting on ``device``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # CPU totals count only what was allocated while profiling (they start at 0); CUDA's
    # are the caching allocator's, from which the bytes live before the step are taken.
    start = torch.cuda.memory_allocated(device) if cuda else 0
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"] - start) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == (1 if cuda else 0))
    peak = torch.cuda.max_memory_allocated(device) - start if cuda else max([0, *(total for _, total in memory)])
    at_backward = [_live_at(memory, ts) for ts in backward_starts(events)]
    return StepMemory(int(peak), int(max([0, *at_backward])))


def backward_starts(events: list[dict[str, Any]]) -> list[float]:
    """Times at which a backward pass begins: its first backward node with some other
    (forward) op between it and the previous backward node."""
    ops = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") == "cpu_op")
    starts, in_backward_until, forward_since = [], -1.0, False
    for ts, end, name in ops:
        if name.startswith(BACKWARD_OP):
            if ts >= in_backward_until and (forward_since or not starts):
                starts.append(ts)
            forward_since = False
            in_backward_until = max(in_backward_until, end)
        elif ts >= in_backward_until:
            forward_since = True
    return starts


def _live_at(memory: list[tuple[float, int]], ts: float) -> int:
    """The running total of the last memory event before ``ts``."""
    index = bisect.bisect_left(memory, (ts, -math.inf)) - 1
    return memory[index][1] if index >= 0 else 0
