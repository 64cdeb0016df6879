"""Sharded, reshardable checkpoints through megatron-core ``dist_checkpointing`` (torch_dist).

Every rank writes its part of one global checkpoint; a checkpoint saved under one layout
(tp, pp, ep, dp, etp) loads under any other, model and optimizer alike::

    run_dir/checkpoints/step-00000200/__0_0.distcp ...   # torch_dist shards (every rank writes)
    run_dir/checkpoints/step-00000200/metadata.json, .metadata, common.pt   # megatron's
    run_dir/checkpoints/step-00000200/manifest.json      # ours: layout, step, config, checksums
    run_dir/checkpoints/step-00000200/COMPLETE           # written last (by rank 0)

The directory machinery (temp dir, rename, ``COMPLETE``, ``latest``, pruning) is
``parallel.checkpoint.write_atomically``: a process killed during a save leaves the
previous checkpoint loadable.

**Keys and shards.** A tensor's key is its parameter's fully-qualified name in the full
model (``blocks.3.ffn.experts.w_in_EDF``). Its global shape and this rank's offset follow
from how the parameter is split: expert parameters (``param.allreduce is False``) hold
experts ``[ep_rank·E/ep, (ep_rank+1)·E/ep)`` along dim 0; tensor-parallel ones
(``tensor_model_parallel=True``) a ``1/tp`` slice (``1/etp`` for experts) along
``partition_dim``. The vocabulary-parallel weights (``embed.weight``, an untied
``lm_head.weight``) hold ``Vp/tp`` rows each, the vocabulary padded to a multiple of tp
(``parallel.tensor_parallel.padded_vocab_size``); only the real rows are stored, so the
global tensor is ``[V, D]`` under every tp: the last TP shard leaves out its padded tail
(an uneven sharding, which megatron hands to torch DCP as such). On load the padded rows,
their Adam moments and master weights come back zero, as at init (they never get a
gradient: padded ids are never looked up and their logits are masked in the loss).
Replica ids come from what the ranks actually hold (an
``all_gather_object`` of (key, offset) descriptors), not from per-layout reasoning: among
the ranks holding the same shard, the ones in the same position of that parameter's
optimizer data-parallel group (``dp`` dense, ``edp`` experts) are numbered by rank; the
first of them with position 0 writes the shard (replica id ``(0, copy, dp_position)``,
all zeros for the writer).

**Optimizer.** megatron's ``DistributedOptimizer`` in its ``fully_reshardable`` format:
each optimizer's data-parallel rank 0 gathers its group's Adam moments and fp32 master
weights and writes them shaped like their parameters, with the parameter's key
(``optimizer.state.exp_avg.<key>``), offset and replica id, so they reshard over dp, ep,
tp and pp like the parameters; on load every rank reads what its parameters cover and
keeps its own slice. On gloo the gather runs over the data-parallel group itself
(megatron's "memory-efficient" variant; the default one gathers on a CUDA device). Only
those tensors are stored; the optimizer's non-tensor state (param groups) is the loading
optimizer's, with Adam's step count restored from the checkpoint (lr and weight decay are
set every step).

**Per-rank extras** (``common.pt``, written by rank 0): step, best validation loss, the
load tracker, the model/moe config, every rank's RNG state (gathered). A load under the
saved layout restores each rank's own RNG state; under another layout every rank takes
rank 0's (the draws per rank depend on the layout anyway).

**Integrity.** Before a checkpoint is published the ranks check that expert shards differ
across expert-parallel positions (``parallel.checkpoint.check_expert_shards``). The
manifest records, per tensor, the CRC-32 of every written shard and a layout-independent
content hash (a wrapping sum over elements of a mix of each element's global index and
bits), and the CRC-32 of every file. On load the files are checked against their CRCs
(the ranks split the files between them) and, once loaded under the new layout, every
model tensor's content hash is recomputed from the shards the ranks now hold and compared
(optimizer tensors are covered by the file CRCs; their content hashes are recorded, so two
checkpoints of one state under different layouts can be compared tensor by tensor).
A model config that differs from the saved one fails before anything is read; a damaged
manifest is a ``CheckpointError`` naming it. Pruning keeps the checkpoint ``latest`` names
(``parallel.checkpoint.write_atomically``).

Legend: E experts; V vocabulary, Vp padded to a multiple of tp, D model dim;
``*_N`` flattened elements.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.checkpoint import (
    COMPLETE_FILE,
    CheckpointError,
    check_expert_shards,
    read_json,
    resolve_checkpoint,
    write_atomically,
)
from parallel.groups import ParallelGroups

MANIFEST_FILE = "manifest.json"
FORMAT = "moe-dist-v1"
# megatron's reshardable optimizer format: model-shaped Adam states keyed by parameter,
# without the chained-optimizer prefix (the dense/expert split of the optimizers may differ
# between layouts).
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# Content hash constants (64-bit odd multipliers; arithmetic wraps in int64).
_K1 = 0x9E3779B97F4A7C15 - (1 << 64)
_K2 = 0xBF58476D1CE4E5B9 - (1 << 64)
# Parameters whose dim 0 is the vocabulary, padded to a multiple of tp under tensor parallelism.
VOCAB_KEYS = ("embed.weight", "lm_head.weight")


@dataclass(frozen=True)
class SavedLayout:
    """The parallel layout a checkpoint was written under."""

    tp: int
    pp: int
    ep: int
    dp: int
    etp: int
    vpp: int
    world_size: int

    @classmethod
    def of(cls, groups: ParallelGroups) -> SavedLayout:
        t = groups.topology
        return cls(t.tp, t.pp, t.ep, t.dp, t.etp, t.vpp, t.world_size)


@dataclass(frozen=True)
class Shard:
    """Where one local parameter sits in its global tensor."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    is_expert: bool
    # A vocabulary-padded parameter's rows of dim 0 to store (its real ones); None: all of it.
    stored_rows: int | None


def is_dist_checkpoint(path: Path) -> bool:
    """Whether a (complete) checkpoint directory is in this format."""
    return (path / MANIFEST_FILE).is_file()


# -- shards and replica ids ---------------------------------------------------------------


def _shard_of(name: str, param: torch.nn.Parameter, groups: ParallelGroups, vocab_size: int) -> Shard:
    """Global shape and offset of ``param``: experts split along dim 0 over ``ep``, TP params
    along ``partition_dim`` over ``tp`` (``etp`` for experts); a vocabulary-padded one
    (``VOCAB_KEYS``) is ``[V, D]``, of which it stores rows ``[offset, min(offset + Vp/tp, V))``."""
    shape, offset = list(param.shape), [0] * param.ndim
    is_expert = getattr(param, "allreduce", True) is False
    if is_expert:
        ep, ep_rank = groups.ep_size, groups.ep_rank
        shape[0], offset[0] = shape[0] * ep, ep_rank * param.shape[0]
    group = groups.etp if is_expert else groups.tp
    if getattr(param, "tensor_model_parallel", False) and group.size() > 1:  # marked but unsplit at size 1
        dim = int(param.partition_dim)
        if is_expert and dim == 0 and groups.ep_size > 1:
            raise CheckpointError(f"{name}: an expert parameter split along dim 0 by both ep and etp has no single offset")
        shape[dim] *= group.size()
        offset[dim] += group.rank() * param.shape[dim]
    stored_rows = None
    if name in VOCAB_KEYS and shape[0] > vocab_size:
        stored_rows = min(param.shape[0], vocab_size - offset[0])
        if stored_rows <= 0:
            raise CheckpointError(
                f"{name}: the vocabulary of {vocab_size} padded to {shape[0]} rows over tp={groups.tp.size()} leaves "
                f"TP rank {groups.tp.rank()} only padding rows, which a checkpoint cannot describe; use a smaller tp"
            )
        shape[0] = vocab_size
    return Shard(name, tuple(shape), tuple(offset), is_expert, stored_rows)


def _checkpoint_key(name: str, tied: bool) -> str:
    """A tied LM head is the embedding: the last pipeline stage's copy (``lm_head.weight``,
    kept equal to the first stage's by the engine) is saved and loaded as ``embed.weight``, a
    replica of it, so that one key serves every pipeline layout (at pp=1 only ``embed.weight``
    exists)."""
    return "embed.weight" if tied and name == "lm_head.weight" else name


def _local_shards(model: torch.nn.Module, groups: ParallelGroups) -> list[tuple[Shard, torch.nn.Parameter]]:
    """Every parameter this rank holds (a tied weight once), with its place."""
    vocab, tied = model.cfg.vocab_size, model.cfg.tie_embeddings
    return [(_shard_of(_checkpoint_key(name, tied), p, groups, vocab), p) for name, p in model.named_parameters()]


def _replica_ids(shards: list[Shard], groups: ParallelGroups) -> dict[str, tuple[int, int, int]]:
    """``(0, copy, dp_position)`` per key: ranks holding the same (key, offset) at the same
    position of the parameter's optimizer data-parallel group are copies, numbered by rank."""
    mine = [(s.key, s.offset, groups.edp_rank if s.is_expert else groups.dp_rank) for s in shards]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    me = dist.get_rank()
    ids: dict[str, tuple[int, int, int]] = {}
    for key, offset, position in mine:
        same = [r for r, held in enumerate(everyone) if (key, offset, position) in held]
        ids[key] = (0, same.index(me), position)
    return ids


def model_sharded_state_dict(model: torch.nn.Module, groups: ParallelGroups) -> tuple[dict[str, Any], dict[str, int]]:
    """``{key: ShardedTensor}`` over this rank's parameters, and the rows to store of each
    vocabulary-padded one (see :func:`_store_real_rows`). The tensors are the parameters
    themselves, whole (megatron's optimizer finds its states through them); a padded one's
    global shape is already the real ``[V, D]``, with no regular grid (uneven shards)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    shards = _local_shards(model, groups)
    replica = _replica_ids([s for s, _ in shards], groups)
    out: dict[str, Any] = {}
    for shard, param in shards:
        even = all(g % l == 0 for g, l in zip(shard.global_shape, param.shape))
        out[shard.key] = ShardedTensor(
            key=shard.key,
            data=param,
            dtype=param.dtype,
            local_shape=tuple(param.shape),
            global_shape=shard.global_shape,
            global_offset=shard.offset,
            axis_fragmentations=tuple(g // l for g, l in zip(shard.global_shape, param.shape)) if even else None,
            replica_id=replica[shard.key],
        )
    return out, {s.key: s.stored_rows for s, _ in shards if s.stored_rows is not None}


def _param_key(key: str) -> str:
    """The parameter a checkpoint key belongs to (``optimizer.state.exp_avg.embed.weight`` -> ``embed.weight``)."""
    return key.split(".", 3)[3] if key.startswith("optimizer.state.") else key


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, leaf) over nested dicts and lists."""
    if isinstance(tree, dict | list):
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            yield from _leaves(v, (*path, k))
    else:
        yield path, tree


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    """The container holding the leaf at ``path``."""
    for k in path[:-1]:
        tree = tree[k]
    return tree


def _store_real_rows(sharded: dict[str, Any], rows: dict[str, int]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Narrow every ShardedTensor of a vocabulary-padded parameter (the parameter and its
    optimizer states) to its first ``rows[key]`` rows, in place; return the path and whole
    local shape of each narrowed one (:func:`_pad_rows` restores them after a load)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    whole: dict[tuple[Any, ...], tuple[int, ...]] = {}
    for path, sh in _leaves(sharded):
        if isinstance(sh, ShardedTensor) and (n := rows.get(_param_key(sh.key))) is not None:
            whole[path] = tuple(sh.local_shape)
            data = sh.data[:n] if sh.data is not None else None
            _parent(sharded, path)[path[-1]] = replace(sh, data=data, local_shape=(n, *sh.local_shape[1:]))
    return whole


def _pad_rows(loaded: dict[str, Any], whole: dict[tuple[Any, ...], tuple[int, ...]]) -> None:
    """Give every loaded narrowed tensor its whole local shape back, zero in the padded rows."""
    for path, shape in whole.items():
        part = _parent(loaded, path)[path[-1]]
        full = torch.zeros(shape, dtype=part.dtype, device=part.device)
        full[: part.shape[0]] = part
        _parent(loaded, path)[path[-1]] = full


# -- checksums ------------------------------------------------------------------------------


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def content_hash(tensor: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> int:
    """This shard's part of its global tensor's layout-independent hash:
    ``Σ_i mix(global_index_i, bits_i)`` mod 2^64, so the parts of any sharding add up to the
    same value."""
    local = tensor.detach().cpu().contiguous()
    index_N = torch.zeros(local.shape, dtype=torch.int64)
    stride = 1
    for dim in reversed(range(local.ndim)):
        coords = torch.arange(local.shape[dim], dtype=torch.int64) + offset[dim]
        view = [1] * local.ndim
        view[dim] = -1
        index_N = index_N + coords.view(view) * stride
        stride *= global_shape[dim]
    bits_N = local.view(torch.int32).to(torch.int64) if local.element_size() == 4 else local.view(torch.int16).to(torch.int64)
    mixed_N = (index_N.reshape(-1) * _K1 + bits_N.reshape(-1)) * _K2
    mixed_N = mixed_N ^ (mixed_N >> 29)
    return int(mixed_N.sum()) % (1 << 64)


def _main_shards(sharded: dict[str, Any]) -> Iterator[Any]:
    """The ShardedTensors this rank writes (replica id all zeros)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and not any(
            (value.replica_id,) if isinstance(value.replica_id, int) else value.replica_id
        ):
            yield value


def _shard_records(sharded: dict[str, Any]) -> list[dict[str, Any]]:
    """CRC-32 of every shard this rank writes (model and optimizer)."""
    records = []
    for sh in _main_shards(sharded):
        records.append({"key": sh.key, "offset": list(sh.global_offset),
                        "shape": list(sh.data.shape), "global_shape": list(sh.global_shape),
                        "dtype": str(sh.dtype).removeprefix("torch."), "crc32": _crc(sh.data)})
    return records


def _content_hashes(sharded: dict[str, Any]) -> dict[str, int]:
    """Every tensor's content hash, summed over the ranks that write its shards."""
    mine: dict[str, int] = {}
    for sh in _main_shards(sharded):
        mine[sh.key] = (mine.get(sh.key, 0) + content_hash(sh.data, sh.global_shape, sh.global_offset)) % (1 << 64)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    total: dict[str, int] = {}
    for hashes in everyone:
        for key, value in hashes.items():
            total[key] = (total.get(key, 0) + value) % (1 << 64)
    return total


# -- optimizer --------------------------------------------------------------------------------


def _init_adam_state(optimizer: Any) -> None:
    """Give every inner Adam the (zero) state it creates lazily at its first step, so a fresh
    optimizer can describe and receive its state."""
    for chained in optimizer.chained_optimizers:
        inner = chained.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if p not in inner.state:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _adam_step(optimizer: Any) -> int:
    steps = {float(s["step"]) for c in optimizer.chained_optimizers for s in c.optimizer.state.values()}
    if len(steps) > 1:
        raise CheckpointError(f"the optimizer's parameter groups disagree on Adam's step count: {sorted(steps)}")
    return int(steps.pop()) if steps else 0


def _sharding(optimizer: Any) -> dict[str, Any]:
    """``SHARDING``; on gloo, megatron's memory-efficient variant, which gathers each
    optimizer's states over its "gloo" data-parallel group on the CPU (the default variant
    gathers on ``torch.cuda.current_device()``). Our groups are gloo groups there, so they
    serve as that group."""
    chained = optimizer.chained_optimizers
    if any(dist.get_backend(c.data_parallel_group) != "gloo" for c in chained):
        return SHARDING
    for c in chained:
        c.data_parallel_group_gloo = c.data_parallel_group
    return {**SHARDING, "distrib_optim_fully_reshardable_mem_efficient": True}


def _holds_params(chained: Any) -> bool:
    """Whether one of the chained optimizers has parameters on this rank. megatron gives
    every rank the same optimizers (it aligns their param groups across all ranks), so a
    pipeline rank whose chunks hold no expert layer (``model.moe_every > 1`` with ``pp``/``vpp``,
    e.g. pp2·vpp2 over 4 layers with MoE in layers 1 and 3: stage 0 runs layers 0 and 2) has
    an expert optimizer with empty param groups, whose ``state_dict`` fails on torch's Adam
    (megatron 0.16.1 asserts that its Adam state holds exactly one step count)."""
    return any(group["params"] for group in chained.optimizer.param_groups)


def _optimizer_parts(engine: Any, model_sd: dict[str, Any], is_loading: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """megatron's sharded optimizer state split into (its ShardedTensors, everything else),
    ``{index in the chain: state}`` over the chained optimizers that hold parameters on this
    rank (``ChainedOptimizer.sharded_state_dict`` per optimizer: with the unprefixed keys of
    ``SHARDING`` the index is no part of any key). An empty one has nothing to save or load;
    its ranks (a pipeline stage's data-parallel group) all skip it, so no collective is
    left unmatched."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    _init_adam_state(engine.optimizer)
    metadata = _sharding(engine.optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        full = {i: c.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
                for i, c in enumerate(engine.optimizer.chained_optimizers) if _holds_params(c)}
    sharded, rest = extract_matching_values(full, lambda v: isinstance(v, ShardedBase))
    return sharded, rest


def _set_step(rest: Any, step: int) -> None:
    """Write Adam's step count into every param group of the optimizer's non-tensor state."""
    if isinstance(rest, dict):
        for key, value in rest.items():
            if key == "param_groups":
                for group in value:
                    group["step"] = step
            else:
                _set_step(value, step)


# -- save ---------------------------------------------------------------------------------------


def _gather(obj: Any) -> list[Any]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def _save_strategy() -> Any:
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def save_dist_checkpoint(
    ckpt_dir: Path,
    step: int,
    engine: Any,
    model: torch.nn.Module,
    groups: ParallelGroups,
    extras: dict[str, Any],
    keep: int,
) -> Path:
    """Every rank of the run writes its shards of model and optimizer into the checkpoint
    of ``step``; rank 0 adds ``extras`` (with every rank's RNG state) and the manifest, and
    publishes once the expert shards are checked. Collective: call on every rank."""
    from megatron.core import dist_checkpointing

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SavedLayout.of(groups)

    def write(tmp: Path) -> None:
        model_sd, rows = model_sharded_state_dict(model, groups)
        opt_sd, _ = _optimizer_parts(engine, model_sd, is_loading=False)
        _store_real_rows({"m": model_sd, "o": opt_sd}, rows)
        rng = _gather({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        common = {**extras, "rng_by_rank": rng, "adam_step": _adam_step(engine.optimizer), "layout": asdict(layout)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            dist_checkpointing.save({"model": model_sd, "optimizer": opt_sd, "extras": common}, str(tmp),
                                    sharded_strategy=_save_strategy())
        experts = [s.key for s, _ in _local_shards(model, groups) if s.is_expert]
        records = _gather({"rank": rank, "ep_rank": groups.ep_rank, "experts": experts,
                           "shards": _shard_records({"m": model_sd, "o": opt_sd})})
        hashes = _content_hashes({"m": model_sd, "o": opt_sd})
        _check_distinct_experts(records)  # every rank judges all ranks' records: all fail alike
        dist.barrier()  # every rank's files are on disk before rank 0 checksums them
        if rank == 0:
            _write_manifest(tmp, step, layout, extras.get("config", {}), records, hashes)

    return write_atomically(ckpt_dir, step, keep, rank, dist.barrier, write, complete=str(world))


def _check_distinct_experts(records: list[dict[str, Any]]) -> None:
    """``check_expert_shards`` over the expert parameters' shards of every rank: a shard
    identical to one at another expert-parallel position means duplicated experts."""
    expert_keys = {key for rec in records for key in rec["experts"]}
    manifests = []
    for rec in records:
        tensors = {s["key"]: {"crc32": s["crc32"]} for s in rec["shards"] if s["key"] in expert_keys}
        manifests.append({"rank": rec["rank"], "shard": {"ep_rank": rec["ep_rank"], "expert_paths": sorted(tensors)},
                          "tensors": tensors})
    check_expert_shards(manifests)


def _write_manifest(tmp: Path, step: int, layout: SavedLayout, config: dict[str, Any],
                    records: list[dict[str, Any]], hashes: dict[str, int]) -> None:
    tensors: dict[str, dict[str, Any]] = {}
    for rec in records:
        for s in rec["shards"]:
            entry = tensors.setdefault(s["key"], {"global_shape": s["global_shape"], "dtype": s["dtype"],
                                                  "content_hash": f"{hashes[s['key']]:016x}", "shards": []})
            entry["shards"].append({"rank": rec["rank"], "offset": s["offset"], "shape": s["shape"], "crc32": s["crc32"]})
    files = {f.name: _file_crc(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    manifest = {"format": FORMAT, "step": step, "layout": asdict(layout), "config": config, "tensors": tensors, "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest))


# -- load ---------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint in this format (a damaged one: ``CheckpointError``).
    megatron's own metadata files (``metadata.json``, ``.metadata``) are covered by the
    manifest's file CRC-32s, checked before a load reads them."""
    if not (path / COMPLETE_FILE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {COMPLETE_FILE} marker; it is not a complete checkpoint")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {MANIFEST_FILE}; it is not a sharded (dist) checkpoint")
    return read_json(file)


def check_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """The model/moe config must be the saved one: one message naming both values."""
    for section in ("model", "moe"):
        for key, value in current[section].items():
            if saved.get(section, {}).get(key) != value:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} was saved with {section}.{key}={saved.get(section, {}).get(key)!r} "
                    f"but the config has {section}.{key}={value!r}; resume with the same model config "
                    f"({section}.{key}={saved.get(section, {}).get(key)!r})"
                )


def verify_files(path: Path, manifest: dict[str, Any], part: int = 0, parts: int = 1) -> None:
    """Check every ``parts``-th file (from ``part``) against its recorded CRC-32."""
    for i, (name, crc) in enumerate(sorted(manifest["files"].items())):
        if i % parts != part:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {name!r}, which its manifest lists; it is incomplete")
        actual = _file_crc(file)
        if actual != crc:
            raise CheckpointError(
                f"checkpoint file {str(file)!r} does not match its recorded CRC-32 ({actual:08x} != {crc:08x}): "
                "the file is corrupt; delete this checkpoint to resume from the previous one"
            )


def _all_ok(error: str | None) -> None:
    """Raise the same error on every rank if any rank found one."""
    errors = [e for e in _gather(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])


def load_dist_checkpoint(path: Path, engine: Any, model: torch.nn.Module, groups: ParallelGroups,
                         config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint of this format under the current layout (any layout) into ``model``
    and ``engine``'s optimizer, after checking the config and the files; return the extras
    (step, best_val, tail_load, ...), with this rank's RNG state restored. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import merge

    manifest = read_manifest(path)
    check_config(path, manifest["config"], config)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        verify_files(path, manifest, rank, world)
        error = None
    except CheckpointError as err:
        error = str(err)
    _all_ok(error)

    model_sd, rows = model_sharded_state_dict(model, groups)
    params = {key: sh.data for key, sh in model_sd.items()}
    opt_sd, opt_rest = _optimizer_parts(engine, model_sd, is_loading=True)
    _store_real_rows(model_sd, rows)
    whole = _store_real_rows(opt_sd, rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, str(path))
    with torch.no_grad():
        for key, sh in model_sd.items():
            if loaded["model"][key] is not sh.data:
                sh.data.copy_(loaded["model"][key])
        for key, n in rows.items():
            params[key][n:].zero_()  # the vocabulary padding, as at init
    _pad_rows(loaded["optimizer"], whole)
    extras = loaded["extras"]
    merge(opt_rest, loaded["optimizer"])
    _set_step(opt_rest, extras["adam_step"])
    _load_optimizer(engine.optimizer, opt_rest)
    _verify_hashes(path, manifest, model_sd)
    same_layout = extras["layout"] == asdict(SavedLayout.of(groups))
    rng = extras["rng_by_rank"][rank if same_layout else 0]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return extras


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    """``ChainedOptimizer.load_state_dict`` over the parts of :func:`_optimizer_parts` (the
    optimizers holding parameters), split in two per optimizer: the non-tensor state,
    then the model-shaped Adam states, loaded while the inner Adam's per-parameter ``step``
    is set aside (megatron 0.16.1 copies every entry of torch Adam's state, ``step``
    included, from the loaded states, which never hold one: a KeyError), then restored as
    one tensor per parameter: megatron gives every parameter the *same* step tensor, which
    torch's foreach AdamW then increments once per parameter (silently wrong bias
    corrections from the second parameter on)."""
    for index, part in state.items():
        opt = optimizer.chained_optimizers[index]
        param_state = part.pop("param_state")
        part.pop("param_state_sharding_type")
        opt.load_state_dict(part)
        inner = opt.optimizer.state
        steps = {p: inner[p].pop("step") for p in inner}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            inner[p]["step"] = step.clone()


def _verify_hashes(path: Path, manifest: dict[str, Any], model_sd: dict[str, Any]) -> None:
    actual = _content_hashes(model_sd)
    for key, value in actual.items():
        recorded = manifest["tensors"].get(key, {}).get("content_hash")
        if recorded != f"{value:016x}":
            raise CheckpointError(
                f"checkpoint {str(path)!r}: tensor {key!r} as loaded does not match its recorded content hash "
                f"({value:016x} != {recorded}); the checkpoint is corrupt or was loaded wrongly"
            )


# -- inspect --------------------------------------------------------------------------------------


def describe_dist_checkpoint(path: Path, verify: bool) -> str:
    """What ``moe ckpt inspect`` prints for this format: layout, step, every tensor (global
    shape, shard count) with its content hash and shard CRC-32s; with ``verify`` every file
    is re-read and checked against its CRC-32."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    lay = manifest["layout"]
    lines = [
        f"checkpoint {path} (sharded, megatron-core dist_checkpointing torch_dist)",
        f"step {manifest['step']}; saved by {lay['world_size']} rank(s): tp={lay['tp']}, pp={lay['pp']}, "
        f"ep={lay['ep']}, dp={lay['dp']}, etp={lay['etp']}, vpp={lay['vpp']}",
        f"{len(manifest['tensors'])} tensors in {len(manifest['files'])} files",
    ]
    if verify:
        verify_files(path, manifest)
        lines.append(f"verified: all {len(manifest['files'])} files match their CRC-32s")
    lines.append(f"{'tensor':<64}{'global shape':<18}{'shards':>7}  {'content hash':<18}shard crc32s")
    for key, entry in sorted(manifest["tensors"].items()):
        shape = str(entry["global_shape"])
        crcs = ",".join(f"{s['crc32']:08x}" for s in entry["shards"])
        lines.append(f"{key:<64}{shape:<18}{len(entry['shards']):>7}  {entry['content_hash']:<18}{crcs}")
    lines.append(f"{'file':<64}crc32")
    lines.extend(f"{name:<64}{crc:08x}" for name, crc in sorted(manifest["files"].items()))
    return "\n".join(lines)

