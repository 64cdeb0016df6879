"""A sweep's results: the table (``results.md``/``results.jsonl``, rewritten as trials
finish), and the report of ``moe sweep report DIR``: ``report.md``, ``fit.json`` and plots.

Rows come from the trial directories on disk (``trials/<key>/trial.json``, ``config.yaml``,
``summary.json``), so a report can be made from any finished subset of a sweep.

Grouping: a trial's *base size* is its overrides without the expert count, the routing
(router, top-k, gate renormalisation: a sweep may pick them per E), the seed, the steps
and the expert width (which ``hold`` may adjust per E). Its ``N`` for
the fit is the non-embedding active parameter count of the base size's dense trial
(E = 1, learned router) when there is one, else the group's median. A trial's *routing*
is ``learned`` (``topk`` or ``sinkhorn``: a sweep may pick the router per E, one learned
router per (base, E)), ``hash`` (top-1, Clark et al.'s baseline) or ``hash-topK`` (Roller et
al.'s multi-hash with K experts per token, the same expert widths as learned top-K). Only
learned-router trials enter the fit; each hash routing is compared with them at equal (base, E).
A granularity axis (``moe.granularity`` G > 1, fine-grained experts: E·G experts of width
F/G, K·G per token) gives the routing ``learned-gG``: not in the fit, which is Clark et al.'s
law in E at G = 1, but compared with coarse learned routing at equal (base, E), where total
and active parameters are equal (``moe.accounting``).

Legend: rows are dicts, one per finished trial.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from launch.dirlock import LOCK_FILE
from launch.scaling_fit import COEFFS, ExpertLaw, fit_power_law, fit_with_uncertainty
from moe.config import ConfigError

NOT_SIZE = {
    "moe.num_experts", "moe.router", "moe.top_k", "moe.normalize_weights", "train.seed", "train.steps", "moe.expert_ffn_dim",
    "moe.granularity",
}


def _row(trial_dir: Path) -> dict[str, Any] | None:
    """A finished trial's row, None for an unfinished one; a trial whose files cannot be
    read is one error naming it (a report silently missing a trial would mislead)."""
    summary_path = trial_dir / "summary.json"
    if not summary_path.is_file() or not (trial_dir / "trial.json").is_file():
        return None
    try:
        return _read_row(trial_dir, summary_path)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{trial_dir}: unreadable trial files ({type(err).__name__}: {err}); fix them, or delete the "
            "directory and run the sweep again to rerun that trial"
        ) from None


def _read_row(trial_dir: Path, summary_path: Path) -> dict[str, Any]:
    trial = json.loads((trial_dir / "trial.json").read_text())
    summary = json.loads(summary_path.read_text())
    cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    params, load = summary["params"], summary["expert_load_tail"]
    return {
        "key": trial["key"],
        "overrides": trial["overrides"],
        "experts": cfg["moe"]["num_experts"],
        "router": cfg["moe"]["router"],
        "top_k": cfg["moe"]["top_k"],
        "granularity": cfg["moe"].get("granularity", 1),  # trials run before fine-grained experts: 1
        "expert_ffn_dim": cfg["moe"]["expert_ffn_dim"],
        "seed": cfg["train"]["seed"],
        "params_total": params["total"],
        "params_active": params["active"],
        "params_embedding": params["embedding"],
        "params_non_embedding_total": params["non_embedding_total"],
        "params_non_embedding_active": params["non_embedding_active"],
        "flops_per_token": summary["flops_per_token"],
        "tokens_seen": summary["tokens_seen"],
        "final_val_loss": summary["final_val_loss"],
        "best_val_loss": summary["best_val_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "wall_seconds": summary["wall_seconds"],
        "load_min_share": load["min_share"],
        "load_max_share": load["max_share"],
        "load_shares": load["shares"],
    }


def routing_of(router: str, top_k: int, granularity: int = 1) -> str:
    """``learned`` for any learned router (``learned-gG`` with fine-grained experts,
    granularity G > 1); ``hash`` (top-1) or ``hash-topK`` for hash routing."""
    if router != "hash":
        return "learned" if granularity == 1 else f"learned-g{granularity}"
    return "hash" if top_k == 1 else f"hash-top{top_k}"


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """Finished trials, each with its base-size label (``base``) and ``N``."""
    rows = [r for d in sorted((Path(out_dir) / "trials").glob("*")) if (r := _row(d)) is not None]
    size_keys = sorted({k for r in rows for k in r["overrides"] if k not in NOT_SIZE})
    varying = [k for k in size_keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]
    for r in rows:
        r["base"] = ", ".join(f"{k}={r['overrides'].get(k)}" for k in varying) or "base"
        r["routing"] = routing_of(r["router"], r["top_k"], r["granularity"])
    _check_one_learned_router(rows)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["base"]].append(r)
    for members in groups.values():
        dense = [r["params_non_embedding_active"] for r in members if r["experts"] == 1 and r["routing"] == "learned"]
        n = dense[0] if dense else float(np.median([r["params_non_embedding_active"] for r in members]))
        for r in members:
            r["N"] = n
    rows.sort(key=lambda r: (r["N"], r["router"], r["experts"], r["seed"]))
    return rows


def _check_one_learned_router(rows: list[dict[str, Any]]) -> None:
    """Learned routers are one line per base size: two of them at one (base, E) would be
    averaged together as if they were seeds."""
    routers: dict[tuple[str, int, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["routing"].startswith("learned"):
            routers[(r["base"], r["experts"], r["routing"])].add(r["router"])
    clash = {k: sorted(v) for k, v in routers.items() if len(v) > 1}
    if clash:
        (base, e, _), names = next(iter(clash.items()))
        raise ConfigError(
            f"base size '{base}', E={e} has trials of the learned routers {names}: a report compares "
            "one learned router with hash routing; put each learned router in its own sweep (out_dir)"
        )


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` was made by ``moe sweep``, which writes sweep.json and trials/ first."""
    return (path / "sweep.json").is_file() or (path / "trials").is_dir()


def check_sweep_dir(out_dir: Path) -> None:
    """``moe sweep report DIR`` writes results.md, report.md, fit.json and plots into DIR:
    only into a directory ``moe sweep`` made, and never a new one, so a mistyped DIR can
    neither overwrite a user's files nor leave a directory behind."""
    hint = "give a sweep's out_dir (e.g. runs/sweeps/experts)"
    if not out_dir.exists():
        raise ConfigError(f"{out_dir}: no such directory; {hint}")
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file, not a sweep directory; {hint}")
    if not is_sweep_dir(out_dir):
        raise ConfigError(
            f"{out_dir}: not a sweep directory (no sweep.json or trials/ in it); a report writes results.md, "
            f"report.md and fit.json only into a directory made by `moe sweep`: {hint}"
        )


def make_sweep_dir(out_dir: Path) -> None:
    """Create ``moe sweep``'s out_dir, or reuse an earlier run's (the sweep resumes); an
    existing directory of other files is refused before anything is written into it."""
    where = f"out_dir={str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{where} is a file; choose a new or empty directory")
    if out_dir.is_dir() and not is_sweep_dir(out_dir):
        foreign = sorted(path.name for path in out_dir.iterdir() if path.name != LOCK_FILE)
        if foreign:
            raise ConfigError(
                f"{where} is not a sweep directory (it holds {foreign[0]}, which `moe sweep` did not write); "
                "choose a new or empty directory"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{where}: cannot create it ({err.strerror}); choose a writable location") from None


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``: a
    reader (or a killed report) never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as err:
        raise ConfigError(f"{path}: cannot write it ({err.strerror}); is {path.parent} writable?") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` replaced whole by ``text`` (see ``_write_atomically``); ``moe sweep`` writes its
    own state files (sweep.json, each trial.json) through this too."""
    _write_atomically(path, lambda temporary: temporary.write_text(text))


def write_results_table(out_dir: Path) -> int:
    """``results.md`` and ``results.jsonl`` from the finished trials; their number."""
    rows = collect(out_dir)
    _write_table(Path(out_dir), rows)
    return len(rows)


def _write_table(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    lines = [
        "| trial | base size | router | E | G | seed | params total (non-emb) | active (non-emb) | embedding "
        "| FLOPs/token | tokens | final val loss | best val loss | tokens/s | expert share min-max |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = f"{_fmt(r['load_min_share'], 3)}-{_fmt(r['load_max_share'], 3)}"
        lines.append(
            f"| {r['key']} | {r['base']} | {r['router']} | {r['experts']} | {r['granularity']} | {r['seed']} | "
            f"{_si(r['params_non_embedding_total'])} | {_si(r['params_non_embedding_active'])} | "
            f"{_si(r['params_embedding'])} | {_si(r['flops_per_token'])} | {_si(r['tokens_seen'])} | "
            f"{_fmt(r['final_val_loss'])} | {_fmt(r['best_val_loss'])} | {r['tokens_per_s']:.0f} | {share} |"
        )
    write_text_atomically(out_dir / "results.md", "# Sweep results (finished trials)\n\n" + "\n".join(lines) + "\n")
    records = "".join(json.dumps({k: v for k, v in r.items() if k != "load_shares"}) + "\n" for r in rows)
    write_text_atomically(out_dir / "results.jsonl", records)


# -- analysis ---------------------------------------------------------------------------


def _means(rows: list[dict[str, Any]], loss_key: str) -> dict[tuple[float, str, int], tuple[float, int]]:
    """(N, routing, E) -> (mean loss over seeds, number of seeds)."""
    acc: dict[tuple[float, str, int], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["N"], r["routing"], r["experts"])].append(r[loss_key])
    return {k: (float(np.mean(v)), len(v)) for k, v in acc.items()}


def seed_noise(rows: list[dict[str, Any]], loss_key: str) -> dict[str, Any]:
    """Pooled standard deviation of the loss across seeds at points with >= 2 seeds."""
    acc: dict[tuple[float, str, int], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["N"], r["routing"], r["experts"])].append(r[loss_key])
    points = {k: v for k, v in acc.items() if len(v) >= 2}
    if not points:
        return {"sigma": None, "points": []}
    dof = sum(len(v) - 1 for v in points.values())
    pooled = math.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in points.values()) / dof)
    return {
        "sigma": pooled,
        "points": [{"N": k[0], "routing": k[1], "experts": k[2], "losses": v} for k, v in points.items()],
    }


def checks(rows: list[dict[str, Any]], loss_key: str, sigma: float | None, b: float | None) -> dict[str, Any]:
    """The acceptance questions: does the loss fall with E at every base size (each step
    by more than 2 sigma of seed noise), is b < 0, does learned routing beat hash at E >= 8."""
    means = _means(rows, loss_key)
    monotone: dict[str, Any] = {}
    for n in sorted({k[0] for k in means}):
        es = sorted(e for (nn, routing, e) in means if nn == n and routing == "learned")
        drops = [means[(n, "learned", a)][0] - means[(n, "learned", c)][0] for a, c in zip(es, es[1:])]
        monotone[str(n)] = {
            "experts": es,
            "losses": [means[(n, "learned", e)][0] for e in es],
            "drops": drops,
            "monotone": all(d > 0 for d in drops),
            "beyond_noise": None if sigma is None else all(d > 2 * sigma for d in drops),
        }
    versus, fine = [], []
    for (n, routing, e), (loss, _) in sorted(means.items()):
        if routing != "learned" and (n, "learned", e) in means:
            pair = {"N": n, "experts": e, "routing": routing, "learned": means[(n, "learned", e)][0]}
            if routing.startswith("learned-g"):
                fine.append({**pair, "fine_grained": loss})
            else:
                versus.append({**pair, "hash": loss})
    big = [v for v in versus if v["experts"] >= 8]
    by_routing = {}
    for routing in sorted({v["routing"] for v in big}):
        wins = [v["learned"] < v["hash"] for v in big if v["routing"] == routing]
        by_routing[routing] = {"all": all(wins), "wins": sum(wins), "points": len(wins)}
    matched = equal_total_pairs(rows, loss_key)
    return {
        "monotone_in_E": monotone,
        "all_monotone": all(m["monotone"] for m in monotone.values()) if monotone else None,
        "all_beyond_noise": (all(m["beyond_noise"] for m in monotone.values()) if monotone and sigma else None),
        "b_negative": None if b is None else b < 0,
        "learned_vs_hash": versus,
        "learned_beats_hash_at_E_ge_8": all(t["all"] for t in by_routing.values()) if by_routing else None,
        "learned_beats_hash_at_E_ge_8_by_routing": by_routing,
        "learned_vs_hash_equal_total_params": matched,
        "fine_grained_vs_coarse": fine,
    }


def equal_total_pairs(rows: list[dict[str, Any]], loss_key: str, tolerance: float = 0.1) -> list[dict[str, Any]]:
    """Hash trials against the learned trial of the same base size with the nearest total
    non-embedding parameter count (within ``tolerance``), mean losses over seeds.

    At equal E the two differ in total parameters when their top-k does: under
    ``hold: active_params`` a top-2 expert is half as wide as a top-1 expert, so learned
    top-2 at 2E has the total (and active) parameters of hash top-1 at E, which is how
    Clark et al. compare routers (top-1 throughout, equal E). With the same top-k (hash
    top-2 is multi-hash) the pair is at equal E.
    """
    means = _means(rows, loss_key)
    totals = {(r["N"], r["routing"], r["experts"]): r["params_non_embedding_total"] for r in rows}
    pairs = []
    for (n, routing, e), total in sorted(totals.items()):
        if routing.startswith("learned"):
            continue
        near = [(abs(t / total - 1), ee, t) for (nn, rr, ee), t in totals.items() if nn == n and rr == "learned"]
        if not near or min(near)[0] > tolerance:
            continue
        _, e_learned, t_learned = min(near)
        pairs.append({"N": n, "routing": routing, "hash_experts": e, "hash": means[(n, routing, e)][0], "hash_total": total,
                      "learned_experts": e_learned, "learned": means[(n, "learned", e_learned)][0],
                      "learned_total": t_learned})
    return pairs


def analyse(rows: list[dict[str, Any]], loss_key: str, delta: float, bootstrap: int) -> dict[str, Any]:
    """Fit Eq. 1 and the per-size power laws to the learned-router trials; the checks."""
    learned = [r for r in rows if r["routing"] == "learned"]
    result: dict[str, Any] = {"loss": loss_key, "huber_delta": delta, "trials": len(rows), "fit": None}
    enough = len(learned) >= 6 and len({r["N"] for r in learned}) >= 2 and len({r["experts"] for r in learned}) >= 3
    if enough:
        n_, e_, l_ = (np.array([r[k] for r in learned], dtype=float) for k in ("N", "experts", loss_key))
        rep = fit_with_uncertainty(n_, e_, l_, delta=delta, bootstrap=bootstrap)
        result["fit"] = {
            "law": "log10 L = a log10 N + b log10 Ehat + c log10 N log10 Ehat + d (Clark et al. 2022, Eq. 1)",
            "coefficients": rep.law.as_dict(),
            "ci95_low": rep.ci_low,
            "ci95_high": rep.ci_high,
            "bootstrap_samples": rep.bootstrap_samples,
            "rmse_log10_in_sample": rep.rmse_log10_in_sample,
            "rmse_log10_leave_one_out": rep.rmse_log10_loo,
            "max_rel_error_leave_one_out": rep.max_rel_error_loo,
            "n_bar": {r["key"]: {"observed": nb, "fitted": nf} for r, nb, nf in zip(learned, rep.n_bar, rep.n_bar_fitted)},
        }
        # N̄ of every trial (hash-routed ones too) from its observed loss under the fitted law.
        for r in rows:
            r["n_bar"] = float(rep.law.n_bar(np.array([r[loss_key]]))[0])
    power = {}
    for n in sorted({r["N"] for r in learned}):
        members = [r for r in learned if r["N"] == n]
        if len({r["experts"] for r in members}) >= 2:
            law = fit_power_law(np.array([r["experts"] for r in members]), np.array([r[loss_key] for r in members]))
            power[str(n)] = {"alpha": law.alpha, "beta": law.beta, "beta_se": law.beta_se}
    result["power_law_in_E"] = power
    noise = seed_noise(rows, loss_key)
    result["seed_noise"] = noise
    b = result["fit"]["coefficients"]["b"] if result["fit"] else None
    result["checks"] = checks(rows, loss_key, noise["sigma"], b)
    return result


# -- plots ------------------------------------------------------------------------------


def _save_png(fig: Any, path: Path) -> None:
    _write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))


def _plots(rows: list[dict[str, Any]], analysis: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_key = analysis["loss"]
    means = _means(rows, loss_key)
    sizes = sorted({k[0] for k in means})
    hashes = sorted({k[1] for k in means} - {"learned"})
    styles = {"learned": "o-", **{h: m + ":" for h, m in zip(hashes, itertools.cycle("s^vD"))}}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    law = ExpertLaw(**analysis["fit"]["coefficients"]) if analysis["fit"] else None
    for i, n in enumerate(sizes):
        color = colors[i % len(colors)]
        for routing, style in styles.items():
            es = sorted(e for (nn, rr, e) in means if nn == n and rr == routing)
            if es:
                label = f"N={_si(n)} {routing}"
                ax.plot(es, [means[(n, routing, e)][0] for e in es], style, color=color, label=label,
                        mfc=color if routing == "learned" else "none")
        if law is not None:
            grid = np.geomspace(1, max(e for (_, _, e) in means), 100)
            ax.plot(grid, law.loss(np.full_like(grid, n), grid), "--", color=color, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E")
    ax.set_ylabel(f"validation loss ({loss_key}, nats/token)")
    ax.set_title("loss vs experts (dashed: Clark et al. Eq. 1 fit)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, out_dir / "loss_vs_experts.png")
    plt.close(fig)
    names.append("loss_vs_experts.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    learned = [r for r in rows if r["routing"] == "learned"]
    for i, e in enumerate(sorted({r["experts"] for r in learned})):
        pts = sorted((r["params_non_embedding_active"], means[(r["N"], "learned", e)][0]) for r in learned if r["experts"] == e)
        pts = sorted(dict(pts).items())
        ax.plot([p for p, _ in pts], [m for _, m in pts], "o-", color=colors[i % len(colors)], label=f"E={e}")
    ax.set_xscale("log")
    ax.set_xlabel("active non-embedding parameters")
    ax.set_ylabel(f"validation loss ({loss_key})")
    ax.set_title("loss vs active parameters, one line per E (learned routing)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, out_dir / "loss_vs_active_params.png")
    plt.close(fig)
    names.append("loss_vs_active_params.png")

    if learned:
        top = max(learned, key=lambda r: (r["experts"], r["N"]))
        shares_LE = np.array(top["load_shares"])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for layer, shares_E in enumerate(shares_LE):
            ax.plot(np.arange(len(shares_E)), shares_E, "o-", ms=3, label=f"MoE layer {layer}")
        ax.axhline(1.0 / top["experts"], color="gray", ls="--", lw=1, label="uniform 1/E")
        ax.set_xlabel("expert")
        ax.set_ylabel("share of routed assignments")
        ax.set_title(f"expert load, E={top['experts']}, N={_si(top['N'])} (last 10% of steps)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save_png(fig, out_dir / "expert_load.png")
        plt.close(fig)
        names.append("expert_load.png")
    return names


# -- the report -------------------------------------------------------------------------


def _fit_settings(out_dir: Path) -> tuple[str, float, int]:
    """The fit options recorded by ``moe sweep`` in ``sweep.json`` (defaults otherwise)."""
    from launch.config import build
    from launch.sweep import FitConfig

    path = out_dir / "sweep.json"
    fit = FitConfig()
    if path.is_file():
        try:
            fit = build(FitConfig, json.loads(path.read_text())["fit"], "fit")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: unreadable fit settings ({err}); delete it to use the defaults") from None
    return fit.loss, fit.huber_delta, fit.bootstrap


def write_report(out_dir: Path) -> Path:
    """``report.md``, ``fit.json`` and the plots in ``out_dir``; the report's path."""
    out_dir = Path(out_dir)
    check_sweep_dir(out_dir)
    rows = collect(out_dir)
    if not rows:
        raise ConfigError(f"{out_dir}: no finished trials yet (no trials/*/summary.json); wait for one, or run the sweep")
    loss_key, delta, bootstrap = _fit_settings(out_dir)
    _write_table(out_dir, rows)
    analysis = analyse(rows, loss_key, delta, bootstrap)
    write_text_atomically(out_dir / "fit.json", json.dumps(analysis, indent=2))
    plots = _plots(rows, analysis, out_dir)
    write_text_atomically(out_dir / "report.md", _markdown(rows, analysis, plots))
    return out_dir / "report.md"


def _markdown(rows: list[dict[str, Any]], analysis: dict[str, Any], plots: list[str]) -> str:
    loss_key = analysis["loss"]
    out = [f"# Scaling with the number of experts\n\n{len(rows)} finished trials; loss = `{loss_key}` "
           "(nats/token on the held-out split). N = non-embedding active parameters of the base size's dense "
           "(E=1) model; N̄ = dense size with the same loss under the fitted law.\n"]
    out.append("| base size | router | E | seed | N | active params (non-emb / +emb) | total params (non-emb) "
               "| FLOPs/token | tokens | loss | N̄ |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out.append(
            f"| {r['base']} | {r['router']} k={r['top_k']} | {r['experts']} | {r['seed']} | {_si(r['N'])} | "
            f"{_si(r['params_non_embedding_active'])} / {_si(r['params_active'])} | "
            f"{_si(r['params_non_embedding_total'])} | {_si(r['flops_per_token'])} | {_si(r['tokens_seen'])} | "
            f"{_fmt(r[loss_key])} | {_si(r['n_bar']) if 'n_bar' in r else '-'} |"
        )
    fit = analysis["fit"]
    out.append("\n## Fit: Clark et al. 2022, Eq. 1\n")
    if fit is None:
        out.append("Not enough learned-router trials (needs >= 6, over >= 2 base sizes and >= 3 expert counts).\n")
    else:
        out.append("`log10 L = a·log10 N + b·log10 Ê + c·log10 N·log10 Ê + d`, "
                   "`1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^−1) + 1/E_max`; Huber loss "
                   f"(delta {analysis['huber_delta']:g}) on log10 L, BFGS from a grid of starts; 95% intervals from "
                   f"{fit['bootstrap_samples']} bootstrap refits.\n")
        out.append("| coefficient | value | 95% CI |\n|---|---:|---|")
        for k in COEFFS:
            out.append(f"| {k} | {fit['coefficients'][k]:.4g} | [{fit['ci95_low'][k]:.4g}, {fit['ci95_high'][k]:.4g}] |")
        out.append(f"\nRMS error of log10 L: {fit['rmse_log10_in_sample']:.2e} in sample, "
                   f"{fit['rmse_log10_leave_one_out']:.2e} leave-one-out (largest leave-one-out relative error "
                   f"of L: {100 * fit['max_rel_error_leave_one_out']:.2f}%).\n")
    if analysis["power_law_in_E"]:
        out.append("## Power law in E per base size\n\n`log10 L = alpha + beta·log10 E` (learned routing)\n")
        out.append("| N | beta | s.e. |\n|---:|---:|---:|")
        for n, p in analysis["power_law_in_E"].items():
            out.append(f"| {_si(float(n))} | {p['beta']:.4f} | {_fmt(p['beta_se'])} |")
    noise, chk = analysis["seed_noise"], analysis["checks"]
    out.append("\n## Checks\n")
    if noise["sigma"] is None:
        out.append("- seed noise: no point has two seeds")
    else:
        pts = "; ".join(f"N={_si(p['N'])} E={p['experts']} {p['routing']}: "
                        + ", ".join(f"{v:.4f}" for v in p["losses"]) for p in noise["points"])
        out.append(f"- seed noise (pooled std of the loss across seeds): {noise['sigma']:.4f} ({pts})")
    for n, m in chk["monotone_in_E"].items():
        drops = ", ".join(f"{d:+.4f}" for d in m["drops"])
        out.append(f"- N={_si(float(n))}: loss over E={m['experts']} falls at each step: {m['monotone']}; "
                   f"each drop > 2 sigma: {m['beyond_noise']} (drops {drops})")
    out.append(f"- fit has b < 0: {chk['b_negative']}")
    for v in chk["learned_vs_hash"]:
        out.append(f"- N={_si(v['N'])} E={v['experts']}: learned {v['learned']:.4f} vs {v['routing']} {v['hash']:.4f}")
    out.append(f"- learned beats hash at every E >= 8: {chk['learned_beats_hash_at_E_ge_8']}")
    for routing, tally in chk["learned_beats_hash_at_E_ge_8_by_routing"].items():
        out.append(f"  - against {routing}: {tally['all']} (learned better at {tally['wins']} of {tally['points']})")
    matched = chk["learned_vs_hash_equal_total_params"]
    if matched:
        wins = sum(m["learned"] < m["hash"] for m in matched)
        out.append(f"- at equal total (and active) parameters, learned beats hash in {wins} of {len(matched)} pairs:")
        for m in matched:
            out.append(f"  - N={_si(m['N'])}: learned E={m['learned_experts']} ({_si(m['learned_total'])} params) "
                       f"{m['learned']:.4f} vs {m['routing']} E={m['hash_experts']} ({_si(m['hash_total'])}) {m['hash']:.4f}")
    for v in chk["fine_grained_vs_coarse"]:
        out.append(f"- fine-grained experts, N={_si(v['N'])} E={v['experts']}: coarse learned {v['learned']:.4f} vs "
                   f"{v['routing']} {v['fine_grained']:.4f} (equal total and active parameters)")
    walls = sorted(r["wall_seconds"] for r in rows)
    speeds = sorted(r["tokens_per_s"] for r in rows)
    out.append(f"\n## Timing\n\nPer trial, training loop only (summary.json `wall_seconds`, without process start, "
               f"imports and data loading): min {walls[0]:.0f} s, median {walls[len(walls) // 2]:.0f} s, max "
               f"{walls[-1]:.0f} s, sum {sum(walls) / 60:.1f} min; {speeds[0]:.0f}-{speeds[-1]:.0f} tokens/s.")
    out.append("\n## Plots\n")
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"
