"""megatron-core's DDP and distributed optimizer around our plain ``torch.nn.Module``.

One :class:`MegatronEngine` per rank::

    engine = MegatronEngine(model, groups, OptimSettings(lr=3e-4, ...))
    engine.zero_grad()
    for i, (x, y) in enumerate(micro_batches):          # this rank's share of the batch
        with engine.no_sync() if i < n - 1 else nullcontext():
            (engine.module(x, y).loss / n).backward()
    grad_norm = engine.step(lr)

What holds (each checked by ``tests/test_engine.py`` against a single-process AdamW run
on the whole global batch):

- **Dense gradients** (every parameter without ``allreduce = False``) are averaged over
  the full data-parallel group ``groups.dp``: each rank's loss is the mean over its own
  micro-batch, megatron scales the gradient buffer by ``1/dp`` and reduce-scatters it with
  a sum, so the result is the gradient of the global-batch mean loss.
- **Expert gradients** (parameters marked ``param.allreduce = False`` by whoever shards
  experts; this engine marks nothing) live in megatron's separate expert buffers and are
  reduce-scattered over the expert-data-parallel group ``groups.edp`` only, but scaled by
  ``1/dp`` (not ``1/edp``): with expert parallelism a rank's expert gradient already sums
  the contributions of the tokens that the ``ep`` ranks of its group sent it (through the
  all-to-all's backward), so summing over ``edp`` and dividing by ``dp = ep·edp`` again
  gives the gradient of the global-batch mean loss. A parameter marked ``allreduce =
  False`` but *replicated* (not sharded over ``ep``) is therefore only right when
  ``ep == 1`` (then ``edp == dp``); with ``ep > 1`` it would get ``edp/dp`` of its gradient.
  Under tensor parallelism (``parallel/tensor_parallel.py``) the TP ranks of a replica route
  disjoint sequences, so every token of the step is routed from exactly one of the
  ``tp·dp = etp·ep·edp`` ranks and reaches each expert (each ``etp`` slice of it) once:
  the ``1/dp`` scaling still gives the global-batch mean's gradient.
- **Tensor-parallel replicas** (routers, shared experts, sequence-parallel norm gains:
  ``param.sequence_parallel = True``) hold partial gradients over their TP rank's tokens;
  ``finalize_model_grads`` sums them over ``groups.tp`` first (the DDP config carries
  ``sequence_parallel=True`` whenever ``tp > 1``).
- **Optimizer state is sharded** (megatron's distributed optimizer): each rank's AdamW
  holds ``exp_avg``/``exp_avg_sq`` for a ``1/dp`` slice of the dense buffer and a ``1/edp``
  slice of the expert buffer; after its update each rank all-gathers the parameters, so
  every replica holds the full, identical model again.
- **Weight decay** as ``launch/train.py``'s ``make_optimizer``: on parameters with
  ``ndim >= 2`` (matrices, stacked expert weights, the embedding), none on ``ndim < 2``
  (norm gains, biases). megatron's own default rule (1-D params and names ``*.bias``)
  agrees for our models, but is replaced here by the ndim rule; and megatron applies its
  ``wd_mult`` only through its LR scheduler, which we do not use, so :meth:`step` writes
  each group's ``weight_decay`` itself (without that, AdamW would decay every group).
- **Clipping** by the global gradient norm (over all ranks and both buffers), as
  ``torch.nn.utils.clip_grad_norm_`` on the whole model; :meth:`step` returns that norm
  (before clipping).
- **Precision** (``dtype``): fp32, or bf16 as megatron-core's mixed precision: the
  parameters (and so the activations) are cast to bf16 before DDP wraps them, so its
  parameter buffer is bf16; gradients accumulate and are reduced in its fp32 ``main_grad``
  buffers (``grad_reduce_in_fp32``); the distributed optimizer (``OptimizerConfig(bf16=True)``)
  keeps an fp32 main copy of each rank's ``1/dp`` (``1/edp``) shard, which clipping and
  AdamW (fp32 moments) act on, then rounds it into the bf16 parameters and all-gathers them.
- **Gradient accumulation**: megatron's DDP adds every backward into its fp32
  ``main_grad`` buffers and reduces only in :meth:`step` (``overlap_grad_reduce=False``),
  so N micro-batches whose losses are divided by N give the same update as one batch.
  :meth:`no_sync` marks the non-final micro-batches (it matters once gradient reduction
  overlaps backward; today it changes nothing).

**Pipeline chunks**: given a list of modules (this rank's pipeline chunks,
``parallel/pipeline.py``), each chunk gets its own DDP (``engine.modules``), one megatron
optimizer spans them all and ``finalize_model_grads`` reduces them together. A chunk's
``tied_weight()`` (a copy of a tied embedding/LM-head matrix on the first or last stage)
has its local gradient summed over the embedding group (first and last pipeline rank of a
data-parallel position) before the data-parallel reduction, and the copies are made equal
(broadcast from the first stage) at construction.

Call :meth:`zero_grad` before each step's first backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.groups import ParallelGroups
from parallel.megatron_compat import apply_cpu_compat


@dataclass(frozen=True)
class OptimSettings:
    """AdamW hyperparameters (``train.*`` in the config); ``grad_clip <= 0`` disables clipping."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float
    eps: float = 1e-8

    @classmethod
    def from_train(cls, train: Any) -> OptimSettings:
        """From a ``TrainConfig`` (``launch/config.py``): the values ``make_optimizer`` uses."""
        return cls(
            lr=train.lr,
            beta1=train.beta1,
            beta2=train.beta2,
            weight_decay=train.weight_decay,
            grad_clip=train.grad_clip,
        )


DTYPES = (torch.float32, torch.bfloat16)


def check_dtype(models: list[torch.nn.Module], dtype: torch.dtype, engine: str) -> None:
    """Raise ``ValueError`` unless ``dtype`` is one the engines train in and every parameter
    arrives in fp32 (the engine casts them itself, after taking what it needs from them)."""
    if dtype not in DTYPES:
        raise ValueError(f"{engine}: dtype {dtype} is not one of {', '.join(map(str, DTYPES))}")
    if any(p.dtype != torch.float32 for m in models for p in m.parameters()):
        raise ValueError(f"{engine}: parameters must arrive as fp32; the engine casts them to dtype={dtype}")


def cast_parameters(models: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """Cast every parameter to ``dtype`` in place: the same ``Parameter`` objects (the marks
    expert and tensor parallelism set on them stay), new data. Buffers keep their dtype (the
    fp32 RoPE tables)."""
    for model in models:
        for param in model.parameters():
            param.data = param.data.to(dtype)


def _no_decay(param: torch.nn.Parameter) -> bool:
    """``make_optimizer``'s rule: no weight decay below two dimensions."""
    return param.ndim < 2


class MegatronEngine:
    """A model wrapped in megatron-core DDP, with megatron's distributed Adam optimizer.

    ``engine.module`` is the DDP-wrapped model (call it like the model); the original is
    ``engine.module.module``. Parameters become views into megatron's contiguous buffers.
    Given a list of pipeline chunks, ``engine.modules`` holds one DDP per chunk
    (``engine.module`` is the first). ``config``: the megatron ``TransformerConfig`` the DDP
    chunks carry (the pipeline schedules read theirs from it); default: placeholders.
    """

    def __init__(
        self,
        model: torch.nn.Module | list[torch.nn.Module],
        groups: ParallelGroups,
        optim: OptimSettings,
        config: Any | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        apply_cpu_compat()
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        models = model if isinstance(model, list) else [model]
        check_dtype(models, dtype, "MegatronEngine")
        cast_parameters(models, dtype)  # before DDP: its parameter buffer takes their dtype
        self.groups = groups
        self.optim = optim
        self.dtype = dtype
        self._pg = _process_groups(groups)
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            average_in_collective=False,
        )
        config = _transformer_config(groups.topology.tp) if config is None else config
        self.modules = [DistributedDataParallel(config, ddp_config, m, pg_collection=self._pg) for m in models]
        self.module = self.modules[0]
        # Replicas must start equal: dense params from dp rank 0, expert params from edp rank 0.
        for module in self.modules:
            module.broadcast_params()
        self._tied = [w for m in models if (w := _tied_weight(m)) is not None]
        for weight in self._tied:  # the last stage's copy of a tied matrix starts as the first's
            dist.broadcast(weight.data, src=dist.get_process_group_ranks(groups.embd)[0], group=groups.embd)
        self._opt_config = OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=max(optim.grad_clip, 0.0),
            use_distributed_optimizer=True,
            bf16=dtype == torch.bfloat16,
            fp16=False,
            params_dtype=dtype,
        )
        no_decay = {ParamKey(predicate=ParamPredicate(name="ndim_below_2", fn=_no_decay)): ParamGroupOverride(wd_mult=0.0)}
        self.optimizer = get_megatron_optimizer(
            self._opt_config,
            self.modules,
            config_overrides=no_decay,
            use_gloo_process_groups=False,
            pg_collection=self._pg,
        )
        self._set_hyperparameters(optim.lr)

    # -- training -----------------------------------------------------------------

    def zero_grad(self) -> None:
        """Zero megatron's gradient buffers and the optimizer's shard gradients."""
        for module in self.modules:
            module.zero_grad_buffer()
        with warnings.catch_warnings():
            # megatron reads .grad of its shard views (non-leaf tensors) while zeroing them.
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            self.optimizer.zero_grad()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Wrap the backward of every micro-batch but the last (megatron DDP's ``no_sync``)."""
        with ExitStack() as stack:
            for module in self.modules:
                stack.enter_context(module.no_sync())
            yield

    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's accumulated, not yet reduced gradient of ``param``: megatron's DDP
        accumulates into ``param.main_grad`` (a view of its fp32 buffer), not ``.grad``."""
        return param.main_grad

    def step(self, lr: float) -> float:
        """Reduce the gradients, clip, update; return the global gradient norm (before clipping).

        ``finalize_model_grads`` reduce-scatters both gradient buffers (dense over ``dp``,
        experts over ``edp``); the distributed optimizer then clips by the norm over all
        ranks, steps its shards at ``lr`` and all-gathers the updated parameters.
        """
        from megatron.core.distributed import finalize_model_grads

        with warnings.catch_warnings():
            # torch 2.13 deprecates the collectives megatron-core 0.16.1 calls (reduce_scatter_tensor,
            # all_gather_into_tensor); the calls are correct, the warning is noise for our users.
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
            for weight in self._tied:  # local sums first: the dp reduction below is linear
                dist.all_reduce(weight.main_grad, group=self.groups.embd)
            finalize_model_grads(self.modules, pg_collection=self._pg)
            self._set_hyperparameters(lr)
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:  # only a loss scaler (fp16) can skip a step; bf16 runs without one
            raise RuntimeError("megatron optimizer skipped the step (inf/nan gradients)")
        return float(grad_norm)

    def _set_hyperparameters(self, lr: float) -> None:
        """What megatron's LR scheduler would write: ``lr`` and ``weight_decay · wd_mult``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.optim.weight_decay * group.get("wd_mult", 1.0)

    # -- introspection --------------------------------------------------------------

    def optimizer_shards(self) -> list[torch.Tensor]:
        """The parameter shards this rank's AdamW updates: views into the model's buffers in
        fp32, the fp32 main copies of the bf16 parameters' shards in bf16."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def main_shards(self) -> list[list[torch.Tensor]]:
        """Per chained optimizer (dense, then experts), the fp32 main copies of this rank's
        shards of the bf16 parameters (empty lists in fp32)."""
        return [[m for group in opt.shard_fp32_from_float16_groups for m in group]
                for opt in self.optimizer.chained_optimizers]

    # -- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's model and optimizer state, as a plain dict of tensors.

        ``model``: the full (replicated) model's ``state_dict`` (with pipeline chunks, the union
        of this rank's chunks' entries, under the full model's names); ``optimizer``: for each of
        megatron's chained optimizers (dense, then experts if any) the inner AdamW's
        ``state_dict`` over this rank's shards; in bf16 ``main_params``: per chained optimizer
        the fp32 main shards AdamW steps (in fp32 they are views of the parameters, which
        ``model`` holds); ``layout``: what the shards depend on.
        Like torch's ``state_dict`` it references live tensors: save or copy it before
        training on. It loads only into an engine of the same layout and model.
        """
        state = {
            "model": {k: v for m in self.modules for k, v in m.module.state_dict().items()},
            "optimizer": [opt.optimizer.state_dict() for opt in self.optimizer.chained_optimizers],
            "layout": self._layout(),
        }
        if self.dtype != torch.float32:
            state["main_params"] = self.main_shards()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (saved by this rank, same layout)."""
        if state["layout"] != self._layout():
            raise ValueError(
                f"MegatronEngine.load_state_dict: the optimizer shards were saved with layout "
                f"{state['layout']} but this engine has {self._layout()}; shards load only into "
                "the same data/expert-parallel layout and model"
            )
        for module in self.modules:
            own = module.module.state_dict().keys()
            module.module.load_state_dict({k: v for k, v in state["model"].items() if k in own})
        if self.dtype != torch.float32:
            with torch.no_grad():
                for mine, saved in zip(self.main_shards(), state["main_params"], strict=True):
                    for main, value in zip(mine, saved, strict=True):
                        main.copy_(value)
        for opt, opt_state in zip(self.optimizer.chained_optimizers, state["optimizer"], strict=True):
            opt.optimizer.load_state_dict(opt_state)

    def _layout(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "dp": (self.groups.dp_rank, self.groups.dp_size),
            "edp": (self.groups.edp_rank, self.groups.edp_size),
            "ep": (self.groups.ep_rank, self.groups.ep_size),
            "pp": (self.groups.pp.rank(), self.groups.pp.size()),
            "shards": [[tuple(p.shape) for p in g["params"]] for g in self.optimizer.param_groups],
        }


def _tied_weight(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """A pipeline chunk's copy of a tied embedding/LM-head matrix (None for anything else)."""
    getter = getattr(module, "tied_weight", None)
    return None if getter is None else getter()


def _transformer_config(tp: int) -> Any:
    """The ``TransformerConfig`` megatron's DDP and ``finalize_model_grads`` want.

    They read only ``calculate_per_token_loss`` (False: gradients are divided by ``dp``),
    ``cuda_graph_impl``, ``timers``, ``sequence_parallel``, ``qk_layernorm``,
    ``moe_router_enable_expert_bias`` and ``mtp_num_layers`` (all at their defaults, off,
    except ``sequence_parallel``). ``sequence_parallel`` is on whenever ``tp > 1``: then
    ``finalize_model_grads`` sums over the TP group the gradients of parameters marked
    ``param.sequence_parallel`` (``parallel/tensor_parallel.py``: routers, shared experts,
    and norm gains under sequence parallelism, which see only their rank's tokens). The
    required ``num_layers``/``hidden_size``/``num_attention_heads`` are placeholders that no
    code on this path reads (sized so that megatron's own divisibility checks by ``tp`` pass).
    """
    from megatron.core.transformer import TransformerConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return TransformerConfig(
            num_layers=1,
            hidden_size=8 * tp,
            num_attention_heads=tp,
            tensor_model_parallel_size=tp,
            sequence_parallel=tp > 1,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
        )


def _process_groups(groups: ParallelGroups) -> Any:
    """megatron's ``ProcessGroupCollection`` from our groups (no context parallelism: dp_cp = dp)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg = ProcessGroupCollection()
    pg.dp = groups.dp
    pg.dp_cp = groups.dp
    pg.expt_dp = groups.edp
    pg.tp = groups.tp
    pg.pp = groups.pp
    pg.ep = groups.ep
    pg.expt_tp = groups.etp
    pg.mp = groups.mp
    pg.tp_ep_pp = groups.expt_tp_pp
    pg.intra_dist_opt = groups.dist_opt
    pg.embd = groups.embd
    pg.pos_embd = groups.pos_embd
    return pg
