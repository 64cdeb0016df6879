"""``moe simulate calibrate``: measure this machine and write its hardware file.

Measured, each as the median of repeated timings (one thread for the per-core rates, as an
emulated rank of a world of ``cores`` ranks runs). The single-process rates use this
process's CPU time, so that other work on a shared machine does not lower them; the
all-to-all uses wall-clock time (waiting for the peer is part of it):

- matmul FLOP/s: an fp32 ``[1024, 256] @ [256, 768]`` product, forward and backward (the
  shape class of the emulated models' projections); written as ``peak_flops.float32`` per
  core with ``matmul_efficiency: 1`` (it is already an achieved rate); the experts' grouped
  GEMM and causal attention likewise, as ``kernel_efficiency`` shares of it;
- memory bandwidth: bytes read + written by a 64 MiB copy;
- per-operation overhead: a chain of tiny autograd multiplications, forward and backward,
  divided by the number of ATen calls it makes;
- gloo all-to-all between 2 processes on this machine: ``all_to_all_single`` of 4 KiB to
  8 MiB, ``time = latency + bytes_sent / bandwidth`` (alpha-beta): bandwidth from the two
  largest messages, latency from the smallest.
"""

from __future__ import annotations

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


def op_overhead() -> float:
    x = torch.ones(4, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(100):
            y = y * 1.0001
        y.sum().backward()

    return _median_time(chain, 11) / 200  # 100 forward + 100 backward multiplications


def _a2a_worker(rank: int, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    results = []
    for n_bytes in A2A_BYTES:
        x = torch.zeros(2 * n_bytes // 4)  # half of it goes to the peer
        y = torch.empty_like(x)

        def exchange() -> None:
            dist.all_to_all_single(y, x)

        dist.barrier()
        results.append((n_bytes, _median_time(exchange, 9, time.perf_counter)))  # waiting counts here
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def gloo_all_to_all() -> Link:
    """Alpha-beta fit of 2-process gloo all-to-all on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_a2a_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    points = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    # Bandwidth from the two largest messages (their difference cancels the fixed cost);
    # latency from the smallest, minus its transfer time. A least-squares intercept is
    # dominated by the large messages and swings by milliseconds on a loaded machine.
    (b1, t1), (b2, t2) = points[-2], points[-1]
    slope = max(t2 - t1, 1e-12) / (b2 - b1)
    latency = max(points[0][1] - points[0][0] * slope, 0.0)
    return Link(bandwidth=1.0 / slope, latency_s=latency)


def calibrate(out: Path) -> Hardware:
    """Measure, write ``out`` (YAML with the measurement conditions as comments), return it."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    link = gloo_all_to_all()
    hw = Hardware(
        name="this-machine",
        kind="cpu",
        nodes=1,
        devices_per_node=os.cpu_count() or 1,
        peak_flops={"float32": matmul_flops()},
        matmul_efficiency=1.0,
        kernel_efficiency=kernel_efficiency(),
        memory_bandwidth=memory_bandwidth(),
        memory_capacity=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        op_overhead_s=op_overhead(),
        intra_node=link,
        inter_node=link,
        cores=os.cpu_count() or 1,
    )
    header = (
        "# This machine, measured by `moe simulate calibrate` (parallel/simulator/calibrate.py) on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
        f"# Load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (other processes share the cores).\n"
        "# kind cpu: peak_flops is one core's measured fp32 matmul rate; emulated ranks share `cores`.\n"
        "# intra_node/inter_node: 2-process gloo all_to_all_single, alpha-beta fit (bytes/s, seconds).\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(hardware_dict(hw), sort_keys=False))
    return hw
