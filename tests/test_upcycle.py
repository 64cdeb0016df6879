"""``moe ckpt upcycle``: a dense model made MoE computes the dense model's logits on its first
forward (the construction in ``launch/ckpt/upcycle.py``: every expert a copy, or with
granularity a 1/G slice, of the dense MLP; a zero router), from a transformers dense model
(Llama, Qwen3) or our own dense checkpoint; it then trains under dp=2·ep=2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf_testing import logits, our_model
from launch.ckpt.cli import ckpt_main
from launch.ckpt.full_state import read_model_state
from launch.ckpt.hf_import import import_hf
from launch.ckpt.upcycle import upcycle
from launch.config import load_config
from parallel.checkpoint import CheckpointError

LLAMA = dict(vocab_size=259, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
QWEN3 = dict(vocab_size=261, hidden_size=28, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(3)
    out = {"llama": tmp_path_factory.mktemp("hf") / "llama", "qwen3": tmp_path_factory.mktemp("hf") / "qwen3"}
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(out["llama"])
    Qwen3ForCausalLM(Qwen3Config(**QWEN3)).save_pretrained(out["qwen3"])
    return out


@pytest.mark.parametrize(("arch", "experts", "top_k", "granularity"), [
    ("llama", 4, 2, 1), ("qwen3", 4, 2, 1), ("llama", 4, 1, 2), ("qwen3", 3, 2, 4), ("llama", 4, 1, 1),
], ids=["llama-e4k2", "qwen3-e4k2", "llama-e4k1-g2", "qwen3-e3k2-g4", "llama-e4k1-raw-gates"])
def test_upcycled_first_forward_equals_the_dense_model(
    dense_dirs: dict[str, Path], tmp_path: Path, arch: str, experts: int, top_k: int, granularity: int,
) -> None:
    out = tmp_path / "moe"
    assert ckpt_main(["upcycle", str(dense_dirs[arch]), "--experts", str(experts), "--top-k", str(top_k),
                      "--granularity", str(granularity), "--out", str(out)]) == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.model.moe_every, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.granularity) == (1, experts, top_k, granularity)
    ids = torch.randint(0, 259, (3, 23))
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[arch]).eval()
    moe = our_model(out)
    assert len(moe.moe_layers()) == 2 and moe.moe_layers()[0].experts.num_experts == experts * granularity
    assert (logits(moe, ids) - logits(dense, ids)).abs().max() <= 1e-6


def test_upcycle_from_our_dense_checkpoint(dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    import_hf(dense_dirs["qwen3"], tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=2, top_k=2, granularity=2)
    ids = torch.randint(0, 261, (2, 17))
    assert (logits(our_model(tmp_path / "moe"), ids) - logits(our_model(tmp_path / "dense"), ids)).abs().max() <= 1e-6
    with pytest.raises(CheckpointError, match="has MoE layers .*upcycle a dense model"):
        upcycle(tmp_path / "moe", tmp_path / "again", experts=2, top_k=1)
    assert not (tmp_path / "again").exists()


def test_upcycled_model_trains_under_dp2_ep2(
    dense_dirs: dict[str, Path], small_corpus: Path, tmp_path: Path, start_within: Callable[..., dict[str, Any]],
) -> None:
    upcycle(dense_dirs["llama"], tmp_path / "moe", experts=4, top_k=2)
    run = tmp_path / "run"
    cfg = load_config(tmp_path / "moe" / "config.yaml", [
        "model.seq_len=32", "train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=100", "train.ckpt_every=3", "data.val_tokens=512", "launch.threads=1",
        "launch.timeout_minutes=2", "launch.launcher=local", "parallel.dp=2", "parallel.ep=2",
        f"data.path={small_corpus}", f"train.run_dir={run}",
    ])
    assert start_within(cfg, 240.0, "upcycled")["steps"] == 3
    before, after = read_model_state(tmp_path / "moe")[0], read_model_state(run)[0]
    router = "blocks.0.ffn.router.weight_ED"
    assert not torch.equal(before[router], after[router])  # the router left zero: the experts can diverge
    w_in = after["blocks.0.ffn.experts.w_in_EDF"]
    assert not torch.equal(w_in[0], w_in[3])  # experts 0 and 3 (ep ranks 0 and 1) trained apart


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_models_import_and_export_bitwise(dense_dirs: dict[str, Path], tmp_path: Path, arch: str) -> None:
    """The dense architectures upcycling starts from go both ways too, exactly."""
    from safetensors.torch import load_file

    from launch.ckpt.hf_export import export_hf

    import_hf(dense_dirs[arch], tmp_path / "ckpt")
    summary = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert summary["architecture"] == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    original, exported = load_file(dense_dirs[arch] / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


# The child upcycles, then reports how far its peak RSS (VmHWM, kB) rose above its RSS just
# before (as tests/test_hf_checkpoint.py's import measurement does).
_PEAK_CHILD = """
import sys
from pathlib import Path
from launch.ckpt.upcycle import upcycle
def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
rss = kb('VmRSS:')
upcycle(Path(sys.argv[1]), Path(sys.argv[2]), experts=8, top_k=2)
print(kb('VmHWM:') - rss)
"""


def _write_random_llama(directory: Path, layers: int) -> int:
    """A LlamaForCausalLM directory of random fp32 weights (d=256, MLP 512), written with
    safetensors directly; the size of the upcycled model's experts in bytes."""
    from safetensors.torch import save_file

    config = LlamaConfig(**{**LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": layers,
                            "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024},
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    save_file({name: torch.randn(shape) for name, shape in shapes.items()}, str(directory / "model.safetensors"))
    return layers * 8 * 3 * 256 * 512 * 4


def test_upcycle_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    """Streaming: upcycling a dense model of 4 or 16 layers into 8 experts (experts 100 and
    403 MB), the peak RSS rises by a fixed amount (one block's experts and the conversion's
    working set), not with the model: the two growths differ by less than a quarter of the
    302 MB between the models (measured: 116 and 117 MB; building the whole MoE model
    first, as 8d08cec did, 152 and 334 MB)."""
    import subprocess
    import sys

    growth, size = {}, {}
    for layers in (4, 16):
        size[layers] = _write_random_llama(tmp_path / f"hf{layers}", layers)
        done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / f"hf{layers}"), str(tmp_path / f"moe{layers}")],
                              cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True, text=True)
        growth[layers] = int(done.stdout.split()[-1]) * 1024
    assert growth[16] - growth[4] < 0.25 * (size[16] - size[4]), (growth, size)
    state = read_model_state(tmp_path / "moe16")[0]
    assert state["blocks.15.ffn.experts.w_in_EDF"].shape == (8, 256, 1024) and state["blocks.15.ffn.router.weight_ED"].abs().max() == 0
