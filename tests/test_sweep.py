"""Sweeps (launch/sweep.py, launch/sweep_report.py): config checks, planning, a tiny sweep
end to end through Ray Tune, resuming, and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from launch.dirlock import held_directory
from launch.scaling_fit import ExpertLaw
from launch.sweep import load_sweep, plan, run_sweep, write_sweep_json
from launch.sweep_report import analyse, collect, equal_total_pairs, write_report
from moe.accounting import param_counts, train_flops_per_token
from moe.config import ConfigError

TINY_FIXED = {
    "model.n_layers": 1, "model.n_heads": 2, "model.dim": 32, "moe.expert_ffn_dim": 64, "model.seq_len": 32,
    "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 1000, "train.ckpt_every": 4,
    "train.log_every": 4, "data.val_tokens": 1024, "launch.threads": 1,
}


def _sweep_file(tmp_path: Path, **raw: Any) -> Path:
    body = {"base": "configs/tiny.yaml", "out_dir": str(tmp_path / "out"), "fixed": TINY_FIXED,
            "grid": {"moe.num_experts": [1, 4]}, **raw}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# -- bad sweep configs fail before any trial starts ------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"grid": {"moe.num_expert": [1, 2]}}, r"grid.moe.num_expert: unknown parameter 'moe.num_expert' "
                                               r"\(did you mean 'moe.num_experts'\?\)"),
        ({"grid": {"mode.dim": [32]}}, r"unknown parameter 'mode.dim' \(did you mean 'model.dim'\?\)"),
        ({"grid": {}}, r"grid: empty grid"),
        ({"grid": {"moe.num_experts": []}}, r"grid.moe.num_experts=\[\]: expected a non-empty list"),
        ({"grid": {"size": [32, 64]}}, r"grid.size\[0\]=32: axis 'size' is not a dotted config key"),
        ({"extra_grids": [{"moe.top_kk": [1]}]}, r"extra_grids\[0\].moe.top_kk: unknown parameter"),
        ({"grids": {}}, r"unknown key 'grids' in sweep config .* \(did you mean 'grid'\?\)"),
        ({"hold": "params"}, r"hold='params': expected one of 'tokens', 'active_params', 'flops_per_token'"),
        ({"max_concurrent": 0}, r"max_concurrent=0: must be >= 1"),
        ({"runner": "ray"}, r"unknown key 'runner' in sweep config"),  # Ray Tune is the only runner
    ],
)
def test_bad_sweep_configs_are_rejected_with_one_message(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep_file(tmp_path, **raw))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"moe.num_experts": [4], "moe.top_k": [1, 8]}, r'trial \{"moe.num_experts": 4, "moe.top_k": 8\}: '
                                                       r"moe.top_k=8: must be in \[1, moe.num_experts=4\]"),
        ({"model.n_heads": [2, 5]}, r'trial \{"model.n_heads": 5\}: model.n_heads=5: must divide model.dim=32'),
        ({"moe.router": ["hash", "learned"]}, r"moe.router='learned': expected one of 'topk', 'sinkhorn', 'hash'"),
    ],
)
def test_a_grid_value_the_base_config_rejects_fails_before_any_trial(tmp_path: Path, grid: dict, message: str) -> None:
    sweep = load_sweep(_sweep_file(tmp_path, grid=grid))
    with pytest.raises(ConfigError, match=message):
        run_sweep(sweep)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_a_second_sweep_over_a_running_sweeps_out_dir_is_refused(tmp_path: Path) -> None:
    """It would restart, and so delete, the first sweep's trials that have no checkpoint yet."""
    sweep = load_sweep(_sweep_file(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    with held_directory(out, "out_dir"):
        with pytest.raises(ConfigError, match=rf"out_dir='{re.escape(str(out))}' is in use by moe pid {os.getpid()} on "):
            run_sweep(sweep)
    assert list(out.iterdir()) == []


# -- planning ----------------------------------------------------------------------------


def test_trials_are_the_union_of_grids_keyed_stably(tmp_path: Path) -> None:
    path = _sweep_file(
        tmp_path,
        grid={"size": [{"model.dim": 32}, {"model.dim": 64}], "moe.num_experts": [1, 4]},
        extra_grids=[{"size": [{"model.dim": 32}], "moe.num_experts": [4]}, {"moe.num_experts": [8], "train.seed": [7]}],
    )
    trials = plan(load_sweep(path))
    assert len(trials) == 5  # 4 + (a duplicate) + 1
    assert [t.key for t in trials] == [t.key for t in plan(load_sweep(path))]
    assert len({t.key for t in trials}) == 5
    assert all(Path(t.cfg.train.run_dir).is_absolute() and Path(t.cfg.data.cache_dir).is_absolute() for t in trials)
    assert trials[-1].cfg.train.seed == 7 and trials[-1].cfg.moe.num_experts == 8


def test_token_budget_sets_the_steps(tmp_path: Path) -> None:
    trials = plan(load_sweep(_sweep_file(tmp_path, tokens=4 * 32 * 25)))
    assert {t.cfg.train.steps for t in trials} == {25}


@pytest.mark.parametrize("hold", ["active_params", "flops_per_token"])
def test_hold_matches_each_trial_to_its_dense_baseline(tmp_path: Path, hold: str) -> None:
    grid = {"moe.num_experts": [1, 2, 8, 32], "moe.router": ["topk", "hash"]}
    trials = plan(load_sweep(_sweep_file(tmp_path, hold=hold, grid=grid)))
    dense = next(t.cfg for t in trials if t.cfg.moe.num_experts == 1 and t.cfg.moe.router == "topk")

    def metric(cfg: Any) -> float:
        if hold == "active_params":
            return param_counts(cfg.model, cfg.moe).non_embedding_active
        return train_flops_per_token(cfg.model, cfg.moe)

    # Rounding the width to an integer leaves at most half a width unit per MoE layer.
    unit = metric(dense) - metric(type(dense)(**{**dense.__dict__, "moe": type(dense.moe)(
        **{**dense.moe.__dict__, "expert_ffn_dim": dense.moe.expert_ffn_dim - 1})}))
    widths = {}
    for t in trials:
        assert abs(metric(t.cfg) - metric(dense)) <= unit / 2
        widths[(t.cfg.moe.router, t.cfg.moe.num_experts)] = t.cfg.moe.expert_ffn_dim
    assert widths[("topk", 32)] < widths[("topk", 8)] < widths[("topk", 1)] == 64  # pays for the router
    assert widths[("hash", 32)] in (64, 65)  # no router to pay for


# -- end to end ---------------------------------------------------------------------------


def _mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in (out / "trials").glob("*/summary.json")}


def test_tiny_sweep_through_ray_tune_then_resume(
    tmp_path: Path, ray_cluster: Path, capsys: pytest.CaptureFixture
) -> None:
    """3 trials as Ray Tune trials (two at a time, one per core), the table (rewritten as
    each finishes) and report; a second run skips the finished trials and resumes an
    interrupted one from its checkpoint."""
    path = _sweep_file(tmp_path, tokens=4 * 32 * 8, grid={"moe.num_experts": [1, 4]},
                       extra_grids=[{"moe.num_experts": [4], "moe.router": ["hash"]}])
    sweep = load_sweep(path)
    assert run_sweep(sweep) == []
    out = tmp_path / "out"
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["router"], r["experts"]) for r in results) == [("hash", 4), ("topk", 1), ("topk", 4)]
    for r in results:
        assert r["tokens_seen"] == 4 * 32 * 8 and r["final_val_loss"] > 0 and r["tokens_per_s"] > 0
        assert r["params_non_embedding_active"] > 0 and r["flops_per_token"] > 0
    printed = capsys.readouterr().out
    assert printed.count("[sweep] done:") == 3
    assert all(f"({n}/3 finished)" in printed for n in (1, 2, 3))  # the table grew trial by trial
    assert len(list((out / "tune").glob("tune-*"))) == 1

    # Interrupt one trial after its step-4 checkpoint: drop what came after.
    victim = next(p for p in (out / "trials").iterdir() if json.loads((p / "trial.json").read_text())["axes"] == {
        "moe.num_experts": 1})
    (victim / "summary.json").unlink()
    for ckpt in (victim / "checkpoints").glob("step-*8*"):
        os.rename(ckpt, tmp_path / ckpt.name)  # only the step-4 checkpoint is left
    before = _mtimes(out)
    assert run_sweep(load_sweep(path)) == []
    printed = capsys.readouterr().out
    assert "3 trials, 2 already finished, 1 to run" in printed
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != victim.name} == before  # never re-run
    log = (victim / "metrics.jsonl").read_text()
    assert json.loads((victim / "summary.json").read_text())["steps"] == 8
    assert '"step": 8' in log and '"step": 4' in log

    report = write_report(out)
    assert report.is_file() and (out / "fit.json").is_file() and (out / "loss_vs_experts.png").is_file()


# -- the report ---------------------------------------------------------------------------


def _fake_trial(
    out: Path, key: str, dim: int, n: int, experts: int, router: str, seed: int, loss: float, top_k: int = 1
) -> None:
    trial_dir = out / "trials" / key
    trial_dir.mkdir(parents=True)
    overrides = {"model.dim": dim, "moe.num_experts": experts, "moe.router": router, "train.seed": seed}
    (trial_dir / "trial.json").write_text(json.dumps({"key": key, "axes": overrides, "overrides": overrides}))
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(
        {"moe": {"num_experts": experts, "router": router, "top_k": top_k, "expert_ffn_dim": 4 * dim},
         "train": {"seed": seed}}))
    shares = (np.ones((2, experts)) / experts).tolist()
    (trial_dir / "summary.json").write_text(json.dumps({
        "steps": 10, "tokens_seen": 1000, "final_val_loss": loss, "best_val_loss": loss, "tokens_per_s": 1.0,
        "wall_seconds": 1.0, "flops_per_token": 6.0 * n,
        "params": {"total": n * experts, "active": n + 100, "embedding": 100, "non_embedding_total": n * experts,
                   "non_embedding_active": n},
        "expert_load_tail": {"min_share": 1 / experts, "max_share": 1 / experts, "shares": shares},
    }))


def test_report_fits_the_law_and_answers_the_acceptance_questions(tmp_path: Path) -> None:
    law = ExpertLaw(a=-0.05, b=-0.03, c=0.002, d=0.6, e_start=1.8, e_max=100.0)
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    for dim, n in ((32, 2e4), (48, 5e4), (64, 1e5)):
        for e in (1, 2, 4, 8, 16, 32):
            _fake_trial(out, f"t{dim}-{e}", dim, int(n), e, "topk", 1, float(law.loss(n, e) * 10 ** rng.normal(0, 3e-4)))
            if e >= 8:
                _fake_trial(out, f"h{dim}-{e}", dim, int(n), e, "hash", 1, float(law.loss(n, e / 2)))
    for seed in (2, 3):
        _fake_trial(out, f"s{seed}", 32, 20000, 8, "topk", seed, float(law.loss(2e4, 8) * 10 ** rng.normal(0, 3e-4)))
    report = write_report(out).read_text()
    fit = json.loads((out / "fit.json").read_text())
    assert fit["fit"]["coefficients"]["b"] < 0 and fit["checks"]["b_negative"]
    assert fit["checks"]["all_monotone"] and fit["checks"]["learned_beats_hash_at_E_ge_8"]
    assert fit["seed_noise"]["sigma"] is not None and len(fit["seed_noise"]["points"]) == 1
    assert set(fit["power_law_in_E"]) == {"20000", "50000", "100000"}
    assert all(p["beta"] < 0 for p in fit["power_law_in_E"].values())
    assert "| coefficient | value | 95% CI |" in report and "learned beats hash at every E >= 8: True" in report
    for png in ("loss_vs_experts.png", "loss_vs_active_params.png", "expert_load.png"):
        assert (out / png).stat().st_size > 1000



def test_routing_chosen_per_expert_count_does_not_split_a_base_size(tmp_path: Path) -> None:
    """A sweep may route E <= 2 top-1 and E >= 4 top-2 (configs/sweeps/experts-cpu.yaml):
    top_k and normalize_weights then vary across one base size's trials, which must stay
    one group, with N from its dense trial."""
    out = tmp_path / "out"
    routing = {1: (1, False), 2: (1, False), 4: (2, True)}
    for e, (k, norm) in routing.items():
        _fake_trial(out, f"t{e}", 32, 20000 + e, e, "topk", 1, 2.0 - 0.1 * e)
        trial_json = out / "trials" / f"t{e}" / "trial.json"
        trial = json.loads(trial_json.read_text())
        trial["overrides"].update({"moe.top_k": k, "moe.normalize_weights": norm})
        trial_json.write_text(json.dumps(trial))
    _fake_trial(out, "t64", 64, 90000, 1, "topk", 1, 1.5)
    rows = collect(out)
    assert {r["base"] for r in rows if r["key"] != "t64"} == {"model.dim=32"}
    assert {r["N"] for r in rows if r["key"] != "t64"} == {20001}

SWEEPS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs", "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_configs_plan_and_comment_every_key(path: Path) -> None:
    trials = plan(load_sweep(path))
    assert len(trials) >= 18
    assert all(Path(t.run_dir).is_absolute() for t in trials)  # Tune runs trials in its own directory
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped:
            assert "#" in stripped, f"{path.name}: key without a comment: {line!r}"


def test_sinkhorn_trials_are_the_learned_line_beside_a_topk_dense_baseline(tmp_path: Path) -> None:
    """E = 1 is the dense baseline (softmax over one expert: gate 1) and E >= 2 may use the
    Sinkhorn router: one learned line per base size, compared with hash at equal E."""
    out = tmp_path / "out"
    _fake_trial(out, "d1", 32, 20000, 1, "topk", 1, 2.0)
    for e in (2, 8):
        _fake_trial(out, f"s{e}", 32, 20000, e, "sinkhorn", 1, 2.0 - 0.01 * e)
    _fake_trial(out, "h8", 32, 20000, 8, "hash", 1, 1.95)
    chk = analyse(collect(out), "final_val_loss", delta=1e-3, bootstrap=0)["checks"]
    assert chk["monotone_in_E"]["20000"]["experts"] == [1, 2, 8] and chk["all_monotone"]
    assert chk["learned_vs_hash"] == [{"N": 20000, "experts": 8, "routing": "hash", "learned": 1.92, "hash": 1.95}]
    assert chk["learned_beats_hash_at_E_ge_8"]


def test_two_learned_routers_at_one_point_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fake_trial(out, "a", 32, 20000, 8, "topk", 1, 2.0)
    _fake_trial(out, "b", 32, 20000, 8, "sinkhorn", 1, 1.9)
    with pytest.raises(ValueError, match=r"E=8 has trials of the learned routers \['sinkhorn', 'topk'\]"):
        collect(out)


def test_equal_total_pairs_match_hash_with_the_learned_trial_of_its_size() -> None:
    """Learned top-2 at 2E has hash top-1's total parameters at E: that is the pair."""
    def row(routing: str, e: int, total: int, loss: float, n: float = 1e4) -> dict[str, Any]:
        return {"N": n, "routing": routing, "experts": e, "params_non_embedding_total": total, "final_val_loss": loss}

    rows = [row("learned", 8, 72_000, 1.60), row("learned", 16, 132_000, 1.56), row("learned", 16, 132_000, 1.58),
            row("hash", 8, 139_000, 1.58), row("hash", 32, 533_000, 1.52), row("hash", 8, 139_000, 1.0, n=2e4)]
    pairs = equal_total_pairs(rows, "final_val_loss")
    assert pairs == [{"N": 1e4, "routing": "hash", "hash_experts": 8, "hash": 1.58, "hash_total": 139_000,
                      "learned_experts": 16, "learned": pytest.approx(1.57), "learned_total": 132_000}]


def test_hash_top1_and_multi_hash_are_separate_baselines(tmp_path: Path) -> None:
    """Hash top-1 and multi-hash top-2 at one (size, E) are two baselines, each compared with
    the learned trial there (not averaged as if they were seeds); multi-hash pairs with the
    learned top-2 trial of the same total size."""
    out = tmp_path / "out"
    _fake_trial(out, "d1", 32, 20000, 1, "topk", 1, 2.0)
    _fake_trial(out, "l8", 32, 20000, 8, "topk", 1, 1.90, top_k=2)
    _fake_trial(out, "h8", 32, 20000, 8, "hash", 1, 1.95)
    _fake_trial(out, "m8", 32, 20000, 8, "hash", 1, 1.85, top_k=2)
    rows = collect(out)
    assert {r["key"]: r["routing"] for r in rows} == {"d1": "learned", "l8": "learned", "h8": "hash", "m8": "hash-top2"}
    chk = analyse(rows, "final_val_loss", delta=1e-3, bootstrap=0)["checks"]
    assert chk["learned_vs_hash"] == [
        {"N": 20000, "experts": 8, "routing": "hash", "learned": 1.90, "hash": 1.95},
        {"N": 20000, "experts": 8, "routing": "hash-top2", "learned": 1.90, "hash": 1.85},
    ]
    assert chk["learned_beats_hash_at_E_ge_8_by_routing"] == {
        "hash": {"all": True, "wins": 1, "points": 1}, "hash-top2": {"all": False, "wins": 0, "points": 1}}
    assert chk["learned_beats_hash_at_E_ge_8"] is False
    pairs = {p["routing"]: p["learned_experts"] for p in chk["learned_vs_hash_equal_total_params"]}
    assert pairs == {"hash": 8, "hash-top2": 8}
    report = write_report(out).read_text()
    assert "learned 1.9000 vs hash-top2 1.8500" in report and "against hash-top2: False (learned better at 0 of 1)" in report


# -- fine-grained experts (moe.granularity) ------------------------------------------------


@pytest.mark.parametrize("hold", ["active_params", "flops_per_token"])
def test_hold_with_a_granularity_axis(tmp_path: Path, hold: str) -> None:
    """Fine-grained trials are held against the same coarse dense baseline, their widths a
    multiple of G; at equal E they are as wide as the coarse trial up to their larger router."""
    grid = {"moe.num_experts": [1, 4], "moe.granularity": [1, 2, 4]}
    trials = plan(load_sweep(_sweep_file(tmp_path, hold=hold, grid=grid)))
    cfgs = {(t.cfg.moe.num_experts, t.cfg.moe.granularity): t.cfg for t in trials}
    dense = cfgs[(1, 1)]

    def metric(cfg: Any) -> float:
        if hold == "active_params":
            return param_counts(cfg.model, cfg.moe).non_embedding_active
        return train_flops_per_token(cfg.model, cfg.moe)

    width_unit = metric(dense) - metric(type(dense)(**{**dense.__dict__, "moe": type(dense.moe)(
        **{**dense.moe.__dict__, "expert_ffn_dim": dense.moe.expert_ffn_dim - 1})}))
    for (e, g), cfg in cfgs.items():
        assert cfg.moe.expert_ffn_dim % g == 0
        assert abs(metric(cfg) - metric(dense)) <= g * width_unit / 2, (e, g)
    widths = [cfgs[(4, g)].moe.expert_ffn_dim for g in (1, 2, 4)]
    assert widths == sorted(widths, reverse=True) and widths[0] - widths[-1] <= 8  # only the router grows


def _fine_grained(out: Path, key: str, granularity: int) -> None:
    """Turn fake trial ``key`` into a granularity-G one (its override and its config)."""
    trial_dir = out / "trials" / key
    trial = json.loads((trial_dir / "trial.json").read_text())
    trial["overrides"]["moe.granularity"] = granularity
    (trial_dir / "trial.json").write_text(json.dumps(trial))
    cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    cfg["moe"]["granularity"] = granularity
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_report_compares_fine_grained_with_coarse_at_equal_experts(tmp_path: Path) -> None:
    """A granularity axis stays in its base size (same N), is its own routing ``learned-gG``
    (not averaged with the coarse trials as seeds, not in the fit, not a hash baseline) and
    is compared with coarse learned routing at equal E, in fit.json, the report and the table."""
    out = tmp_path / "out"
    _fake_trial(out, "d1", 32, 20000, 1, "topk", 1, 2.0)
    _fake_trial(out, "c8", 32, 20000, 8, "topk", 1, 1.90)
    _fake_trial(out, "f8", 32, 20000, 8, "topk", 1, 1.85)
    _fine_grained(out, "f8", 4)
    rows = collect(out)
    assert {r["key"]: (r["routing"], r["N"], r["granularity"]) for r in rows} == {
        "d1": ("learned", 20000, 1), "c8": ("learned", 20000, 1), "f8": ("learned-g4", 20000, 4)}
    chk = analyse(rows, "final_val_loss", delta=1e-3, bootstrap=0)["checks"]
    assert chk["monotone_in_E"]["20000"]["losses"] == [2.0, 1.90]
    assert chk["fine_grained_vs_coarse"] == [
        {"N": 20000, "experts": 8, "routing": "learned-g4", "learned": 1.90, "fine_grained": 1.85}]
    assert chk["learned_vs_hash"] == [] and chk["learned_vs_hash_equal_total_params"] == []
    report = write_report(out).read_text()
    assert "coarse learned 1.9000 vs learned-g4 1.8500" in report
    assert "| f8 | base | topk | 8 | 4 | 1 |" in (out / "results.md").read_text()


def test_sweep_json_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite of sweep.json that fails halfway (disk full) keeps the previous file whole,
    leaves no temporary file, and says which file and why in one error."""
    sweep = load_sweep(_sweep_file(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    write_sweep_json(sweep, out)
    before = (out / "sweep.json").read_text()
    write_text = Path.write_text

    def half_then_full(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    changed = dataclasses.replace(sweep, max_concurrent=sweep.max_concurrent + 1)
    with pytest.raises(ConfigError, match=r"sweep.json: cannot write it \(No space left on device\)"):
        write_sweep_json(changed, out)
    monkeypatch.undo()
    assert (out / "sweep.json").read_text() == before and [p.name for p in out.iterdir()] == ["sweep.json"]
    write_sweep_json(changed, out)
    assert json.loads((out / "sweep.json").read_text())["max_concurrent"] == sweep.max_concurrent + 1


def test_an_unreadable_trial_summary_is_one_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated summary.json in a planned trial: one error naming it, nothing written."""
    from launch.cli import main as cli_main

    path = _sweep_file(tmp_path)
    trial_dir = Path(plan(load_sweep(path))[0].run_dir)
    trial_dir.mkdir(parents=True)
    (trial_dir / "summary.json").write_text('{"steps": 1,\n')
    assert cli_main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{trial_dir / 'summary.json'}: unreadable (JSONDecodeError" in err[0], err
    assert f"delete {trial_dir} and run the sweep again" in err[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["trials"]
