"""``moe check-layouts``: the same training under several parallel layouts, compared.

    moe check-layouts configs/tiny.yaml --layouts "ep=1;ep=2;dp=2;dp=2,ep=2" [--steps 3] [overrides...]

Every layout trains the same seed and global batch for a few steps (through the same
launcher as ``moe train``); the table shows, per step and layout, the LM loss, aux loss,
z-loss, the routers' gradient norm and the routed tokens per expert, with the largest
relative difference against the first layout. Any difference above ``--rtol`` (or any
tokens-per-expert count that differs) fails, and the command exits non-zero.

A layout is ``key=value`` pairs joined by commas; keys are the ``parallel`` section's
(tp, pp, ep, dp, etp, vpp, engine) plus ``micro`` for ``train.micro_batch_size`` (to check
gradient accumulation). Without ``dp``, the smallest data-parallel degree that holds the
expert-parallel groups is used (``ep=2`` alone means two ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from launch.config import Config, load_config
from launch.metrics import read_metrics
from moe.config import ConfigError

PARALLEL_KEYS = ("tp", "pp", "ep", "dp", "etp", "vpp", "engine")
COMPARED = ("lm_loss", "aux_loss", "z_loss", "router_grad_norm")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    overrides: list[str]


def parse_layouts(text: str) -> list[Layout]:
    """``"ep=2;dp=2,micro=2"`` -> layouts with their config overrides."""
    layouts = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        pairs = {}
        for pair in item.split(","):
            key, sep, value = pair.strip().partition("=")
            if not sep or key not in (*PARALLEL_KEYS, "micro"):
                raise ConfigError(
                    f"layout {item!r}: {pair.strip()!r} is not key=value with a key in "
                    f"{', '.join((*PARALLEL_KEYS, 'micro'))}"
                )
            pairs[key] = value
        if "dp" not in pairs:
            ep, etp, tp = (int(pairs.get(k, 1)) for k in ("ep", "etp", "tp"))
            pairs["dp"] = str(max(1, ep * etp // math.gcd(ep * etp, tp)))
        overrides = [f"parallel.{k}={v}" for k, v in pairs.items() if k != "micro"]
        if "micro" in pairs:
            overrides.append(f"train.micro_batch_size={pairs['micro']}")
        layouts.append(Layout(item, overrides))
    if not layouts:
        raise ConfigError(f"--layouts {text!r}: no layout given; e.g. --layouts \"ep=1;ep=2;dp=2\"")
    return layouts


def _configs(args: argparse.Namespace, layouts: list[Layout], out: Path) -> list[Config]:
    """Load and validate every layout's config before anything runs."""
    from launch.train import check_layout

    configs = []
    for i, layout in enumerate(layouts):
        run_dir = out / f"{i}-{layout.name.replace(',', '_').replace('=', '')}"
        common = [f"train.steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps}",
                  f"train.ckpt_every={args.steps}", f"train.run_dir={run_dir}", "train.resume=false"]
        cfg = load_config(args.config, [*args.overrides, *common, *layout.overrides])
        try:
            check_layout(cfg)
        except ConfigError as err:
            raise ConfigError(f"layout {layout.name!r} is refused: {err}") from None
        configs.append(cfg)
    return configs


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(results: list[list[dict[str, Any]]], layouts: list[Layout], rtol: float) -> tuple[list[str], bool]:
    """Table lines and whether every layout matches the first within ``rtol``."""
    header = f"{'step':>4}  {'layout':<18}" + "".join(f"{k:>18}" for k in COMPARED) + f"{'max rel diff':>14}  tokens/expert (first MoE layer)  ok"
    lines, all_ok = [header, "-" * len(header)], True
    for step, reference in enumerate(results[0]):
        for layout, records in zip(layouts, results):
            record = records[step]
            diff = max(_rel(record[k], reference[k]) for k in COMPARED)
            same_tokens = record["expert_tokens"] == reference["expert_tokens"]
            ok = diff <= rtol and same_tokens
            all_ok &= ok
            values = "".join(f"{record[k]:>18.10g}" for k in COMPARED)
            tokens = record["expert_tokens"][0] if record["expert_tokens"] else []
            lines.append(f"{step + 1:>4}  {layout.name:<18}{values}{diff:>14.2e}  {str(tokens):<31}  {'PASS' if ok else 'FAIL'}")
    return lines, all_ok


def main(argv: list[str]) -> int:
    from launch.local_launcher import start

    parser = argparse.ArgumentParser(prog="moe check-layouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every layout")
    parser.add_argument("--layouts", required=True, help='e.g. "ep=1;ep=2;dp=2;dp=2,ep=2"')
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-5, help="largest relative difference allowed (fp32)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    layouts = parse_layouts(args.layouts)
    out = args.out or Path(tempfile.mkdtemp(prefix="check-layouts-"))
    configs = _configs(args, layouts, out)
    results = []
    for layout, cfg in zip(layouts, configs):
        print(f"running layout {layout.name} ({' '.join(layout.overrides)})", file=sys.stderr)
        start(cfg, Path(args.config).stem)
        records = [r for r in read_metrics(Path(str(cfg.train.run_dir))) if r["kind"] == "train"]
        results.append(records)
    lines, ok = compare(results, layouts, args.rtol)
    print("\n".join(lines))
    verdict = "all layouts agree" if ok else "layouts DISAGREE"
    print(f"{verdict} (rtol {args.rtol:g}); runs in {out}")
    (out / "check-layouts.json").write_text(json.dumps({"layouts": [l.name for l in layouts], "ok": ok, "records": results}))
    return 0 if ok else 1
