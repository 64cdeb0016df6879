"""Run megatron-core 0.16.1's DDP, distributed optimizer and MoE layer on CPU with gloo.

megatron-core assumes a CUDA device in a few places on the path that
``parallel/engine.py`` takes (``DistributedDataParallel`` -> ``get_megatron_optimizer``
-> ``ChainedOptimizer.step``), on the forward of its own ``MoELayer`` (which
``moe bench layer`` compares ours against) and in the sequence-parallel collectives of its
tensor-parallel layers (``parallel/tensor_parallel.py``). :func:`apply_cpu_compat` replaces exactly those megatron
functions or module-level names, each with a small named function below whose docstring
says what it replaces and why. Nothing of torch is replaced: where a megatron module calls
``torch.cuda.current_device()`` the replacement is that *module's own* ``torch`` name, a
view of torch that differs only in ``cuda.current_device`` and is seen by no other module.

Rules:

- a no-op when ``torch.cuda.is_available()`` (megatron runs unpatched on GPUs);
- refuses any megatron-core other than :data:`SUPPORTED_VERSION`: the patches copy or
  bypass megatron internals of that release;
- idempotent: the second call patches nothing and returns the same names.

Each patch is exercised by ``tests/test_megatron_compat.py`` (which fails without it; the
sequence-parallel ones, which need two ranks, by ``tests/test_tensor_parallel.py``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

SUPPORTED_VERSION = "0.16.1"

_applied: list[str] = []


def megatron_version() -> str:
    """The installed megatron-core version (``megatron.core.package_info.__version__``)."""
    from megatron.core import package_info

    return package_info.__version__


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless megatron-core is the release these patches were written for."""
    version = megatron_version() if version is None else version
    if version != SUPPORTED_VERSION:
        raise RuntimeError(
            f"parallel.megatron_compat patches megatron-core {SUPPORTED_VERSION} internals, but "
            f"megatron-core {version} is installed; install megatron-core=={SUPPORTED_VERSION} or "
            "re-check every patch in parallel/megatron_compat.py against the new release"
        )


def apply_cpu_compat() -> list[str]:
    """Patch megatron-core for CPU/gloo; return the names of the patches in effect.

    Returns ``[]`` (and changes nothing) when a CUDA device is available. Raises
    ``RuntimeError`` for a megatron-core version other than 0.16.1.
    """
    if torch.cuda.is_available():
        return []
    check_version()
    if _applied:
        return list(_applied)
    for name, patch in _PATCHES.items():
        patch()
        _applied.append(name)
    return list(_applied)


def applied_patches() -> list[str]:
    """The names of the patches applied so far in this process."""
    return list(_applied)


# -- a module-local view of torch ---------------------------------------------------


class _TorchView(types.ModuleType):
    """``torch`` as one megatron module sees it: identical except ``torch.cuda.current_device``.

    Bound to a single megatron module's global name ``torch``; every other module,
    including torch itself, keeps the real ``torch.cuda``.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        cuda = types.ModuleType("torch.cuda")
        cuda.__getattr__ = lambda name: getattr(torch.cuda, name)  # type: ignore[method-assign]
        cuda.current_device = _cpu_current_device  # type: ignore[attr-defined]
        self.cuda = cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_current_device() -> torch.device:
    """Stands in for ``torch.cuda.current_device()`` where megatron uses it as an allocation device."""
    return torch.device("cpu")


# -- the patches --------------------------------------------------------------------


def patch_grad_buffer_device() -> None:
    """Allocate DDP's contiguous param/grad buffers on the CPU.

    megatron-core 0.16.1, ``megatron/core/distributed/param_and_grad_buffer.py``,
    ``_ParamAndGradBuffer.__init__`` allocates ``param_data``/``grad_data`` with
    ``device=torch.cuda.current_device()``, which raises "Torch not compiled with CUDA
    enabled" on CPU. Replaced: that module's global name ``torch``, by a view of torch whose
    ``cuda.current_device()`` returns the CPU device (the module's other ``torch.cuda`` uses
    sit behind ``num_distributed_optimizer_instances > 1`` or ``nccl_ub``, unused here).
    """
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.torch = _TorchView()


def patch_mixed_precision_optimizer_init() -> None:
    """Create the distributed optimizer's bookkeeping tensors on the CPU.

    megatron-core 0.16.1, ``megatron/core/optimizer/optimizer.py``,
    ``MixedPrecisionOptimizer.__init__`` (the base of ``DistributedOptimizer``) makes
    ``found_inf``, ``_dummy_overflow_buf`` and ``_scale_one`` with ``device='cuda'``.
    Replaced: that ``__init__``, by a copy that makes the same tensors on the CPU.
    """
    from megatron.core.config_logger import has_config_logger_enabled, log_config_to_disk
    from megatron.core.optimizer.optimizer import MegatronOptimizer, MixedPrecisionOptimizer

    def __init__(self, optimizer, config, grad_scaler, init_state_fn):  # noqa: N807 - mirrors megatron's signature
        if has_config_logger_enabled(config):
            log_config_to_disk(config, locals(), prefix=type(self).__name__)
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self.grad_scaler = grad_scaler
        if self.grad_scaler is None:
            assert not self.config.fp16, "fp16 expects a grad scaler."
        if self.grad_scaler:
            self.found_inf = torch.tensor([0.0], dtype=torch.float)
        self._dummy_overflow_buf = None if self.config.bf16 else torch.tensor([0], dtype=torch.int)
        if self.grad_scaler is None:
            self._scale_one = torch.tensor([1.0], dtype=torch.float)

    MixedPrecisionOptimizer.__init__ = __init__


def patch_distributed_optimizer_fp32_shards() -> None:
    """Let the distributed optimizer shard fp32 and bf16 parameters that live on the CPU.

    megatron-core 0.16.1, ``megatron/core/optimizer/distrib_optimizer.py``,
    ``DistributedOptimizer._build_model_and_main_param_groups`` recognises parameters by
    ``param.type()`` in ``('torch.cuda.FloatTensor', 'torch.cuda.HalfTensor',
    'torch.cuda.BFloat16Tensor')`` and raises ``TypeError`` for a CPU ``torch.FloatTensor``
    or ``torch.BFloat16Tensor``. Replaced: that classmethod, by its fp32 and bf16 branches
    as upstream (no fp8, no precision-aware optimizer): an fp32 parameter's shard is a view
    of the parameter, stepped in place; a bf16 parameter's shard gets an fp32 main copy
    (``shard.clone().float()``, also set as ``param.main_param``), which the optimizer steps
    and ``_copy_main_params_to_model_params`` rounds back into the bf16 parameter buffer.
    Any other dtype still raises.
    """
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def _with_attributes(shard: torch.Tensor, model_param: torch.nn.Parameter) -> torch.Tensor:
        tensor_parallel.copy_tensor_model_parallel_attributes(shard, model_param)
        if hasattr(model_param, "shared"):
            shard.shared = model_param.shared
        return shard

    def _build_model_and_main_param_groups(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups: dict[str, list[list[Any]]] = {
            k: [] for k in ("model_float16", "model_fp32", "shard_float16", "shard_fp32", "shard_fp32_from_float16")
        }
        for group_range in opt_group_ranges:
            group = {k: [] for k in groups}
            for model_param in group_range["params"]:
                assert model_param.requires_grad
                if model_param.dtype not in (torch.float32, torch.bfloat16) or model_param.is_cuda:
                    raise TypeError(
                        "megatron_compat: on CPU the distributed optimizer takes fp32 or bf16 parameters only, "
                        f"got {model_param.type()}"
                    )
                gbuf_index, dtype, bucket_index = param_gbuf_map[model_param]
                param_range = gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"][model_param]["param"]
                if model_param.dtype == torch.float32:
                    shard = _with_attributes(model_param.view(-1)[param_range.start : param_range.end], model_param)
                    group["model_fp32"].append(model_param)
                    group["shard_fp32"].append(shard)
                    continue
                shard = _with_attributes(model_param.detach().view(-1)[param_range.start : param_range.end], model_param)
                main = _with_attributes(shard.clone().float(), model_param)
                model_param.main_param = main
                model_param.main_param_sharded = True
                group["model_float16"].append(model_param)
                group["shard_float16"].append(shard)
                group["shard_fp32_from_float16"].append(main)
            for key, value in group.items():
                groups[key].append(value)
            group_range["orig_group"]["params"] = [*group["shard_fp32"], *group["shard_fp32_from_float16"]]
        return tuple(groups.values())

    DistributedOptimizer._build_model_and_main_param_groups = classmethod(_build_model_and_main_param_groups)


def patch_grad_norm_and_clip() -> None:
    """Compute the gradient norm and clip on the CPU.

    megatron-core 0.16.1, ``megatron/core/optimizer/clip_grads.py``: ``get_grad_norm_fp32``
    allocates its overflow buffer (and, without apex/TE, ``local_multi_tensor_l2_norm`` its
    result) with ``device='cuda'``; ``clip_grad_by_total_norm_fp32`` asserts
    ``grad.type() == 'torch.cuda.FloatTensor'``. Replaced: both names where the optimizers
    call them, ``megatron.core.optimizer.optimizer`` (``MegatronOptimizer.get_grad_norm``,
    ``ChainedOptimizer.step``), by CPU versions with the same reduction: the p-th powers of
    the local norms are summed over ``grad_stats_parallel_group`` (max for inf), then
    ``clip_coeff = max_norm / (total_norm + 1e-6)`` scales every grad when below 1.
    """
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        data_parallel_group = None
        for grad in grads_for_norm:
            data_parallel_group = get_data_parallel_group_if_dtensor(grad, data_parallel_group)
        grads = [to_local_if_dtensor(grad) for grad in grads_for_norm]
        norm_type = float(norm_type)
        if norm_type == math.inf:
            total = torch.tensor([max((float(g.abs().max()) for g in grads), default=0.0)], dtype=torch.float)
            op = torch.distributed.ReduceOp.MAX
        else:
            total = torch.zeros(1, dtype=torch.float)
            for grad in grads:
                total += torch.linalg.vector_norm(grad, norm_type, dtype=torch.float) ** norm_type
            op = torch.distributed.ReduceOp.SUM
        if data_parallel_group:
            torch.distributed.all_reduce(total, op=op, group=data_parallel_group)
        torch.distributed.all_reduce(total, op=op, group=grad_stats_parallel_group)
        return total.item() if norm_type == math.inf else total.item() ** (1.0 / norm_type)

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [
            to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters if getattr(p, attr, None) is not None
        ]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    megatron_optimizer.get_grad_norm_fp32 = get_grad_norm_fp32
    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def patch_moe_router_device() -> None:
    """Keep megatron's MoE router weight where it is.

    megatron-core 0.16.1, ``megatron/core/transformer/moe/router.py``, ``Router.gating``
    moves a CPU router weight to ``torch.cuda.current_device()`` on every forward, which
    raises on CPU. Replaced: that module's global name ``torch``, by the view of torch
    whose ``cuda.current_device()`` is the CPU (the weight then "moves" to where it is).
    """
    from megatron.core.transformer.moe import router

    router.torch = _TorchView()


def patch_moe_utils_missing_te_gemm() -> None:
    """Bind ``te_general_gemm`` when TransformerEngine is absent.

    megatron-core 0.16.1, ``megatron/core/transformer/moe/moe_utils.py``:
    ``RouterGatingLinearFunction.forward`` tests ``te_general_gemm is not None``, but the
    name is bound only when TransformerEngine imports, so without TE every router forward
    raises ``NameError``. Bound to ``None``, the value the test expects (upstream then takes
    its plain ``torch.mm`` branch). A GPU without TransformerEngine has the same bug, and
    :func:`apply_cpu_compat` does nothing there, so ``moe bench layer`` calls this directly
    (idempotent; a no-op where TransformerEngine bound the name). Seen on an H200 without
    TransformerEngine (2026-12-04): megatron's MoELayer raised this ``NameError``.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def patch_tensor_parallel_mappings_device() -> None:
    """Allocate the tensor-parallel gathers' outputs on the CPU.

    megatron-core 0.16.1, ``megatron/core/tensor_parallel/mappings.py``:
    ``_gather_along_first_dim``, ``_gather_along_last_dim``, ``_reduce_scatter_along_first_dim``
    (the sequence-parallel scatter/gather/reduce-scatter regions) allocate their outputs with
    ``device=torch.cuda.current_device()``. Replaced: that module's global name ``torch``,
    by the view of torch whose ``cuda.current_device()`` is the CPU.
    """
    from megatron.core.tensor_parallel import mappings

    mappings.torch = _TorchView()


def patch_tensor_parallel_linear_device() -> None:
    """Allocate the sequence-parallel linear's input-gradient buffer on the CPU.

    megatron-core 0.16.1, ``megatron/core/tensor_parallel/layers.py``,
    ``LinearWithGradAccumulationAndAsyncCommunication.backward`` makes the reduce-scatter
    output for a sequence-parallel input gradient with ``device=torch.cuda.current_device()``.
    Replaced: that module's global name ``torch``, by the view of torch (its other
    ``current_device()`` uses allocate parameters when ``use_cpu_initialization=False``,
    which this project never sets).
    """
    from megatron.core.tensor_parallel import layers

    layers.torch = _TorchView()


def patch_global_memory_buffer_device() -> None:
    """Allocate megatron's global memory buffer on the CPU.

    megatron-core 0.16.1, ``megatron/core/utils.py``, ``GlobalMemoryBuffer.get_tensor``
    (where the sequence-parallel linear all-gathers its input) allocates with
    ``device=torch.cuda.current_device()``. Replaced: that module's global name ``torch``,
    by the view of torch.
    """
    from megatron.core import utils

    utils.torch = _TorchView()


class _CudaZerosTorchView(_TorchView):
    """The view of torch whose ``zeros(..., device="cuda")`` allocates on the CPU."""

    def zeros(self, *size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*size, device="cpu" if str(device) == "cuda" else device, **kwargs)


def patch_pipeline_schedules_token_count() -> None:
    """Count the pipeline schedules' tokens on the CPU.

    megatron-core 0.16.1, ``megatron/core/pipeline_parallel/schedules.py``: the 1F1B and
    interleaved schedules (``forward_backward_pipelining_without_interleaving`` /
    ``_with_interleaving``) start with ``total_num_tokens = torch.zeros([], dtype=torch.int,
    device="cuda")``. Replaced: that module's global name ``torch``, by a view of torch
    whose ``zeros`` maps ``device="cuda"`` to the CPU (and whose ``cuda.current_device()``
    is the CPU).
    """
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CudaZerosTorchView()


def patch_pipeline_p2p_device() -> None:
    """Allocate the pipeline's receive buffers on the CPU.

    megatron-core 0.16.1, ``megatron/core/pipeline_parallel/p2p_communication.py``,
    ``P2PCommunicator._communicate`` makes the buffers that receive the previous stage's
    activation / the next stage's gradient with ``device=torch.cuda.current_device()``.
    Replaced: that module's global name ``torch``, by the view of torch whose
    ``cuda.current_device()`` is the CPU. (Its ``torch.cuda.synchronize()`` calls sit behind
    ``batch_p2p_comm`` and ``variable_seq_lengths``, which ``parallel/pipeline.py`` leaves off.)
    """
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication.torch = _TorchView()


def patch_checkpoint_save_device() -> None:
    """Let ``dist_checkpointing``'s torch_dist save run on CPU.

    megatron-core 0.16.1, ``megatron/core/dist_checkpointing/strategies/``:
    ``filesystem_async.py``, ``FileSystemWriterAsync.preload_tensors`` copies the tensors to
    write to the host with ``non_blocking=True`` (hard-wired) and then calls
    ``torch.cuda.synchronize()`` (CPU copies are synchronous: nothing to wait for);
    ``state_dict_saver.py``, ``save_state_dict_async_finalize`` all-reduces its failure flag
    on ``torch.cuda.current_device()``. Both raise on CPU. Replaced: each module's global
    name ``torch``, by a view of torch whose ``cuda.current_device()`` is the CPU (and, for
    the writer, whose ``cuda.synchronize()`` does nothing).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    view = _TorchView()
    view.cuda.synchronize = lambda device=None: None  # type: ignore[attr-defined]
    filesystem_async.torch = view
    state_dict_saver.torch = _TorchView()


_PATCHES = {
    "grad_buffer_device": patch_grad_buffer_device,
    "mixed_precision_optimizer_init": patch_mixed_precision_optimizer_init,
    "distributed_optimizer_fp32_shards": patch_distributed_optimizer_fp32_shards,
    "grad_norm_and_clip": patch_grad_norm_and_clip,
    "moe_router_device": patch_moe_router_device,
    "moe_utils_missing_te_gemm": patch_moe_utils_missing_te_gemm,
    "pipeline_schedules_token_count": patch_pipeline_schedules_token_count,
    "pipeline_p2p_device": patch_pipeline_p2p_device,
    "tensor_parallel_mappings_device": patch_tensor_parallel_mappings_device,
    "tensor_parallel_linear_device": patch_tensor_parallel_linear_device,
    "global_memory_buffer_device": patch_global_memory_buffer_device,
    "checkpoint_save_device": patch_checkpoint_save_device,
}
