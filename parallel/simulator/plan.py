"""``moe simulate plan``: the layouts of a model on N GPUs, ranked by predicted step time.

Enumerates every megatron-core layout of ``N = tp·pp·dp`` GPUs that ``cluster.layout_problem``
accepts: tp within a node dividing the attention heads, pp up to the layer count, vpp, ep
dividing the experts and ``tp·dp``, etp = 1, micro-batch sizes, recompute modes, the
hardware file's dispatcher profiles and the all-to-all overlap where megatron-core allows it
(interleaved pipeline or none). Each is predicted by ``cluster.predict_cluster``; those whose
peak memory exceeds the GPU's are dropped, the rest are sorted fastest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe.config import ConfigError, ModelConfig, MoEConfig
from parallel.simulator.cluster import (
    RECOMPUTE_MODES, ClusterLayout, ClusterPrediction, layout_problem, peak_memory, pipeline_slots, predict_cluster,
    require_cluster_fields,
)
from parallel.simulator.hardware import Hardware

MICRO_BATCHES = (1, 2, 4)
VIRTUAL_STAGES = (1, 2, 3, 4, 6, 8)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Plan:
    """What ``plan`` considered: the layouts that fit, fastest first, and how many did not."""

    gpus: int
    considered: int
    too_big: int
    ranked: list[ClusterPrediction]

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "considered": self.considered, "dropped_over_memory": self.too_big,
                "layouts": [p.to_dict() | {"rank": i + 1, "describe": p.layout.describe()}
                            for i, p in enumerate(self.ranked)]}


def candidate_layouts(model: ModelConfig, moe: MoEConfig, hw: Hardware, gpus: int, global_batch: int,
                      dispatchers: list[str]) -> list[ClusterLayout]:
    """Every layout of ``gpus`` GPUs megatron-core accepts for this model (module doc)."""
    out, experts = [], moe.fine_grained().num_experts
    for tp in [d for d in divisors(gpus) if d <= hw.devices_per_node]:
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for vpp in VIRTUAL_STAGES if pp > 1 else (1,):
                for ep in [e for e in divisors(experts) if (tp * dp) % e == 0]:
                    for mbs in MICRO_BATCHES:
                        for recompute in RECOMPUTE_MODES:
                            for dispatcher in dispatchers if ep > 1 else dispatchers[:1]:
                                overlaps = (False, True) if ep > 1 and (pp == 1 or vpp > 1) else (False,)
                                for overlap in overlaps:
                                    layout = _layout(model, tp, pp, vpp, ep, dp, mbs, global_batch, recompute,
                                                     dispatcher, overlap)
                                    if layout and not layout_problem(model, moe, layout, gpus):
                                        out.append(layout)
    return out


def _layout(model: ModelConfig, tp: int, pp: int, vpp: int, ep: int, dp: int, mbs: int, global_batch: int,
            recompute: str, dispatcher: str, overlap: bool) -> ClusterLayout | None:
    """The layout, counting the embedding and the loss as pipeline layers when that is what
    makes the layers divide over the chunks (megatron-core's account_for_*_in_pipeline_split);
    None when neither split is even."""
    chunks = pp * vpp
    for slots in (False, True) if pp > 1 else (False,):
        layout = ClusterLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp, micro_batch=mbs, global_batch=global_batch,
                               seq_len=model.seq_len, recompute=recompute, dispatcher=dispatcher,  # type: ignore[arg-type]
                               overlap_moe_a2a=overlap, embedding_loss_slots=slots)
        if pipeline_slots(model, layout) % chunks == 0:
            return layout
    return None


def plan(model: ModelConfig, moe: MoEConfig, hw: Hardware, gpus: int, global_batch: int,
         dispatcher: str | None = None) -> Plan:
    """Rank the layouts of ``gpus`` GPUs (module doc); a ``ConfigError`` when the cluster is
    too small, the dispatcher is not a profile of ``hw``, or no layout uses ``gpus`` GPUs."""
    if gpus < 1 or gpus > hw.world_size:
        raise ConfigError(f"--gpus {gpus}: cluster '{hw.name}' has {hw.nodes} x {hw.devices_per_node} = "
                          f"{hw.world_size} GPUs; pass 1..{hw.world_size} or raise nodes in the hardware file")
    names = [dispatcher] if dispatcher else sorted(hw.dispatchers)
    for name in names or ["alltoall"]:
        require_cluster_fields(hw, ClusterLayout(dispatcher=name))
    layouts = candidate_layouts(model, moe, hw, gpus, global_batch, names)
    if not layouts:
        raise ConfigError(
            f"--gpus {gpus}: no layout of this model uses {gpus} GPUs with a global batch of {global_batch} "
            f"sequences (tp·pp·dp = {gpus}, tp <= {hw.devices_per_node} dividing {model.n_heads} heads and "
            f"{model.kv_heads} key/value heads, ep dividing {moe.fine_grained().num_experts} experts and tp·dp, "
            "global batch a multiple of micro-batch x dp); pick a GPU count such as a power of two "
            "or change train.batch_size")
    fitting = [layout for layout in layouts if peak_memory(model, moe, layout, hw) <= hw.memory_capacity]
    ranked = sorted((predict_cluster(model, moe, layout, hw) for layout in fitting), key=lambda p: p.step_time_s)
    return Plan(gpus, len(layouts), len(layouts) - len(ranked), ranked)


def plan_table(result: Plan, top: int) -> list[str]:
    """The fastest ``top`` layouts as text lines."""
    lines = [f"{result.considered} layouts of {result.gpus} GPUs considered, {result.too_big} dropped "
             f"(over memory), {len(result.ranked)} fit; fastest first:",
             f"{'#':>4}  {'layout':<72} {'step s':>8} {'tokens/s':>10} {'MFU':>6} {'mem GiB':>8}  bottleneck"]
    for i, p in enumerate(result.ranked[:top]):
        lines.append(f"{i + 1:>4}  {p.layout.describe():<72} {p.step_time_s:>8.2f} {p.tokens_per_s:>10.0f} "
                     f"{p.mfu:>6.1%} {p.peak_memory_bytes / 2**30:>8.1f}  {p.bottleneck}")
    return lines
