"""The live collapse alarm: an expert whose share stays below ``train.collapse_share`` for
``train.collapse_intervals`` log intervals in a row is reported at that interval, on the
console, in metrics.jsonl and in summary.json.

Legend: L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from launch.config import load_config
from launch.data import prepare, stdlib_sources
from launch.metrics import CollapseAlarm, read_metrics
from launch.train import Run, train
from moe.router import Routing

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=1", "moe.normalize_weights=false", "moe.expert_ffn_dim=32", "moe.aux_loss_coeff=0",
    "train.batch_size=4", "train.warmup_steps=1", "train.steps=8", "train.log_every=2", "train.eval_every=100",
    "train.ckpt_every=100", "train.collapse_share=0.05", "train.collapse_intervals=2", "data.val_tokens=256",
    "launch.threads=1",
]
COLLAPSE_FROM = 2  # the hook sends every token to expert 0 from the third step on


def test_alarm_counts_consecutive_intervals_and_resets_on_recovery() -> None:
    alarm = CollapseAlarm(share=0.1, intervals=2)
    healthy, starved = np.array([[0.25, 0.25, 0.25, 0.25]]), np.array([[0.7, 0.25, 0.05, 0.0]])
    assert alarm.update(10, starved)["dead_experts"] == [[]]  # one interval below: not yet
    assert alarm.update(20, healthy)["dead_experts"] == [[]]  # recovered: the streak restarts
    alarm.update(30, starved)
    entry = alarm.update(40, starved)
    assert entry["dead_experts"] == [[2, 3]] and [d["step"] for d in entry["new_dead"]] == [40, 40]
    assert entry["max_share"] == [0.7] and entry["min_share"] == [0.0]
    assert entry["cv"][0] == pytest.approx(float(starved.std() / starved.mean()), abs=1e-5)
    assert "layer 0 expert 2, layer 0 expert 3 below 0.1" in alarm.message(entry)
    later = alarm.update(50, starved)
    assert later["dead_experts"] == [[2, 3]] and later["new_dead"] == [] and alarm.message(later) is None
    assert alarm.verdict()["fired"] == [{"layer": 0, "expert": 2, "step": 40}, {"layer": 0, "expert": 3, "step": 40}]
    assert alarm.verdict()["collapsed"]


def _all_to_expert_0(module: nn.Module, args: tuple, routing: Routing) -> Routing:
    experts_TK = torch.zeros_like(routing.experts_TK)
    counts_E = torch.zeros_like(routing.counts_E)
    counts_E[0] = experts_TK.numel()
    return dataclasses.replace(routing, experts_TK=experts_TK, counts_E=counts_E)


def test_alarm_state_round_trips() -> None:
    alarm = CollapseAlarm(share=0.1, intervals=3)
    fresh = CollapseAlarm(share=0.1, intervals=3)
    fresh.load_state_dict(alarm.state_dict())  # before the first interval: no streaks yet
    assert fresh.streak_LE is None and fresh.fired == []
    starved = np.array([[0.7, 0.25, 0.05, 0.0]])
    for step in (10, 20, 30):
        alarm.update(step, starved)
    resumed = CollapseAlarm(share=0.1, intervals=3)
    resumed.load_state_dict(alarm.state_dict())
    assert resumed.verdict() == alarm.verdict()
    assert resumed.update(40, starved) == alarm.update(40, starved)


def test_a_collapsing_router_fires_the_alarm_at_the_right_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:10], corpus, val_fraction=0.2)
    original = Run.train_step

    def collapsing_step(self: Run):  # noqa: ANN202
        if self.step == COLLAPSE_FROM:
            for layer in self.model.moe_layers():
                layer.router.register_forward_hook(_all_to_expert_0)
        return original(self)

    monkeypatch.setattr(Run, "train_step", collapsing_step)
    run = tmp_path / "run"
    summary = train(load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"data.path={corpus}", f"train.run_dir={run}"]), "tiny")
    records = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    assert sorted(records) == [2, 4, 6, 8]
    # steps 1-2 route normally, 3-4 are the first interval below the share, 5-6 the second: the alarm fires at 6
    assert [records[s]["collapse"]["dead_experts"] for s in (2, 4)] == [[[], []], [[], []]]
    assert records[6]["collapse"]["dead_experts"] == [[1, 2, 3], [1, 2, 3]]
    assert records[6]["collapse"]["max_share"] == [1.0, 1.0] and records[6]["collapse"]["cv"] == [pytest.approx(np.sqrt(3))] * 2
    assert records[8]["collapse"]["new_dead"] == []
    out = capsys.readouterr()
    assert "step 6: collapse alarm: layer 0 expert 1, layer 0 expert 2, layer 0 expert 3, layer 1 expert 1" in out.out + out.err
    verdict = json.loads((run / "summary.json").read_text())["collapse_alarm"]
    assert verdict == summary["collapse_alarm"]
    assert verdict["collapsed"] and verdict["dead_at_end"] == [[1, 2, 3], [1, 2, 3]]
    assert {(d["layer"], d["expert"], d["step"]) for d in verdict["fired"]} == {(l, e, 6) for l in (0, 1) for e in (1, 2, 3)}
    assert verdict["share"] == 0.05 and verdict["intervals"] == 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    dead = {e.step: e.value for e in events.Scalars("collapse/layer1/dead_experts")}
    assert dead == {2: 0, 4: 0, 6: 3, 8: 3}
    assert {e.step: e.value for e in events.Scalars("collapse/layer0/min_share")}[6] == 0
    assert "collapse/layer0/cv" in events.Tags()["scalars"] and "collapse/layer0/max_share" in events.Tags()["scalars"]


class Killed(Exception):
    """Stands for the process dying after a checkpoint."""


def test_a_resumed_run_continues_the_alarm_streaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after step 4's checkpoint (one interval below the share so far) and resumed,
    the run fires at step 6, as the uninterrupted run does: the streak of steps 3-4 was
    saved with the checkpoint (starting over, it would fire at 8)."""
    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:10], corpus, val_fraction=0.2)
    original = Run.train_step

    def collapsing_step(self: Run):  # noqa: ANN202
        if self.step == kill_at:
            raise Killed
        if self.step >= COLLAPSE_FROM and not getattr(self, "collapsing", False):
            self.collapsing = True
            for layer in self.model.moe_layers():
                layer.router.register_forward_hook(_all_to_expert_0)
        return original(self)

    monkeypatch.setattr(Run, "train_step", collapsing_step)

    def run(run_dir: Path, *overrides: str) -> None:
        cfg = load_config(ROOT / "configs" / "tiny.yaml",
                          [*SMALL, f"data.path={corpus}", f"train.run_dir={run_dir}", "train.ckpt_every=4", *overrides])
        train(cfg, "tiny")

    kill_at = -1
    run(tmp_path / "whole")
    kill_at = 4
    with pytest.raises(Killed):
        run(tmp_path / "resumed")
    kill_at = -1
    run(tmp_path / "resumed", "train.resume=true")

    def alarm(run_dir: Path) -> tuple[dict, dict]:
        records = {r["step"]: r["collapse"] for r in read_metrics(run_dir) if r["kind"] == "train"}
        return records, json.loads((run_dir / "summary.json").read_text())["collapse_alarm"]

    whole, resumed = alarm(tmp_path / "whole"), alarm(tmp_path / "resumed")
    assert [d["step"] for d in whole[1]["fired"]] == [6] * 6
    assert resumed == whole
