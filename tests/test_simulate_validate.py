"""``moe simulate validate``: its layouts are checked before any of them runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.simulate import main
from moe.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_validate_refuses_a_bad_layout_before_running_any(tmp_path: Path) -> None:
    """The issue's case: four good layouts, then ``pp=2`` with one micro-batch per step
    (batch 8 at dp=1), which each emulated rank used to refuse with a traceback after the
    four layouts before it had run. Now one error names the layout and the key to set,
    and nothing is written."""
    out = tmp_path / "validate"
    argv = ["validate", TINY, "model.n_layers=2", "train.batch_size=8", "launch.threads=1",
            "--layouts", "dp=1;dp=2;ep=2,dp=2;tp=2;pp=2", "--out", str(out)]
    with pytest.raises(ConfigError, match=r"layout 'pp=2': 1 micro-batches per data-parallel rank .* fewer than "
                                          r"parallel\.pp=2 .* micro=N sets train\.micro_batch_size\); nothing was run"):
        main(argv)
    assert not out.exists()
