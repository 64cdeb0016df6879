"""``moe bench kernels``, ``moe bench layer``, ``moe bench layouts`` and ``moe bench memory``:
speed and memory tables, printed and written as JSON.

    moe bench kernels [--shapes T,H,E,K;...] [--out FILE]
    moe bench layer [--tokens 4096 --hidden 1024 --experts 8 --top-k 2 --capacity-factor 1.25] [--out FILE]
    moe bench layouts CONFIG [--layouts "dp=1;dp=2;ep=2"] [--steps 10] [--warmup 2] [--out FILE] [overrides...]
    moe bench memory CONFIG [--layouts "dp=1;tp=2"] [--recompute none,selective,full] [--dtype float32,bfloat16]
                     [--steps 2] [--out FILE] [overrides...]

Kernels: gating, permute and unpermute for each shape, timed for the fused Triton kernels,
their torch references and megatron-core's unfused utilities (``moe_utils``), with the
bytes each must move, the achieved GB/s and the fraction of the device's copy bandwidth
(measured in the same run by a large device-to-device copy). Triton kernels compile for
GPUs only; on a CPU their row says so instead of timing the interpreter.

Layer: forward + backward time and peak memory of moe-train's MoE layer, megatron-core's
``MoELayer`` and DeepSpeed's ``deepspeed.moe.layer.MoE`` with the same sizes, each in its
own process (peak memory is per process), on the current device; ratios against
megatron-core. A layer that cannot run here gets a row with the reason, not a number.

Layouts: the training loop itself (``launch.train.Run``, started like ``moe train``, one
fresh process per rank, a one-rank layout in a fresh process too) under each layout of
``moe check-layouts``' syntax, ``--warmup`` + ``--steps`` steps; per layout the median
step time over the last ``--steps`` steps (rank 0's clock: every step ends in collectives,
so the ranks finish it together), tokens/s of the global batch at that median, and each
rank's peak memory (``launch.memory``: peak RSS of the rank's process on a CPU, which
includes the interpreter and libraries; ``torch.cuda.max_memory_allocated`` on a GPU),
measured at the end of the run (validation and the final checkpoint included).

Memory: each layout × ``train.recompute`` mode × ``train.dtype`` through ``moe simulate``'s
emulation (``launch.simulate.emulate_and_compare``: the layout's ranks as gloo processes,
the real training step; step 0 warms up, step 1 is measured), each case in its own process
so that a case that cannot run (say bf16 where it is not supported) is a row saying why.
Per rank, the measured live tensor bytes (``parallel.simulator.measure``: the profiler's
allocator accounting on a CPU, the CUDA allocator on a GPU) next to the simulator's
prediction for the same layout and the emulation's own routing (``predict``): model states,
the activations a backward starts from, and the step's peak, with predicted/measured ratios.

Outputs: ``--out`` (a directory, a path under a file, an unwritable directory, or a file
``moe bench`` did not write) and ``--runs`` (a file, unwritable, or already holding one of
this run's run directories) are refused before anything runs; the JSON is replaced whole
(temporary file + rename), so a failed write keeps the earlier table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launch.config import check_creatable, check_output_file, output_dir
from moe.config import ConfigError

if TYPE_CHECKING:
    from launch.config import Config

BF16 = torch.bfloat16
DEFAULT_GPU_SHAPES = "4096,1024,8,1;16384,4096,64,2;16384,4096,256,8;65536,8192,64,2"
DEFAULT_CPU_SHAPES = "4096,1024,8,1;4096,1024,64,2;16384,1024,8,2"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second)."""
    numel = (1 << 29) if device.type == "cuda" else (1 << 26)  # 1 GiB / 128 MiB of bf16
    src = torch.empty(numel, dtype=BF16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


# -- kernels ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    experts: int
    top_k: int

    @classmethod
    def parse_many(cls, text: str) -> list[Shape]:
        """``--shapes "T,H,E,K;..."``; one ``ConfigError`` naming the first bad item."""
        shapes = []
        for item in filter(None, (part.strip() for part in text.split(";"))):
            try:
                values = [int(v) for v in item.split(",")]
            except ValueError:
                values = []
            if len(values) != 4 or min(values) < 1 or values[3] > values[2]:
                raise ConfigError(f"--shapes item {item!r}: expected T,H,E,K with K <= E, all integers >= 1")
            shapes.append(cls(*values))
        if not shapes:
            raise ConfigError(f"--shapes {text!r}: no shape given; expected T,H,E,K;... e.g. 4096,1024,8,2")
        return shapes


@dataclass(frozen=True)
class KernelRow:
    kernel: str
    impl: str
    shape: Shape
    ms: float | None
    gb_per_s: float | None
    copy_fraction: float | None
    note: str = ""


def _kernel_cases(shape: Shape, device: torch.device) -> dict[str, tuple[int, dict[str, Callable[[], Any]]]]:
    """Per kernel: the bytes it must move, and a callable per implementation."""
    from megatron.core.transformer.moe import moe_utils

    from moe.kernels.gating import topk_gating
    from moe.kernels.permute import permute
    from moe.kernels.unpermute import unpermute

    t, h, e, k = shape.tokens, shape.hidden, shape.experts, shape.top_k
    logits = torch.randn(t, e, device=device)
    x = torch.randn(t, h, dtype=BF16, device=device)
    gate = topk_gating(logits, k, True, impl="torch")
    routed = permute(x, gate.experts_TK, None, e, None, impl="torch")
    y = routed.x_ND
    probs, routing_map = moe_utils.topk_routing_with_score_function(logits, k, score_function="softmax")
    _, _, sorted_indices = moe_utils.permute(x, routing_map)
    permuted = x.new_empty(t * k, h).normal_()

    def megatron_gating() -> Any:
        moe_utils.topk_routing_with_score_function(logits, k, score_function="softmax")
        return moe_utils.compute_routing_scores_for_aux_loss(logits, k, "softmax")

    row_bytes = t * k * h * x.element_size()
    return {
        # logits in; gates, ids and the per-expert statistics out
        "gating": (t * e * 4 + t * k * (4 + 8), {
            "fused": lambda: topk_gating(logits, k, True, impl="triton"),
            "torch": lambda: topk_gating(logits, k, True, impl="torch"),
            "megatron": megatron_gating,
        }),
        # every routed row read once and written once: 2·T·K·H·bytes
        "permute": (2 * row_bytes, {
            "fused": lambda: permute(x, gate.experts_TK, None, e, None, impl="triton"),
            "torch": lambda: permute(x, gate.experts_TK, None, e, None, impl="torch"),
            "megatron": lambda: moe_utils.permute(x, routing_map),
        }),
        # T·K rows read, T rows written
        "unpermute": (row_bytes + t * h * x.element_size(), {
            "fused": lambda: unpermute(y, routed.dest_TK, gate.weights_TK, impl="triton"),
            "torch": lambda: unpermute(y, routed.dest_TK, gate.weights_TK, impl="torch"),
            "megatron": lambda: moe_utils.unpermute(permuted, sorted_indices, x.shape, probs=probs, routing_map=routing_map),
        }),
    }


def bench_kernels(shapes: list[Shape], device: torch.device) -> tuple[float, list[KernelRow]]:
    bandwidth = copy_bandwidth(device)
    rows = []
    for shape in shapes:
        for kernel, (nbytes, impls) in _kernel_cases(shape, device).items():
            for impl, fn in impls.items():
                if impl == "fused" and device.type != "cuda":
                    rows.append(KernelRow(kernel, impl, shape, None, None, None, "Triton compiles for GPUs; not timed on CPU"))
                    continue
                with torch.no_grad():
                    seconds = median_seconds(fn, device)
                gbps = nbytes / seconds / 1e9
                rows.append(KernelRow(kernel, impl, shape, seconds * 1e3, gbps, gbps / bandwidth))
    return bandwidth, rows


def _kernel_table(rows: list[KernelRow]) -> list[str]:
    header = f"{'kernel':<10}{'impl':<10}{'T':>7}{'H':>6}{'E':>5}{'K':>3}{'ms':>10}{'GB/s':>9}{'of copy':>9}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        s = r.shape
        ms = f"{r.ms:10.3f}" if r.ms is not None else f"{'-':>10}"
        gbps = f"{r.gb_per_s:9.1f}" if r.gb_per_s is not None else f"{'-':>9}"
        frac = f"{100 * r.copy_fraction:8.1f}%" if r.copy_fraction is not None else f"{'-':>9}"
        lines.append(f"{r.kernel:<10}{r.impl:<10}{s.tokens:>7}{s.hidden:>6}{s.experts:>5}{s.top_k:>3}{ms}{gbps}{frac}  {r.note}")
    return lines


# -- layer --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    capacity_factor: float
    dtype: str


def _init_single_rank() -> None:
    """megatron-core's and DeepSpeed's layers need torch.distributed even on one rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")
        store = Path(tempfile.mkdtemp(prefix="moe-bench-")) / "store"  # one rank: no port needed
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timedelta(minutes=2))


def _ours(spec: LayerSpec, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    cfg = MoEConfig(num_experts=spec.experts, top_k=spec.top_k, normalize_weights=spec.top_k > 1,
                    capacity_factor=spec.capacity_factor, expert_ffn_dim=spec.ffn, activation="gelu")
    layer = MoELayer(spec.hidden, cfg).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return lambda x: layer(x.unsqueeze(0))[0].squeeze(0)


def megatron_moe_layer(spec: LayerSpec) -> torch.nn.Module:
    """megatron-core's ``MoELayer`` (local spec, no grouped GEMM: that needs TransformerEngine)
    sized as ``spec``, with its all-gather dispatcher (equivalent at EP=1, and the all-to-all
    one wants CUDA streams). Needs torch.distributed and megatron's parallel state."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = TransformerConfig(
        num_layers=1, hidden_size=spec.hidden, num_attention_heads=8, ffn_hidden_size=spec.ffn,
        moe_ffn_hidden_size=spec.ffn, num_moe_experts=spec.experts, moe_router_topk=spec.top_k,
        moe_expert_capacity_factor=spec.capacity_factor, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_router_pre_softmax=spec.top_k == 1,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
    )
    submodules = get_gpt_layer_local_spec(num_experts=spec.experts, moe_grouped_gemm=False).submodules.mlp.submodules
    return MoELayer(config, submodules=submodules)


def _megatron(spec: LayerSpec, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from megatron.core import parallel_state

    from parallel.megatron_compat import apply_cpu_compat, patch_moe_utils_missing_te_gemm

    _init_single_rank()
    apply_cpu_compat()
    patch_moe_utils_missing_te_gemm()  # not a CPU matter: a GPU without TransformerEngine needs it too
    parallel_state.initialize_model_parallel()
    # megatron runs bf16 with bf16 parameters (its Float16Module), not under autocast: its
    # router's autograd function computes in bf16 under autocast and then fails its backward
    # (bf16 grad against the fp32 weight; seen on an H200). So: cast, and autocast off.
    dtype = getattr(torch, spec.dtype)
    layer = megatron_moe_layer(spec).to(device=device, dtype=dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=False):
            return layer(x.to(dtype).unsqueeze(1))[0].squeeze(1)

    return run


def _deepspeed(spec: LayerSpec, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from deepspeed.moe.layer import MoE

    from moe.mlp import MLP
    from parallel.deepspeed_engine import use_torch_distributed

    _init_single_rank()
    use_torch_distributed()
    layer = MoE(spec.hidden, MLP(spec.hidden, spec.ffn, "gelu"), num_experts=spec.experts, ep_size=1, k=spec.top_k,
                capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor, min_capacity=1,
                drop_tokens=True, use_rts=False)
    layer.set_deepspeed_parallelism()
    layer = layer.to(device)
    return lambda x: layer(x)[0]


LAYERS: dict[str, Callable[[LayerSpec, torch.device], Callable[[torch.Tensor], torch.Tensor]]] = {
    "moe-train": _ours, "megatron-core": _megatron, "deepspeed": _deepspeed,
}


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_layer(name: str, spec: LayerSpec) -> dict[str, Any]:
    """Forward + backward time and peak memory of one layer, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(0)
    x = torch.randn(spec.tokens, spec.hidden, device=device, requires_grad=True)
    grad = torch.randn(spec.tokens, spec.hidden, device=device)
    baseline = _peak_memory_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    layer = LAYERS[name](spec, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)
        y.float().backward(grad)

    seconds = median_seconds(step, device, repeat=5)
    return {"layer": name, "ms": seconds * 1e3, "peak_mb": (_peak_memory_bytes(device) - baseline) / 2**20}


def bench_layer(spec: LayerSpec) -> list[dict[str, Any]]:
    """Each layer in a fresh process: peak memory is per process, and megatron's and
    DeepSpeed's global state must not leak into the others."""
    rows = []
    for name in LAYERS:
        code = (
            "import json, sys; from launch.bench import LayerSpec, measure_layer; "
            f"print('RESULT ' + json.dumps(measure_layer({name!r}, LayerSpec(**json.loads(sys.argv[1])))))"
        )
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(spec))], capture_output=True, text=True,
                              env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}, timeout=900)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and result:
            rows.append(json.loads(result[-1][len("RESULT "):]))
        else:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            rows.append({"layer": name, "ms": None, "peak_mb": None, "note": f"did not run here: {reason}"})
    return rows


def check_layer_spec(spec: LayerSpec) -> None:
    """Sizes every layer can run with: a bad one would fail in each layer's own process and
    come back as three "did not run" rows instead of one message."""
    for flag, value in (("--tokens", spec.tokens), ("--hidden", spec.hidden), ("--ffn", spec.ffn),
                        ("--experts", spec.experts)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    if not 1 <= spec.top_k <= spec.experts:
        raise ConfigError(f"--top-k {spec.top_k}: must be in [1, --experts={spec.experts}]")
    if not (math.isfinite(spec.capacity_factor) and spec.capacity_factor > 0):
        raise ConfigError(f"--capacity-factor {spec.capacity_factor}: must be a finite number > 0")


def _is_bench_result(path: Path) -> bool:
    """Whether ``path`` is a JSON table ``moe bench`` wrote (which a new run may replace)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(payload, dict) and {"device", "rows"} <= payload.keys()


def _layer_table(rows: list[dict[str, Any]]) -> list[str]:
    reference = next((r["ms"] for r in rows if r["layer"] == "megatron-core" and r["ms"]), None)
    lines = [f"{'layer':<15}{'fwd+bwd ms':>12}{'peak MB':>10}{'vs megatron':>13}  note", "-" * 60]
    for r in rows:
        ms = f"{r['ms']:12.2f}" if r["ms"] is not None else f"{'-':>12}"
        mb = f"{r['peak_mb']:10.1f}" if r["peak_mb"] is not None else f"{'-':>10}"
        ratio = f"{r['ms'] / reference:12.2f}x" if r["ms"] is not None and reference else f"{'-':>13}"
        lines.append(f"{r['layer']:<15}{ms}{mb}{ratio}  {r.get('note', '')}")
    return lines


# -- layouts ------------------------------------------------------------------------

DEFAULT_LAYOUTS = "dp=1;dp=2;ep=2;ep=2,engine=deepspeed,zero=2"


def _train_one_process(cfg: Config, config_name: str) -> None:
    from launch.train import train

    train(cfg, config_name)


def _run_layout(cfg: Config, config_name: str) -> dict[str, Any]:
    """Train ``cfg``'s layout; return rank 0's summary. One rank trains in a fresh spawned
    process (as ``start`` would in this one): its peak memory is then its own, not this
    driver's nor an earlier layout's."""
    import multiprocessing as mp

    from launch.local_launcher import LaunchError, start

    if cfg.parallel.world_size > 1 or cfg.launch.address is not None:
        return start(cfg, config_name)
    proc = mp.get_context("spawn").Process(target=_train_one_process, args=(cfg, config_name))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise LaunchError(f"the one-process run in {cfg.train.run_dir} failed (exit code {proc.exitcode}); its error is above")
    return json.loads((Path(str(cfg.train.run_dir)) / "summary.json").read_text())


def layout_row(name: str, engine: str, cfg: Config, summary: dict[str, Any], records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """One layout's figures from its run: the last ``steps`` train records (one per step)."""
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    step_seconds = [tokens_per_step / r["tokens_per_s"] for r in records[-steps:]]
    median = statistics.median(step_seconds)
    peak = summary["peak_memory"]
    return {
        "layout": name,
        "engine": engine,
        "world_size": cfg.parallel.world_size,
        "tokens_per_step": tokens_per_step,
        "step_seconds": step_seconds,
        "median_step_ms": median * 1e3,
        "tokens_per_s": tokens_per_step / median,
        "memory_kind": peak["kind"],
        "peak_memory_mb_per_rank": [b / 2**20 for b in peak["bytes_per_rank"]],
        "final_lm_loss": records[-1]["lm_loss"],
        "run_dir": summary["run_dir"],
    }


def bench_layouts(config: str, overrides: list[str], layouts_text: str, steps: int, warmup: int, runs: Path) -> list[dict[str, Any]]:
    """Every layout validated first, then each trained ``warmup + steps`` steps in turn."""
    from launch.check_layouts import layout_configs, parse_layouts, train_records

    layouts, configs = layout_configs(config, overrides, parse_layouts(layouts_text), warmup + steps, runs)
    check_runs_dir(runs, [Path(str(cfg.train.run_dir)) for cfg in configs])
    rows = []
    for layout, cfg in zip(layouts, configs):
        print(f"layout {layout.name}: {cfg.parallel.world_size} rank(s), engine {layout.engine}", file=sys.stderr)
        summary = _run_layout(cfg, Path(config).stem)
        records = train_records(Path(summary["run_dir"]))
        rows.append(layout_row(layout.name, layout.engine, cfg, summary, records, steps))
    return rows


def check_runs_dir(runs: Path, run_dirs: list[Path]) -> None:
    """``--runs``: refused before the first run, not at the layout that meets it, when it is
    a file, cannot be created and written, or already holds one of ``run_dirs`` with
    files in it (an earlier benchmark's run: training there would replace its metrics and
    checkpoints)."""
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"--runs {str(runs)!r} is a file; give a directory")
    held = next((d for d in run_dirs if d.is_dir() and any(d.iterdir())), None)
    if held is not None:
        raise ConfigError(f"--runs {str(runs)!r} already holds {held.name}/, an earlier run's; "
                          "choose a new or empty --runs directory")
    check_creatable(runs, Path(os.path.abspath(runs)), "--runs", "a writable directory")


def _layouts_table(rows: list[dict[str, Any]]) -> list[str]:
    kind = rows[0]["memory_kind"] if rows else ""
    header = f"{'layout':<34}{'engine':<14}{'ranks':>6}{'step ms':>10}{'tokens/s':>11}  peak memory per rank, MB ({kind})"
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = " ".join(f"{mb:.0f}" for mb in r["peak_memory_mb_per_rank"])
        lines.append(f"{r['layout']:<34}{r['engine']:<14}{r['world_size']:>6}{r['median_step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}  {memory}")
    return lines


# -- memory -------------------------------------------------------------------------

RECOMPUTE_MODES = ("none", "selective", "full")
DTYPES = ("float32", "bfloat16")
MiB = 2**20


def parse_choices(text: str, flag: str, choices: tuple[str, ...]) -> list[str]:
    """``--recompute none,full``: the items in the order given; one ``ConfigError`` naming
    the first unknown or repeated item otherwise."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for i, item in enumerate(items):
        if item not in choices or item in items[:i]:
            what = "is given twice" if item in choices else "is unknown"
            raise ConfigError(f"{flag} {text!r}: {item!r} {what}; give a comma-separated list of {', '.join(choices)}")
    if not items:
        raise ConfigError(f"{flag} {text!r}: nothing given; give a comma-separated list of {', '.join(choices)}")
    return items


@dataclass(frozen=True)
class MemoryCase:
    """One layout × recompute mode × dtype, and the overrides that make its config."""

    layout: str
    recompute: str
    dtype: str
    world_size: int
    overrides: tuple[str, ...]


def memory_cases(config: str, overrides: list[str], layouts_text: str, modes: list[str], dtypes: list[str],
                 steps: int) -> list[MemoryCase]:
    """Every case's config loaded and its layout checked before anything runs (the run
    directory ``layout_configs`` names is not used: each case runs into its own)."""
    from launch.check_layouts import layout_configs, parse_layouts

    layouts = parse_layouts(layouts_text)
    cases = []
    for dtype in dtypes:
        for mode in modes:
            common = [*overrides, f"train.recompute={mode}", f"train.dtype={dtype}"]
            _, configs = layout_configs(config, common, layouts, steps, Path(tempfile.gettempdir()))
            cases += [MemoryCase(layout.name, mode, dtype, cfg.parallel.world_size, (*common, *layout.overrides))
                      for layout, cfg in zip(layouts, configs)]
    return cases


def measure_memory(config: str, overrides: list[str], steps: int, out: Path) -> list[dict[str, Any]]:
    """One case, in this process: ``moe simulate``'s emulation and its comparison; per rank
    the measured and predicted bytes."""
    from launch.check_layouts import pipeline_micro_batches
    from launch.config import load_config
    from launch.simulate import emulate_and_compare

    cfg = pipeline_micro_batches(load_config(config, overrides))
    _, _, record = emulate_and_compare(cfg, steps, out)
    return [memory_rank_row(r) for r in record["ranks"]]


def memory_rank_row(rank: dict[str, Any]) -> dict[str, Any]:
    """A rank of ``compare``'s record as measured/predicted bytes and their ratios."""
    predicted = rank["memory_predicted"]
    predicted_states = predicted["params"] + predicted["grads"] + predicted["optimizer"]
    measured_activations = rank["activations_measured"]
    return {
        "rank": rank["rank"],
        "states_measured": sum(rank["states"].values()),
        "states_predicted": predicted_states,
        "activations_measured": measured_activations,
        "activations_predicted": predicted["activations"],
        "transient_predicted": predicted["transient"],
        "peak_measured": rank["peak_measured"],
        "peak_predicted": rank["peak_predicted"],
        "activations_ratio": predicted["activations"] / measured_activations if measured_activations else None,
        "peak_ratio": rank["peak_predicted"] / rank["peak_measured"],
    }


def _failure_reason(stderr: str) -> str:
    """The first exception line (a failed rank prints its own before the launcher's
    "rank failed" follows), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    return ((errors or lines or ["no output"])[0])[:300]


def run_memory_case(config: str, case: MemoryCase, steps: int, out: Path) -> dict[str, Any]:
    """``measure_memory`` in a fresh process: its tracebacks stay out of the table, and a case
    that fails becomes a row saying why."""
    code = ("import json, sys; from pathlib import Path; from launch.bench import measure_memory; "
            "print('RESULT ' + json.dumps(measure_memory(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), "
            "Path(sys.argv[4]))))")
    row: dict[str, Any] = {"layout": case.layout, "recompute": case.recompute, "dtype": case.dtype,
                           "world_size": case.world_size, "run_dir": str(out), "ranks": [], "note": ""}
    argv = [sys.executable, "-c", code, config, json.dumps(list(case.overrides)), str(steps), str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and result:
        row["ranks"] = json.loads(result[-1][len("RESULT "):])
    else:
        row["note"] = f"did not run: {_failure_reason(proc.stderr)}"
    return row


def activation_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layout and dtype: each mode's measured activations over ``none``'s, the largest
    over the ranks (the acceptance: full at most 1/3, selective in between)."""
    by_case = {(r["layout"], r["dtype"], r["recompute"]): r["ranks"] for r in rows if r["ranks"]}
    out = []
    for (layout, dtype, mode), ranks in by_case.items():
        base = by_case.get((layout, dtype, "none"))
        if mode != "none" and base:
            ratio = max(r["activations_measured"] / b["activations_measured"] for r, b in zip(ranks, base))
            out.append({"layout": layout, "dtype": dtype, "recompute": mode, "activations_vs_none": ratio})
    return out


def _memory_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[str]:
    header = (f"{'layout':<22}{'dtype':<10}{'recompute':<11}{'rank':>5}{'st meas':>9}{'st pred':>9}{'act meas':>10}"
              f"{'act pred':>10}{'ratio':>7}{'peak meas':>11}{'peak pred':>11}{'ratio':>7}  (MiB; ratio = predicted / measured)")
    lines = [header, "-" * len(header)]
    for row in rows:
        case = f"{row['layout']:<22}{row['dtype']:<10}{row['recompute']:<11}"
        if not row["ranks"]:
            lines.append(f"{case}{'-':>5}  {row['note']}")
        for r in row["ranks"]:
            act_ratio = f"{r['activations_ratio']:7.3f}" if r["activations_ratio"] is not None else f"{'-':>7}"
            lines.append(f"{case}{r['rank']:>5}{r['states_measured'] / MiB:9.1f}{r['states_predicted'] / MiB:9.1f}"
                         f"{r['activations_measured'] / MiB:10.1f}{r['activations_predicted'] / MiB:10.1f}{act_ratio}"
                         f"{r['peak_measured'] / MiB:11.1f}"
                         f"{r['peak_predicted'] / MiB:11.1f}{r['peak_ratio']:7.3f}")
    lines += [f"{r['layout']} {r['dtype']}: measured activations with {r['recompute']} = "
              f"{r['activations_vs_none']:.3f} of none's" for r in ratios]
    return lines


# -- command line ---------------------------------------------------------------------


def _write(out: Path, payload: dict[str, Any]) -> None:
    """``out`` replaced whole (temporary file + rename): a killed or failed write leaves the
    earlier table, never half of one."""
    from parallel.checkpoint import write_atomic_text

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out, json.dumps(payload, indent=2, default=str))
    print(f"written: {out}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    kernels = sub.add_parser("kernels", help="gating/permute/unpermute: fused vs torch vs megatron-core")
    kernels.add_argument("--shapes", default=None, help=f"T,H,E,K;... (GPU default {DEFAULT_GPU_SHAPES!r})")
    kernels.add_argument("--out", type=Path, default=Path("runs/bench/kernels.json"))
    layer = sub.add_parser("layer", help="moe-train vs megatron-core vs DeepSpeed MoE layer, fwd+bwd")
    layer.add_argument("--tokens", type=int, default=4096)
    layer.add_argument("--hidden", type=int, default=1024)
    layer.add_argument("--ffn", type=int, default=2048)
    layer.add_argument("--experts", type=int, default=8)
    layer.add_argument("--top-k", type=int, default=2)
    layer.add_argument("--capacity-factor", type=float, default=1.25)
    layer.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    layer.add_argument("--out", type=Path, default=Path("runs/bench/layer.json"))
    layouts = sub.add_parser("layouts", help="the training loop under several layouts: step time, tokens/s, peak memory")
    layouts.add_argument("config", help="a YAML config, e.g. configs/tiny.yaml")
    layouts.add_argument("overrides", nargs="*", help="section.key=value applied to every layout")
    layouts.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"moe check-layouts syntax (default {DEFAULT_LAYOUTS!r})")
    layouts.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    layouts.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    layouts.add_argument("--out", type=Path, default=Path("runs/bench/layouts.json"))
    layouts.add_argument("--runs", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    memory = sub.add_parser("memory", help="measured vs predicted memory per rank: layouts x recompute modes x dtypes")
    memory.add_argument("config", help="a YAML config, e.g. configs/tiny.yaml")
    memory.add_argument("overrides", nargs="*", help="section.key=value applied to every case")
    memory.add_argument("--layouts", default="dp=1", help="moe check-layouts syntax (default %(default)r)")
    memory.add_argument("--recompute", default=",".join(RECOMPUTE_MODES), help="train.recompute modes (default %(default)s)")
    memory.add_argument("--dtype", default="float32", help=f"train.dtype values, of {', '.join(DTYPES)} (default %(default)s)")
    memory.add_argument("--steps", type=int, default=2, help="emulated steps per case (step 0 warms up, step 1 is measured)")
    memory.add_argument("--out", type=Path, default=Path("runs/bench/memory.json"))
    memory.add_argument("--runs", type=Path, default=None, help="where the emulations go (default: a temporary directory)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.what == "layouts":
        return _layouts_main(args, device)
    if args.what == "memory":
        return _memory_main(args, device)
    if args.what == "kernels":
        shapes = Shape.parse_many(args.shapes or (DEFAULT_GPU_SHAPES if device.type == "cuda" else DEFAULT_CPU_SHAPES))
        check_output_file(args.out, "--out", "moe bench", _is_bench_result)
        bandwidth, rows = bench_kernels(shapes, device)
        print(f"device: {device_name(device)}; measured copy bandwidth {bandwidth:.1f} GB/s")
        print("\n".join(_kernel_table(rows)))
        _write(args.out, {"device": device_name(device), "copy_gb_per_s": bandwidth, "rows": [asdict(r) for r in rows]})
        return 0
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    spec = LayerSpec(args.tokens, args.hidden, args.ffn, args.experts, args.top_k, args.capacity_factor, dtype)
    check_layer_spec(spec)
    check_output_file(args.out, "--out", "moe bench", _is_bench_result)
    rows = bench_layer(spec)
    print(f"device: {device_name(device)}; {spec}")
    print("\n".join(_layer_table(rows)))
    _write(args.out, {"device": device_name(device), "spec": asdict(spec), "rows": rows})
    return 0


def _layouts_main(args: argparse.Namespace, device: torch.device) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps {args.steps} --warmup {args.warmup}: need at least 1 timed step and no negative warmup")
    check_output_file(args.out, "--out", "moe bench", _is_bench_result)
    with output_dir(args.runs, "bench-layouts-") as runs:
        rows = bench_layouts(args.config, args.overrides, args.layouts, args.steps, args.warmup, runs)
    print(f"device: {device_name(device)}; {args.config} {' '.join(args.overrides)}; "
          f"median of {args.steps} steps after {args.warmup} warmup")
    print("\n".join(_layouts_table(rows)))
    _write(args.out, {"device": device_name(device), "config": args.config, "overrides": args.overrides,
                      "steps": args.steps, "warmup": args.warmup, "rows": rows})
    return 0


def _memory_main(args: argparse.Namespace, device: torch.device) -> int:
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: at least 2 (step 0 warms up, step 1 is measured)")
    modes = parse_choices(args.recompute, "--recompute", RECOMPUTE_MODES)
    dtypes = parse_choices(args.dtype, "--dtype", DTYPES)
    cases = memory_cases(args.config, args.overrides, args.layouts, modes, dtypes, args.steps)
    check_output_file(args.out, "--out", "moe bench", _is_bench_result)
    with output_dir(args.runs, "bench-memory-") as runs:
        run_dirs = [runs / f"{i}-{case.layout}-{case.dtype}-{case.recompute}".replace(",", "_").replace("=", "")
                    for i, case in enumerate(cases)]
        check_runs_dir(runs, run_dirs)
        rows = []
        for i, (case, run_dir) in enumerate(zip(cases, run_dirs)):
            print(f"case {i + 1}/{len(cases)}: {case.layout}, {case.dtype}, recompute {case.recompute}", file=sys.stderr)
            rows.append(run_memory_case(args.config, case, args.steps, run_dir))
    ratios = activation_ratios(rows)
    kind = "CUDA allocator" if device.type == "cuda" else "live CPU tensor bytes (profiler allocator accounting)"
    print(f"device: {device_name(device)}; {args.config} {' '.join(args.overrides)}; step 1 of {args.steps}; {kind}")
    print("\n".join(_memory_table(rows, ratios)))
    _write(args.out, {"device": device_name(device), "config": args.config, "overrides": args.overrides,
                      "steps": args.steps, "measured": kind, "rows": rows, "activation_ratios": ratios})
    return 0
