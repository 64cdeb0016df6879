"""The parallel topology: one object built from the config, validated once.

Dense parts of the model see ``world = tp · pp · dp`` ranks. Expert layers fold the same
ranks differently (megatron-core's expert rank generator): ``world = etp · ep · edp · pp``,
so ``etp · ep`` must divide ``tp · dp`` and ``edp = tp · dp / (etp · ep)`` is the
expert-data-parallel degree over which expert gradients are reduced.

Every rule is checked here, before any process group exists, and each failure is one
``ConfigError`` that prints the values involved and a fix.
"""

from __future__ import annotations

import itertools
import math
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
    first_stage_layers: int | None = None  # layers of the first / last pipeline rank; None = an even share
    last_stage_layers: int | None = None

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
            first_stage_layers=parallel.first_stage_layers,
            last_stage_layers=parallel.last_stage_layers,
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
            f"parallel.tp={p.tp} x parallel.dp={p.dp} = {p.tp * p.dp} (the ranks of one pipeline stage, over "
            f"which the experts are split); set {' or '.join(_expert_split_fixes(p, moe))}"
        )


def _expert_split_fixes(p: ParallelConfig, moe: MoEConfig) -> list[str]:
    """The nearest layouts that satisfy ``etp · ep | tp · dp``: a lower etp or ep (each
    still dividing the expert width, resp. the expert count), or a higher dp (more ranks)."""
    stage = p.tp * p.dp
    fixes = []
    if stage % p.ep == 0:
        etp = max(d for d in range(1, p.etp) if (stage // p.ep) % d == 0 and moe.fine_grained().expert_ffn_dim % d == 0)
        fixes.append(f"parallel.etp={etp}")
    if stage % p.etp == 0:
        ep = max(d for d in range(1, p.ep) if (stage // p.etp) % d == 0 and moe.num_experts % d == 0)
        fixes.append(f"parallel.ep={ep}")
    dp = next(d for d in itertools.count(p.dp + 1) if (p.tp * d) % (p.etp * p.ep) == 0)
    fixes.append(f"parallel.dp={dp} (a world of {p.tp * p.pp * dp} ranks)")
    return fixes


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
    # The width of the experts as built: fine-grained experts are expert_ffn_dim / granularity wide.
    width = moe.fine_grained().expert_ffn_dim
    if width % p.etp:
        key = "moe.expert_ffn_dim" if moe.granularity == 1 else "moe.expert_ffn_dim/moe.granularity"
        _fail(
            f"{key}={width} is not divisible by parallel.etp={p.etp}; "
            "expert tensor parallelism splits each expert's hidden width evenly"
        )


def _check_pipeline(p: ParallelConfig, model: ModelConfig) -> None:
    """Every pipeline rank holds a whole number of layers per virtual stage: ``n_layers/pp``
    each, or ``first_stage_layers`` / ``last_stage_layers`` on the first / last rank and an
    even share of the rest on the others; ``vpp`` divides each rank's count (megatron-core's
    rule for uneven stages: the first/last counts are the whole rank's, over its chunks)."""
    if p.vpp > 1 and p.pp == 1:
        _fail(f"parallel.vpp={p.vpp} needs parallel.pp > 1: virtual stages interleave a real pipeline")
    n = model.n_layers
    ends = {k: v for k, v in (("first_stage_layers", p.first_stage_layers), ("last_stage_layers", p.last_stage_layers))
            if v is not None}
    if not ends:
        stages = p.pp * p.vpp
        if n % stages:
            uneven = _uneven_split(n, p.pp, p.vpp)
            hint = f", or give the first/last stage other sizes: {uneven}" if uneven else ""
            _fail(
                f"model.n_layers={n} is not divisible by parallel.pp={p.pp} x parallel.vpp={p.vpp} "
                f"= {stages} pipeline chunks; choose degrees whose product divides the layer count{hint}"
            )
        return
    named = " + ".join(f"parallel.{k}={v}" for k, v in ends.items())
    if p.pp == 1:
        _fail(f"{named} needs parallel.pp > 1: a single pipeline stage holds all model.n_layers={n} layers; "
              "set it to null")
    for key, value in ends.items():
        if value % p.vpp:
            _fail(
                f"parallel.{key}={value} is not divisible by parallel.vpp={p.vpp}: the stage's layers split evenly "
                f"over its {p.vpp} virtual stages (megatron-core's rule); set parallel.{key}="
                f"{max(p.vpp, value // p.vpp * p.vpp)} or {-(-value // p.vpp) * p.vpp}"
            )
    others = p.pp - len(ends)  # ranks that share the rest evenly
    rest = n - sum(ends.values())
    if others == 0 and rest != 0:
        _fail(
            f"{named} = {n - rest} layers, but model.n_layers={n}: with parallel.pp=2 the two stages hold every "
            f"layer; set parallel.last_stage_layers={n - p.first_stage_layers} or null (the last stage then takes "
            "the rest)"
        )
    if others and rest < others * p.vpp:
        left = f"is more than model.n_layers={n}" if rest < 0 else f"leaves {rest} of model.n_layers={n} layers"
        each = " (one per virtual stage)" if p.vpp > 1 else ""
        _fail(
            f"{named} {left} for the other {others} pipeline stage(s), which need at least {others * p.vpp}{each}; "
            "lower it" + _nearest_ends(n, p, ends)
        )
    if others and rest % (others * p.vpp):
        per = f", a multiple of parallel.vpp={p.vpp}" if p.vpp > 1 else ""
        fixes = _nearest_ends(n, p, ends) or (
            f"; no first/last stage sizes split {n} layers over parallel.pp={p.pp} with parallel.vpp={p.vpp}: "
            "change parallel.vpp or parallel.pp")
        _fail(
            f"the {rest} layers left by {named} (model.n_layers={n}) do not split evenly over the other {others} "
            f"pipeline stage(s); each takes the same number{per}" + fixes
        )


def _ends_split(n: int, pp: int, vpp: int, first: int | None, last: int | None) -> bool:
    """Whether these first/last stage sizes give every rank a whole number of layers per virtual stage."""
    sizes = [v for v in (first, last) if v is not None]
    others, rest = pp - len(sizes), n - sum(sizes)
    if any(v < 1 or v % vpp for v in sizes):
        return False
    return rest == 0 if others == 0 else rest >= others * vpp and rest % (others * vpp) == 0


def _nearest_ends(n: int, p: ParallelConfig, ends: dict[str, int]) -> str:
    """``; e.g. parallel.first_stage_layers=X or ...``: the nearest values of each given end
    (the other held) that split the rest evenly, or ``""`` when none does."""
    fixes = []
    for key, value in ends.items():
        def splits(v: int, key: str = key) -> bool:
            trial = {**ends, key: v}
            return _ends_split(n, p.pp, p.vpp, trial.get("first_stage_layers"), trial.get("last_stage_layers"))
        below = next((v for v in range(value - 1, 0, -1) if splits(v)), None)
        above = next((v for v in range(value + 1, n) if splits(v)), None)
        fixes += [f"parallel.{key}={v}" for v in (below, above) if v is not None]
    return f"; e.g. {' or '.join(fixes)}" if fixes else ""


def _uneven_split(n: int, pp: int, vpp: int) -> str:
    """First/last stage sizes that split ``n`` layers when ``pp·vpp`` does not divide them:
    equal first and last stages no larger than the others (they also hold the embedding and
    the LM head), else a first stage alone; ``""`` when neither exists."""
    for x in range(n // pp // vpp * vpp, 0, -vpp):
        if pp > 2 and _ends_split(n, pp, vpp, x, x):
            return f"parallel.first_stage_layers={x} parallel.last_stage_layers={x} ({(n - 2 * x) // (pp - 2)} on each other stage)"
    for x in range(n // pp // vpp * vpp, 0, -vpp):
        if _ends_split(n, pp, vpp, x, None):
            return f"parallel.first_stage_layers={x} ({(n - x) // (pp - 1)} on each other stage)"
    return ""


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
    """Under tensor parallelism the TP ranks route disjoint tokens through MoE layers (and,
    with sequence parallelism, hold disjoint tokens between TP regions): each takes its
    contiguous 1/tp of the micro-batch's ``B·S`` tokens, so tp must divide them (any
    micro-batch size works when tp divides model.seq_len)."""
    if p.tp == 1 or (model.moe_every == 0 and not p.sequence_parallel):
        return
    tokens = batch.micro_batch * model.seq_len
    if tokens % p.tp:
        why = "parallel.sequence_parallel=true" if p.sequence_parallel else "MoE layers (model.moe_every > 0)"
        micro = p.tp // math.gcd(model.seq_len, p.tp)  # the fewest sequences whose tokens tp divides
        _fail(
            f"a micro-batch of {batch.micro_batch} sequences x model.seq_len={model.seq_len} = {tokens} tokens "
            f"(train.micro_batch_size, by default train.batch_size / parallel.dp) is not divisible by "
            f"parallel.tp={p.tp}; with {why} each TP rank takes 1/tp of the micro-batch's tokens: make "
            f"model.seq_len a multiple of parallel.tp, or train.micro_batch_size a multiple of {micro}"
        )


def _check_engine(p: ParallelConfig) -> None:
    if p.engine == "deepspeed" and (p.tp, p.pp, p.etp, p.vpp) != (1, 1, 1, 1):
        _fail(
            f"parallel.engine='deepspeed' trains ep x dp layouts only, but parallel.tp={p.tp}, pp={p.pp}, "
            f"etp={p.etp}, vpp={p.vpp}; set them to 1 or use parallel.engine=megatron"
        )
