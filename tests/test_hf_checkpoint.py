"""Hugging Face interop against transformers itself (5.25, models built from configs here,
nothing downloaded): ``moe ckpt import`` then our forward gives transformers' logits;
import then export gives back the original safetensors bit for bit; an imported model
trained under dp=2·ep=2, tp=2·pp=2, pp=2·vpp=2, tp=2·etp=2 and DeepSpeed dp=2·ep=2 through
``moe train`` (``train.init_from``), then
exported, loads in transformers with our logits; the YAML written beside an import loads
and maps transformers' conventions."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_testing import logits, our_model
from launch.ckpt.cli import ckpt_main
from launch.ckpt.full_state import read_model_state
from launch.ckpt.hf_export import export_hf
from launch.ckpt.hf_import import import_hf
from launch.ckpt.init_from import read_initial_weights
from launch.config import load_config
from moe.model import Transformer
from parallel.checkpoint import CheckpointError

# Odd vocabularies (transformers' grouped_mm wants expert widths in 16-byte multiples), grouped-query attention (3 query heads per key/value head), head_dim != dim/heads.
MIXTRAL = dict(vocab_size=263, hidden_size=36, intermediate_size=20, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=10, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
               rms_norm_eps=1e-5, tie_word_embeddings=False)
# Qwen3-MoE, tied embeddings, q/k norms, dense layers 0 and 2 (decoder_sparse_step=2), unnormalised gates.
QWEN3 = dict(vocab_size=261, hidden_size=28, intermediate_size=30, moe_intermediate_size=12, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
             decoder_sparse_step=2, norm_topk_prob=False, max_position_embeddings=64, rms_norm_eps=1e-6,
             tie_word_embeddings=True, router_aux_loss_coef=0.01)
ROOT = Path(__file__).resolve().parent.parent


def _hf_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(7)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**MIXTRAL)).eval()
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**QWEN3)).eval()
    with torch.no_grad():  # q/k norm gains start at 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for arch in ("mixtral", "qwen3"):
        out[arch] = tmp_path_factory.mktemp("hf") / arch
        _hf_model(arch).save_pretrained(out[arch])
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3"])
def test_import_gives_transformerslogits(hf_dirs: dict[str, Path], tmp_path: Path, arch: str) -> None:
    out = tmp_path / "ckpt"
    assert ckpt_main(["import", str(hf_dirs[arch]), "--out", str(out)]) == 0
    ids = torch.randint(0, 261, (3, 29))
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).eval()
    ours = our_model(out)
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "hf_config.json", "tokenizer"]
    assert [p.name for p in (out / "tokenizer").iterdir()] == ["generation_config.json"]  # save_pretrained's


def test_tokenizer_files_are_copied_and_named(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["qwen3"], hf)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(vocab_size=261))
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (hf / "generation_config.json").write_text('{"eos_token_id": 7, "temperature": 0.6}')  # a published model's
    import_hf(hf, tmp_path / "ckpt")
    copied = tmp_path / "ckpt" / "tokenizer"
    assert sorted(p.name for p in copied.iterdir()) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert (copied / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    raw = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert raw["data"]["tokenizer"] == str((copied / "tokenizer.json").resolve())


def test_imported_config_maps_the_conventions(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    import_hf(hf_dirs["qwen3"], tmp_path / "q")
    cfg = load_config(tmp_path / "q" / "config.yaml")
    assert (cfg.model.moe_every, cfg.model.qk_norm, cfg.model.tie_embeddings, cfg.model.n_kv_heads) == (2, True, True, 2)
    assert (cfg.moe.normalize_weights, cfg.moe.expert_ffn_dim, cfg.model.ffn_dim, cfg.model.norm_eps) == (False, 12, 30, 1e-6)
    assert cfg.moe.aux_loss_coeff == pytest.approx(2 * 0.01) and cfg.moe.z_loss_coeff == 0.0
    assert cfg.train.init_from == str((tmp_path / "q").resolve())
    text = (tmp_path / "q" / "config.yaml").read_text()
    assert "num_experts_per_tok (2) x router_aux_loss_coef (0.01): HF's aux loss is K x ours" in text
    assert "decoder_sparse_step=2" in text
    import_hf(hf_dirs["mixtral"], tmp_path / "m")
    cfg = load_config(tmp_path / "m" / "config.yaml")
    assert (cfg.moe.normalize_weights, cfg.model.rope_theta, cfg.model.head_dim, cfg.model.tie_embeddings) == (True, 5e5, 10, False)


def _tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in _tensors_of(file).items()}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3"])
def test_import_then_export_is_bitwise_equal(hf_dirs: dict[str, Path], tmp_path: Path, arch: str) -> None:
    import_hf(hf_dirs[arch], tmp_path / "ckpt")
    assert ckpt_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    original, exported = _tensors(hf_dirs[arch]), _tensors(tmp_path / "hf")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [{"mixtral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[arch]]
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_export_in_bfloat16_reads_one_piece_at_a_time(
    hf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dtype bfloat16``: every tensor is the original's bf16 rounding, config.json says
    so, and transformers loads it; the export read the checkpoint piece by piece (embedding,
    each block, norm, LM head: one read each, in order), never the whole model at once."""
    from launch.ckpt.full_state import ModelState, piece_of

    import_hf(hf_dirs["mixtral"], tmp_path / "ckpt")
    reads: list[set[str]] = []
    real_read = ModelState.read
    monkeypatch.setattr(ModelState, "read", lambda self, names: real_read(self, reads.append(set(names)) or reads[-1]))
    assert ckpt_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    layers = json.loads((hf_dirs["mixtral"] / "config.json").read_text())["num_hidden_layers"]
    assert [{piece_of(n) for n in names} for names in reads] == [
        {"embed"}, *({f"blocks.{i}"} for i in range(layers)), {"norm"}, {"lm_head"}]
    original, exported = _tensors(hf_dirs["mixtral"]), _tensors(tmp_path / "hf")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.bfloat16()), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(0, 261, (2, 13))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(hf_dirs["mixtral"]).eval()
    assert 0 < (logits(hf, ids) - logits(reference, ids)).abs().max() < 0.05  # bf16 weights: rounded, close


def test_sharded_export_and_import_of_shards(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Shards of at most 20 kB (5 GB in use) with their index; the shards import again, identically."""
    import_hf(hf_dirs["qwen3"], tmp_path / "ckpt")
    summary = export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=20_000)
    shards = [f for f in summary["files"] if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # full (a tensor larger than a shard gets one of its own)
        tensors = _tensors_of(tmp_path / "hf" / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
    ids = torch.randint(0, 261, (2, 13))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(hf, ids), logits(AutoModelForCausalLM.from_pretrained(hf_dirs["qwen3"]).eval(), ids))
    import_hf(tmp_path / "hf", tmp_path / "again")
    a, b = read_model_state(tmp_path / "ckpt")[0], read_model_state(tmp_path / "again")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_names_a_tensor_that_does_not_fit(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    import_hf(hf_dirs["mixtral"], tmp_path / "ckpt")
    cfg = load_config(tmp_path / "ckpt" / "config.yaml", ["moe.expert_ffn_dim=24"])
    with pytest.raises(CheckpointError, match=r"'blocks.0.ffn.experts.w_in_EDF' is \[4, 36, 40\] there but \[4, 36, 48\] "
                                              r"here .*moe.expert_ffn_dim=20 there, 24 here"):
        read_initial_weights(str(tmp_path / "ckpt"), cfg.model, cfg.moe)


TRAIN = ["model.seq_len=32", "train.lr=1e-6", "train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
         "train.eval_every=100", "train.ckpt_every=3", "data.val_tokens=512", "launch.threads=1",
         "launch.timeout_minutes=2", "launch.launcher=local"]


@pytest.mark.parametrize(("arch", "layout"), [
    ("mixtral", ["parallel.dp=2", "parallel.ep=2"]),
    ("qwen3", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "train.micro_batch_size=1"]),
    ("mixtral", ["parallel.dp=2", "parallel.ep=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    ("qwen3", ["parallel.pp=2", "parallel.vpp=2", "parallel.dp=1", "train.micro_batch_size=1"]),
    ("mixtral", ["parallel.tp=2", "parallel.etp=2", "parallel.dp=1"]),
], ids=["mixtral-dp2-ep2", "qwen3-tp2-pp2", "mixtral-deepspeed-dp2-ep2", "qwen3-pp2-vpp2", "mixtral-tp2-etp2"])
def test_imported_model_trains_under_a_layout_and_exports_to_transformers(
    hf_dirs: dict[str, Path], small_corpus: Path, tmp_path: Path, start_within: Callable[..., dict[str, Any]],
    arch: str, layout: list[str],
) -> None:
    """moe train with train.init_from (the imported weights, resharded to the layout), 3
    steps, a sharded checkpoint (megatron) or per-rank files holding each EP rank's experts
    (DeepSpeed); exported in one process, transformers' logits are ours."""
    import_hf(hf_dirs[arch], tmp_path / "ckpt")
    run = tmp_path / "run"
    cfg = load_config(tmp_path / "ckpt" / "config.yaml", [*TRAIN, *layout, f"data.path={small_corpus}", f"train.run_dir={run}"])
    summary = start_within(cfg, 240.0, "imported")
    assert summary["steps"] == 3
    export_hf(run, tmp_path / "hf")
    ids = torch.randint(0, 257, (2, 19))
    trained = our_model(run)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits(hf, ids) - logits(trained, ids)).abs().max() <= 1e-5
    # trained on a byte dataset: generate stops at its end-of-document id, not Mixtral's default 2
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == hf.generation_config.bos_token_id == 256
    # It started from the imported weights (another initialisation differs by ~0.05) and trained
    # them (at lr 1e-6 Adam moves each weight by about 1e-6 a step).
    before, after = read_model_state(tmp_path / "ckpt")[0], read_model_state(run)[0]
    for name in ("blocks.1.ffn.experts.w_in_EDF", "blocks.1.attn.qkv.weight", "embed.weight"):
        assert 0 < (after[name] - before[name]).abs().max() < 1e-4, name


def _train_rank(rank: int, world_size: int, cfg: Any) -> None:
    """One rank of a run, as a launcher's rank runs it."""
    import os

    from launch.train import train_rank

    os.environ["LOCAL_RANK"] = str(rank)
    train_rank(cfg, "tiny")


def test_sigmoid_expert_bias_of_a_sharded_checkpoint_is_read_back(
    small_corpus: Path, tmp_path: Path, rank_pool: Callable[[int], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dp=2·ep=2 run with sigmoid scores and bias balancing saves a sharded checkpoint whose
    expert bias lives in its extras, not among the sharded parameters; ``train.init_from``
    under one process (and export's reader) takes it from there: equal to the bias the run
    logged at its last step, which is not zero. Export refuses sigmoid scores by name.
    A run started from it opens the checkpoint without reading a tensor, then reads each
    piece it builds on its own (one DCP read per piece, of that piece's names only), and ends
    with the whole checkpoint's weights."""
    import torch.distributed.checkpoint as dcp

    from launch.check_layouts import train_records
    from launch.train import Run

    run = tmp_path / "run"
    routing = ["model.dim=32", "model.n_layers=3", "model.moe_every=1", "model.n_heads=2", "model.ffn_dim=64",
               "model.vocab_size=257", "moe.num_experts=4", "moe.top_k=2", "moe.score=sigmoid",
               "moe.expert_bias_update_rate=1e-2", "moe.normalize_weights=true", "train.lr=1e-3"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TRAIN, *routing, "parallel.dp=2", "parallel.ep=2",
                                                        f"data.path={small_corpus}", f"train.run_dir={run}"])
    rank_pool(cfg.parallel.world_size).run(_train_rank, cfg, timeout=240)
    logged = torch.tensor(train_records(run)[-1]["expert_bias"])
    assert logged.shape == (3, 4) and logged.abs().max() > 0
    one = load_config(ROOT / "configs" / "tiny.yaml", [*TRAIN, *routing, f"train.init_from={run}",
                                                        f"data.path={small_corpus}", f"train.run_dir={tmp_path / 'one'}"])
    reads: list[list[str]] = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda state, **kw: (reads.append(sorted(state)), real_load(state, **kw))[1])
    state = read_initial_weights(str(run), one.model, one.moe)
    assert reads == []
    whole = state.whole()
    net = Transformer(one.model, one.moe)
    net.load_state_dict(whole)
    loaded = torch.stack([net.blocks[str(b)].ffn.router.expert_bias_E for b in range(3)])
    assert torch.equal(loaded, logged)
    reads.clear()
    started = Run(one, "tiny").net.state_dict()
    pieces = ["embed", "blocks.0", "blocks.1", "blocks.2", "norm"]  # tied: the LM head is the embedding
    stored = [n for n in whole if n != "lm_head.weight" and not n.endswith("expert_bias_E")]  # the DCP keys
    assert reads == [sorted(n for n in stored if n.startswith(f"{p}.")) for p in pieces]
    assert started.keys() == whole.keys()
    assert all(torch.equal(started[n], whole[n]) for n in whole)
    with pytest.raises(CheckpointError, match=r"moe\.score='sigmoid' .*moe\.expert_bias_update_rate=0\.01"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def write_random_mixtral(directory: Path, layers: int, dim: int, ffn: int, experts: int = 8) -> int:
    """A Mixtral-shaped transformers directory of random fp32 weights, written with
    safetensors directly (no transformers model is built); its size in bytes. The tensor
    names and shapes are the ones ``config.json`` implies (``moe.hf_weights.weight_table``)."""
    from safetensors.torch import save_file

    from launch.ckpt.hf_config import config_from_hf
    from launch.ckpt.hf_import import expected_shapes
    from moe.hf_weights import weight_table

    config = MixtralConfig(**{**MIXTRAL, "vocab_size": 1024, "hidden_size": dim, "intermediate_size": ffn,
                              "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
                              "head_dim": dim // 8, "num_local_experts": experts},
                           architectures=["MixtralForCausalLM"])
    config.save_pretrained(directory)
    model, moe, _ = config_from_hf(json.loads((directory / "config.json").read_text()), "MixtralForCausalLM")
    shapes = expected_shapes(model, moe)
    tensors = {name: torch.randn(t.shape) for entry in weight_table("MixtralForCausalLM", model, moe)
               for name, t in zip(entry.hf, entry.to_hf(torch.empty(shapes[entry.ours], device="meta")), strict=True)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


# The child imports, then reports how far its peak RSS (VmHWM, kB) rose above its RSS just
# before the import. Not ru_maxrss: it survives exec, so a child starts with its parent's
# RSS at the fork (the parent that just wrote the model) as its maximum.
_PEAK_CHILD = """
import sys
from pathlib import Path
from launch.ckpt.hf_import import import_hf
def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
rss = kb('VmRSS:')
import_hf(Path(sys.argv[1]), Path(sys.argv[2]))
print(kb('VmHWM:') - rss)
"""


def import_peak_growth(hf_dir: Path, out: Path, tree: Path = ROOT) -> int:
    """``moe ckpt import`` in a fresh process (the code of ``tree``): how many bytes its peak
    RSS rose during the import."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(hf_dir), str(out)], cwd=tree, check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024


def test_import_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    """Streaming: the importer's peak RSS rises by a fixed amount (one layer's tensors and
    the conversion's working set), not with the model's size. Two Mixtral-shaped models of 4
    and 16 layers (53 and 206 MB): their imports' peak RSS growths differ by less than a
    quarter of the 150 MB between them (holding the converted model, as before streaming,
    differs by about 2 x 150 MB; measured in docs/checkpoints.md)."""
    growth, size = {}, {}
    for layers in (4, 16):
        size[layers] = write_random_mixtral(tmp_path / f"hf{layers}", layers, 256, 512)
        growth[layers] = import_peak_growth(tmp_path / f"hf{layers}", tmp_path / f"ckpt{layers}")
    assert growth[16] - growth[4] < 0.25 * (size[16] - size[4]), (growth, size)
    a, b = read_model_state(tmp_path / "ckpt16")[0], _tensors(tmp_path / "hf16")
    assert torch.equal(a["embed.weight"], b["model.embed_tokens.weight"]) and torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_tokenizer_goes_through_import_export_and_eval(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A model directory with a BPE tokenizer (trained here): import copies it, export
    carries it into the transformers directory byte for byte, and ``moe eval`` of the
    imported checkpoint on a text file tokenizes with it (its ids, not bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from launch.eval.evaluate import evaluate

    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["qwen3"], hf)
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(200))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (hf / "generation_config.json").write_text('{"eos_token_id": 7, "temperature": 0.6}')  # a published model's
    import_hf(hf, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "exported")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (hf / name).read_bytes(), name
    # the published generation config goes through, the end-of-document id added to its end ids
    eod = tokenizer.token_to_id("<|endoftext|>")
    generation = GenerationConfig.from_pretrained(tmp_path / "exported")
    assert generation.eos_token_id == [7, eod] and generation.temperature == 0.6
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["eos_token_id"] == [7, eod]
    (tmp_path / "code.txt").write_text(text)
    record, _ = evaluate(tmp_path / "ckpt", ["launch.launcher=local", "launch.threads=1"], str(tmp_path / "code.txt"),
                         str(tmp_path / "eval.json"))
    ids = tokenizer.encode(text).ids
    assert record["tokenizer"] == {"name": "tokenizer", "vocab_size": tokenizer.get_vocab_size()}
    assert len(ids) + 1 < len(text.encode()) // 2  # subword tokens: a byte model would see twice as many
    assert 0 < record["tokens"] <= len(ids) + 1 and math.isfinite(record["loss"])
    # a tokenizer gone since training: the ids are unknown, written as null (not Qwen's defaults)
    shutil.rmtree(tmp_path / "ckpt" / "tokenizer")
    assert export_hf(tmp_path / "ckpt", tmp_path / "exported-without")["eod"] is None
    generation = json.loads((tmp_path / "exported-without" / "generation_config.json").read_text())
    assert generation["eos_token_id"] is None and generation["bos_token_id"] is None
