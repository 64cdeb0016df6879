"""The single-process engine: torch AdamW on the whole model.

Same interface as ``parallel.engine.MegatronEngine`` (``module``, ``zero_grad``,
``no_sync``, ``local_grad``, ``step``, ``state_dict``, ``load_state_dict``), so the training
loop has one code path for every layout; the parallel engines are tested against this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from parallel.engine import OptimSettings


class LocalEngine:
    """AdamW with decay on ``ndim >= 2`` parameters, clipping by the global gradient norm."""

    def __init__(self, model: torch.nn.Module, optim: OptimSettings) -> None:
        self.module = model
        self.optim = optim
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to synchronise in one process."""
        yield

    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This process's accumulated gradient of ``param`` (zeros before any backward)."""
        return param.grad if param.grad is not None else torch.zeros_like(param)

    def step(self, lr: float) -> float:
        """Clip by the global norm, update at ``lr``; return the norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        return float(grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
