"""The parallel topology: one object built from the config, validated once.

Dense parts of the model see ``world = tp · pp · dp`` ranks. Expert layers fold the same
ranks differently (megatron-core's expert rank generator): ``world = etp · ep · edp · pp``,
so ``etp · ep`` must divide ``tp · dp`` and ``edp = tp · dp / (etp · ep)`` is the
expert-data-parallel degree over which expert gradients are reduced.

Every rule is checked here, before any process group exists, and each failure is one
``ConfigError`` that prints the values involved and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ConfigError, ModelConfig, MoEConfig
from parallel.config import ParallelConfig


@dataclass(frozen=True)
class BatchShape:
    """The global batch and how each data-parallel rank splits it into micro-batches."""

    global_batch: int
    micro_batch: int


@dataclass(frozen=True)
class Topology:
    """Validated parallel degrees and the quantities derived from them."""

    tp: int
    pp: int
    ep: int
    dp: int
    etp: int
    vpp: int
    edp: int
    world_size: int
    micro_batches: int
    engine: str

    @classmethod
    def build(
        cls,
        parallel: ParallelConfig,
        model: ModelConfig,
        moe: MoEConfig,
        batch: BatchShape,
        world_size: int,
    ) -> Topology:
        """Check every product and divisibility rule; return the topology or raise."""
        _check_world(parallel, world_size)
        _check_experts(parallel, model, moe)
        _check_tensor_parallel(parallel, model, moe)
        _check_pipeline(parallel, model)
        micro_batches = _check_batch(parallel, batch)
        _check_sequence_split(parallel, model, batch)
        _check_engine(parallel)
        return cls(
            tp=parallel.tp,
            pp=parallel.pp,
            ep=parallel.ep,
            dp=parallel.dp,
            etp=parallel.etp,
            vpp=parallel.vpp,
            edp=parallel.tp * parallel.dp // (parallel.etp * parallel.ep),
            world_size=world_size,
            micro_batches=micro_batches,
            engine=parallel.engine,
        )


def _fail(message: str) -> None:
    raise ConfigError(message)


def _check_world(p: ParallelConfig, world_size: int) -> None:
    if p.tp * p.pp * p.dp != world_size:
        _fail(
            f"parallel.tp={p.tp} x parallel.pp={p.pp} x parallel.dp={p.dp} = {p.tp * p.pp * p.dp} ranks, "
            f"but the job has {world_size}; the product must equal the world size "
            f"(e.g. parallel.dp={max(1, world_size // (p.tp * p.pp))} if that divides)"
        )


def _check_experts(p: ParallelConfig, model: ModelConfig, moe: MoEConfig) -> None:
    if p.ep > 1 and model.moe_every == 0:
        _fail(f"parallel.ep={p.ep} with model.moe_every=0: a dense model has no experts to split; set parallel.ep=1")
    if moe.num_experts % p.ep:
        _fail(
            f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}; "
            "each expert-parallel rank must own the same number of experts"
        )
    if (p.tp * p.dp) % (p.etp * p.ep):
        _fail(
            f"parallel.etp={p.etp} x parallel.ep={p.ep} = {p.etp * p.ep} must divide "
            f"parallel.tp={p.tp} x parallel.dp={p.dp} = {p.tp * p.dp} (the ranks of one pipeline stage); "
            "raise parallel.dp or lower parallel.ep"
        )


def _check_tensor_parallel(p: ParallelConfig, model: ModelConfig, moe: MoEConfig) -> None:
    for key, value in (("model.n_heads", model.n_heads), ("model.ffn_dim", model.ffn_dim)):
        if value % p.tp:
            _fail(f"{key}={value} is not divisible by parallel.tp={p.tp}; tensor parallelism splits it evenly")
    if model.kv_heads % p.tp:
        divisors = [d for d in range(1, model.kv_heads + 1) if model.kv_heads % d == 0]
        _fail(
            f"model.n_kv_heads={model.kv_heads} is not divisible by parallel.tp={p.tp}; each tensor-parallel rank "
            f"takes whole key/value groups (their query heads with them): parallel.tp must be one of {divisors}, "
            "or raise model.n_kv_heads"
        )
    if moe.expert_ffn_dim % p.etp:
        _fail(
            f"moe.expert_ffn_dim={moe.expert_ffn_dim} is not divisible by parallel.etp={p.etp}; "
            "expert tensor parallelism splits each expert's hidden width evenly"
        )


def _check_pipeline(p: ParallelConfig, model: ModelConfig) -> None:
    if p.vpp > 1 and p.pp == 1:
        _fail(f"parallel.vpp={p.vpp} needs parallel.pp > 1: virtual stages interleave a real pipeline")
    stages = p.pp * p.vpp
    if model.n_layers % stages:
        _fail(
            f"model.n_layers={model.n_layers} is not divisible by parallel.pp={p.pp} x parallel.vpp={p.vpp} "
            f"= {stages} pipeline chunks; choose degrees whose product divides the layer count"
        )


def _check_batch(p: ParallelConfig, batch: BatchShape) -> int:
    """Return the number of micro-batches each data-parallel rank runs per step."""
    if batch.global_batch % (p.dp * batch.micro_batch):
        _fail(
            f"train.batch_size={batch.global_batch} is not divisible by parallel.dp={p.dp} x "
            f"train.micro_batch_size={batch.micro_batch} = {p.dp * batch.micro_batch}; "
            "every data-parallel rank runs a whole number of micro-batches"
        )
    micro_batches = batch.global_batch // (p.dp * batch.micro_batch)
    if p.pp > 1 and micro_batches < p.pp:
        _fail(
            f"{micro_batches} micro-batches per data-parallel rank (train.batch_size={batch.global_batch} / "
            f"(parallel.dp={p.dp} x train.micro_batch_size={batch.micro_batch})) is fewer than parallel.pp={p.pp} "
            "stages; the pipeline would idle most of the step: lower train.micro_batch_size"
        )
    if p.vpp > 1 and micro_batches % p.pp:
        _fail(
            f"{micro_batches} micro-batches per data-parallel rank is not a multiple of parallel.pp={p.pp}, "
            "which the interleaved schedule (parallel.vpp > 1) requires; adjust train.micro_batch_size"
        )
    return micro_batches


def _check_sequence_split(p: ParallelConfig, model: ModelConfig, batch: BatchShape) -> None:
    """Under tensor parallelism the TP ranks route disjoint sequences through MoE layers
    (and, with sequence parallelism, hold disjoint sequences between TP regions): the
    micro-batch must split into whole sequences per TP rank."""
    if p.tp == 1 or (model.moe_every == 0 and not p.sequence_parallel):
        return
    if batch.micro_batch % p.tp:
        why = "parallel.sequence_parallel=true" if p.sequence_parallel else "MoE layers (model.moe_every > 0)"
        _fail(
            f"a micro-batch of {batch.micro_batch} sequences (train.micro_batch_size, by default train.batch_size / "
            f"parallel.dp) is not divisible by parallel.tp={p.tp}; with {why} each TP rank takes whole sequences of "
            "the micro-batch: make the micro-batch a multiple of parallel.tp"
        )


def _check_engine(p: ParallelConfig) -> None:
    if p.engine == "deepspeed" and (p.tp, p.pp, p.etp, p.vpp) != (1, 1, 1, 1):
        _fail(
            f"parallel.engine='deepspeed' trains ep x dp layouts only, but parallel.tp={p.tp}, pp={p.pp}, "
            f"etp={p.etp}, vpp={p.vpp}; set them to 1 or use parallel.engine=megatron"
        )
