"""Will the run fit, and can the model read its data? Checked before any rank starts.

The data (``check_data``): the model's embedding must hold every id of the dataset
(``model.vocab_size`` at least the vocabulary in its meta.json, or of the tokenizer the
embedded corpus is prepared with), and a ``data.path`` dataset must be complete and
prepared with ``data.tokenizer`` when one is named. Found here, a bad pairing is one
error; found inside the ranks, it would be every rank's failure and rank 0's traceback.

The simulator's accounting (``parallel.simulator.predict``) gives every rank's model
states exactly (parameters, gradients, optimizer state: checked byte for byte against
runs in tests/test_simulate.py) and predicts its activations. A layout whose model states
alone exceed the memory its ranks will have cannot run: it is refused, naming the largest
component and the keys that shrink it, instead of ending in an allocator traceback or the
OOM killer minutes later. Where only the predicted peak (states + activations + the
largest transient) exceeds it, the run goes on with a warning: that prediction is not yet
validated on GPU clusters, and refusing a run that fits would be worse than a warning.

The memory the ranks have: on GPU ranks, each device's total memory; on CPU ranks, this
machine's available memory (``MemAvailable``), shared by every rank that runs here. Ranks
on a remote Ray cluster (``launch.address``) are on machines this process cannot see:
only their GPUs are checked, when this machine has the same kind.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.config import Config
from moe.config import ConfigError, ModelConfig
from parallel.simulator.predict import Layout, Memory, rank_coords, rank_params, uniform_memory
from parallel.topology import Topology

MEMINFO = Path("/proc/meminfo")
GIB = 1024**3

# Which keys shrink each kind of parameter (the names ``rank_params`` gives them).
SHRINK = {
    "embedding": "model.vocab_size or model.dim (or raise parallel.tp)",
    "attention": "model.dim, model.head_dim, model.n_kv_heads or model.n_layers (or raise parallel.tp or parallel.pp)",
    "experts": "moe.num_experts or moe.expert_ffn_dim (or raise parallel.ep or parallel.pp)",
    "dense MLP": "model.ffn_dim or model.n_layers (or raise parallel.tp or parallel.pp)",
    "norms and routers": "model.dim or model.n_layers",
}


@dataclass(frozen=True)
class Budget:
    """The bytes available to each rank (``per_rank``) or to all ranks together (``shared``)."""

    what: str
    per_rank: int | None = None
    shared: int | None = None


def _kind(name: str) -> str:
    if "experts" in name or ".shared." in name:
        return "experts"
    if name.startswith(("embed", "lm_head")):
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".ffn.w_" in name:
        return "dense MLP"
    return "norms and routers"


def available_host_bytes() -> int | None:
    """This machine's ``MemAvailable`` (what can be had without swapping), None if unknown."""
    if not MEMINFO.is_file():
        return None
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def budget(cfg: Config, device: torch.device) -> Budget | None:
    """What the ranks' memory is measured against; None when this process cannot know."""
    if device.type == "cuda":
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        return Budget(f"each GPU's {smallest / GIB:.1f} GiB", per_rank=smallest)
    if cfg.launch.address is not None:
        return None
    host = available_host_bytes()
    return None if host is None else Budget(f"this machine's {host / GIB:.1f} GiB available", shared=host)


def _layout(cfg: Config, device: torch.device) -> Layout:
    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    return Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size,
                        "bfloat16" if bf16 else "float32", cfg.train.recompute, cfg.launch.threads,
                        cfg.train.recompute_layers)


def _largest_params(cfg: Config, layout: Layout, stage: int) -> tuple[str, int]:
    """The kind of parameter with the most elements on a rank of ``stage``, and that count."""
    by_kind: dict[str, int] = defaultdict(int)
    for spec in rank_params(cfg.model, cfg.moe, layout, stage):
        by_kind[_kind(spec.name)] += spec.numel
    kind = max(by_kind, key=by_kind.__getitem__)
    return kind, by_kind[kind]


def _refusal(cfg: Config, layout: Layout, rank: int, memory: Memory, need: int, room: Budget) -> ConfigError:
    kind, numel = _largest_params(cfg, layout, rank_coords(layout.topology, rank)["pp"])
    parts = {"parameters": memory.params, "gradients": memory.grads, "optimizer state": memory.optimizer}
    largest = max(parts, key=parts.__getitem__)
    each = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
    world = layout.topology.world_size
    scope = f"rank {rank}'s" if room.per_rank is not None or world == 1 else f"the {world} ranks'"
    return ConfigError(
        f"the model does not fit: {scope} model states alone need {need / GIB:.2f} GiB ({each}; largest: "
        f"{largest}) but there is {room.what}. Its largest part is the {kind} ({numel:,} parameters on "
        f"rank {rank}): lower {SHRINK[kind]}, or spread the states over more ranks (parallel.dp with the "
        f"distributed optimizer)"
    )


def rank_device(cfg: Config) -> torch.device:
    """The ranks' device as far as this machine can tell: CUDA where it has a GPU and the
    config allows one (a driver without a GPU launching onto a remote cluster's GPUs sees
    ``cpu``, and ``budget`` then checks nothing)."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")


def check_memory(cfg: Config, topology: Topology) -> list[Memory]:
    """Refuse (``ConfigError``) a layout whose model states cannot fit; warn on stderr when
    only the predicted peak does not. Returns every rank's prediction."""
    device = rank_device(cfg)
    layout = _layout(cfg, device)
    memories = [uniform_memory(cfg.model, cfg.moe, layout, cfg.parallel.engine, r) for r in range(topology.world_size)]
    room = budget(cfg, device)
    if room is None:
        return memories
    rank = max(range(len(memories)), key=lambda r: memories[r].states)
    if room.per_rank is not None:
        states, peak, limit = memories[rank].states, max(m.peak for m in memories), room.per_rank
    else:
        states, peak, limit = sum(m.states for m in memories), sum(m.peak for m in memories), room.shared
    if states > limit:
        raise _refusal(cfg, layout, rank, memories[rank], states, room)
    if peak > limit:
        print(
            f"warning: the predicted peak memory ({peak / GIB:.2f} GiB: model states {states / GIB:.2f} GiB plus "
            f"activations) exceeds {room.what}; going on, as the activation prediction is not validated on "
            "GPU clusters. Smaller train.micro_batch_size or model.seq_len lower it",
            file=sys.stderr,
        )
    return memories


def check_vocab(model: ModelConfig, data_vocab: int) -> None:
    """Refuse a model whose embedding has fewer rows than the data has ids."""
    if model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the dataset's vocabulary ({data_vocab} ids); "
            f"set model.vocab_size={data_vocab}"
        )


def data_vocab_size(cfg: Config) -> int | None:
    """The number of ids the run's data holds, from what this machine reads without
    preparing anything: ``data.path``'s meta.json (the dataset's files and tokenizer checked
    first, as the ranks will check them: ``ensure_dataset``), else the vocabulary of the
    tokenizer the embedded corpus is prepared with. None when the ranks run on a cluster's
    machines (``launch.address``) and the file is not on this one: they check it there."""
    from launch.data import ByteTokenizer, ensure_dataset, load_hf_tokenizer, read_meta

    data, remote = cfg.data, cfg.launch.address is not None
    if data.path is not None:
        if remote and not Path(data.path).exists():
            return None
        return int(read_meta(ensure_dataset(data))["vocab_size"])
    if data.tokenizer is None:
        return ByteTokenizer.vocab_size
    if remote and not Path(data.tokenizer).exists():
        return None
    return load_hf_tokenizer(data.tokenizer, "data.tokenizer").vocab_size


def check_data(cfg: Config) -> None:
    """Refuse (``ConfigError``, ``DataError``) data the model cannot read, before any rank
    starts: a ``data.path`` that is not a complete dataset prepared with ``data.tokenizer``,
    or a vocabulary larger than ``model.vocab_size``."""
    vocab = data_vocab_size(cfg)
    if vocab is not None:
        check_vocab(cfg.model, vocab)
