"""Process groups, built by megatron-core from a validated :class:`Topology`.

``init_groups`` asks megatron-core's ``parallel_state`` to build every group of the layout
(torch.distributed must already be initialised by the caller) and hands back the ones our
components use in one frozen :class:`ParallelGroups`. Components receive that object; this
module keeps no globals of its own. (megatron-core itself keeps its groups in module
globals of ``parallel_state``: ``destroy_groups`` clears them.)

Which ranks share a group (megatron-core's rank generators, order ``tp-cp-ep-dp-pp``):

- dense parts: ``world = tp · dp · pp``; ``dp`` reduces dense gradients;
- experts: ``world = etp · ep · edp · pp``; ``ep`` exchanges tokens (all-to-all) and
  ``edp`` reduces expert gradients (``edp = tp · dp / (etp · ep)``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist

from parallel.topology import Topology

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one rank, as megatron-core built them.

    ``dp``: data-parallel (dense gradients are averaged over it); ``ep``: expert-model-
    parallel (token all-to-all); ``edp``: expert-data-parallel (expert gradients are
    reduced over it); ``tp``/``pp``: tensor/pipeline-model-parallel; ``etp``: expert-tensor-
    parallel. The remaining groups are what megatron's DDP, distributed optimizer and
    ``finalize_model_grads`` need besides: ``mp`` (tp·pp model-parallel), ``expt_tp_pp``
    (etp·ep·pp), ``dist_opt`` (the ranks of one distributed-optimizer instance, over which
    gradient-norm statistics are summed: every rank, with one instance), ``embd`` and
    ``pos_embd`` (first/last pipeline stage; may be None).
    """

    dp: ProcessGroup
    ep: ProcessGroup
    edp: ProcessGroup
    tp: ProcessGroup
    pp: ProcessGroup
    etp: ProcessGroup
    mp: ProcessGroup
    expt_tp_pp: ProcessGroup
    dist_opt: ProcessGroup
    embd: ProcessGroup | None
    pos_embd: ProcessGroup | None
    ep_rank: int
    dp_rank: int
    edp_rank: int
    topology: Topology

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    @property
    def edp_size(self) -> int:
        return self.edp.size()

    @property
    def ep_size(self) -> int:
        return self.ep.size()


def init_groups(topology: Topology, timeout_minutes: int) -> ParallelGroups:
    """Build megatron-core's process groups for ``topology`` and return ours.

    torch.distributed must be initialised (any backend; gloo on CPU) with
    ``topology.world_size`` ranks. Raises ``RuntimeError`` if it is not, or if megatron's
    groups already exist (call :func:`destroy_groups` first).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_groups: torch.distributed is not initialised; call init_process_group first")
    if dist.get_world_size() != topology.world_size:
        raise RuntimeError(
            f"init_groups: the topology needs {topology.world_size} ranks "
            f"(tp={topology.tp} x pp={topology.pp} x dp={topology.dp}) but torch.distributed has "
            f"{dist.get_world_size()}"
        )
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        raise RuntimeError("init_groups: megatron-core's process groups already exist; call destroy_groups() first")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        virtual_pipeline_model_parallel_size=topology.vpp if topology.vpp > 1 else None,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    groups = ParallelGroups(
        dp=ps.get_data_parallel_group(),
        ep=ps.get_expert_model_parallel_group(),
        edp=ps.get_expert_data_parallel_group(),
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(),
        mp=ps.get_model_parallel_group(),
        expt_tp_pp=ps.get_expert_tensor_model_pipeline_parallel_group(),
        dist_opt=ps.get_intra_distributed_optimizer_instance_group(),
        embd=ps.get_embedding_group(check_initialized=False),
        pos_embd=ps.get_position_embedding_group(check_initialized=False),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        topology=topology,
    )
    _check_sizes(groups, topology)
    return groups


def _check_sizes(groups: ParallelGroups, topology: Topology) -> None:
    """megatron's groups must have the degrees the topology validated."""
    expected = {"dp": topology.dp, "ep": topology.ep, "edp": topology.edp, "tp": topology.tp, "pp": topology.pp, "etp": topology.etp}
    actual = {name: getattr(groups, name).size() for name in expected}
    if actual != expected:
        raise RuntimeError(f"megatron-core built groups of sizes {actual}, the topology expects {expected}")


def destroy_groups() -> None:
    """Drop megatron-core's process-group state (``parallel_state.destroy_model_parallel``)
    and destroy every process group but the default one.

    megatron-core 0.16.1 forgets its groups without destroying them (except its gloo data-
    parallel copies), and each gloo group keeps its own threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``) and sockets: a process that builds layouts repeatedly (the restart
    loop, the harness, the test pool) would otherwise gather thousands of them. There is no
    public list of groups; ``_world.pg_map`` is where torch (and megatron itself) finds them.
    """
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    default = dist.GroupMember.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)
    deepspeed_groups = sys.modules.get("deepspeed.utils.groups")
    if deepspeed_groups is not None:
        # DeepSpeed caches groups in module globals (its world clone, expert groups, mpu) and
        # would hand the destroyed ones to its next engine; ``group=None`` forgets them all.
        deepspeed_groups._release_process_group_references(group=None)
