"""Subword tokenizers: ``moe data tokenizer train`` (byte-level BPE), ``moe data prepare
--tokenizer`` checked against transformers' own fast tokenizer reading the same file, int32
storage for vocabularies over 65,536 ids, ``data.tokenizer`` for the embedded corpus and its
hash check, and a short training run on BPE tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from launch.config import load_config
from launch.data import DataConfig, DataError, ensure_dataset, load_hf_tokenizer, load_split, prepare
from launch.data import corpus as corpus_module
from launch.data.bpe import main as tokenizer_main
from launch.data.bpe import train_bpe
from launch.train import train
from moe.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "naïve café — ünïcödé ✓ 日本語\n",
    "class A:\n    pass\n" * 3,
    "import os\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Repository sources plus unicode documents: enough text for merges and both splits."""
    root = tmp_path_factory.mktemp("src")
    files = []
    for i, path in enumerate(sorted((ROOT / "launch").rglob("*.py"))[:30]):
        files.append(root / f"{i:02d}_{path.name}")
        files[-1].write_text(path.read_text() + TEXTS[i % len(TEXTS)])
    return files


@pytest.fixture(scope="module")
def bpe(sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert tokenizer_main(["train", *map(str, sources), "--vocab-size", "384", "--out", str(out)]) == 0
    return out


def test_trained_bpe_is_byte_level_and_round_trips(bpe: Path) -> None:
    tokenizer = load_hf_tokenizer(bpe)
    assert (tokenizer.vocab_size, tokenizer.eod) == (384, 0)  # <|endoftext|> is the first id
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.backend.decode(ids.tolist()) == text
        assert len(ids) < len(text.encode())  # merges shorten every text
    with pytest.raises(DataError, match=r"--vocab-size=257: must be >= 258"):
        train_bpe([bpe], 257)


def test_tokenizer_train_never_overwrites(bpe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = bpe.read_bytes()
    assert tokenizer_main(["train", str(bpe), "--vocab-size", "300", "--out", str(bpe)]) == 2
    assert "exists; choose another path (a tokenizer is never overwritten)" in capsys.readouterr().err
    assert bpe.read_bytes() == before
    assert sorted(p.name for p in bpe.parent.iterdir()) == ["tokenizer.json"]


def test_prepare_with_tokenizer_matches_transformers(bpe: Path, sources: list[Path], tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    prepared = prepare(sources, tmp_path / "ds", 0.3, tokenizer=load_hf_tokenizer(bpe.parent))
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["tokenizer"] == "huggingface" and meta["vocab_size"] == 384 and meta["eod"] == 0
    assert meta["tokenizer_file"]["path"] == str(bpe) and meta["tokenizer_file"]["name"] == bpe.parent.name
    assert meta["tokenizer_file"]["sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    # split_special_tokens: the "<|endoftext|>" that launch/data/tokenizer.py's source quotes is
    # text, not the end of a document
    reference = PreTrainedTokenizerFast(tokenizer_file=str(bpe), split_special_tokens=True)
    assert any("<|endoftext|>" in path.read_text() for path in sources)
    expected: dict[str, list[int]] = {"train": [], "val": []}
    for path in sources:
        doc_id = path.name  # the sources' common root is their directory
        split = "val" if corpus_module._is_val(doc_id, 0.3) else "train"
        expected[split] += reference(path.read_text(), add_special_tokens=False)["input_ids"] + [0]
    for split in ("train", "val"):
        assert np.asarray(load_split(tmp_path / "ds", split).tokens).tolist() == expected[split]
    assert prepared.val.tokens == len(expected["val"]) - prepared.val.documents


def test_vocabulary_over_65536_is_stored_as_int32(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "low": 2, "high": 70_000}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "wide.json"))
    docs = []
    for i in range(12):
        docs.append(tmp_path / f"d{i}.txt")
        docs[-1].write_text("low high other " * (i + 1))
    tokenizer = load_hf_tokenizer(tmp_path / "wide.json")
    assert (tokenizer.vocab_size, tokenizer.eod) == (70_001, 1)
    prepare(docs, tmp_path / "ds", 0.3, tokenizer=tokenizer)
    assert (tmp_path / "ds" / "train.bin").stat().st_size % 4 == 0
    stream = load_split(tmp_path / "ds", "train")
    assert stream.vocab_size == 70_001 and 70_000 in np.asarray(stream.tokens)
    assert set(np.unique(np.asarray(stream.tokens)).tolist()) == {0, 1, 2, 70_000}


def test_a_mistral_shaped_tokenizer_ends_documents_with_its_eos(sources: list[Path], tmp_path: Path) -> None:
    """A tokenizer laid out as Mixtral's published tokenizer.json (SentencePiece BPE: a
    Metaspace pre-tokenizer, ``<unk>``, ``<s>``, ``</s>`` as ids 0-2, no ``<|endoftext|>``),
    trained here: documents end with ``</s>``, the id transformers' Llama tokenizer takes as
    its eos, and a prepared dataset's documents decode back to the texts, a literal ``</s>``
    in one of them included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    text = [path.read_text() for path in sources]
    assert any("</s>" in doc for doc in text)  # launch/data/tokenizer.py quotes it: text, not an end
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_hf_tokenizer(tmp_path)
    reference = LlamaTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert tokenizer.eod == reference.eos_token_id == 2
    assert tokenizer.vocab_size == backend.get_vocab_size() == len(reference)
    prepare(sources, tmp_path / "ds", 0.3, tokenizer=tokenizer)
    ids = [np.asarray(load_split(tmp_path / "ds", split).tokens).tolist() for split in ("train", "val")]
    assert sorted(reference.decode(doc) for split in ids for doc in _split_at(split, 2)) == sorted(text)


def _split_at(ids: list[int], eod: int) -> list[list[int]]:
    """``ids`` = ``doc eod doc eod ...`` cut into its documents."""
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == eod:
            docs.append(ids[start:i])
            start = i + 1
    return docs


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--tokenizer=.*nowhere.json: not found"):
        load_hf_tokenizer(tmp_path / "nowhere.json")
    with pytest.raises(DataError, match=r"no tokenizer.json in this directory"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"junk.json: not a Hugging Face tokenizer \("):
        load_hf_tokenizer(tmp_path / "junk.json")
    with pytest.raises(DataError, match=r"data.tokenizer='': must be a path"):
        DataConfig(tokenizer="")


def test_embedded_corpus_with_a_tokenizer_and_the_hash_check(
    bpe: Path, sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_module, "stdlib_sources", lambda: sources)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), val_fraction=0.3, tokenizer=str(bpe))
    out = ensure_dataset(cfg)
    sha = load_hf_tokenizer(bpe).sha256
    assert out == tmp_path / "cache" / f"stdlib-{bpe.parent.name}-{sha[:12]}-v0.3"
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 384
    assert ensure_dataset(DataConfig(path=str(out), tokenizer=str(bpe.parent))) == out
    other = tmp_path / "other.json"
    assert tokenizer_main(["train", *map(str, sources[:10]), "--vocab-size", "300", "--out", str(other)]) == 0
    with pytest.raises(DataError, match=rf"data.tokenizer={other} \(sha256 \w{{12}}\) is not the tokenizer .* was "
                                         rf"prepared with: {bpe} \(sha256 {sha[:12]}\)"):
        ensure_dataset(DataConfig(path=str(out), tokenizer=str(other)))
    bytes_ds = ensure_dataset(DataConfig(cache_dir=str(tmp_path / "cache"), val_fraction=0.3))
    with pytest.raises(DataError, match="was prepared with: the byte tokenizer"):
        ensure_dataset(DataConfig(path=str(bytes_ds), tokenizer=str(bpe)))


def test_a_run_trains_on_bpe_tokens(bpe: Path, sources: list[Path], tmp_path: Path) -> None:
    prepare(sources, tmp_path / "ds", 0.3, tokenizer=load_hf_tokenizer(bpe))
    small = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
             "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32", "train.batch_size=8",
             "train.warmup_steps=2", "train.log_every=1", "train.eval_every=4", "train.ckpt_every=4",
             "train.steps=4", "data.val_tokens=512", "launch.threads=1", f"data.path={tmp_path / 'ds'}",
             f"data.tokenizer={bpe}"]
    configs = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"model.vocab_size=257 is smaller than the dataset's vocabulary \(384 ids\)"):
        train(load_config(configs, [*small, "model.vocab_size=257", f"train.run_dir={tmp_path / 'refused'}"]), "tiny")
    summary = train(load_config(configs, [*small, "model.vocab_size=384", f"train.run_dir={tmp_path / 'run'}"]), "tiny")
    assert summary["steps"] == 4 and np.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] < np.log(384)  # learned something beyond uniform over the vocabulary
