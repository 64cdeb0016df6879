"""DeepSpeed's ZeRO (stage 1 or 2, optionally with the optimizer on the CPU) around our plain model.

One :class:`DeepSpeedEngine` per rank, used exactly like ``parallel.engine.MegatronEngine``::

    engine = DeepSpeedEngine(model, groups, optim, zero_stage=2, offload_optimizer=False,
                             watch_grads=routers)
    engine.zero_grad()
    for i, (x, y) in enumerate(micro_batches):          # this rank's share of the batch
        with engine.no_sync() if i < n - 1 else nullcontext():
            (engine.module(x, y).loss / n).backward()    # torch's backward, not DeepSpeed's
    grad_norm = engine.step(lr)

What holds (each checked by ``tests/test_deepspeed_engine.py`` against ``LocalEngine`` on
the whole global batch and against ``MegatronEngine`` on the same layout):

- **Dense gradients** (parameters without ``allreduce = False``) are averaged over the
  data-parallel group ``groups.dp`` (the whole world in an ep x dp layout): DeepSpeed
  divides the flat gradient by ``dp``, sums it over the group and each rank keeps its
  ``1/dp`` partition (ZeRO-1 in :meth:`step`, ZeRO-2 as the gradients appear in backward).
- **Expert gradients** (``param.allreduce = False``, set by ``apply_expert_parallel``) sit
  in DeepSpeed's MoE parameter groups, partitioned over the expert-data-parallel group
  ``groups.edp`` and summed over it only, also divided by ``dp`` (not ``edp``): the
  all-to-all's backward has already summed over the ``ep`` ranks the tokens came from, so
  ``sum over edp / dp`` is the gradient of the global-batch mean loss, as in megatron
  (and, as there, a parameter marked ``allreduce = False`` but replicated over ``ep``
  would get ``edp/dp`` of its gradient).
  DeepSpeed finds an expert's group through ``param.group_name`` in its registry
  ``deepspeed.utils.groups``; this engine registers megatron's own ``groups.ep`` and
  ``groups.edp`` there (the same process groups, no new communicators) after checking
  that they hold the rank sets DeepSpeed's MoE code assumes (consecutive EP blocks,
  strided EDP), and fails naming both if not.
- **AdamW** with weight decay on ``ndim >= 2`` parameters only (``make_optimizer``'s rule):
  torch's ``AdamW`` as DeepSpeed's client optimizer (``zero_allow_untested_optimizer``),
  or ``DeepSpeedCPUAdam`` (AdamW mode) when the optimizer is offloaded to the CPU. Each
  rank steps only its partition (``1/dp`` of the dense and ``1/edp`` of its experts'
  fp32 weights and Adam state), then the partitions are all-gathered.
- **Precision** (``dtype``): fp32, or DeepSpeed's bf16 mode (``bf16.enabled``): DeepSpeed
  casts the parameters to bf16 (buffers stay fp32: the RoPE tables), keeps each rank's
  partition of fp32 master weights with its fp32 Adam state, accumulates gradients in fp32
  (``data_types.grad_accum_dtype: fp32``) and reduces them in fp32
  (``communication_data_type: fp32``), then rounds the updated masters into the bf16
  parameters it all-gathers. Under ZeRO-2 this is its ZeRO optimizer with fp32 gradient
  partitions; under ZeRO-1 DeepSpeed 0.19.8 hands bf16 with fp32 accumulation to its
  ``BF16_Optimizer`` (fp32 accumulation buffers, the same partitioned masters and Adam
  state). Both run on the CPU.
- **Clipping** by the global gradient norm (DeepSpeed's ``gradient_clipping``: the norm
  over every rank's partition, dense and expert); :meth:`step` returns it before clipping.
- **Gradient accumulation**: DeepSpeed runs with ``managed_gradient_accumulation: false``
  and ``gradient_accumulation_steps: 1``: it scales no loss or gradient (the loop divides
  each micro-batch loss by their count itself), every torch backward accumulates, and
  :meth:`step` is the accumulation boundary. ZeRO-1 keeps each rank's local gradients
  until :meth:`step` and reduces them there; ZeRO-2 reduces each backward's gradients as
  they are produced and adds them into the rank's partition, which is the same sum.
  :meth:`no_sync` therefore changes nothing (DeepSpeed's own ``no_sync`` refuses ZeRO-2
  for that reason). DeepSpeed's default (managed accumulation) would make every backward
  a boundary: two micro-batches then gave a grad norm 31% off, silently.
- **Local gradients** (:meth:`local_grad`, the loop's router-gradient norm): ZeRO-2 frees
  each local gradient as soon as it is reduced, so the engine keeps its own copy of the
  local (this rank's, not yet reduced) gradient, summed over the step's backwards, for the
  parameters named in ``watch_grads`` only (a tensor hook adds each backward's gradient
  before DeepSpeed sees it). It does the same under ZeRO-1, so both stages report the
  same quantity.

Not supported, refused by :func:`check_zero_stage` with a message: ZeRO stage 0 (DeepSpeed
runs it only through ``engine.backward(loss)``; the loop calls torch's backward) and stage 3
(DeepSpeed 0.19.8 accepts MoE under ZeRO-3 only for its own AutoEP layers, and ZeRO-3 frees
every parameter outside forward, while the loop and the checkpoints read full parameters).
Re-checked on deepspeed 0.19.8 (2026-11-22): with experts sharded (ep > 1)
``runtime/engine.py:2218`` (``_validate_zero3_moe_compatibility``) raises "MoE not supported
with Stage 3". With ep = 1, ZeRO-3 after torch's backward fails in the step
(``runtime/zero/stage3.py:2579``, ``KeyError: 0``: no gradient was reduced into the
partitions); the router returns a ``Routing`` dataclass, whose tensors ZeRO-3's module hooks
do not see, so the router weight is not re-gathered for backward ("size of tensor a (0) must
match ... (32)" in its AccumulateGrad) unless registered with
``deepspeed.zero.register_external_parameter``; and with both worked around
(``engine.backward`` and the registration), losses and grad norms drifted 1e-4 from the
one-process run within 3 steps (ZeRO-1/2: 1e-7). ZeRO-0 through ``engine.backward`` trains
but reports no global gradient norm (``get_global_grad_norm()`` is None), which the loop logs.

DeepSpeed's communication layer wraps the torch.distributed process group the launcher
created; its CPU shared-memory all-reduce op (inference only, a ~25 s JIT build) is skipped.
DeepSpeed requires ``LOCAL_RANK`` in the environment (both launchers export it). Call
:meth:`zero_grad` before each step's first backward.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.checkpoint import constants as ds_ckpt
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine as _DeepSpeedRuntime
from deepspeed.utils import groups as ds_groups
from torch import nn

from moe.config import ConfigError
from parallel.engine import OptimSettings, check_dtype
from parallel.groups import ParallelGroups

SUPPORTED_ZERO_STAGES = (1, 2)

# What DeepSpeed's ZeRO-1/2 ``state_dict`` holds besides tensors and plain values: its loss
# scaler object (fp32 runs no loss scaling; loading keeps the engine's own), the ZeRO stage
# as an enum and the universal-checkpoint fragment map. Checkpoints are loaded with
# ``torch.load(weights_only=True)``, which refuses such objects; the loader needs none of them.
_NOT_PLAIN_STATE_KEYS = (ds_ckpt.LOSS_SCALER, ds_ckpt.ZERO_STAGE, ds_ckpt.PARAM_SLICE_MAPPINGS)


def check_zero_stage(zero_stage: int) -> None:
    """Raise ``ConfigError`` unless this engine can run ``zero_stage`` (1 or 2)."""
    if zero_stage == 0:
        raise ConfigError(
            "parallel.zero_stage=0 with parallel.engine=deepspeed: DeepSpeed runs ZeRO stage 0 only through "
            "engine.backward(loss) ('Direct calls to tensor.backward() are not supported'), and the training loop "
            "calls torch's backward itself; use parallel.zero_stage=1 or 2, or parallel.engine=megatron"
        )
    if zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage=3 with parallel.engine=deepspeed: DeepSpeed 0.19.8 takes MoE under ZeRO-3 only for "
            "its own AutoEP layers ('MoE not supported with Stage 3' for our expert parameters), without experts "
            "its ZeRO-3 step fails after torch's backward, and ZeRO-3 frees every parameter outside forward while "
            "the loop and checkpoints read full parameters; use parallel.zero_stage=1 or 2"
        )
    if zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"parallel.zero_stage={zero_stage}: DeepSpeed ZeRO stages are 0-3; this engine runs 1 or 2")


class DeepSpeedEngine:
    """A model under DeepSpeed ZeRO-1/2 with expert parameters in DeepSpeed's MoE groups.

    ``engine.module`` is called like the model and returns its output; the original model
    is ``engine.module.module``. Parameters become views into DeepSpeed's flat buffers.
    ``watch_grads``: the parameters whose local gradient :meth:`local_grad` must return.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: ParallelGroups,
        optim: OptimSettings,
        zero_stage: int,
        offload_optimizer: bool,
        watch_grads: Sequence[nn.Parameter] = (),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_zero_stage(zero_stage)
        check_dtype([model], dtype, "DeepSpeedEngine")  # DeepSpeed casts the parameters itself (bf16 mode)
        self.groups = groups
        self.optim = optim
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        use_torch_distributed()
        group_name = register_expert_groups(groups)
        for param in model.parameters():
            if is_moe_param(param):
                param.group_name = group_name  # type: ignore[attr-defined]
        self._local_grads = _watch(watch_grads)
        config = _config(optim, zero_stage, offload_optimizer, dtype)
        runtime = _ExpertAwareRuntime(
            args=None,
            model=_LossTensorsVisible(model),
            optimizer=_optimizer(_param_groups(model, optim, group_name), optim, offload_optimizer),
            config=config,
            config_class=DeepSpeedConfig(config),
        )
        self.module = DeepSpeedModule(runtime)

    @property
    def _runtime(self) -> _DeepSpeedRuntime:
        return self.module.runtime

    # -- training -----------------------------------------------------------------

    def zero_grad(self) -> None:
        """Clear DeepSpeed's gradients and partitions, and the watched local gradients."""
        self._runtime.optimizer.zero_grad()
        for grad in self._local_grads.values():
            grad.zero_()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to hold back: ZeRO-1 reduces only in :meth:`step`, ZeRO-2 reduce-scatters
        every backward's gradients into the partitions by design (see the module docstring)."""
        yield

    def local_grad(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's gradient of ``param`` summed over the step's backwards, before any
        reduction; only for parameters passed as ``watch_grads``."""
        if param not in self._local_grads:
            raise KeyError(
                "DeepSpeedEngine.local_grad: this parameter is not watched; ZeRO-2 frees local gradients as soon "
                "as they are reduced, so pass the parameters whose local gradient you need as watch_grads"
            )
        return self._local_grads[param]

    def step(self, lr: float) -> float:
        """Reduce (ZeRO-1) or finish reducing (ZeRO-2) the gradients, clip by the global norm,
        update every rank's partition at ``lr`` and all-gather the parameters; return the
        global gradient norm before clipping."""
        for group in self._runtime.optimizer.param_groups:
            group["lr"] = lr
        with warnings.catch_warnings():
            # torch 2.13 deprecates the collectives DeepSpeed 0.19.8 calls (all_gather_into_tensor);
            # the calls are correct, the warning is noise for our users.
            warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
            self._runtime.step()
        if not self._runtime.was_step_applied():  # only non-finite gradients skip a step in fp32
            raise RuntimeError("DeepSpeed skipped the step (inf/nan gradients)")
        return float(self._runtime.get_global_grad_norm())

    # -- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's model and optimizer state, as a plain dict of tensors and values.

        ``model``: the full (replicated dense, this rank's experts) model ``state_dict``;
        ``optimizer``: DeepSpeed's ZeRO (or, ZeRO-1 in bf16, ``BF16_Optimizer``) ``state_dict``
        of this rank (its fp32 partitions and their Adam state) without its non-plain entries (see ``_NOT_PLAIN_STATE_KEYS``);
        ``layout``: what the partitions depend on. Like torch's ``state_dict`` it references
        live tensors: save or copy it before training on. It loads only into an engine of
        the same layout, ZeRO stage and model.
        """
        optimizer = self._runtime.optimizer.state_dict()
        return {
            "model": self.module.module.state_dict(),
            "optimizer": {k: v for k, v in optimizer.items() if k not in _NOT_PLAIN_STATE_KEYS},
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (saved by this rank, same layout): the model,
        then DeepSpeed's partitions from their saved fp32 copies and their Adam state."""
        if state["layout"] != self._layout():
            raise ValueError(
                f"DeepSpeedEngine.load_state_dict: the ZeRO partitions were saved with layout {state['layout']} "
                f"but this engine has {self._layout()}; they load only into the same data/expert-parallel layout, "
                "ZeRO stage and model"
            )
        self.module.module.load_state_dict(state["model"])
        # DeepSpeed reads the entry at this rank's data-parallel index only (a rigid checkpoint).
        per_rank = [state["optimizer"] if r == self.groups.dp_rank else None for r in range(self.groups.dp_size)]
        self._runtime.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)

    def _layout(self) -> dict[str, Any]:
        return {
            "dp": (self.groups.dp_rank, self.groups.dp_size),
            "edp": (self.groups.edp_rank, self.groups.edp_size),
            "ep": (self.groups.ep_rank, self.groups.ep_size),
            "zero_stage": self.zero_stage,
            "partitions": [p.numel() for p in self.fp32_partitions()],
        }

    def fp32_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions, one flat tensor per parameter group (what AdamW
        steps): ZeRO's ``single_partition_of_fp32_groups``, or ``BF16_Optimizer``'s
        ``fp32_groups_flat_partition`` (ZeRO-1 in bf16)."""
        optimizer = self._runtime.optimizer
        partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)
        return partitions if partitions is not None else optimizer.fp32_groups_flat_partition


class DeepSpeedModule(nn.Module):
    """``engine.module``: call it like the model (DeepSpeed's forward runs around it).

    ``.module`` is the original model, as for megatron's DDP wrapper.
    """

    def __init__(self, runtime: _DeepSpeedRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    @property
    def module(self) -> nn.Module:
        return self.runtime.module.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _, output = self.runtime(*args, **kwargs)
        return output


class _LossTensorsVisible(nn.Module):
    """The model as DeepSpeed wraps it: returns ``(tensors, output)``.

    DeepSpeed starts its backward bookkeeping (ZeRO's reduction prologue; the epilogue that
    reduces the last bucket depends on it) from hooks on the tensors it finds in the
    forward's output, looking into tuples, lists and dicts only. Our models return a
    dataclass; its tensor fields are listed for DeepSpeed in front of it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[list[Any], Any]:
        output = self.model(*args, **kwargs)
        if dataclasses.is_dataclass(output):
            return [getattr(output, f.name) for f in dataclasses.fields(output)], output
        return [output], output


class _ExpertAwareRuntime(_DeepSpeedRuntime):
    """DeepSpeed's engine for a model whose experts are not ``deepspeed.moe.layer.MoE``.

    DeepSpeed sets ``has_moe_layers`` only when it finds its own MoE modules; with it off,
    ZeRO neither partitions the ``moe`` optimizer groups over the expert-data-parallel
    group nor gets the expert groups, and fails at the first expert gradient it reduces
    ("'NoneType' object is not subscriptable"). Here it is on exactly when the model has
    parameters marked ``allreduce = False``; everything else about MoE (groups found by
    ``param.group_name``, ``moe`` optimizer groups) is DeepSpeed's own path.
    """

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)
        self.has_moe_layers = any(is_moe_param(p) for p in model.parameters())


def use_torch_distributed() -> None:
    """Make ``deepspeed.comm`` wrap the torch.distributed process group that already exists.

    ``deepspeed.initialize`` would do this through ``init_distributed``, whose torch
    backend JIT-builds a shared-memory all-reduce op for CPU inference (~25 s on first use);
    training never calls it, so the build is skipped. A no-op once done in this process.
    """
    if not dist.is_initialized():
        raise RuntimeError("DeepSpeedEngine: torch.distributed is not initialised; the launcher must do it first")
    if deepspeed.comm.is_initialized():
        return
    # The package attribute ``deepspeed.comm.torch`` is torch itself; the backend module by name:
    backend_module = importlib.import_module("deepspeed.comm.torch")
    with mock.patch.object(backend_module, "build_shm_op", return_value=None):
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)


def deepspeed_expert_ranks(rank: int, world_size: int, ep: int) -> tuple[list[int], list[int]]:
    """The (EP, EDP) rank sets DeepSpeed's MoE code assumes for ``rank`` without model
    parallelism (``groups._create_expert_and_data_parallel``): EP groups are blocks of
    ``ep`` consecutive ranks, EDP groups take every ``ep``-th rank."""
    start = rank - rank % ep
    return list(range(start, start + ep)), list(range(rank % ep, world_size, ep))


def register_expert_groups(groups: ParallelGroups) -> str:
    """Register megatron's ``groups.ep``/``groups.edp`` as DeepSpeed's expert groups; return
    their name (``ep_size_<ep>``, DeepSpeed's convention).

    Checks first that the dense data-parallel group is the whole world (DeepSpeed without
    an mpu reduces dense gradients over all ranks) and that megatron's EP/EDP rank sets
    are the ones DeepSpeed assumes; raises ``RuntimeError`` naming both otherwise. The
    registry then holds exactly this layout's groups.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_ranks = dist.get_process_group_ranks(groups.dp)
    if dp_ranks != list(range(world)):
        raise RuntimeError(
            f"DeepSpeedEngine: the data-parallel group is ranks {dp_ranks}, not the whole world of {world}; "
            "DeepSpeed (no mpu) reduces dense gradients over every rank, so only ep x dp layouts are supported"
        )
    ep_ranks, edp_ranks = dist.get_process_group_ranks(groups.ep), dist.get_process_group_ranks(groups.edp)
    expected = deepspeed_expert_ranks(rank, world, groups.ep_size)
    if (ep_ranks, edp_ranks) != expected:
        raise RuntimeError(
            f"DeepSpeedEngine: on rank {rank} megatron's expert groups are ep={ep_ranks}, edp={edp_ranks} but "
            f"DeepSpeed's MoE code assumes ep={expected[0]}, edp={expected[1]}; the expert gradients would be "
            "reduced over different ranks than the experts were sharded over"
        )
    name = f"ep_size_{groups.ep_size}"
    registry = (
        (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS, groups.ep, ep_ranks),
        (ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, groups.edp, edp_ranks),
    )
    for by_name, ranks_by_name, group, ranks in registry:
        by_name.clear()
        ranks_by_name.clear()
        by_name[name] = group
        ranks_by_name[name] = ranks
    return name


def _watch(params: Sequence[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor]:
    """A zeroed fp32 local-gradient sum per parameter, added to by a hook on every backward.

    A tensor hook on a leaf receives the gradient of this backward (all its uses summed)
    before it is accumulated into ``.grad``, so before DeepSpeed's post-accumulation hook
    reduces it (ZeRO-2) or anything is reduced at all (ZeRO-1).
    """
    local = {param: torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format).detach()
             for param in params}
    for param, total in local.items():
        param.register_hook(_adder(total))
    return local


def _adder(total: torch.Tensor) -> Any:
    """A gradient hook that adds the gradient into ``total`` and leaves it unchanged."""

    def add(grad: torch.Tensor) -> None:
        total.add_(grad)

    return add


def _param_groups(model: nn.Module, optim: OptimSettings, expert_group: str) -> list[dict[str, Any]]:
    """AdamW groups: (dense, expert) x (decay on ``ndim >= 2``, none below); expert groups
    carry DeepSpeed's MoE marks (``moe``, ``name`` = the expert groups' registry name)."""
    out = []
    for expert in (False, True):
        for decay in (True, False):
            params = [p for p in model.parameters() if is_moe_param(p) == expert and (p.ndim >= 2) == decay]
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "weight_decay": optim.weight_decay if decay else 0.0}
            if expert:
                group.update(moe=True, name=expert_group)
            out.append(group)
    return out


def _optimizer(param_groups: list[dict[str, Any]], optim: OptimSettings, offload: bool) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam in AdamW mode when the optimizer is offloaded
    (its C++ op is JIT-built on first use, ~1 min on 2 cores, then loaded from the torch
    extensions cache in a few seconds)."""
    betas = (optim.beta1, optim.beta2)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=betas, eps=optim.eps)


def _config(optim: OptimSettings, zero_stage: int, offload: bool, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's config. The batch sizes are bookkeeping only (no DeepSpeed data loader or
    LR scheduler): one accumulation step, and the caller owns the accumulation boundary.
    bf16: DeepSpeed's bf16 mode (bf16 parameters, fp32 master partitions and Adam state)
    with gradients accumulated and reduced in fp32."""
    precision: dict[str, Any] = {}
    if dtype == torch.bfloat16:
        precision = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                     "communication_data_type": "fp32"}
    return {
        **precision,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max(optim.grad_clip, 0.0),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
            "offload_optimizer": {"device": "cpu" if offload else "none"},
        },
        "log_level": "warning",
    }
