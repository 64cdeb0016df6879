"""The simulator's outputs: a text table per rank group and a summary, JSON, a PNG breakdown.

A rank group is the ranks of one pipeline stage (they run the same layers); each group's
table has a row per rank (or the group's min/max when it has more than 16 ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parallel.simulator.cluster import ClusterPrediction
from parallel.simulator.predict import Layout, Prediction, RankPrediction

GIB = 2**30


def _row(r: RankPrediction) -> str:
    m, t = r.memory, r.time
    return (f"{r.rank:>5} {m.params / GIB:>8.3f} {m.grads / GIB:>8.3f} {m.optimizer / GIB:>8.3f} "
            f"{m.activations / GIB:>8.3f} {m.peak / GIB:>8.3f} {r.comm.total() / 2**20:>10.2f} "
            f"{sum(t.values()) * 1e3:>10.2f}")


def _recompute_text(layout: Layout) -> str:
    """``train.recompute`` as the layout line names it ("" without recomputation)."""
    if layout.recompute == "none":
        return ""
    layers = "" if layout.recompute_layers is None else f" of {layout.recompute_layers} block(s) per chunk"
    return f", {layout.recompute} recompute{layers}"


def text_report(pred: Prediction, scaled: list[str], comparison: list[str] | None = None) -> str:
    t = pred.layout.topology
    s = pred.summary
    lines = [
        f"layout: tp={t.tp} pp={t.pp} vpp={t.vpp} ep={t.ep} etp={t.etp} dp={t.dp} (edp={t.edp}), world {t.world_size}, "
        f"{t.micro_batches} micro-batches of {pred.layout.micro_batch} x {pred.layout.seq_len} tokens, {pred.layout.dtype}"
        f"{_recompute_text(pred.layout)}; cluster {pred.hardware.name}",
        "scaled by the user: " + (", ".join(scaled) if scaled else "nothing (the config as given)"),
    ]
    header = f"{'rank':>5} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'peak':>8} {'comm MiB':>10} {'step ms':>10}"
    for stage in range(t.pp):
        group = [r for r in pred.ranks if r.coords["pp"] == stage]
        lines += ["", f"pipeline stage {stage} ({len(group)} ranks; memory in GiB)", header]
        shown = group if len(group) <= 16 else [min(group, key=lambda r: r.memory.peak), max(group, key=lambda r: r.memory.peak)]
        lines += [_row(r) for r in shown]
    slow = pred.ranks[s["slowest_rank"]]
    lines += ["", f"slowest rank {slow.rank}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in slow.time.items() if v)]
    lines += ["", "summary:",
              f"  step time        {s['step_time_s'] * 1e3:.2f} ms",
              f"  tokens/s         {s['tokens_per_s']:.0f}",
              f"  MFU              {s['mfu'] * 100:.1f}%",
              f"  peak memory      {s['peak_memory_bytes'] / GIB:.3f} GiB of {s['memory_capacity_bytes'] / GIB:.1f} GiB",
              f"  bottleneck       {s['bottleneck']}",
              f"  expert imbalance {s['expert_imbalance']:.3f} (slowest EP rank's load / mean)"]
    if not s["fits"]:
        worst = max(s["over_capacity"], key=lambda o: o["over_bytes"])
        lines.append(f"  DOES NOT FIT: {len(s['over_capacity'])} rank(s) over capacity; rank {worst['rank']} by "
                     f"{worst['over_bytes'] / GIB:.2f} GiB")
    if comparison:
        lines += ["", "emulation vs prediction:", *comparison]
    return "\n".join(lines)


def write_json(pred: Prediction, path: Path, extra: dict[str, Any]) -> Path:
    path.write_text(json.dumps(pred.to_dict() | extra, indent=2))
    return path


def plot_breakdown(pred: Prediction, path: Path) -> Path:
    """Stacked bars: step time by component and peak memory by kind, per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = pred.ranks if len(pred.ranks) <= 32 else pred.ranks[:: max(1, len(pred.ranks) // 32)]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(len(ranks)))
    bottom = [0.0] * len(ranks)
    for key in ranks[0].time:
        values = [r.time[key] * 1e3 for r in ranks]
        if any(values):
            ax_t.bar(x, values, bottom=bottom, label=key)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax_t.set(title="step time by component", xlabel="rank", ylabel="ms")
    ax_t.legend(fontsize=7)
    bottom = [0.0] * len(ranks)
    for key in ("params", "grads", "optimizer", "activations", "transient"):
        values = [getattr(r.memory, key) / GIB for r in ranks]
        ax_m.bar(x, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    capacity = pred.hardware.memory_capacity / GIB
    if max(bottom) > 0.25 * capacity:  # else the line would flatten the bars
        ax_m.axhline(capacity, color="k", linestyle="--", linewidth=1, label="capacity")
    ax_m.set(title=f"peak memory by kind (capacity {capacity:.0f} GiB)", xlabel="rank", ylabel="GiB")
    ax_m.legend(fontsize=7)
    for ax in (ax_t, ax_m):
        ax.set_xticks(x, [str(r.rank) for r in ranks], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cluster_lines(pred: ClusterPrediction) -> list[str]:
    """The cluster model's prediction of a megatron-core run (``parallel.simulator.cluster``)
    as report lines: step, throughput, memory by kind (fragmentation its own line), the
    step's components."""
    mem = pred.memory
    parts = ", ".join(f"{k} {v:.3g}" for k, v in sorted(pred.breakdown.items(), key=lambda kv: -kv[1]) if v > 0)
    return [
        f"megatron-core bf16 run of this layout (cluster model, {pred.layout.describe()}):",
        f"  step {pred.step_time_s:.3f} s, {pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%}, bottleneck {pred.bottleneck}",
        "  memory per GPU (GiB): " + ", ".join(f"{k} {mem[k] / GIB:.2f}" for k in
                                           ("params", "grads", "optimizer", "activations", "transient", "reserved",
                                            "fragmentation", "peak")) + (" (fits)" if pred.fits else " (DOES NOT FIT)"),
        f"  step (s): {parts}",
    ]
