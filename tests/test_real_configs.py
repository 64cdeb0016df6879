"""The shipped configs of published models (configs/mixtral-8x7b.yaml, qwen3-30b-a3b.yaml,
qwen3-235b-a22b.yaml): at full size they validate with their cluster layout, hold the
published parameter counts (a count that does not match means a wrong key), and predict
with ``moe simulate --no-emulate``; shrunk by overrides to a few dimensions, layers and
experts (every architectural switch kept: grouped-query attention, head_dim, QK-norm, SwiGLU,
untied embeddings, the published vocabulary) each trains 2 steps in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.config import load_config
from launch.train import check_layout
from moe.accounting import param_counts

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "configs" / "hardware" / "h100-ib.yaml"

# name: (published total, published active parameters) from the model cards and papers:
# Mixtral 46.7B / 12.9B (Jiang et al. 2024), Qwen3-30B-A3B 30.5B / 3.3B and Qwen3-235B-A22B
# 235B / 22B (Qwen3 Technical Report, table 2, and the Hugging Face model cards).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "qwen3-235b-a22b": (235e9, 22e9),
}
SHRINK = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.seq_len=32", "model.ffn_dim=64", "moe.expert_ffn_dim=32", "train.batch_size=4", "train.micro_batch_size=2",
    "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2", "train.ckpt_every=2",
    "train.peak_tflops=null", "data.val_tokens=256", "launch.threads=1",
    "parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=1", "parallel.sequence_parallel=false",
    "parallel.first_stage_layers=null", "parallel.last_stage_layers=null",
]
# Qwen3's top-8 needs at least 8 experts: 16 keeps routing a choice.
EXPERTS = {"mixtral-8x7b": [], "qwen3-30b-a3b": ["moe.num_experts=16"], "qwen3-235b-a22b": ["moe.num_experts=16"]}


def _path(name: str) -> Path:
    return ROOT / "configs" / f"{name}.yaml"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_config_validates_and_has_the_published_size(name: str) -> None:
    cfg = load_config(_path(name))
    check_layout(cfg)  # the shipped cluster layout is a valid one for this model
    counts = param_counts(cfg.model, cfg.moe)
    total, active = PUBLISHED[name]
    assert abs(counts.total - total) <= 0.02 * total, (name, counts.total)
    assert abs(counts.active - active) <= 0.02 * active, (name, counts.active)
    assert cfg.model.kv_heads < cfg.model.n_heads and cfg.model.head_size == 128
    assert (cfg.model.activation, cfg.moe.activation, cfg.model.tie_embeddings) == ("swiglu", "swiglu", False)


def test_qwen3_235b_uses_uneven_pipeline_stages() -> None:
    """94 layers over pp=8: 11 on the first and last stage, 12 on each middle one."""
    from parallel.simulator.predict import Layout, stage_layers

    cfg = load_config(_path("qwen3-235b-a22b"))
    layout = Layout.build(cfg.parallel, cfg.model, cfg.moe, cfg.train.batch_size, cfg.train.micro_batch_size)
    sizes = [len(stage_layers(cfg.model, layout, s)) for s in range(cfg.parallel.pp)]
    assert sizes == [11, 12, 12, 12, 12, 12, 12, 11]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_simulate_predicts_the_full_size_model(name: str, tmp_path: Path) -> None:
    from launch.simulate import main

    out = tmp_path / "sim"
    assert main([str(_path(name)), "--no-emulate", "--cluster", str(H100), "--out", str(out)]) == 0
    prediction = json.loads((out / "prediction.json").read_text())
    cfg = load_config(_path(name))
    assert len(prediction["ranks"]) == cfg.parallel.world_size
    assert prediction["layout"]["first_stage_layers"] == cfg.parallel.first_stage_layers
    if name != "qwen3-235b-a22b":  # 235B's fp32 states alone are ~55 GiB per GPU on 64 H100s
        assert prediction["summary"]["fits"], prediction["summary"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shrunk_model_trains(name: str, small_corpus: Path, tmp_path: Path) -> None:
    from launch.metrics import read_metrics
    from launch.train import train

    cfg = load_config(_path(name), [*SHRINK, *EXPERTS[name], f"data.path={small_corpus}", f"train.run_dir={tmp_path}"])
    full = load_config(_path(name))
    # the architecture is the published one, only smaller
    assert (cfg.model.vocab_size, cfg.model.qk_norm, cfg.moe.top_k) == (full.model.vocab_size, full.model.qk_norm, full.moe.top_k)
    train(cfg, name)
    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["lm_loss"] == r["lm_loss"] and r["lm_loss"] > 0 for r in steps)
