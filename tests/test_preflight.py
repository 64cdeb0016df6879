"""The checks before any rank starts (``launch/preflight.py``): the data against the model,
and the memory before a run allocates anything.

Data: the vocabulary of a prepared dataset (its meta.json) or of the tokenizer the embedded
corpus is prepared with must fit ``model.vocab_size``; on a remote cluster, data this
machine cannot see is left to the ranks.

Model states come from the simulator's exact accounting (tests/test_simulate.py checks it
byte for byte against real runs); here: a layout whose states cannot fit is refused with
the largest part and the keys to change, one whose predicted peak alone does not fit only
warns, and the real CLI refuses an impossible model before any work, leaving nothing behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch.preflight as preflight
from launch.config import load_config
from launch.data import DataError, prepare, stdlib_sources
from launch.preflight import check_data, check_memory, data_vocab_size
from launch.train import check_layout
from moe.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def _states_and_peak(overrides: list[str]) -> tuple[int, int]:
    cfg = load_config(TINY, overrides + ["launch.address=auto"])  # a remote cluster: nothing to check against
    memories = check_memory(cfg, check_layout(cfg))
    return sum(m.states for m in memories), sum(m.peak for m in memories)


@pytest.mark.parametrize(
    ("overrides", "part", "key"),
    [
        (["moe.num_experts=1000000"], "the experts", "moe.num_experts"),
        (["model.dim=999999744", "model.n_heads=4"], "the attention", "model.dim"),
        (["model.vocab_size=4000000000"], "the embedding", "model.vocab_size"),
    ],
)
def test_states_that_cannot_fit_are_refused_naming_the_largest_part(overrides: list[str], part: str, key: str) -> None:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, check_layout(cfg))
    message = str(err.value)
    assert "model states alone need" in message and "optimizer state" in message
    assert f"Its largest part is {part}" in message and key in message


def test_the_budget_decides_between_refusal_warning_and_silence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = ["parallel.dp=2", "parallel.ep=2"]
    states, peak = _states_and_peak(layout)
    assert 0 < states < peak
    cfg = load_config(TINY, layout)
    topology = check_layout(cfg)
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: states - 1)
    with pytest.raises(ConfigError, match="the 2 ranks' model states alone need"):
        check_memory(cfg, topology)
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: states + 1)
    check_memory(cfg, topology)
    assert "warning: the predicted peak memory" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: peak + 1)
    check_memory(cfg, topology)
    assert capsys.readouterr().err == ""


def test_gpu_ranks_are_held_against_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On GPUs every rank has its own device: the largest rank's states count, not the sum."""
    layout = ["parallel.dp=2", "parallel.ep=2", "train.dtype=float32"]
    remote = load_config(TINY, layout + ["launch.address=auto"])  # nothing to check against: predictions only
    largest = max(m.states for m in check_memory(remote, check_layout(remote)))
    cfg = load_config(TINY, layout)
    topology = check_layout(cfg)

    class Props:
        total_memory = largest + 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    check_memory(cfg, topology)  # the sum of both ranks' states exceeds one device: still fits
    Props.total_memory = largest - 1
    with pytest.raises(ConfigError, match=r"rank \d's model states alone need .* each GPU's"):
        check_memory(cfg, topology)


def test_cli_refuses_an_impossible_model_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(TINY), "moe.num_experts=1000000", f"train.run_dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: the model does not fit") and "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists()


def test_the_datas_vocabulary_must_fit_the_model(tmp_path: Path) -> None:
    data = tmp_path / "bytes"
    prepare(stdlib_sources()[:2], data, val_fraction=0.3)
    cfg = load_config(TINY, [f"data.path={data}"])
    assert data_vocab_size(cfg) == 257
    check_data(cfg)
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than the dataset's vocabulary \(257 ids\); "
                                          r"set model.vocab_size=257"):
        check_data(load_config(TINY, [f"data.path={data}", "model.vocab_size=256", "parallel.dp=2"]))
    with pytest.raises(ConfigError, match=r"model.vocab_size=200 is smaller .* \(257 ids\)"):
        check_data(load_config(TINY, ["model.vocab_size=200"]))  # the embedded corpus, in bytes: nothing prepared
    with pytest.raises(DataError, match=r"data.path=.*nowhere: directory not found"):
        check_data(load_config(TINY, [f"data.path={tmp_path / 'nowhere'}", "parallel.dp=2"]))
    remote = load_config(TINY, [f"data.path={tmp_path / 'nowhere'}", "launch.address=auto", "model.vocab_size=8"])
    assert data_vocab_size(remote) is None  # on the cluster's nodes only: their ranks check it
