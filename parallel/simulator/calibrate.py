"""``moe simulate calibrate``: measure this machine and write its hardware file.

Measured, each as the median of repeated timings (one thread for the per-core rates, as an
emulated rank of a world of ``cores`` ranks runs). The single-process rates use this
process's CPU time, so that other work on a shared machine does not lower them; the
all-to-all uses wall-clock time (waiting for the peer is part of it):

- matmul FLOP/s: an fp32 ``[1024, 256] @ [256, 768]`` product, forward and backward (the
  shape class of the emulated models' projections), written as ``peak_flops.float32`` per
  core; the experts' grouped GEMM and causal attention likewise, as ``kernel_efficiency``
  shares of it;
- ``matmul_efficiency``: the share of that rate a whole training step achieves. A fixed
  reference model (dense, D=128, 2 layers, 1,024 tokens; not any model a user validates)
  trains a few steps here (forward, backward, AdamW); the efficiency is set so that the
  predictor's single-process step time equals the measured one (smaller projections,
  norms, softmaxes and autograd's bookkeeping all run below the big product's rate);
- memory bandwidth: bytes read + written by a 64 MiB copy;
- per-operation overhead: a chain of tiny autograd multiplications, forward and backward,
  divided by the number of ATen calls it makes;
- gloo all-to-all between 2 processes on this machine: ``all_to_all_single`` of 4 KiB to
  8 MiB, ``time = latency + bytes_sent / bandwidth`` (alpha-beta): bandwidth from the two
  largest messages, latency from the smallest (each size timed in two passes, the faster
  median kept);
- gloo reduce-scatter, all-gather and all-reduce between the same 2 processes, at the
  largest size (a 16 MiB buffer): the bandwidth each achieves under the ring model
  (``(n-1)/n`` of the buffer per rank, twice that for an all-reduce), as a share of the
  all-to-all's at that size (``collective_efficiency``; gloo's reduce-scatter reaches about
  a quarter of it). One size, not a slope between two: a slope is too noisy for
  collectives that cost 5-20 ms.
- synchronisation wait (``sync_wait_s``): W processes each compute a fixed chunk (three
  ``[512, 512]`` products, ~10 ms on a core) and then call a 4 KiB all-to-all, 150 times;
  the wait is the mean time of that call, over calls and ranks, minus its median in a
  tight loop of aligned ranks (the latency above). Ranks that computed the same work
  still arrive apart (scheduling, caches, the other rank's wake-up), and the mean, not
  the median, is what a step pays. W = 2, and W = 2·cores for
  ``sync_wait_oversubscribed_s`` (a peer may be off its core when the call starts).
- the residual stream's own work (``residual_s_per_element``): one RMSNorm and one residual
  add, forward and backward, on ``[2048, 192]`` with its inputs out of cache (a 64 MiB write
  first), median of 21, per element: what a tensor-parallel rank repeats on every token.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from moe.config import ConfigError, ModelConfig, MoEConfig
from parallel.config import ParallelConfig
from parallel.simulator.hardware import Hardware, Link, hardware_dict

A2A_BYTES = [4096, 65536, 524288, 2097152, 8388608]


def _median_time(fn: Callable[[], Any], repeats: int = 7, clock: Callable[[], float] = time.process_time) -> float:
    """Median seconds of ``fn``; by default CPU seconds of this process, which other
    processes on a shared machine do not inflate (they do inflate wall-clock time)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def _train_rate(flops_forward: float, forward: Callable[[], torch.Tensor]) -> float:
    """FLOP/s of a kernel's forward and backward (3x the forward's FLOPs)."""
    def step() -> None:
        forward().sum().backward()

    return 3 * flops_forward / _median_time(step, 11)


def matmul_flops() -> float:
    """A projection ``[1024, 256] @ [256, 768]``, forward and backward."""
    x, w = torch.randn(1024, 256, requires_grad=True), torch.randn(256, 768, requires_grad=True)
    return _train_rate(2 * 1024 * 256 * 768, lambda: x @ w)


def kernel_efficiency() -> dict[str, float]:
    """Forward+backward rates of the other kernels, as shares of the projection's: the
    experts' grouped GEMM (4 experts of 256 rows) and causal attention (``sdpa``)."""
    from moe.experts import grouped_matmul

    base = matmul_flops()
    x = torch.randn(1024, 256, requires_grad=True)
    w = torch.randn(4, 256, 768, requires_grad=True)
    counts = torch.full((4,), 256)
    grouped = _train_rate(2 * 1024 * 256 * 768, lambda: grouped_matmul(x, w, counts))
    q, k, v = (torch.randn(4, 4, 256, 48, requires_grad=True) for _ in range(3))
    attention_flops = 2 * 2 * 4 * 4 * 256 * 256 * 48 / 2  # QK^T and AV, causal half
    attention = _train_rate(attention_flops, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return {"grouped_mm": min(grouped / base, 1.0), "attention": min(attention / base, 1.0)}


def memory_bandwidth() -> float:
    src = torch.empty(16 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src))


RESIDUAL_SHAPE = (2048, 192)  # [T, D]: a micro-batch of configs/tiny.yaml (8 x 256 tokens)
EVICT_BYTES = 64 * 2**20  # more than this machine's caches


def residual_chain() -> float:
    """Seconds per element of ``[T, D]`` of one RMSNorm and one residual add, forward and
    backward (the residual-stream work every tensor-parallel rank repeats), on one core:
    the median of 21 chains, each started with its inputs out of cache (in a training step
    they were written long before)."""
    norm = torch.nn.RMSNorm(RESIDUAL_SHAPE[1], eps=1e-5)
    evict = torch.empty(EVICT_BYTES // 4)
    seconds = []
    for _ in range(21):
        x = torch.randn(RESIDUAL_SHAPE, requires_grad=True)
        y = torch.randn(RESIDUAL_SHAPE, requires_grad=True)
        grad = torch.ones(RESIDUAL_SHAPE)
        evict.fill_(1.0)
        start = time.perf_counter()
        norm(x + y).backward(grad)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / (RESIDUAL_SHAPE[0] * RESIDUAL_SHAPE[1])


def op_overhead() -> float:
    x = torch.ones(4, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(100):
            y = y * 1.0001
        y.sum().backward()

    return _median_time(chain, 11) / 200  # 100 forward + 100 backward multiplications


# Ring traffic per rank of each collective over 2 ranks, per byte of its (full) buffer.
RING_SHARE = {"reduce_scatter": 0.5, "all_gather": 0.5, "all_reduce": 1.0}


def _collectives(n_bytes: int) -> dict[str, Callable[[], Any]]:
    """The collectives timed, each on a buffer of ``n_bytes`` (the all-to-all sends half)."""
    x = torch.zeros(n_bytes // 4)
    y, half = torch.empty_like(x), torch.empty(n_bytes // 8)
    return {
        "all_to_all": lambda: dist.all_to_all_single(y, x),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(half, x),
        "all_gather": lambda: dist.all_gather_into_tensor(y, half),
        "all_reduce": lambda: dist.all_reduce(x),
    }


def _gloo_worker(rank: int, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    # Two passes over the sizes, the faster median of each kept: a pass that ran while the
    # machine was busy (a peer's start-up, another process) is not what the link costs.
    best: dict[tuple[str, int], float] = {}
    for _ in range(2):
        for n_bytes in A2A_BYTES:
            for name, fn in _collectives(2 * n_bytes).items():
                if name != "all_to_all" and n_bytes != A2A_BYTES[-1]:
                    continue
                dist.barrier()
                seconds = _median_time(fn, 9, time.perf_counter)  # waiting counts
                best[(name, n_bytes)] = min(best.get((name, n_bytes), seconds), seconds)
    results: dict[str, list[tuple[int, float]]] = {}
    for (name, n_bytes), seconds in best.items():  # sizes ascending, as first timed
        results.setdefault(name, []).append((n_bytes, seconds))
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


SYNC_CALLS = 150


def _sync_worker(rank: int, world: int, port: int, out: Any) -> None:
    """Mean extra seconds of a small all-to-all reached after computing (module doc)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    x, y = torch.zeros(1024 * world), torch.empty(1024 * world)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    dist.barrier()
    tight = _median_time(lambda: dist.all_to_all_single(y, x), 21, time.perf_counter)
    calls = []
    for _ in range(SYNC_CALLS + 5):
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        dist.all_to_all_single(y, x)
        calls.append(time.perf_counter() - t0)
    wait = torch.tensor([max(statistics.mean(calls[5:]) - tight, 0.0)], dtype=torch.float64)
    dist.all_reduce(wait)
    if rank == 0:
        out.put(wait.item() / world)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(target: Callable[..., None], world: int, *args: Any) -> Any:
    """Run ``target(rank, *args, port, queue)`` in ``world`` spawned processes; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def sync_waits(cores: int) -> tuple[float, float]:
    """(``sync_wait_s`` at 2 ranks, ``sync_wait_oversubscribed_s`` at 2·cores ranks)."""
    return _spawn(_sync_worker, 2, 2), _spawn(_sync_worker, 2 * cores, 2 * cores)


def gloo_collectives() -> tuple[Link, dict[str, float]]:
    """Alpha-beta fit of 2-process gloo all-to-all on this machine, and the other
    collectives' ring bandwidth as shares of it."""
    results = _spawn(_gloo_worker, 2)
    # Bandwidth from the two largest messages (their difference cancels the fixed cost);
    # latency from the smallest, minus its transfer time. A least-squares intercept is
    # dominated by the large messages and swings by milliseconds on a loaded machine.
    points = results["all_to_all"]
    bandwidth = _slope_bandwidth(points[-2:])
    latency = max(points[0][1] - points[0][0] / bandwidth, 0.0)
    # Each collective's ring bytes per second over the all-to-all's, at the largest size.
    _, a2a_seconds = points[-1]
    shares = {k: min(2 * RING_SHARE[k] * a2a_seconds / results[k][0][1], 1.0) for k in RING_SHARE}
    return Link(bandwidth=bandwidth, latency_s=latency), shares


def _slope_bandwidth(points: list[tuple[int, float]]) -> float:
    """Bytes/s from two (bytes sent per rank, seconds) points."""
    (b1, t1), (b2, t2) = points
    return (b2 - b1) / max(t2 - t1, 1e-12)


REFERENCE_MODEL = ModelConfig(vocab_size=257, dim=128, n_layers=2, n_heads=4, seq_len=128, ffn_dim=512, moe_every=0)
REFERENCE_BATCH = 8


def step_efficiency(hw: Hardware) -> float:
    """``matmul_efficiency`` that makes the predicted single-process training step of the
    reference model equal its measured step (CPU seconds, median of 11 after a warm-up)."""
    from moe.model import Transformer
    from parallel.simulator.predict import Layout, predict

    moe = MoEConfig(num_experts=1, top_k=1, normalize_weights=False)
    torch.manual_seed(0)
    net = Transformer(REFERENCE_MODEL, moe)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ids_BS = torch.randint(0, REFERENCE_MODEL.vocab_size, (REFERENCE_BATCH, REFERENCE_MODEL.seq_len))

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        net(ids_BS, ids_BS).lm_loss.backward()
        optimizer.step()

    measured = _median_time(step, 31)
    layout = Layout.build(ParallelConfig(), REFERENCE_MODEL, moe, REFERENCE_BATCH, None, threads=1)
    time_ = predict(REFERENCE_MODEL, moe, layout, hw).ranks[0].time
    rest = sum(time_.values()) - time_["matmul"]
    return min(max(time_["matmul"] / max(measured - rest, 1e-9), 1e-3), 1.0)


def calibrate(out: Path) -> Hardware:
    """Measure, write ``out`` (YAML with the measurement conditions as comments), return it."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    link, collective_shares = gloo_collectives()
    cores = os.cpu_count() or 1
    wait, wait_oversubscribed = sync_waits(cores)
    raw = Hardware(
        name="this-machine",
        kind="cpu",
        nodes=1,
        devices_per_node=cores,
        peak_flops={"float32": matmul_flops()},
        matmul_efficiency=1.0,
        kernel_efficiency=kernel_efficiency(),
        memory_bandwidth=memory_bandwidth(),
        memory_capacity=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        op_overhead_s=op_overhead(),
        intra_node=link,
        inter_node=link,
        cores=cores,
        collective_efficiency=collective_shares,
        sync_wait_s=wait,
        sync_wait_oversubscribed_s=wait_oversubscribed,
        residual_s_per_element=residual_chain(),
    )
    hw = dataclasses.replace(raw, matmul_efficiency=step_efficiency(raw))
    header = (
        "# This machine, measured by `moe simulate calibrate` (parallel/simulator/calibrate.py) on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
        f"# Load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (other processes share the cores).\n"
        "# kind cpu: peak_flops is one core's measured fp32 matmul rate; emulated ranks share `cores`.\n"
        "# matmul_efficiency: the share of it a reference model's whole training step achieves.\n"
        "# intra_node/inter_node: 2-process gloo all_to_all_single, alpha-beta fit (bytes/s, seconds).\n"
        "# collective_efficiency: gloo reduce-scatter/all-gather/all-reduce ring bandwidth over the all-to-all's.\n"
        "# sync_wait_s / sync_wait_oversubscribed_s: mean wait of a small all-to-all reached after computing, 2 and 2*cores ranks.\n"
        "# residual_s_per_element: one RMSNorm + residual add, forward and backward, per element of [2048, 192], one core.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(hardware_dict(hw), sort_keys=False))
    return hw


# -- one GPU of a cluster (``moe simulate calibrate --gpu BASE``) ------------------------
#
# A GPU's per-device numbers, measured with CUDA events in bf16, written over a copy of a
# cluster file BASE (its nodes, links and dispatcher profiles need a cluster to measure):
# the GEMM roofline (``matmul_efficiency``) from ``[m, 4096] @ [4096, 4096]`` for m = 64 ...
# 8192 (small m is memory-bound), the grouped GEMM's share (``torch._grouped_mm`` over 8
# experts), flash attention's share (causal ``scaled_dot_product_attention``, forward and
# backward), ``memory_efficiency`` (a 1 GiB device copy) and ``op_overhead_s`` (a chain of
# tiny kernels). The fitting is plain arithmetic on the timings (CPU-tested on synthetic ones).

GEMM_ROWS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
GEMM_DIM = 4096


@dataclasses.dataclass(frozen=True)
class GemmPoint:
    """One timed bf16 GEMM ``[m, k] @ [k, n]`` (``experts`` of them for a grouped GEMM)."""

    m: int
    n: int
    k: int
    seconds: float
    experts: int = 1


def fit_roofline(points: list[GemmPoint], peak_flops: float, memory_bandwidth: float) -> tuple[float, float]:
    """(efficiency, memory efficiency) of ``cluster.gemm_time``'s roofline
    ``t = max(F / (peak·e), B / (bw·e_mem))`` from timed GEMMs: each point achieves at most
    ``e`` of the peak and at most ``e_mem`` of the bandwidth, with equality for the bound it
    is limited by, so each is the largest share any point achieves."""
    if not points:
        raise ValueError("fit_roofline needs at least one timed GEMM")
    flop_share = [p.experts * 2.0 * p.m * p.n * p.k / p.seconds / peak_flops for p in points]
    byte_share = [p.experts * 2.0 * (p.m * p.k + p.k * p.n + p.m * p.n) / p.seconds / memory_bandwidth for p in points]
    return min(max(flop_share), 1.0), min(max(byte_share), 1.0)


def _cuda_time(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median seconds of ``fn`` on the current CUDA stream (CUDA events, after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_gemm_points() -> list[GemmPoint]:
    w = torch.randn(GEMM_DIM, GEMM_DIM, device="cuda", dtype=torch.bfloat16)
    out = []
    for m in GEMM_ROWS:
        x = torch.randn(m, GEMM_DIM, device="cuda", dtype=torch.bfloat16)
        out.append(GemmPoint(m, GEMM_DIM, GEMM_DIM, _cuda_time(lambda: x @ w)))
    return out


def gpu_grouped_points(experts: int = 8) -> list[GemmPoint]:
    w = torch.randn(experts, GEMM_DIM, GEMM_DIM, device="cuda", dtype=torch.bfloat16)
    out = []
    for m in GEMM_ROWS:
        x = torch.randn(experts * m, GEMM_DIM, device="cuda", dtype=torch.bfloat16)
        offsets = torch.arange(m, experts * m + 1, m, device="cuda", dtype=torch.int32)
        out.append(GemmPoint(m, GEMM_DIM, GEMM_DIM, _cuda_time(lambda: torch._grouped_mm(x, w, offs=offsets)), experts))
    return out


def gpu_attention_flops(seq: int = 4096, heads: int = 32, head_dim: int = 128) -> float:
    """FLOP/s of causal flash attention, forward + backward (``2·S²·H·Dh`` forward FLOPs
    under the mask, backward 2.5x: ``cluster.ATTENTION_BACKWARD``)."""
    from parallel.simulator.cluster import ATTENTION_BACKWARD

    q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return (1 + ATTENTION_BACKWARD) * 2 * seq * seq * heads * head_dim / _cuda_time(step)


def gpu_copy_bandwidth() -> float:
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _cuda_time(lambda: dst.copy_(src))


def gpu_kernel_overhead(kernels: int = 1000) -> float:
    x = torch.zeros(1, device="cuda")

    def chain() -> None:
        for _ in range(kernels):
            x.add_(1)

    return _cuda_time(chain, 5) / kernels


def calibrate_gpu(out: Path, base: Hardware) -> Hardware:
    """Measure this process's GPU (bf16), write ``out`` as ``base`` with the measured
    per-device fields (YAML, the conditions as comments), return it."""
    if not torch.cuda.is_available():
        raise ConfigError("moe simulate calibrate --gpu: no CUDA device here; run it on a node of the cluster")
    peak, bandwidth = base.peak_flops["bfloat16"], base.memory_bandwidth
    efficiency, _ = fit_roofline(gpu_gemm_points(), peak, bandwidth)
    grouped, _ = fit_roofline(gpu_grouped_points(), peak, bandwidth)
    rate = peak * efficiency
    hw = dataclasses.replace(
        base, name=out.stem, matmul_efficiency=efficiency,
        kernel_efficiency={"grouped_mm": min(grouped / efficiency, 1.0),
                           "attention": min(gpu_attention_flops() / rate, 1.0)},
        memory_efficiency=min(gpu_copy_bandwidth() / bandwidth, 1.0), op_overhead_s=gpu_kernel_overhead())
    header = (
        f"# {torch.cuda.get_device_name()}, measured by `moe simulate calibrate --gpu {base.name}` "
        f"(parallel/simulator/calibrate.py) on {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
        "# Measured (bf16, CUDA events, medians): matmul_efficiency, kernel_efficiency, memory_efficiency, op_overhead_s.\n"
        f"# Everything else is {base.name}'s (vendor figures, estimates, the cluster's links and dispatcher profiles).\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(header + yaml.safe_dump(hardware_dict(hw), sort_keys=False))
    os.replace(temporary, out)
    return hw
