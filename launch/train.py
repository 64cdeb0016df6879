"""The training loop, one code path for every layout.

Each rank runs ``Run``: it takes its data-parallel slice of the global batch (the batch of
step s is a pure function of (seed, s), identical on every rank), runs its micro-batches
through an engine (``LocalEngine`` in one process, ``MegatronEngine`` across ranks) and
reduces metrics over the data-parallel group. Rank 0 writes the outputs.

Everything a run writes lives under its run directory::

    run_dir/config.yaml          the resolved config
    run_dir/metrics.jsonl        one record per log interval ("train") and validation ("val")
    run_dir/tensorboard/         the same scalars for TensorBoard
    run_dir/checkpoints/         atomic checkpoints (see parallel/checkpoint.py)
    run_dir/summary.json         final figures
    run_dir/loss_curve.png, run_dir/expert_load.png

A run directory holds one run (``claimed_run_dir``, entered by ``launch.local_launcher.start``
for every layout): a new run is refused where another run's outputs are, and a run that
fails before it recorded anything removes the outputs it made (and the directory, if it
made it), so the retry is not refused in turn.

Resuming is bit-exact: the batch of step s is a pure function of (seed, s), and a
checkpoint holds the model, the optimizer, the RNG state and the load statistics, so
the loss at step k+1 after resuming from step k equals the uninterrupted run's. A resume
continues the same run: the config may differ from the checkpoint's only in
``RESUMABLE_KEYS`` (and the layout, for reshardable checkpoints).

Non-finite training stops: before each update every rank checks the step's losses and
its local gradients, and the ranks agree (an all-reduce of the flags) whether the step is
non-finite. Such a step applies no update; up to ``train.max_nonfinite_steps`` of them are
skipped, the next one stops the run with ``NonFiniteStop``, as does a non-finite
validation loss, or non-finite weights before a save: a checkpoint never holds them, and
``latest`` stays the last finite one.

Legend: B batch, S sequence, L MoE layers, E experts.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from tqdm import tqdm

import torch.distributed as dist
from torch import nn

from launch.ckpt.full_state import ModelState, piece_of
from launch.ckpt.init_from import read_initial_weights
from launch.config import Config, TrainConfig, to_dict
from launch.data import TokenStream, ensure_dataset, load_split
from launch.dirlock import LOCK_FILE, held_directory
from launch.memory import memory_kind, peak_memory_per_rank
from launch.metrics import METRICS_FILE, CollapseAlarm, MetricsLog, NullLog, read_metrics, to_json, truncate_after
from launch.plots import plot_expert_load, plot_loss_curve
from launch.rank import NonFiniteStop
from moe.accounting import param_counts, train_flops_per_token
from moe.config import ConfigError
from moe.model import Transformer, build_streamed
from moe.noisy_router import set_noise_step
from moe.recompute import apply_recompute
from moe.router import update_expert_bias
from parallel.checkpoint import (
    CheckpointError,
    ShardInfo,
    latest_checkpoint,
    load_checkpoint,
    read_manifests,
    save_checkpoint,
    write_atomic_text,
)
from parallel.engine import OptimSettings
from parallel.expert_parallel import apply_expert_parallel
from parallel.simulator.routing import RoutingRecorder, truncate_routing
from parallel.tensor_parallel import apply_tensor_parallel, check_whole_sequences
from parallel.local_engine import LocalEngine
from parallel.reduce import mean_over, sum_over
from parallel.topology import BatchShape, Topology

# What a run writes into its run directory. A directory holding any of these holds a run:
# a new run is refused there. The launchers' ``logs/`` (and a local Ray cluster's ``ray/``)
# are not run outputs: they explain a failed start, and every attempt appends to them.
RUN_OUTPUTS = ("config.yaml", METRICS_FILE, "summary.json", "checkpoints", "tensorboard", "routing",
               "loss_curve.png", "expert_load.png")
# The keys a resume may change (why these: ``config_changes``).
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.micro_batch_size", "train.device", "train.log_every", "train.eval_every",
    "train.ckpt_every", "train.keep_checkpoints", "train.run_dir", "train.resume", "train.peak_tflops",
    "train.record_routing", "train.max_nonfinite_steps", "train.recompute", "train.recompute_layers",
    "train.collapse_share", "train.collapse_intervals", "data.path", "data.cache_dir",
})
RESUMABLE_SECTIONS = ("launch",)
LAYOUT_SECTION = "parallel"


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda': no CUDA device is visible; use train.device=cpu or auto")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The parameters' and activations' dtype: ``train.dtype``, where ``auto`` is bf16 on a
    GPU and fp32 on the CPU. In bf16 the engine keeps fp32 master weights, fp32 gradient
    accumulation and fp32 Adam state (no autocast: the parameters themselves are bf16); the
    router and the losses compute in fp32 whatever the dtype."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else torch.float32


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` updates, then cosine from ``lr`` to ``min_lr_ratio·lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def check_layout(cfg: Config) -> Topology:
    """Validate the layout against the model and batch, then refuse what this loop cannot
    run (yet) rather than run it wrong: with the DeepSpeed engine a single process (it trains
    with the local engine, and has no process group for DeepSpeed) and ZeRO stages 0 and 3
    (see ``parallel.deepspeed_engine.check_zero_stage``)."""
    # No micro_batch_size: each data-parallel rank runs its share of the batch at once.
    per_rank = max(1, cfg.train.batch_size // cfg.parallel.dp)
    batch = BatchShape(cfg.train.batch_size, cfg.train.micro_batch_size or per_rank)
    topology = Topology.build(cfg.parallel, cfg.model, cfg.moe, batch, world_size=cfg.parallel.world_size)
    check_recompute_layers(cfg.train, topology, cfg.model.n_layers)
    check_whole_sequences(cfg.moe, cfg.parallel.tp, batch.micro_batch)
    p = cfg.parallel
    if p.engine == "deepspeed":
        if p.is_single_process:
            raise ConfigError(
                "parallel.engine=deepspeed with parallel.dp=1: one process trains with the local engine (torch "
                "AdamW, no process group), and ZeRO over a world of one would partition nothing; set "
                "parallel.dp >= 2, or parallel.engine=megatron for a single process"
            )
        from parallel.deepspeed_engine import check_zero_stage

        check_zero_stage(p.zero_stage)
        if cfg.train.max_nonfinite_steps:
            raise ConfigError(
                f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps} with parallel.engine=deepspeed: ZeRO "
                "reduces gradients during the backward, so a step cannot be skipped once it ran (DeepSpeed's own "
                "overflow check fails it); set train.max_nonfinite_steps=0, or parallel.engine=megatron to skip steps"
            )
    return topology


def check_recompute_layers(cfg: TrainConfig, topology: Topology, n_layers: int) -> None:
    """Refuse a ``train.recompute_layers`` larger than every pipeline chunk: it counts the
    blocks recomputed at the start of each chunk (a chunk with fewer recomputes all of its
    own, as megatron-core's ``block`` method does on uneven stages)."""
    from parallel.pipeline import layers_per_rank

    if cfg.recompute_layers is None:
        return
    t = topology
    largest = max(layers_per_rank(n_layers, t.pp, t.first_stage_layers, t.last_stage_layers)) // t.vpp
    if cfg.recompute_layers > largest:
        where = "the model" if t.pp == 1 else f"the largest pipeline chunk (pp={t.pp}, vpp={t.vpp})"
        raise ConfigError(
            f"train.recompute_layers={cfg.recompute_layers}: {where} holds {largest} block(s); set "
            f"train.recompute_layers to at most {largest}, or null to recompute every block"
        )


def resolve_run_dir(cfg: TrainConfig, config_name: str) -> Path:
    """``train.run_dir``, else ``runs/<config>-<timestamp>``; to resume without a run_dir,
    the newest ``runs/<config>-*`` that holds a checkpoint."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    if cfg.resume:
        candidates = sorted(p for p in Path("runs").glob(f"{config_name}-*") if latest_checkpoint(p / "checkpoints"))
        if not candidates:
            raise ConfigError(
                f"train.resume=true: no run of config '{config_name}' with a checkpoint under runs/; "
                "name one with train.run_dir=PATH"
            )
        return candidates[-1]
    return Path("runs") / f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def config_changes(saved: dict[str, Any], current: dict[str, Any], reshardable: bool) -> list[str]:
    """Each key a resume may not change whose value differs from the checkpoint's, as
    "KEY=SAVED but the config has KEY=NOW".

    A resume continues the same run, so what defines the run stays: the model (model.*,
    moe.*), the optimizer and its schedule (train.lr, min_lr_ratio, warmup_steps,
    weight_decay, beta1, beta2, grad_clip), the batch and its order (train.batch_size,
    train.seed), the numerics (train.dtype), the data split and the validation set
    (data.val_fraction, data.val_tokens). A resume may change (``RESUMABLE_KEYS``,
    ``RESUMABLE_SECTIONS``): how long the run goes on (train.steps; the cosine schedule then
    spans the new total), how a batch is split into micro-batches (train.micro_batch_size),
    the device (train.device), what it logs and keeps (train.log_every, eval_every,
    ckpt_every, keep_checkpoints, peak_tflops, record_routing), where its files are
    (train.run_dir, train.resume; data.path and data.cache_dir, for the same data moved),
    how many non-finite steps it may skip (train.max_nonfinite_steps), what it recomputes
    in the backward (train.recompute, recompute_layers: the same numbers), and how it is
    launched (every launch.* key). With a ``reshardable`` checkpoint (megatron's sharded
    format, ``parallel/dist_checkpoint.py``) the layout (every parallel.* key) may change
    too; a per-rank checkpoint loads under the layout that saved it only.

    Keys the checkpoint did not record (added since it was saved; checkpoints from before
    this check recorded model.* and moe.* only) are not compared."""
    changes = []
    for section, values in current.items():
        if section in RESUMABLE_SECTIONS or (reshardable and section == LAYOUT_SECTION):
            continue
        recorded = saved.get(section, {})
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_KEYS and key in recorded and recorded[key] != value:
                changes.append(f"{name}={recorded[key]!r} but the config has {name}={value!r}")
    return changes


def check_resume_config(path: Path, saved: dict[str, Any], cfg: Config, reshardable: bool) -> None:
    """Refuse to resume from the checkpoint at ``path`` (saved under config ``saved``) under
    a config that makes it another run; name every changed key."""
    changes = config_changes(saved, to_dict(cfg), reshardable)
    if changes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved with {'; '.join(changes)}. A resume continues the same run: set "
            "the saved value(s), or start a new run in another train.run_dir (without train.resume)"
        )


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resume in ``run_dir`` starts from: its latest complete one."""
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise CheckpointError(
            f"train.resume=true but {str(run_dir / 'checkpoints')!r} holds no complete checkpoint; name the run "
            "that has one with train.run_dir, or start a new run without train.resume=true"
        )
    return found


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Refuse a resume in ``run_dir`` that has no checkpoint, or whose checkpoint's config
    (read from its manifest: no state is loaded) makes ``cfg`` another run."""
    from parallel.dist_checkpoint import is_dist_checkpoint, read_manifest

    found = resume_checkpoint(run_dir)
    reshardable = is_dist_checkpoint(found)
    manifests = [read_manifest(found)] if reshardable else read_manifests(found)
    check_resume_config(found, manifests[0].get("config", {}) if manifests else {}, cfg, reshardable)


def _refuse_reuse(run_dir: Path) -> None:
    held = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if held:
        raise ConfigError(
            f"train.run_dir={str(run_dir)!r} already holds a run ({', '.join(held)}); a run directory holds one run: "
            "continue that run with train.resume=true, or start this one in another train.run_dir"
        )


def _make_run_dir(run_dir: Path) -> Path | None:
    """Create ``run_dir`` (and its missing parents) and check that a file can be written
    there; return the outermost directory this created (None: ``run_dir`` existed)."""
    created = next((d for d in reversed((run_dir, *run_dir.parents)) if not d.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        blocking = next((d for d in (run_dir, *run_dir.parents) if d.exists()), None)
        why = f"{str(blocking)!r} is a file" if blocking is not None and not blocking.is_dir() else err.strerror
        raise ConfigError(
            f"train.run_dir={str(run_dir)!r} cannot hold a run ({why}); set train.run_dir to a directory "
            "this user can create and write"
        ) from None
    return created


def _has_records(run_dir: Path) -> bool:
    """Whether a run recorded anything: a metrics record or a complete checkpoint."""
    metrics = run_dir / METRICS_FILE
    return (metrics.is_file() and metrics.stat().st_size > 0) or latest_checkpoint(run_dir / "checkpoints") is not None


def _discard_outputs(run_dir: Path, created: Path | None) -> None:
    """Remove the run outputs in ``run_dir``, then the directories up to ``created`` that
    this left empty."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    (run_dir / LOCK_FILE).unlink(missing_ok=True)  # the hold's file too (it would keep the directory)
    if created is None:
        return
    for directory in (run_dir, *run_dir.parents):
        try:
            directory.rmdir()
        except OSError:  # not empty: the launchers' logs of the failed start stay
            return
        if directory == created:
            return


@contextmanager
def claimed_run_dir(run_dir: Path, resume: bool) -> Iterator[None]:
    """Hold ``run_dir`` for the run in the block, which starts a new run there or (``resume``)
    continues the one there. Refused, before anything is written, when another moe command
    holds the directory, a new run would share it with another run's outputs, or it cannot
    be created and written (``ConfigError``). A new run that fails before it recorded
    anything (a metrics record or a checkpoint) removes its outputs and the directories it
    made: a run directory is never left half-made, and the retry is not refused."""
    if not resume:
        _refuse_reuse(run_dir)  # first without writing anything: a refused start leaves the directory as it was
    created = _make_run_dir(run_dir)
    # Held for the whole run (``launch.dirlock``): a second command in this directory, even
    # a resume of this run, is refused while this one runs; the reuse check below runs
    # under the hold, so two new runs started at once cannot both pass it.
    with held_directory(run_dir, "train.run_dir"):
        if not resume:
            _refuse_reuse(run_dir)
        try:
            yield
        except BaseException:
            if not resume and not _has_records(run_dir):
                _discard_outputs(run_dir, created)
            raise


@dataclass
class LoadTracker:
    """Routed assignments per (MoE layer, expert), summed over a window of steps."""

    counts_LE: torch.Tensor

    @classmethod
    def zeros(cls, n_layers: int, n_experts: int) -> LoadTracker:
        return cls(torch.zeros(n_layers, n_experts, dtype=torch.float64))

    def add(self, counts_LE: torch.Tensor) -> None:
        self.counts_LE += counts_LE.to(self.counts_LE)

    def shares_LE(self) -> np.ndarray:
        totals_L1 = self.counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
        return (self.counts_LE / totals_L1).numpy()


@dataclass
class Interval:
    """Sums over the steps since the last train record. A skipped (non-finite) step counts
    in ``steps`` and ``skipped`` but not in the sums: the means are over the steps that
    updated the model (None when every step was skipped)."""

    steps: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, float], skipped: bool) -> None:
        self.steps += 1
        self.skipped += skipped
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + (0.0 if skipped else value)

    def means(self) -> dict[str, float | None]:
        counted = self.steps - self.skipped
        return {key: value / counted if counted else None for key, value in self.sums.items()}


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: its rank, and megatron's groups when there are several."""

    rank: int = 0
    world_size: int = 1
    groups: Any = None  # parallel.groups.ParallelGroups when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.groups is None else self.groups.dp

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return None if self.groups is None else self.groups.tp

    @property
    def dp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.dp_rank

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class Run:
    """One training run on one rank: model, engine, data and the bookkeeping around them."""

    def __init__(self, cfg: Config, config_name: str, info: RankInfo = RankInfo()) -> None:
        self.topology = check_layout(cfg)
        self.info = info
        self.cfg = cfg
        self.tcfg = cfg.train
        self.device = resolve_device(cfg.train)
        # A resume takes the weights from its own checkpoint; a fresh run may start from init_from's.
        init_state = (read_initial_weights(cfg.train.init_from, cfg.model, cfg.moe)
                      if cfg.train.init_from and not cfg.train.resume else None)
        if cfg.launch.threads is not None:
            torch.set_num_threads(cfg.launch.threads)
        data_dir = ensure_dataset(cfg.data)
        self.train_stream = load_split(data_dir, "train")
        self.val_stream = load_split(data_dir, "val")
        self._check_vocab(self.train_stream)
        self.run_dir = resolve_run_dir(cfg.train, config_name)

        torch.manual_seed(cfg.train.seed)
        # This rank's pieces of the model, on the CPU, each expert-sharded as soon as it is
        # built (the single-process model's values: same seed on every rank).
        self.net = build_streamed(cfg.model, cfg.moe, self._holds_piece, partial(self._finish_piece, init_state))
        # Tensor parallelism after expert parallelism: EP replaces the expert parameters, and
        # TP sets the marks (allreduce, tensor_model_parallel, partition_dim, sequence_parallel)
        # that the engine and the checkpoint read on the final parameter objects.
        if self.topology.tp > 1 or self.topology.etp > 1:
            apply_tensor_parallel(self.net, info.groups, cfg.parallel.sequence_parallel)
        self.n_moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
        self.chunks = self._stage_chunks()  # this rank's chunks of self.net when pp > 1
        # To the device only now, sharded: a GPU never holds more than its shard (Qwen3-30B-A3B's
        # whole model is 122 GB in fp32). The chunks hold their own references to the RoPE tables.
        for module in (self.net, *self.chunks):
            module.to(self.device)
        # Recomputation last: it marks the final modules (EP and TP replace some) and counts
        # train.recompute_layers per pipeline chunk (after the split).
        for chunk in self.chunks:
            apply_recompute(chunk, cfg.train.recompute, cfg.train.recompute_layers)
        # Learned routers' weights (hash routers have none): their gradient norm is logged.
        self.routers = [w for chunk in self.chunks for layer in chunk.moe_layers() for w in layer.router.parameters()]
        # Sigmoid routers with aux-loss-free balancing: (global MoE layer index, router) of this rank's layers.
        self.bias_routers = [] if cfg.moe.expert_bias_update_rate == 0 else [
            (chunk.moe_layer_index(name), block.ffn.router)
            for chunk in self.chunks for name, block in chunk.blocks.items() if chunk.cfg.is_moe_layer(int(name))
        ]
        self.engine = self._make_engine()
        self.model = self.engine.module
        self.pipeline = self._make_pipeline()
        n_moe, n_exp = self.n_moe_layers, cfg.moe.routed_experts
        self.tail_start = cfg.train.steps - max(1, cfg.train.steps // 10)
        self.tail_load = LoadTracker.zeros(n_moe, n_exp)
        # The live collapse alarm over the log intervals (launch.metrics.CollapseAlarm).
        self.alarm = CollapseAlarm(cfg.train.collapse_share or 1.0 / (4 * n_exp), cfg.train.collapse_intervals)
        self.step = 0
        self.best_val = math.inf
        self.nonfinite_steps = 0  # skipped so far (train.max_nonfinite_steps), kept in checkpoints
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.moe)
        self.local_batch = cfg.train.batch_size // self.topology.dp
        self.val_batches = self.make_val_batches(self.val_stream)

    def make_val_batches(self, stream: TokenStream) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows of ``stream``'s fixed validation windows (``TokenStream.val_batches``,
        ``data.val_tokens`` targets): each batch holds one micro-batch per data-parallel rank, and
        a smaller last batch is dropped. ``moe eval`` calls it on the stream it evaluates."""
        micro = self.local_batch // self.topology.micro_batches
        val = stream.val_batches(micro * self.topology.dp, self.cfg.model.seq_len, self.cfg.data.val_tokens)
        return [(x[self._dp_rows(micro)], y[self._dp_rows(micro)]) for x, y in val if len(x) == len(val[0][0])]

    def _make_engine(self) -> Any:
        optim = OptimSettings.from_train(self.tcfg)
        dtype = train_dtype(self.tcfg, self.device)
        if self.info.groups is None:
            return LocalEngine(self.net, optim, dtype)
        if self.cfg.parallel.engine == "deepspeed":
            from parallel.deepspeed_engine import DeepSpeedEngine

            p = self.cfg.parallel
            # The routers' gradients are watched: _router_grad_norm reads them before ZeRO-2 frees them.
            return DeepSpeedEngine(self.net, self.info.groups, optim, p.zero_stage, p.offload_optimizer, self.routers,
                                   dtype)
        from parallel.engine import MegatronEngine

        if self.topology.pp > 1:
            from parallel.pipeline import pipeline_config

            t = self.topology
            config = pipeline_config(self.cfg.model, t.pp, t.vpp, t.tp, t.first_stage_layers, t.last_stage_layers)
            config.pipeline_dtype = dtype  # the activations the stages exchange: the parameters' dtype
            return MegatronEngine(self.chunks, self.info.groups, optim, config, dtype)
        return MegatronEngine(self.net, self.info.groups, optim, dtype=dtype)

    def _holds_piece(self, name: str) -> bool:
        """Whether this rank keeps the model piece ``name`` (``moe.model.model_pieces``): its
        pipeline stages' blocks; the embedding on the first stage, and on the last one too
        when tied (the LM head is its copy); the final norm and LM head on the last."""
        t = self.topology
        if t.pp == 1:
            return True
        from parallel.pipeline import stage_layers

        stage = self.info.groups.pp.rank()
        first, last = stage == 0, stage == t.pp - 1
        if name.startswith("blocks."):
            layers = stage_layers(self.cfg.model.n_layers, t.pp, t.vpp, stage, t.first_stage_layers, t.last_stage_layers)
            return int(name.removeprefix("blocks.")) in {i for chunk in layers for i in chunk}
        if name == "embed":
            return first or (last and self.cfg.model.tie_embeddings)
        return last

    def _finish_piece(self, init_state: ModelState | None, name: str, piece: nn.Module) -> None:
        """A kept piece, just built: ``train.init_from``'s weights of this piece alone read and
        loaded (a tied LM head is the embedding's), then its experts sharded over ep."""
        if init_state is not None and not (name == "lm_head" and self.cfg.model.tie_embeddings):
            weights = init_state.read(k for k in init_state.shapes if piece_of(k) == name)
            piece.load_state_dict({k.removeprefix(f"{name}."): v for k, v in weights.items()})
        if self.topology.ep > 1:
            apply_expert_parallel(piece, self.info.groups.ep)

    def _stage_chunks(self) -> list[Transformer]:
        """This rank's pipeline chunks (``parallel.pipeline.split_stages``); at pp=1 the model."""
        if self.topology.pp == 1:
            return [self.net]
        from parallel.pipeline import split_stages

        t = self.topology
        return split_stages(self.net, self.info.groups.pp.rank(), t.pp, t.vpp, t.first_stage_layers, t.last_stage_layers)

    def _make_pipeline(self) -> Any:
        """megatron's schedule over the engine's DDP chunks (``parallel.pipeline``); None at pp=1."""
        if self.topology.pp == 1:
            return None
        from parallel.pipeline import PipelineRunner

        return PipelineRunner(self.engine.modules, self.chunks, self.n_moe_layers, self.cfg.moe.routed_experts,
                              self.topology.tp, self.cfg.parallel.sequence_parallel)

    def _dp_rows(self, rows_per_rank: int) -> slice:
        """This data-parallel rank's rows of a batch with ``rows_per_rank`` rows per rank."""
        start = self.info.dp_rank * rows_per_rank
        return slice(start, start + rows_per_rank)

    def _check_vocab(self, stream: TokenStream) -> None:
        """As ``launch.preflight.check_data`` did before the ranks started, on the data as read
        here (a cluster's node may hold data its driver cannot see)."""
        from launch.preflight import check_vocab

        check_vocab(self.cfg.model, stream.vocab_size)

    # -- state ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "engine": self.engine.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "tail_load": self.tail_load.counts_LE,
            "best_val": self.best_val,
            "nonfinite_steps": self.nonfinite_steps,
            "collapse_alarm": self.alarm.state_dict(),
            "config": to_dict(self.cfg),
        }

    def _shard_info(self) -> ShardInfo:
        """This rank's place, and its expert shards as state paths (``engine.model.<name>``)."""
        groups = self.info.groups
        experts = [f"engine.model.{n}" for n, p in self.net.named_parameters() if getattr(p, "allreduce", True) is False]
        if groups is None:
            return ShardInfo(expert_paths=experts)
        return ShardInfo(groups.ep_rank, groups.ep_size, groups.dp_rank, groups.dp_size, experts)

    @property
    def _dist_checkpoints(self) -> bool:
        """Whether this run saves sharded, reshardable checkpoints (``parallel/dist_checkpoint.py``):
        every megatron-engine run across ranks. DeepSpeed runs keep per-rank files (ZeRO's
        shards are DeepSpeed's own and do not reshard); one process keeps ``state.pt``."""
        return self.info.groups is not None and self.cfg.parallel.engine == "megatron"

    def _save(self, ckpt_dir: Path) -> None:
        if not self._dist_checkpoints:
            save_checkpoint(ckpt_dir, self.step, self.state(), self.tcfg.keep_checkpoints,
                            self.info.rank, self.info.world_size, self.info.barrier, self._shard_info())
            return
        from parallel.dist_checkpoint import save_dist_checkpoint

        # The expert bias is a buffer, which the sharded model state (parameters) leaves out.
        extras = {"step": self.step, "tail_load": self.tail_load.counts_LE, "best_val": self.best_val,
                  "nonfinite_steps": self.nonfinite_steps, "config": to_dict(self.cfg),
                  "expert_bias": self._expert_bias_LE(), "collapse_alarm": self.alarm.state_dict()}
        save_dist_checkpoint(ckpt_dir, self.step, self.engine, self.net, self.info.groups, extras,
                             self.tcfg.keep_checkpoints)

    def _restore_dist(self, path: Path) -> None:
        """Load a sharded checkpoint under this run's layout, whatever layout saved it."""
        from parallel.dist_checkpoint import load_dist_checkpoint, read_manifest

        if not self._dist_checkpoints:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a sharded (megatron dist_checkpointing) checkpoint; it loads "
                f"into megatron-engine runs across ranks, not this one (parallel.engine={self.cfg.parallel.engine!r}, "
                f"{self.info.world_size} rank(s)); resume with parallel.engine=megatron and a layout of 2 or more ranks"
            )
        check_resume_config(path, read_manifest(path)["config"], self.cfg, reshardable=True)
        extras = load_dist_checkpoint(path, self.engine, self.net, self.info.groups, to_dict(self.cfg))
        self.tail_load.counts_LE = extras["tail_load"]
        if "expert_bias" in extras:  # absent from checkpoints saved before bias balancing existed
            self._load_expert_bias(extras["expert_bias"])
        self.best_val = extras["best_val"]
        self.nonfinite_steps = extras.get("nonfinite_steps", 0)
        if "collapse_alarm" in extras:  # absent from checkpoints saved before the alarm's state was
            self.alarm.load_state_dict(extras["collapse_alarm"])
        self.step = extras["step"]

    def restore(self, path: Path) -> None:
        from parallel.dist_checkpoint import is_dist_checkpoint

        if is_dist_checkpoint(path):
            self._restore_dist(path)
            return
        state = load_checkpoint(path, self.info.rank, self.info.world_size)
        check_resume_config(path, state["config"], self.cfg, reshardable=False)
        self.engine.load_state_dict(state["engine"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.tail_load.counts_LE = state["tail_load"]
        self.best_val = state["best_val"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)  # absent from checkpoints saved before it existed
        if "collapse_alarm" in state:  # likewise
            self.alarm.load_state_dict(state["collapse_alarm"])
        self.step = state["step"]

    # -- one step ------------------------------------------------------------------

    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of step ``self.step``'s global batch, split into micro-batches."""
        x_BS, y_BS = self.train_stream.batch(self.step, self.tcfg.batch_size, self.cfg.model.seq_len, self.tcfg.seed,
                                             self._dp_rows(self.local_batch))
        n_micro = self.topology.micro_batches
        return list(zip(x_BS.chunk(n_micro), y_BS.chunk(n_micro)))

    @torch.no_grad()
    def _global_load(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """For ``moe.aux_loss_scope=global_batch``: every MoE layer's assignment fraction
        over the whole global batch (all micro-batches, all data-parallel ranks), from a
        routing pre-pass without gradients. The RNG is rewound afterwards, so the training
        pass draws the same router jitter and routes exactly as the pre-pass did.

        Not needed (None) when one forward already sees the whole global batch.
        """
        if self.cfg.moe.aux_loss_scope != "global_batch" or (len(micro) == 1 and self.topology.dp == 1):
            return None
        rng = torch.get_rng_state()
        counts_LE = torch.zeros(self.n_moe_layers, self.cfg.moe.routed_experts)
        if self.pipeline is not None:  # a forward-only schedule; each stage counts its own layers
            stats = self.pipeline.run(self._on_device(micro), None, forward_only=True)
            counts_LE = sum_over(stats.counts_LE, self.info.groups.pp)
        else:
            for x_mBS, _ in micro:
                out = self.model(x_mBS.to(self.device))
                counts_LE += torch.stack([s.tokens_per_expert_E for s in out.moe_stats]).cpu().float()
        torch.set_rng_state(rng)
        counts_LE = sum_over(counts_LE, self.info.dp_group)
        return (counts_LE / counts_LE.sum(dim=1, keepdim=True)).to(self.device)

    def _router_grad_norm(self) -> float:
        """Norm of the routers' gradient for the global batch (local sums, averaged over DP),
        before the engine reduces and clips: the quantity layouts must agree on. Under tensor
        parallelism each TP rank routed its own tokens (its contiguous 1/tp of each micro-batch's
        B·S): local sums are summed over tp first. Under pipeline parallelism each stage holds
        its own layers' routers: squares are summed over stages."""
        if self.pipeline is not None:
            sq = torch.zeros((), dtype=torch.float64)
            if self.routers:  # the ranks of a stage (its tp and dp groups) hold the same layers
                local = torch.cat([self.engine.local_grad(w).reshape(-1) for w in self.routers])
                sq = mean_over(sum_over(local, self.info.tp_group), self.info.dp_group).double().square().sum()
            return float(sum_over(sq, self.info.groups.pp).sqrt())
        if not self.routers:
            return 0.0
        local = torch.cat([self.engine.local_grad(w).reshape(-1) for w in self.routers])
        # Under tensor parallelism each TP rank routed its own tokens: sum over tp first.
        return float(mean_over(sum_over(local, self.info.tp_group), self.info.dp_group).norm())

    def train_step(self) -> tuple[dict[str, float], torch.Tensor, str | None]:
        """One optimizer update over this rank's share of the global batch: the step's
        metrics, routed-token counts, and None; or, when the step is non-finite on any rank,
        no update and what went non-finite (the same on every rank).

        Each micro-batch's loss is divided by the number of micro-batches before backward;
        the engine averages over data-parallel ranks: the update is the global-batch one.
        """
        lr = lr_at(self.step, self.tcfg)
        # Noisy top-k draws its noise per (step, sequence): the same in every layout and pass.
        set_noise_step((layer.router for chunk in self.chunks for layer in chunk.moe_layers()), self.step)
        micro = self._micro_batches()
        load_LE = self._global_load(micro)
        n_micro = len(micro)
        sums_4 = torch.zeros(4)  # lm, aux, z, dropped
        counts_LE = torch.zeros(self.n_moe_layers, self.cfg.moe.routed_experts)
        self.model.train()
        self.engine.zero_grad()
        if self.pipeline is not None:
            sums_4, counts_LE = self._pipeline_step(micro, load_LE)
        else:
            for i, (x_mBS, y_mBS) in enumerate(micro):
                with self.engine.no_sync() if i < n_micro - 1 else nullcontext():
                    out = self.model(x_mBS.to(self.device), y_mBS.to(self.device), load_LE)
                    (out.loss / n_micro).backward()
                dropped = torch.stack([s.dropped_fraction for s in out.moe_stats]).mean() if out.moe_stats else torch.zeros(())
                sums_4 += torch.stack([out.lm_loss, out.aux_loss, out.z_loss, dropped]).detach().cpu().float() / n_micro
                if out.moe_stats:
                    counts_LE += torch.stack([s.tokens_per_expert_E for s in out.moe_stats]).cpu().float()
        router_grad_norm = self._router_grad_norm()
        lm, aux, z, dropped = mean_over(sums_4, self.info.dp_group).tolist()
        problem = self._nonfinite({"lm_loss": lm, "aux_loss": aux, "z_loss": z})
        grad_norm = math.nan if problem else self.engine.step(lr)
        if problem is None and not math.isfinite(grad_norm):  # finite on every rank, not once reduced
            problem = f"the gradient norm is non-finite ({grad_norm}, after the update)"
        self.step += 1
        values = {"lm_loss": lm, "aux_loss": aux, "z_loss": z, "dropped_fraction": dropped,
                  "grad_norm": grad_norm, "router_grad_norm": router_grad_norm, "lr": lr}
        counts_LE = sum_over(counts_LE, self.info.dp_group)
        if problem is None:
            self._update_expert_bias(counts_LE)
        return values, counts_LE, problem

    def _update_expert_bias(self, counts_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing after the optimizer step (``moe.router.update_expert_bias``).
        ``counts_LE`` holds the global batch's assignments: every micro-batch, summed over tp
        (each TP rank routes its own tokens; the TP layer sums its counts), over dp, and over
        pp (each stage fills its own layers' rows). Every rank holding a layer sees the same
        counts, so its bias stays identical on every rank and in every layout."""
        for index, router in self.bias_routers:
            update_expert_bias(router.expert_bias_E, counts_LE[index], self.cfg.moe.expert_bias_update_rate)

    def _expert_bias_LE(self) -> torch.Tensor:
        """Every MoE layer's expert bias, the same on every rank (other stages' rows summed in
        over pp); zeros without bias balancing."""
        bias_LE = torch.zeros(self.n_moe_layers, self.cfg.moe.routed_experts)
        for index, router in self.bias_routers:
            bias_LE[index] = router.expert_bias_E.detach().cpu()
        return bias_LE if self.pipeline is None else sum_over(bias_LE, self.info.groups.pp)

    def _load_expert_bias(self, bias_LE: torch.Tensor) -> None:
        """Give this rank's layers their rows of a saved ``_expert_bias_LE``."""
        for index, router in self.bias_routers:
            router.expert_bias_E.copy_(bias_LE[index])

    def _on_any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag, true where it is true on some rank: every rank takes the same decision."""
        flags_N = torch.tensor(flags, dtype=torch.float32)
        if self.info.world_size > 1:
            flags_N = sum_over(flags_N, dist.group.WORLD)
        return [bool(flag) for flag in flags_N]

    def _local_grads_finite(self) -> bool:
        """Whether this rank's gradients, before any reduction, have a finite norm (a norm
        that overflows counts as non-finite, as the engine's clipping norm would). DeepSpeed
        frees them as it reduces them (ZeRO-2); there its own overflow check refuses the
        update (and fails the step)."""
        if self.info.groups is not None and self.cfg.parallel.engine == "deepspeed":
            return True
        grads = [self.engine.local_grad(p) for chunk in self.chunks for p in chunk.parameters()]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def _nonfinite(self, losses: dict[str, float]) -> str | None:
        """What went non-finite in this step, on any rank (losses, as reduced; gradients);
        None when nothing did. Decided before the update, which a non-finite step skips."""
        *bad_losses, bad_grads = self._on_any_rank([not math.isfinite(v) for v in losses.values()]
                                                   + [not self._local_grads_finite()])
        named = ", ".join(f"{name}={value}" for (name, value), bad in zip(losses.items(), bad_losses) if bad)
        parts = ([f"the loss is non-finite ({named})"] if named else []) + (
            ["the gradient norm is non-finite"] if bad_grads else [])
        return " and ".join(parts) or None

    def _on_device(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.to(self.device), y.to(self.device)) for x, y in micro]

    def _pipeline_step(
        self, micro: list[tuple[torch.Tensor, torch.Tensor]], load_LE: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch through megatron's pipeline schedule.

        Returns this data-parallel rank's ``(lm, aux, z, dropped)`` micro-batch means and
        per-expert counts, assembled over the pipeline stages (each holds its own layers:
        aux/z and counts are sums over stages; dropped is averaged over all MoE layers).
        """
        for module in self.engine.modules:
            module.train()
        stats = self.pipeline.run(self._on_device(micro), load_LE, forward_only=False)
        sums_4 = sum_over(stats.sums_4, self.info.groups.pp) / len(micro)
        sums_4[3] /= max(self.n_moe_layers, 1)
        return sums_4, sum_over(stats.counts_LE, self.info.groups.pp)

    def _pipeline_evaluate(self, progress: Callable[[int], None] | None) -> float:
        """``evaluate`` through a forward-only schedule, one validation batch per micro-batch.

        The interleaved schedule needs a multiple of ``pp`` micro-batches: the list is padded
        with repeats of the first batch, whose losses are not counted. Only the last stage
        has losses; sums run over the pipeline, then the data-parallel group. The schedule
        runs every batch at once: ``progress`` hears of them all at its end.
        """
        for module in self.engine.modules:
            module.eval()
        batches = self._on_device(self.val_batches)
        pp = self.topology.pp
        pad = (-len(batches)) % pp if self.topology.vpp > 1 else 0
        total_2 = torch.zeros(2, dtype=torch.float64)
        if batches:
            stats = self.pipeline.run(batches + batches[:1] * pad, None, forward_only=True)
            for loss, (_, y_BS) in zip(stats.lm_losses, batches):  # empty before the last stage
                total_2 += torch.tensor([loss * y_BS.numel(), y_BS.numel()], dtype=torch.float64)
            if progress is not None:
                progress(len(batches))
        loss_sum, count = sum_over(sum_over(total_2, self.info.groups.pp), self.info.dp_group).tolist()
        return loss_sum / max(count, 1)

    @torch.no_grad()
    def evaluate(self, progress: Callable[[int], None] | None = None) -> float:
        """Mean LM loss (nats per token) over the fixed held-out windows, every
        data-parallel rank evaluating its rows of each batch: sum over batches and ranks of
        loss·targets, divided by the targets. ``progress(n)``: n more batches done (a progress bar)."""
        if self.pipeline is not None:
            return self._pipeline_evaluate(progress)
        self.model.eval()
        total_2 = torch.zeros(2, dtype=torch.float64)
        for x_BS, y_BS in self.val_batches:
            out = self.model(x_BS.to(self.device), y_BS.to(self.device))
            total_2 += torch.tensor([out.lm_loss.item() * y_BS.numel(), y_BS.numel()], dtype=torch.float64)
            if progress is not None:
                progress(1)
        loss_sum, count = sum_over(total_2, self.info.dp_group).tolist()
        return loss_sum / max(count, 1)

    @property
    def val_token_count(self) -> int:
        return sum(y.numel() for _, y in self.val_batches) * self.topology.dp

    # -- the loop ------------------------------------------------------------------

    def _train_record(self, interval: Interval, load: LoadTracker) -> dict[str, Any]:
        tokens_per_s = interval.tokens / max(interval.seconds, 1e-9)
        record: dict[str, Any] = {"kind": "train", "step": self.step, **interval.means()}
        if interval.skipped:
            record["skipped_steps"] = interval.skipped
        record["tokens_per_s"] = tokens_per_s
        record["flops_per_token"] = self.flops_per_token
        if self.tcfg.peak_tflops is not None:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.tcfg.peak_tflops * 1e12)
        if load.counts_LE.numel():
            record["expert_tokens"] = load.counts_LE.long().tolist()
            record["expert_load"] = load.shares_LE().round(5).tolist()
        if self.cfg.moe.expert_bias_update_rate > 0:  # every rank takes part (a pp collective)
            record["expert_bias"] = self._expert_bias_LE().tolist()
        return record

    def _log_start(self) -> None:
        counts = param_counts(self.cfg.model, self.cfg.moe)
        routed = self.cfg.moe.fine_grained()  # moe.granularity: the experts as built
        tqdm.write(
            f"model: {counts.total / 1e6:.2f}M params ({counts.active / 1e6:.2f}M active per token), "
            f"{self.n_moe_layers} MoE layers x {routed.num_experts} experts top-{routed.top_k}; "
            f"{len(self.train_stream) / 1e6:.1f}M train tokens; device {self.device}; run dir {self.run_dir}"
        )

    def fit(self) -> dict[str, Any]:
        tcfg, main = self.tcfg, self.info.is_main
        if tcfg.resume:
            found = resume_checkpoint(self.run_dir)
            self.restore(found)
            if main:
                truncate_after(self.run_dir, self.step)
                tqdm.write(f"resumed from {found} at step {self.step}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            self._log_start()
        log = MetricsLog(self.run_dir) if main else NullLog()
        bar = tqdm(total=tcfg.steps, initial=self.step, desc="train", unit="step", mininterval=1.0,
                   dynamic_ncols=True, disable=not main)
        start_wall = time.perf_counter()
        try:
            train_seconds, train_tokens = self._loop(log, bar)
        finally:
            bar.close()
            log.close()
        peak_memory = peak_memory_per_rank(self.device, self.info.world_size)  # a collective: every rank
        summary = self._finish(time.perf_counter() - start_wall, train_seconds, train_tokens, peak_memory) if main else {}
        self.info.barrier()
        return summary

    def _loop(self, log: MetricsLog | NullLog, bar: tqdm) -> tuple[float, int]:
        """Train from ``self.step`` to ``train.steps``, logging, validating and checkpointing
        at their intervals; the seconds spent in training steps and the tokens they took."""
        tcfg = self.tcfg
        recorder, routing_path = self._routing_recorder()
        n_moe, n_exp = self.n_moe_layers, self.cfg.moe.routed_experts
        interval, load = Interval(), LoadTracker.zeros(n_moe, n_exp)
        train_seconds, train_tokens = 0.0, 0
        tokens_per_step = tcfg.batch_size * self.cfg.model.seq_len
        postfix: dict[str, str] = {}
        while self.step < tcfg.steps:
            if recorder is not None:
                recorder.step = self.step
            t0 = time.perf_counter()
            values, counts_LE, problem = self.train_step()
            seconds = time.perf_counter() - t0
            interval.add(values, skipped=problem is not None)
            interval.tokens += tokens_per_step
            interval.seconds += seconds
            train_seconds += seconds
            train_tokens += tokens_per_step
            load.add(counts_LE)
            if self.step > self.tail_start:
                self.tail_load.add(counts_LE)
            bar.update(1)
            stop = None if problem is None else self._skip_or_stop(problem)
            final = self.step == tcfg.steps
            if self.step % tcfg.log_every == 0 or final or stop:
                record = self._train_record(interval, load)
                if load.counts_LE.numel():
                    record["collapse"] = self.alarm.update(self.step, load.shares_LE())
                    alarm = self.alarm.message(record["collapse"])
                    if alarm and self.info.is_main:
                        tqdm.write(alarm)
                log.write(record)
                if record["lm_loss"] is not None:  # None when every step of the interval was skipped
                    postfix.update(loss=f"{record['lm_loss']:.3f}")
                postfix.update(tok_s=f"{record['tokens_per_s']:.0f}")
                bar.set_postfix(postfix)
                interval, load = Interval(), LoadTracker.zeros(n_moe, n_exp)
                if recorder is not None:
                    recorder.append_to(routing_path)
            if stop is not None:
                self._stop(stop, skippable=True)
            if self.step % tcfg.eval_every == 0 or final:
                with nullcontext() if recorder is None else recorder.paused():
                    val_loss = self._validate(log)
                postfix.update(val=f"{val_loss:.3f}")
                bar.set_postfix(postfix)
            if self.step % tcfg.ckpt_every == 0 or final:
                if recorder is not None:
                    recorder.append_to(routing_path)  # a resume keeps every step before its checkpoint
                self._save_finite()
        if recorder is not None:
            recorder.remove()
        return train_seconds, train_tokens

    def _validate(self, log: MetricsLog | NullLog) -> float:
        """Evaluate and log the validation loss; stop the run if it is non-finite."""
        val_loss = self.evaluate()
        self.best_val = min(self.best_val, val_loss)
        log.write({"kind": "val", "step": self.step, "val_loss": val_loss, "best_val_loss": self.best_val})
        if self._on_any_rank([not math.isfinite(val_loss)])[0]:
            self._stop(f"the validation loss is non-finite ({val_loss})", skippable=False)
        return val_loss

    def _save_finite(self) -> None:
        """Checkpoint this step, unless a weight is non-finite on some rank: then stop, so
        that a checkpoint never holds non-finite weights."""
        finite = torch.stack([torch.isfinite(p).all() for chunk in self.chunks for p in chunk.parameters()]).all()
        if self._on_any_rank([not finite])[0]:  # one device sync for all the parameters
            self._stop("the weights are non-finite (the checkpoint of this step was not saved)", skippable=False)
        self._save(self.run_dir / "checkpoints")

    def _skip_or_stop(self, problem: str) -> str | None:
        """Count a non-finite step (``train_step`` applied no update): None while within
        ``train.max_nonfinite_steps``, else why the run stops."""
        self.nonfinite_steps += 1
        allowed = self.tcfg.max_nonfinite_steps
        if self.nonfinite_steps > allowed:
            return f"{problem} (non-finite step {self.nonfinite_steps} of this run; train.max_nonfinite_steps={allowed})"
        if self.info.is_main:
            tqdm.write(f"step {self.step}: {problem}; skipped without an update "
                       f"({self.nonfinite_steps} of train.max_nonfinite_steps={allowed})")
        return None

    def _stop(self, why: str, skippable: bool) -> NoReturn:
        """End the run at this step, on every rank (all call this at the same step, once
        rank 0 has written its records); the latest checkpoint stays the last finite one."""
        self.info.barrier()
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        kept = f"latest checkpoint: {latest.name}, the last with finite weights" if latest else "no checkpoint was saved"
        skip = "resume with a larger train.max_nonfinite_steps to skip such steps, or " if skippable else ""
        raise NonFiniteStop(
            f"training stopped at step {self.step}: {why}; {kept}. To go on, {skip}start a new run (another "
            "train.run_dir) with a lower train.lr or loss coefficients"
        )

    def _routing_recorder(self) -> tuple[RoutingRecorder | None, Path]:
        """``train.record_routing``: every rank records the routing of its MoE layers to
        ``run_dir/routing/routing-rank-K.jsonl`` (``parallel.simulator.routing``), from the
        current step on; a resumed run first drops what the steps after its checkpoint wrote."""
        path = self.run_dir / "routing" / f"routing-rank-{self.info.rank}.jsonl"
        if not self.tcfg.record_routing:
            return None, path
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.tcfg.resume:
            truncate_routing(path, self.step)
        else:
            path.unlink(missing_ok=True)
        return RoutingRecorder(self.net, self.info.rank), path

    def _finish(self, wall: float, train_seconds: float, train_tokens: int, peak_memory: list[int]) -> dict[str, Any]:
        records = read_metrics(self.run_dir)
        vals = [r["val_loss"] for r in records if r["kind"] == "val"]
        counts = param_counts(self.cfg.model, self.cfg.moe)
        shares_LE = self.tail_load.shares_LE()
        n_exp = self.cfg.moe.routed_experts
        threshold = self.alarm.share
        tokens_per_s = train_tokens / max(train_seconds, 1e-9)
        outputs = {
            "metrics": "metrics.jsonl",
            "tensorboard": "tensorboard/",
            "checkpoints": "checkpoints/",
            "loss_curve": plot_loss_curve(records, self.run_dir / "loss_curve.png").name,
        }
        if shares_LE.size:
            outputs["expert_load"] = plot_expert_load(
                shares_LE, self.run_dir / "expert_load.png", f"expert load, steps {self.tail_start + 1}-{self.tcfg.steps}"
            ).name
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "tokens_seen": self.step * self.tcfg.batch_size * self.cfg.model.seq_len,
            "final_val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals) if vals else None,
            "val_tokens": self.val_token_count,
            "wall_seconds": wall,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": self.flops_per_token,
            "layout": {"world_size": self.info.world_size, "ep": self.topology.ep, "dp": self.topology.dp,
                       "micro_batches": self.topology.micro_batches},
            "mfu": (self.flops_per_token * tokens_per_s / (self.tcfg.peak_tflops * 1e12)) if self.tcfg.peak_tflops else None,
            "peak_memory": {"kind": memory_kind(self.device), "bytes_per_rank": peak_memory},
            "params": {
                "total": counts.total,
                "active": counts.active,
                "embedding": counts.embedding,
                "non_embedding_total": counts.non_embedding_total,
                "non_embedding_active": counts.non_embedding_active,
            },
            "expert_load_tail": {
                "steps": [self.tail_start + 1, self.tcfg.steps],
                "shares": shares_LE.round(5).tolist(),
                "min_share": float(shares_LE.min()) if shares_LE.size else None,
                "max_share": float(shares_LE.max()) if shares_LE.size else None,
                "collapse_threshold": threshold,
                "collapsed": bool(shares_LE.size and shares_LE.min() < threshold),
            },
            "collapse_alarm": self.alarm.verdict(),
            "outputs": outputs,
        }
        write_atomic_text(self.run_dir / "summary.json", to_json(summary, indent=2))
        return summary


def train(cfg: Config, config_name: str) -> dict[str, Any]:
    """Train in this process (a layout of one rank); return the summary (also written to
    ``run_dir/summary.json``)."""
    return Run(cfg, config_name).fit()


def train_rank(cfg: Config, config_name: str) -> dict[str, Any]:
    """One rank of a run (the launchers' default entry point, ``launch.rank.RankEntry``):
    torch.distributed initialised by the launcher, or none for a one-rank layout in this
    process. Returns the summary on rank 0 (an empty dict elsewhere)."""
    with rank_info(cfg) as info:
        return Run(cfg, config_name, info).fit()


@contextmanager
def rank_info(cfg: Config) -> Iterator[RankInfo]:
    """This process's place in ``cfg``'s multi-rank layout (torch.distributed initialised by
    the launcher): megatron-core's process groups built for the validated layout, torn down
    on exit; without torch.distributed (a one-rank layout run in-process), the single rank.
    ``train_rank`` and ``moe eval``'s ranks run inside it."""
    from parallel.groups import destroy_groups, init_groups

    if not dist.is_initialized() and check_layout(cfg).world_size == 1:
        yield RankInfo()
        return

    # megatron-core warns at import that TransformerEngine/Apex are absent and it falls
    # back to torch: expected here, and four lines per rank of noise otherwise.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # Its tensor-parallel layers call collectives torch 2.13 deprecates (the calls are
    # correct), and recommend a CUDA setting, which means nothing on the CPU.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message="When using .* set the environment variable CUDA_DEVICE_MAX_CONNECTIONS")
    topology = check_layout(cfg)
    groups = init_groups(topology, timeout_minutes=cfg.launch.timeout_minutes)
    try:
        yield RankInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), groups=groups)
    finally:
        destroy_groups()
