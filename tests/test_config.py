"""The config system: strict loading, overrides, and the shipped YAML files."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from launch.config import Config, load_config
from launch.train import check_layout
from moe.config import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["moe.num_expert=16"], "unknown key 'moe.num_expert' (did you mean 'num_experts'?)"),
        (["modle.dim=64"], "unknown key 'modle' (did you mean 'model'?)"),
        (["moe.top_k=two"], "moe.top_k='two': expected an integer"),
        (["model.dim=true"], "model.dim=True: expected an integer"),
        (["moe.drop_policy=first"], "moe.drop_policy='first': expected one of 'position', 'probability'"),
        (["moe.top_k=5", "moe.num_experts=4"], "moe.top_k=5: must be in [1, moe.num_experts=4]"),
        (["model.n_heads=5"], "model.n_heads=5: must divide model.dim=192"),
        (["moe.capacity_factor=0"], "moe.capacity_factor=0.0: must be > 0, or null for dropless routing"),
        (["moe.top_k=1", "moe.normalize_weights=true"], "moe.normalize_weights=True: with moe.top_k=1"),
        (["train.micro_batch_size=5"], "train.micro_batch_size=5: must divide train.batch_size=16"),
        (["train.warmup_steps=-1"], "train.warmup_steps=-1: must be >= 0"),
        (["data.val_fraction=0.9"], "data.val_fraction=0.9: must be a number in (0, 0.5]"),
        (["parallel.ep=0"], "parallel.ep=0: must be >= 1"),
        (["model.moe_every=9"], "model.moe_every=9: must be in [0, model.n_layers=4]"),
        (["train.lr=fast"], "train.lr='fast': expected a number"),
        (["train.dtype=fp8"], "train.dtype='fp8': expected one of 'auto', 'float32', 'bfloat16'"),
        (["moe.num_experts"], "override 'moe.num_experts': expected section.key=value"),
        (["model.dim.width=3"], "override 'model.dim.width=3': 'dim' is a value, not a section"),
        (["moe=3"], "moe: expected a mapping of keys, got 3"),
    ],
)
def test_bad_config_is_rejected_with_one_clear_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_merge_keys_are_not_duplicates_but_a_repeated_key_is(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yaml"
    merged.write_text("train:\n  <<: {steps: 2, lr: 0.01}\n  steps: 3\n")
    cfg = load_config(merged)
    assert (cfg.train.steps, cfg.train.lr) == (3, 0.01)
    merged.write_text("train:\n  <<: {steps: 2}\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 3 and 4\); keep one"):
        load_config(merged)


def test_shipped_configs_are_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.yaml") == load_config("tiny") == load_config(TINY)
    (tmp_path / "tiny.yaml").write_text("train:\n  steps: 7\n")
    assert load_config("tiny.yaml").train.steps == 7  # the current directory comes first
    with pytest.raises(ConfigError, match=rf"'nope' not found \(looked in: {tmp_path}/nope, .*configs/nope.yaml\)"):
        load_config("nope")


def test_multi_rank_layout_is_refused_not_run_wrong() -> None:
    check_layout(load_config(TINY, ["parallel.ep=2", "parallel.dp=2"]))  # ep x dp trains
    check_layout(load_config(TINY, ["parallel.tp=2", "parallel.etp=2"]))  # tp x etp trains
    check_layout(load_config(TINY, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=4"]))  # tp x pp trains
    with pytest.raises(ConfigError, match="must divide parallel.tp=1 x parallel.dp=1"):
        check_layout(load_config(TINY, ["parallel.ep=2"]))


def test_overrides_apply_and_parse_yaml_values() -> None:
    cfg = load_config(
        TINY, ["moe.num_experts=16", "train.steps=50", "moe.capacity_factor=1.25", "moe.jitter_eps=1e-2",
               "train.micro_batch_size=null", "data.path=some/dir"]
    )
    assert cfg.moe.num_experts == 16 and cfg.train.steps == 50
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.jitter_eps == 0.01
    assert cfg.train.micro_batch_size is None and cfg.data.path == "some/dir"
    assert isinstance(cfg.moe.capacity_factor, float)


def _fields(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_mirrors_dataclasses_and_comments_every_key(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    sections = _fields(Config)
    assert set(raw) == set(sections), f"{path.name}: sections differ from Config"
    for section, cls in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(raw[section]) == names, f"{path.name}: {section} keys differ: {set(raw[section]) ^ names}"
    key_line = re.compile(r"^\s*[a-z_]+:")
    for line in path.read_text().splitlines():
        if key_line.match(line):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"
    load_config(path)  # and it loads


def test_shipped_configs_are_what_they_say() -> None:
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    switch = by_name["switch-base-8"]
    assert (switch.moe.top_k, switch.moe.capacity_factor, switch.moe.aux_loss_coeff, switch.moe.num_experts) == (1, 1.25, 0.01, 8)
    glam = by_name["glam-64e"]
    assert (glam.moe.top_k, glam.model.moe_every, glam.moe.num_experts) == (2, 2, 64)
    mixtral = by_name["mixtral-8x-small"]
    assert (mixtral.moe.top_k, mixtral.moe.activation, mixtral.moe.capacity_factor, mixtral.moe.num_experts) == (2, "swiglu", None, 8)


def test_cli_reports_a_bad_config_in_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    assert main(["train", str(TINY), "moe.num_expert=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'moe.num_expert' (did you mean 'num_experts'?)")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["check-layouts", "bench", "sweep", "simulate"])
def test_cli_help_of_a_pass_through_command_is_its_own(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: moe {command} ")
