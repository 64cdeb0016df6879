"""parallel/megatron_compat.py: version gate, no-op on GPUs, idempotence, and each patch.

The patches change megatron-core process-wide, so everything that applies them runs in a
fresh interpreter (``_ladder``, spawned once per module): starting from unpatched
megatron-core it shows that each step of the engine's path fails without its patch and
works with it, then checks each patch's effect. The pytest process itself is never patched.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

from parallel import megatron_compat

CUDA_ERROR = "Torch not compiled with CUDA enabled"


def _patch_targets() -> dict[str, Any]:
    """The megatron-core objects the patches replace (to compare before/after)."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    return {
        "param_and_grad_buffer.torch": param_and_grad_buffer.torch,
        "MixedPrecisionOptimizer.__init__": MixedPrecisionOptimizer.__dict__["__init__"],
        "DistributedOptimizer._build_model_and_main_param_groups": DistributedOptimizer.__dict__[
            "_build_model_and_main_param_groups"
        ],
        "optimizer.get_grad_norm_fp32": megatron_optimizer.get_grad_norm_fp32,
        "optimizer.clip_grad_by_total_norm_fp32": megatron_optimizer.clip_grad_by_total_norm_fp32,
        "moe.router.torch": _moe_router().torch,
        "moe_utils.te_general_gemm": getattr(_moe_utils(), "te_general_gemm", "unbound"),
        "tensor_parallel.mappings.torch": _tp_modules()[0].torch,
        "tensor_parallel.layers.torch": _tp_modules()[1].torch,
        "utils.torch": _tp_modules()[2].torch,
        "dist_checkpointing.filesystem_async.torch": _ckpt_modules()[0].torch,
        "dist_checkpointing.state_dict_saver.torch": _ckpt_modules()[1].torch,
    }


def _ckpt_modules() -> tuple[Any, Any]:
    """The modules the checkpoint-save patch rebinds ``torch`` in (exercised by
    tests/test_dist_checkpoint.py)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    return filesystem_async, state_dict_saver


def _tp_modules() -> tuple[Any, Any, Any]:
    """The modules the sequence-parallel patches rebind ``torch`` in (tested in
    tests/test_tensor_parallel.py, which needs two ranks to reach them)."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    return mappings, layers, utils


def _moe_router() -> Any:
    from megatron.core.transformer.moe import router

    return router


def _moe_utils() -> Any:
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def _error(fn: Callable[[], Any]) -> str:
    """The message of what ``fn`` raises ("" if it does not)."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return ""


def _ladder(out: mp.Queue, store: str) -> None:
    """In a fresh interpreter: unpatched megatron-core, one gloo rank, the engine's path."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        out.put((True, _ladder_steps(store)))
    except BaseException:
        out.put((False, traceback.format_exc()))


def _ladder_steps(store: str) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from parallel import megatron_compat as compat

    report: dict[str, Any] = {}
    pristine = _patch_targets()

    # A faked CUDA device: nothing is patched.
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        report["with_cuda"] = compat.apply_cpu_compat()
    finally:
        torch.cuda.is_available = real_is_available
    report["with_cuda_untouched"] = _patch_targets() == pristine and compat.applied_patches() == []

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True, params_dtype=torch.float32
    )

    def build_ddp() -> DistributedDataParallel:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False
        )
        return DistributedDataParallel(config, ddp_config, model)

    def build_optimizer(ddp: DistributedDataParallel) -> Any:
        opt_config = OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=0.01, use_distributed_optimizer=True)
        return get_megatron_optimizer(opt_config, [ddp])

    # 1. DDP's grad buffers.
    report["ddp_unpatched"] = _error(build_ddp)
    compat.patch_grad_buffer_device()
    ddp = build_ddp()
    report["buffer_devices"] = sorted({str(b.grad_data.device) for b in ddp.buffers} | {str(b.param_data.device) for b in ddp.buffers})
    report["real_current_device"] = _error(torch.cuda.current_device)
    # 2. the distributed optimizer's bookkeeping tensors, then 3. its fp32 shards.
    report["optimizer_unpatched"] = _error(lambda: build_optimizer(ddp))
    compat.patch_mixed_precision_optimizer_init()
    report["optimizer_without_shards"] = _error(lambda: build_optimizer(build_ddp()))
    compat.patch_distributed_optimizer_fp32_shards()
    ddp = build_ddp()
    optimizer = build_optimizer(ddp)
    dense = optimizer.chained_optimizers[0]
    report["loss_scale"] = float(optimizer.get_loss_scale())
    params = list(ddp.module.parameters())
    shards = dense.shard_fp32_groups
    report["shards_view_params"] = all(
        s.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        for group, model_group in zip(shards, dense.model_fp32_groups, strict=True)
        for s, p in zip(group, model_group, strict=True)
    ) and sum(s.numel() for g in shards for s in g) == sum(p.numel() for p in params)

    # 4. the step: grad norm and clipping.
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).square().mean().backward()
    finalize_model_grads([ddp])
    grads = [p.main_grad.clone() for p in params]
    report["step_unpatched"] = _error(optimizer.step)
    compat.patch_grad_norm_and_clip()
    before = [p.detach().clone() for p in params]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).square().mean().backward()
    finalize_model_grads([ddp])
    ok, grad_norm, _ = optimizer.step()
    report["step_ok"] = ok
    report["grad_norm"] = (grad_norm, torch.linalg.vector_norm(torch.cat([g.view(-1) for g in grads])).item())
    report["updated"] = any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))

    world = dist.group.WORLD
    g = [torch.tensor([3.0, -4.0]), torch.tensor([[12.0]])]
    report["norm2"] = megatron_optimizer.get_grad_norm_fp32(g, grad_stats_parallel_group=world)
    report["norm_inf"] = megatron_optimizer.get_grad_norm_fp32(g, norm_type=float("inf"), grad_stats_parallel_group=world)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, -4.0])
    megatron_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    report["clipped"] = p.grad.tolist()
    megatron_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)
    report["not_clipped"] = p.grad.tolist()

    # apply_cpu_compat: all patches, then idempotent.
    first = compat.apply_cpu_compat()
    targets = _patch_targets()
    second = compat.apply_cpu_compat()
    report["applied"] = (first, second, _patch_targets() == targets)
    report["patched_everything"] = all(targets[k] is not pristine[k] for k in pristine)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return report


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_ladder, args=(out, str(tmp_path_factory.mktemp("gloo") / "store")), daemon=True)
    proc.start()
    try:
        ok, value = out.get(timeout=120)
    except queue.Empty:
        proc.kill()
        raise TimeoutError("the patch ladder did not finish within 120 s") from None
    finally:
        proc.join(timeout=10)
    assert ok, value
    return value


# -- in this process: nothing is patched ----------------------------------------------


def test_refuses_other_megatron_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    before = _patch_targets()
    with pytest.raises(RuntimeError) as err:
        megatron_compat.apply_cpu_compat()
    assert "megatron-core 0.17.0 is installed" in str(err.value)
    assert "0.16.1" in str(err.value)
    assert _patch_targets() == before


def test_noop_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _patch_targets()
    assert megatron_compat.apply_cpu_compat() == []
    assert _patch_targets() == before


def test_installed_version_is_supported() -> None:
    assert megatron_compat.megatron_version() == megatron_compat.SUPPORTED_VERSION == "0.16.1"


# -- in a fresh interpreter: each patch, from unpatched megatron-core -------------------


def test_noop_with_cuda_from_pristine_megatron(ladder: dict[str, Any]) -> None:
    assert ladder["with_cuda"] == []
    assert ladder["with_cuda_untouched"]


def test_grad_buffer_device(ladder: dict[str, Any]) -> None:
    assert CUDA_ERROR in ladder["ddp_unpatched"]
    assert ladder["buffer_devices"] == ["cpu"]
    # torch.cuda itself is untouched: only param_and_grad_buffer's view of torch changed
    assert CUDA_ERROR in ladder["real_current_device"]


def test_mixed_precision_optimizer_init(ladder: dict[str, Any]) -> None:
    assert CUDA_ERROR in ladder["optimizer_unpatched"]
    assert ladder["loss_scale"] == 1.0


def test_distributed_optimizer_fp32_shards(ladder: dict[str, Any]) -> None:
    assert "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor" in ladder["optimizer_without_shards"]
    assert ladder["shards_view_params"]


def test_grad_norm_and_clip(ladder: dict[str, Any]) -> None:
    assert CUDA_ERROR in ladder["step_unpatched"]
    assert ladder["step_ok"] and ladder["updated"]
    got, want = ladder["grad_norm"]
    assert abs(got - want) <= 1e-6 * want
    assert ladder["norm2"] == pytest.approx(13.0, rel=1e-7)
    assert ladder["norm_inf"] == 12.0
    assert ladder["clipped"] == pytest.approx([3.0 / (5.0 + 1e-6), -4.0 / (5.0 + 1e-6)], rel=1e-7)
    assert ladder["not_clipped"] == ladder["clipped"]


def test_apply_is_idempotent_and_patches_everything(ladder: dict[str, Any]) -> None:
    first, second, unchanged = ladder["applied"]
    assert first == second == list(megatron_compat._PATCHES)
    assert unchanged
    assert ladder["patched_everything"]


# -- megatron's MoELayer forward (the layer benchmark's path) ----------------------------


def _moe_layer_ladder(out: mp.Queue, store: str) -> None:
    """In a fresh interpreter: megatron's MoELayer on CPU fails without each MoE patch and
    runs forward and backward with both."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from launch.bench import LayerSpec, megatron_moe_layer

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        layer = megatron_moe_layer(LayerSpec(64, 32, 64, 4, 2, 1.25, "float32"))
        x = torch.randn(64, 1, 32, requires_grad=True)
        report = {"unpatched": _error(lambda: layer(x))}
        megatron_compat.patch_moe_router_device()
        report["router_only"] = _error(lambda: layer(x))
        megatron_compat.patch_moe_utils_missing_te_gemm()
        y = layer(x)[0]
        y.sum().backward()
        report["shape"] = tuple(y.shape)
        report["router_grad"] = float(layer.router.weight.grad.abs().sum())
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        out.put((True, report))
    except BaseException:
        out.put((False, traceback.format_exc()))


def test_moe_layer_patches_each_needed(tmp_path: Any) -> None:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_moe_layer_ladder, args=(out, str(tmp_path / "store")), daemon=True)
    proc.start()
    try:
        ok, report = out.get(timeout=120)
    finally:
        proc.join(timeout=10)
    assert ok, report
    assert CUDA_ERROR in report["unpatched"]
    assert "NameError: name 'te_general_gemm' is not defined" in report["router_only"]
    assert report["shape"] == (64, 1, 32) and report["router_grad"] > 0
