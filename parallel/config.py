"""The parallel layout section of the config.

Degrees only; the topology object that checks them against the world size and the model
(experts % ep, heads % tp, ...) and builds megatron-core's process groups is built from
this once, before any group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe.config import require


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run. (Here, not in
    ``parallel.checkpoint``, so the command line catches it without importing torch.)"""


@dataclass(frozen=True)
class ParallelConfig:
    """``world = tp · pp · dp`` for dense parts; experts are split ``ep`` ways (× ``etp``).

    ``first_stage_layers`` / ``last_stage_layers`` (megatron-core's ``num_layers_in_first_
    pipeline_stage`` / ``num_layers_in_last_pipeline_stage``): the layers the first / last
    pipeline rank holds, over all its ``vpp`` chunks; null = an even share. The other
    ranks share the remaining layers evenly (``parallel.pipeline.stage_layers``).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    etp: int = 1
    vpp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    sequence_parallel: bool = False
    engine: Literal["megatron", "deepspeed"] = "megatron"
    zero_stage: int = 1
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "ep", "dp", "etp", "vpp"):
            value = getattr(self, key)
            require(value >= 1, f"parallel.{key}", value, "must be >= 1")
        for key in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"parallel.{key}", value,
                    "must be >= 1 (layers on that pipeline stage), or null for an even share")
        require(0 <= self.zero_stage <= 3, "parallel.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3 (DeepSpeed ZeRO stage)")
        require(
            not self.offload_optimizer or (self.engine == "deepspeed" and self.zero_stage >= 1),
            "parallel.offload_optimizer",
            self.offload_optimizer,
            "CPU optimizer offload needs parallel.engine=deepspeed and parallel.zero_stage >= 1",
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_single_process(self) -> bool:
        return self.world_size == 1 and self.ep == 1 and self.etp == 1 and self.vpp == 1
