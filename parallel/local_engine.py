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

from parallel.engine import OptimSettings, cast_parameters, check_dtype


class LocalEngine:
    """AdamW with decay on ``ndim >= 2`` parameters, clipping by the global gradient norm.

    ``dtype`` is the parameters' (and so the activations') dtype:

    - ``float32``: the optimizer steps the parameters themselves; gradients in ``.grad``.
    - ``bfloat16``: megatron-core's mixed precision, by hand. The parameters are cast to
      bf16 (forward and backward run in bf16); the engine holds an fp32 *master* copy
      ``m = float(p)`` of each and an fp32 gradient buffer ``p.main_grad``. A
      post-accumulate-grad hook adds each backward's bf16 gradient into ``main_grad`` and
      frees ``p.grad``, so micro-batch accumulation sums in fp32. Clipping and AdamW act on
      the masters, whose gradient is ``main_grad``; after each update ``p = bf16(m)``
      (round to nearest). Adam's moments are fp32, shaped like the masters.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimSettings, dtype: torch.dtype = torch.float32) -> None:
        check_dtype([model], dtype, "LocalEngine")
        cast_parameters([model], dtype)
        self.module = model
        self.optim = optim
        self.dtype = dtype
        named = list(model.named_parameters())
        self._names = [name for name, _ in named]
        self._params = [p for _, p in named]
        if dtype == torch.float32:
            self._main = self._params
        else:
            self._main = [p.detach().float() for p in self._params]
            for param, main in zip(self._params, self._main, strict=True):
                param.main_grad = torch.zeros_like(main)  # type: ignore[attr-defined]
                main.grad = param.main_grad  # type: ignore[attr-defined]
                param.register_post_accumulate_grad_hook(_accumulate_main_grad)
        pairs = list(zip(self._params, self._main, strict=True))
        groups = [
            {"params": [m for p, m in pairs if p.ndim >= 2], "weight_decay": optim.weight_decay},
            {"params": [m for p, m in pairs if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)

    @property
    def mixed(self) -> bool:
        """Whether the parameters are bf16 with fp32 masters and fp32 ``main_grad``."""
        return self.dtype != torch.float32

    def main_params(self) -> dict[str, torch.Tensor]:
        """The tensors AdamW updates, by parameter name: the fp32 masters (the parameters
        themselves in fp32)."""
        return dict(zip(self._names, self._main, strict=True))

    def zero_grad(self) -> None:
        if not self.mixed:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for param in self._params:
            param.grad = None
            param.main_grad.zero_()  # type: ignore[attr-defined]

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to synchronise in one process."""
        yield

    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This process's accumulated gradient of ``param`` (zeros before any backward);
        in bf16 its fp32 ``main_grad``."""
        if self.mixed:
            return param.main_grad  # type: ignore[attr-defined]
        return param.grad if param.grad is not None else torch.zeros_like(param)

    def step(self, lr: float) -> float:
        """Clip by the global norm, update at ``lr``; return the norm before clipping.
        In bf16 the fp32 masters are updated, then copied (rounded) into the parameters."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self._main, self.optim.grad_clip)
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                for param, main in zip(self._params, self._main, strict=True):
                    param.copy_(main)
        return float(grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """``model`` (the parameters, bf16 in mixed precision), ``optimizer`` (AdamW's state
        over the masters) and, in bf16, ``main_params``: the fp32 masters by name."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.mixed:
            state["main_params"] = self.main_params()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixed != ("main_params" in state):
            saved = "bf16 parameters with fp32 master weights" if "main_params" in state else "fp32 parameters"
            raise ValueError(
                f"LocalEngine.load_state_dict: the state holds {saved} but this engine runs {self.dtype}; "
                "load it with the train.dtype that saved it"
            )
        self.module.load_state_dict(state["model"])
        if self.mixed:
            with torch.no_grad():
                for name, main in self.main_params().items():
                    main.copy_(state["main_params"][name])
        self.optimizer.load_state_dict(state["optimizer"])


def _accumulate_main_grad(param: torch.Tensor) -> None:
    """Add this backward's gradient of ``param`` into its fp32 ``main_grad`` and free it."""
    param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
    param.grad = None
