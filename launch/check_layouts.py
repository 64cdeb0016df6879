"""``moe check-layouts``: the same training under several parallel layouts, compared.

    moe check-layouts configs/tiny.yaml --layouts "ep=1;ep=2;dp=2;dp=2,ep=2" [--steps 3] [overrides...]

Every layout trains the same seed and global batch for a few steps (through the same
launcher as ``moe train``); the table shows, per step and layout, the LM loss, aux loss,
z-loss, the routers' gradient norm and the routed tokens per expert, with the largest
relative difference against the first layout. Any difference above ``--rtol`` (or any
tokens-per-expert count or, with ``moe.expert_bias_update_rate``, expert bias that
differs) fails, and the command exits non-zero.

A layout is ``key=value`` pairs joined by commas; a key is any field of the ``parallel``
section, by its own name (``tp``, ``pp``, ``ep``, ``dp``, ``etp``, ``vpp``,
``first_stage_layers``, ``sequence_parallel``, ``engine``, ``zero_stage``, ... : whatever
``parallel.config.ParallelConfig`` holds), or one of two short aliases: ``micro`` for
``train.micro_batch_size`` (to check gradient accumulation) and ``zero`` for
``parallel.zero_stage``. Values are YAML, as in config overrides (``sequence_parallel=true``,
``first_stage_layers=null``). Defaults that make a layout runnable on its own:

- without ``dp``, the smallest data-parallel degree that holds the expert groups
  (``etp·ep`` must divide ``tp·dp``: ``ep=2`` alone means two ranks, ``tp=2,ep=2`` two as
  well), and at least 2 with ``engine=deepspeed`` (ZeRO over one rank partitions nothing);
- without ``micro`` under a pipeline (``pp > 1``) and with ``train.micro_batch_size``
  unset, micro-batches of ``batch_size / (dp·pp)`` sequences: ``pp`` micro-batches per
  step, the fewest a pipeline (and the interleaved schedule) accepts.

Under ``moe.aux_loss_scope=micro_batch`` (the default) the aux loss is taken over each
forward's tokens, so layouts whose micro-batches differ (``dp``, ``micro``, a pipeline's
micro-batches) cannot agree, whatever the parallelism does: the command says so before
training (a warning naming the layouts' micro-batches and ``moe.aux_loss_scope=global_batch``,
the scope that does not depend on them), then runs as asked. So it does for the other
per-forward balancing: noisy top-k's importance and load losses (per forward whatever the
aux scope; under TP each TP rank's sequences) and expert choice with
``moe.expert_choice_scope=micro_batch`` (the experts choose among one forward's tokens).

The engine column names what trained each layout: ``local`` (one process, torch AdamW),
``megatron`` (megatron-core DDP + distributed optimizer) or ``deepspeed-z<stage>``.

Tolerance: fp32 throughout; layouts sum the same numbers in a different order (the
data-parallel all-reduce, the expert all-to-all, tensor-parallel partial sums of a
row-split matmul, pipeline stages' gradient accumulation), which moves the last bits:
measured differences are ~1e-7 to 5e-7, so the default ``--rtol 1e-5`` leaves a 20x margin
and still fails on any real error (a wrong scale or a missed reduction is >= 1e-3).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from launch.config import Config, load_config, output_dir
from launch.metrics import read_metrics
from moe.config import ConfigError
from parallel.config import ParallelConfig

# layout key -> config key: every ParallelConfig field by its own name, and the short aliases
ALIASES = {"micro": "train.micro_batch_size", "zero": "parallel.zero_stage"}
LAYOUT_KEYS = {**{f.name: f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)}, **ALIASES}
COMPARED = ("lm_loss", "aux_loss", "z_loss", "router_grad_norm")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One layout: its name as given, its config overrides, and (once its config is
    loaded, see :func:`layout_configs`) the engine that trains it."""

    name: str
    overrides: list[str]
    engine: str = ""


def parse_layouts(text: str) -> list[Layout]:
    """``"ep=2;dp=2,micro=2"`` -> layouts with their config overrides (``dp`` filled in
    when absent, see the module docstring). Keys are ``LAYOUT_KEYS``: the ``parallel``
    section's fields and the aliases ``micro`` and ``zero``; each config key at most once.
    The overrides come in the order given, ``parallel.dp`` next when it was filled in,
    ``train.micro_batch_size`` last."""
    layouts = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        pairs: dict[str, str] = {}  # config key -> value text
        given: dict[str, str] = {}  # config key -> the pair that set it
        for pair in (p.strip() for p in item.split(",")):
            key, sep, value = (part.strip() for part in pair.partition("="))
            if not sep or key not in LAYOUT_KEYS:
                raise ConfigError(f"layout {item!r}: {pair!r} is not key=value with a key in "
                                  f"{', '.join(LAYOUT_KEYS)}{_closest(key)}")
            target = LAYOUT_KEYS[key]
            if target in pairs:
                raise ConfigError(f"layout {item!r}: {target} is given twice ({given[target]!r} and {pair!r}); "
                                  "give it once")
            pairs[target], given[target] = value, pair
        if "parallel.dp" not in pairs:
            pairs["parallel.dp"] = str(_default_dp(item, pairs))
        micro = pairs.pop("train.micro_batch_size", None)
        overrides = [f"{k}={v}" for k, v in pairs.items()]
        if micro is not None:
            overrides.append(f"train.micro_batch_size={micro}")
        layouts.append(Layout(item, overrides))
    if not layouts:
        raise ConfigError(f"--layouts {text!r}: no layout given; e.g. --layouts \"ep=1;ep=2;dp=2\"")
    return layouts


def _closest(key: str) -> str:
    """`` (did you mean 'ep'?)`` for the layout key nearest ``key``, or ``""``."""
    close = difflib.get_close_matches(key, list(LAYOUT_KEYS), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _default_dp(item: str, pairs: dict[str, str]) -> int:
    """The smallest dp with ``etp·ep | tp·dp``; at least 2 under the DeepSpeed engine.
    ``pairs``: config key -> value text (YAML)."""
    values = {k: yaml.safe_load(pairs.get(f"parallel.{k}", "1")) for k in ("ep", "etp", "tp")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        raise ConfigError(f"layout {item!r}: ep, etp and tp must be integers")
    ep, etp, tp = values["ep"], values["etp"], values["tp"]
    if min(ep, etp, tp) < 1:
        raise ConfigError(f"layout {item!r}: ep, etp and tp must be >= 1")
    dp = ep * etp // math.gcd(ep * etp, tp)
    return max(dp, 2) if yaml.safe_load(pairs.get("parallel.engine", "megatron")) == "deepspeed" else dp


def engine_label(cfg: Config) -> str:
    """What trains ``cfg``'s layout: ``local`` (one process), ``megatron`` or ``deepspeed-z<stage>``."""
    p = cfg.parallel
    if p.is_single_process:
        return "local"
    if p.engine == "deepspeed":
        return f"deepspeed-z{p.zero_stage}" + ("+offload" if p.offload_optimizer else "")
    return p.engine


def layout_configs(
    config: str | Path, overrides: list[str], layouts: list[Layout], steps: int, out: Path
) -> tuple[list[Layout], list[Config]]:
    """Load and validate every layout's config before anything runs; each layout trains
    ``steps`` steps into ``out/<index>-<name>``. Returns the layouts with their engine
    named, and their configs."""
    from launch.train import check_layout

    named, configs = [], []
    for i, layout in enumerate(layouts):
        run_dir = out / f"{i}-{layout.name.replace(',', '_').replace('=', '')}"
        common = [f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
                  f"train.ckpt_every={steps}", f"train.run_dir={run_dir}", "train.resume=false"]
        cfg = load_config(config, [*overrides, *common, *layout.overrides])
        cfg = pipeline_micro_batches(cfg)
        try:
            check_layout(cfg)
        except ConfigError as err:
            raise ConfigError(f"layout {layout.name!r} is refused: {err}") from None
        named.append(dataclasses.replace(layout, engine=engine_label(cfg)))
        configs.append(cfg)
    return named, configs


def pipeline_micro_batches(cfg: Config) -> Config:
    """Under a pipeline, ``pp`` micro-batches per step unless the micro-batch size is set."""
    p, train = cfg.parallel, cfg.train
    if p.pp == 1 or train.micro_batch_size is not None or train.batch_size % (p.dp * p.pp):
        return cfg  # a batch that does not split is left to check_layout to refuse, with its message
    micro = train.batch_size // (p.dp * p.pp)
    return dataclasses.replace(cfg, train=dataclasses.replace(train, micro_batch_size=micro))


def micro_batch(cfg: Config) -> int:
    """The sequences one forward of one data-parallel replica routes (its micro-batch)."""
    return cfg.train.micro_batch_size or cfg.train.batch_size // cfg.parallel.dp


def _by_value(layouts: list[Layout], configs: list[Config], value: Callable[[Config], float]) -> str | None:
    """``"v1 under a, b; v2 under c"`` of each layout's ``value``, or None when all are equal."""
    by_value: dict[float, list[str]] = {}
    for layout, cfg in zip(layouts, configs):
        by_value.setdefault(value(cfg), []).append(layout.name)
    if len(by_value) < 2:
        return None
    return "; ".join(f"{size:g} under {', '.join(names)}" for size, names in by_value.items())


def _per_tp_rank(cfg: Config) -> float:
    """The sequences each TP rank of a forward routes (its micro-batch over ``parallel.tp``)."""
    return micro_batch(cfg) / cfg.parallel.tp


def aux_scope_warning(layouts: list[Layout], configs: list[Config]) -> str | None:
    """Why the layouts cannot agree, when they cannot: whatever depends on the tokens of one
    forward differs between layouts whose forwards differ (dp, micro, a pipeline's
    micro-batching, tp), by definition, however right the parallelism is. Three things do:

    - ``moe.aux_loss_scope=micro_batch``: the Switch aux loss over each forward's tokens
      (under TP its counts are summed over tp: the whole micro-batch);
    - ``moe.router=noisy_topk``'s importance and load losses, per forward only whatever
      ``moe.aux_loss_scope`` says (under TP over each TP rank's sequences);
    - ``moe.router=expert_choice`` with ``moe.expert_choice_scope=micro_batch``: the experts
      choose among one forward's tokens (under TP each TP rank's), so the routing itself.

    One warning line per cause that applies; None when nothing differs."""
    moe, model = configs[0].moe, configs[0].model
    if model.moe_every == 0:
        return None
    lines = []
    switch = moe.aux_loss_scope == "micro_batch" and moe.aux_loss_coeff > 0 and moe.router != "hash"
    groups = _by_value(layouts, configs, micro_batch) if switch else None
    if groups:
        lines.append(
            f"warning: moe.aux_loss_scope=micro_batch takes the aux loss over each forward's tokens, and these layouts' "
            f"forwards route different sequences (sequences per micro-batch: {groups}): their aux losses, and through "
            "them the router gradients and later losses, differ by definition, not by a fault. To compare the layouts, "
            "set moe.aux_loss_scope=global_batch (the same for every dp, ep and micro-batch size)"
        )
    noisy = moe.router == "noisy_topk" and (moe.importance_loss_coeff > 0 or moe.load_loss_coeff > 0)
    groups = _by_value(layouts, configs, _per_tp_rank) if noisy else None
    if groups:
        lines.append(
            "warning: moe.router=noisy_topk's importance and load losses are per forward only (over each forward's "
            "tokens, whatever moe.aux_loss_scope says), and these layouts' forwards route different sequences "
            f"(sequences per forward and TP rank: {groups}): those losses, and through them the router gradients and "
            "later losses, differ by definition, not by a fault. To compare the layouts, set "
            "moe.importance_loss_coeff=0 and moe.load_loss_coeff=0 (and balance with moe.aux_loss_scope=global_batch)"
        )
    choice = moe.router == "expert_choice" and moe.expert_choice_scope == "micro_batch"
    groups = _by_value(layouts, configs, _per_tp_rank) if choice else None
    if groups:
        lines.append(
            "warning: moe.expert_choice_scope=micro_batch lets each expert choose among one forward's tokens, and these "
            f"layouts' forwards route different sequences (sequences per forward and TP rank: {groups}): which tokens "
            "the experts take, and so every loss, differ by definition, not by a fault. To compare the layouts, set "
            "moe.expert_choice_scope=sequence (each sequence on its own: the same for every layout)"
        )
    return "\n".join(lines) or None


def check_arguments(steps: int, rtol: float) -> None:
    """``--steps`` and ``--rtol``, before anything is loaded or run."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be >= 1 (the steps each layout trains and compares)")
    if not math.isfinite(rtol) or rtol < 0:
        raise ConfigError(f"--rtol {rtol:g}: must be a finite number >= 0 (the largest relative difference "
                          "allowed; the default 1e-5 fits fp32)")


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The ``train`` records a layout's run wrote (one per step with ``log_every=1``)."""
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(results: list[list[dict[str, Any]]], layouts: list[Layout], rtol: float) -> tuple[list[str], bool]:
    """Table lines and whether every layout matches the first within ``rtol``."""
    width = max(18, *(len(layout.name) + 2 for layout in layouts))
    engine_width = max(14, *(len(layout.engine) + 2 for layout in layouts))
    header = f"{'step':>4}  {'layout':<{width}}{'engine':<{engine_width}}" + "".join(f"{k:>18}" for k in COMPARED) + f"{'max rel diff':>14}  tokens/expert (first MoE layer)  ok"
    lines, all_ok = [header, "-" * len(header)], True
    for step, reference in enumerate(results[0]):
        for layout, records in zip(layouts, results):
            record = records[step]
            diff = max(_rel(record[k], reference[k]) for k in COMPARED)
            # Routed counts are integers and the expert bias moves by +-u on them: both exact.
            same_tokens = record["expert_tokens"] == reference["expert_tokens"]
            same_bias = record.get("expert_bias") == reference.get("expert_bias")
            ok = diff <= rtol and same_tokens and same_bias
            all_ok &= ok
            values = "".join(f"{record[k]:>18.10g}" for k in COMPARED)
            tokens = record["expert_tokens"][0] if record["expert_tokens"] else []
            lines.append(f"{step + 1:>4}  {layout.name:<{width}}{layout.engine or '-':<{engine_width}}{values}{diff:>14.2e}  {str(tokens):<31}  {'PASS' if ok else 'FAIL'}")
    return lines, all_ok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe check-layouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every layout")
    parser.add_argument("--layouts", required=True, help='e.g. "ep=1;ep=2;dp=2;dp=2,ep=2"')
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="largest relative difference allowed (fp32: layouts differ by ~1e-7 to 5e-7)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    check_arguments(args.steps, args.rtol)
    layouts = parse_layouts(args.layouts)
    with output_dir(args.out, "check-layouts-") as out:
        return _check(args, layouts, out)


def _check(args: argparse.Namespace, layouts: list[Layout], out: Path) -> int:
    """Validate every layout's config, run each into ``out``, compare; 0 when they agree."""
    from launch.local_launcher import start

    layouts, configs = layout_configs(args.config, args.overrides, layouts, args.steps, out)
    warning = aux_scope_warning(layouts, configs)
    if warning:
        print(warning, file=sys.stderr)
    results = []
    for layout, cfg in zip(layouts, configs):
        print(f"running layout {layout.name} on {cfg.parallel.world_size} rank(s), engine {layout.engine} "
              f"({' '.join(layout.overrides)})", file=sys.stderr)
        start(cfg, Path(args.config).stem)
        results.append(train_records(Path(str(cfg.train.run_dir))))
    lines, ok = compare(results, layouts, args.rtol)
    print("\n".join(lines))
    verdict = "all layouts agree" if ok else "layouts DISAGREE"
    if warning and not ok:
        verdict += " (per-forward losses or routing: see the warning above)"
    print(f"{verdict} (rtol {args.rtol:g}); runs in {out}")
    (out / "check-layouts.json").write_text(json.dumps({"layouts": [l.name for l in layouts], "engines": [l.engine for l in layouts], "ok": ok, "records": results}))
    return 0 if ok else 1
