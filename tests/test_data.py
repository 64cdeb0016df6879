"""Tests for launch.data: tokenizer, prepare/load round trip, sampling, and bad-data errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import corpus as corpus_module
from launch.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    TokenStream,
    collect_sources,
    ensure_dataset,
    load_split,
    prepare,
    prepare_main,
    stdlib_sources,
)

TOKENIZER = ByteTokenizer()


def is_val(doc_id: str, val_fraction: float) -> bool:
    """The split rule as the spec states it, written independently of the implementation."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def write_corpus(root: Path, count: int = 24) -> dict[str, str]:
    """Small text files with unicode content; returns {doc_id: text} in sorted-path order."""
    docs = {}
    for i in range(count):
        doc_id = f"pkg{i % 3}/mod_{i:02d}.py"
        body = "".join(f"def f{j}(): return {i * j}\n" for j in range(i + 1))
        text = f"# módulo {i} ✓\n{body}"
        path = root / doc_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        docs[doc_id] = text
    return dict(sorted(docs.items()))


def expected_stream(texts: list[str]) -> np.ndarray:
    """Documents encoded in order, each followed by EOD."""
    parts = [np.append(TOKENIZER.encode(text), TOKENIZER.eod) for text in texts]
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[Path], dict[str, str]]:
    root = tmp_path / "src"
    docs = write_corpus(root)
    return [root / doc_id for doc_id in docs], docs


@pytest.fixture
def prepared(tmp_path: Path, corpus: tuple[list[Path], dict[str, str]]) -> Path:
    sources, _ = corpus
    out = tmp_path / "ds"
    prepare(sources, out, 0.3)
    return out


def write_raw_dataset(out: Path, train_docs: list[list[int]], meta: dict) -> None:
    """A dataset written directly with megatron's builder, bypassing prepare's checks."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True)
    for split, docs in (("train", train_docs), ("val", [[1, 2, 3]])):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        for doc in docs:
            builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
        builder.finalize(str(out / f"{split}.idx"))
    (out / "meta.json").write_text(json.dumps(meta))


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trips_unicode_and_drops_eod() -> None:
    text = "héllo wörld — 你好 🚀\n\ttab"
    ids = TOKENIZER.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode(np.append(ids, TOKENIZER.eod)) == text
    assert TOKENIZER.decode(torch.tensor([104, 105, 256, 33])) == "hi!"
    assert (TOKENIZER.vocab_size, TOKENIZER.eod, TOKENIZER.name) == (257, 256, "bytes")


def test_tokenizer_decode_replaces_broken_utf8_and_rejects_out_of_vocab() -> None:
    assert TOKENIZER.decode([0xE4, 0xBD]) == "\ufffd"
    with pytest.raises(DataError, match="257"):
        TOKENIZER.decode([65, 257])


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.9}, "data.val_fraction=0.9: must be a number in (0, 0.5]"),
        ({"val_fraction": 0.0}, "data.val_fraction=0.0"),
        ({"val_fraction": "0.1"}, "data.val_fraction='0.1'"),
        ({"val_tokens": 0}, "data.val_tokens=0: must be an integer >= 1"),
        ({"val_tokens": 1.5}, "data.val_tokens=1.5"),
    ],
)
def test_data_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        DataConfig(**kwargs)
    assert isinstance(excinfo.value, DataError)
    assert message in str(excinfo.value)


def test_data_config_accepts_bounds() -> None:
    assert DataConfig(val_fraction=0.5, val_tokens=1).val_fraction == 0.5


# --- corpus ------------------------------------------------------------------------------


def test_stdlib_sources_sorted_without_site_packages() -> None:
    sources = stdlib_sources()
    assert len(sources) > 500
    root = Path(os.path.commonpath([str(p) for p in sources]))
    relative = [p.relative_to(root).as_posix() for p in sources]
    assert relative == sorted(relative)
    assert all(p.suffix == ".py" and p.is_file() for p in sources)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in sources)


def test_collect_sources_walks_directories_sorted(tmp_path: Path) -> None:
    for name in ("b.py", "a/z.md", "a/y.rst", "c.jsonl", "notes.txt", "skip.bin", ".git/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = collect_sources([tmp_path, tmp_path / "b.py"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/y.rst", "a/z.md", "b.py", "c.jsonl", "notes.txt"
    ]


# --- prepare / load round trip -----------------------------------------------------------


def test_prepare_load_round_trip_and_meta(
    prepared: Path, corpus: tuple[list[Path], dict[str, str]]
) -> None:
    _, docs = corpus
    val_ids = [doc_id for doc_id in docs if is_val(doc_id, 0.3)]
    train_ids = [doc_id for doc_id in docs if not is_val(doc_id, 0.3)]
    assert val_ids and train_ids
    for split, ids in (("train", train_ids), ("val", val_ids)):
        stream = load_split(prepared, split)
        assert isinstance(stream, TokenStream)
        assert (stream.vocab_size, stream.eod) == (257, 256)
        np.testing.assert_array_equal(
            np.asarray(stream.tokens, dtype=np.int64), expected_stream([docs[i] for i in ids])
        )
        assert len(stream) == stream.tokens.size

    meta = json.loads((prepared / "meta.json").read_text())
    encoded = {doc_id: len(text.encode("utf-8")) for doc_id, text in docs.items()}
    assert meta["tokenizer"] == "bytes"
    assert (meta["vocab_size"], meta["eod"], meta["sources"]) == (257, 256, len(docs))
    assert meta["train"] == {
        "documents": len(train_ids), "tokens": sum(encoded[i] for i in train_ids)
    }
    assert meta["val"] == {"documents": len(val_ids), "tokens": sum(encoded[i] for i in val_ids)}
    assert len(meta["fingerprint"]) == 40


def test_split_is_deterministic_and_by_document(
    tmp_path: Path, corpus: tuple[list[Path], dict[str, str]]
) -> None:
    sources, docs = corpus
    prepare(sources, tmp_path / "one", 0.3)
    prepare(sources, tmp_path / "two", 0.3)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    # Dropping a validation document leaves every other document on its side.
    dropped = next(doc_id for doc_id in docs if is_val(doc_id, 0.3))
    fewer = [p for p, doc_id in zip(sources, docs) if doc_id != dropped]
    prepare(fewer, tmp_path / "three", 0.3)
    assert (tmp_path / "three" / "train.bin").read_bytes() == (
        tmp_path / "one" / "train.bin"
    ).read_bytes()


def test_jsonl_documents_and_empty_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"record {i} — ü", "id": i}) for i in range(40)]
    lines[5] = json.dumps({"text": ""})
    (src / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    (src / "empty.txt").write_text("")
    prepare([src / "data.jsonl", src / "empty.txt"], tmp_path / "ds", 0.3)

    texts = {
        f"data.jsonl:{n}": json.loads(line)["text"] for n, line in enumerate(lines, start=1)
    }
    texts = {doc_id: text for doc_id, text in texts.items() if text}
    for split, want_val in (("train", False), ("val", True)):
        ids = [doc_id for doc_id in texts if is_val(doc_id, 0.3) == want_val]
        np.testing.assert_array_equal(
            np.asarray(load_split(tmp_path / "ds", split).tokens, dtype=np.int64),
            expected_stream([texts[i] for i in ids]),
        )
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 39


# --- sampling ----------------------------------------------------------------------------


def make_stream(n: int = 5000) -> TokenStream:
    return TokenStream(np.arange(n, dtype=np.int64) % 257, 257, 256)


def test_batch_shapes_shift_and_determinism() -> None:
    stream = TokenStream(np.arange(5000, dtype=np.int64), 5001, 0)
    x, y = stream.batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # arange stream: each window is contiguous
    again = stream.batch(step=7, batch_size=4, seq_len=32, seed=1)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, stream.batch(step=8, batch_size=4, seq_len=32, seed=1)[0])
    assert not torch.equal(x, stream.batch(step=7, batch_size=4, seq_len=32, seed=2)[0])
    rows = stream.batch(step=7, batch_size=4, seq_len=32, seed=1, rows=slice(2, 4))  # a data-parallel rank's
    assert torch.equal(rows[0], x[2:]) and torch.equal(rows[1], y[2:])


def test_batch_starts_cover_the_whole_range() -> None:
    stream = TokenStream(np.arange(12, dtype=np.int64), 12, 0)
    starts = {int(stream.batch(step, 8, 10, 0)[0][i, 0]) for step in range(50) for i in range(8)}
    assert starts == {0, 1}  # len - seq_len - 1 = 1 is reachable, nothing beyond


def test_batch_rejects_short_stream() -> None:
    with pytest.raises(DataError, match="seq_len=64"):
        make_stream(64).batch(0, 2, 64, 0)


def test_val_batches_fixed_and_covering() -> None:
    stream = make_stream(5000)
    batches = stream.val_batches(batch_size=3, seq_len=50, n_tokens=400)
    assert len(batches) == 3  # ceil(400 / 50) = 8 windows -> 3 batches of 3
    assert sum(y.numel() for _, y in batches) >= 400
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    tokens = torch.from_numpy(np.asarray(stream.tokens))
    assert torch.equal(x, tokens[: x.numel()])  # contiguous, non-overlapping, from the start
    assert torch.equal(y, tokens[1 : y.numel() + 1])
    again = stream.val_batches(batch_size=3, seq_len=50, n_tokens=400)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_val_batches_use_all_windows_of_a_small_split() -> None:
    batches = make_stream(1001).val_batches(batch_size=4, seq_len=100, n_tokens=10**6)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]


# --- bad data ----------------------------------------------------------------------------


def test_missing_source_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(DataError, match="source not found: .*nope.py"):
        prepare([missing], tmp_path / "ds", 0.1)
    with pytest.raises(DataError, match="nope.py"):
        collect_sources([missing])


def test_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no source files"):
        prepare([], tmp_path / "ds", 0.1)
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="every document is empty"):
        prepare([tmp_path / "a.txt"], tmp_path / "ds", 0.1)
    (tmp_path / "b.txt").write_text("only one document")
    with pytest.raises(DataError, match="split is empty"):
        prepare([tmp_path / "b.txt"], tmp_path / "ds", 0.1)
    assert not (tmp_path / "ds").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"a.txt", "b.txt"}


def test_truncated_bin(prepared: Path) -> None:
    bin_path = prepared / "train.bin"
    with bin_path.open("r+b") as stream:
        stream.truncate(bin_path.stat().st_size - 4)
    with pytest.raises(DataError, match="train.bin: size mismatch"):
        load_split(prepared, "train")
    with bin_path.open("r+b") as stream:
        stream.truncate(0)
    with pytest.raises(DataError, match="mismatch"):
        load_split(prepared, "train")


def test_corrupt_idx(prepared: Path) -> None:
    idx_path = prepared / "val.idx"
    idx_path.write_bytes(idx_path.read_bytes()[:-8])
    with pytest.raises(DataError, match="val.idx: size mismatch"):
        load_split(prepared, "val")
    idx_path.write_bytes(b"not an index at all, but long enough")
    with pytest.raises(DataError, match="val.idx: not a megatron-core"):
        load_split(prepared, "val")


def test_token_id_outside_vocab(tmp_path: Path) -> None:
    meta = {
        "tokenizer": "bytes", "vocab_size": 257, "eod": 256,
        "train": {"documents": 2, "tokens": 5}, "val": {"documents": 1, "tokens": 3},
    }
    write_raw_dataset(tmp_path / "ds", [[1, 2], [3, 300, 4]], meta)
    train = load_split(tmp_path / "ds", "train")  # loading reads the index only; each read checks its ids
    (x, y), = train.val_batches(1, 2, 2)  # the stream is 1 2 EOD 3 300 4 EOD: a window short of the 300
    assert x.tolist() == [[1, 2]] and y.tolist() == [[2, 256]]
    with pytest.raises(DataError, match=r"train.bin: token id 300 at stream position 4 is outside vocab_size=257"):
        train.val_batches(1, 6, 6)
    assert np.asarray(load_split(tmp_path / "ds", "val").tokens).tolist() == [1, 2, 3, 256]


def test_meta_mismatch_and_unknown_tokenizer(prepared: Path) -> None:
    meta_path = prepared / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "val": {"documents": 1, "tokens": 1}}))
    with pytest.raises(DataError, match="different prepares"):
        load_split(prepared, "val")
    meta_path.write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    with pytest.raises(DataError, match="tokenizer 'gpt2' is unknown"):
        load_split(prepared, "train")
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="meta.json: unreadable"):
        load_split(prepared, "train")


def test_missing_meta_json(prepared: Path) -> None:
    (prepared / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json not found"):
        load_split(prepared, "train")
    with pytest.raises(DataError, match=r"meta.json not found; run `moe data prepare PATHS"):
        ensure_dataset(DataConfig(path=str(prepared)))


def test_ensure_dataset_with_path(prepared: Path, tmp_path: Path) -> None:
    assert ensure_dataset(DataConfig(path=str(prepared))) == prepared
    with pytest.raises(DataError, match=r"data.path=.*nowhere: directory not found; run `moe"):
        ensure_dataset(DataConfig(path=str(tmp_path / "nowhere")))
    (prepared / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin not found"):
        ensure_dataset(DataConfig(path=str(prepared)))


def test_bad_jsonl_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2: no string "text" field'):
        prepare([source], tmp_path / "ds", 0.1)
    source.write_text('{"text": "fine"}\n{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        prepare([source], tmp_path / "ds", 0.1)


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(
    tmp_path: Path, corpus: tuple[list[Path], dict[str, str]]
) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (out / "meta.json").write_text("{}")
    with pytest.raises(DataError, match="not a prepared dataset .it holds precious.txt"):
        prepare(corpus[0], out, 0.3)
    assert (out / "precious.txt").read_text() == "keep me"


def test_binary_sources_are_refused_when_named_and_skipped_with_a_warning_when_found(
    tmp_path: Path, corpus: tuple[list[Path], dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "src"
    (root / "pkg0" / "blob.py").write_bytes(b"import x\n\x00\x01\x02")
    (root / "pkg1" / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    found = collect_sources([root])
    assert {p.name for p in found} == {p.name for p in corpus[0]}
    warning = capsys.readouterr().err
    assert "warning: skipped 2 file(s) that are not text" in warning
    assert "blob.py (binary, a NUL byte at offset 9)" in warning and "latin.txt (not UTF-8 text, byte 0xe9" in warning
    with pytest.raises(DataError, match=r"source .*blob.py: binary, a NUL byte at offset 9; only text is tokenized"):
        collect_sources([root / "pkg0" / "blob.py", root])


def test_an_unwritable_output_fails_before_tokenizing(
    tmp_path: Path, corpus: tuple[list[Path], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile is a file, not a directory; choose a writable output directory"):
        prepare(corpus[0], tmp_path / "afile" / "sub" / "ds", 0.3)
    monkeypatch.setattr(corpus_module, "stdlib_sources", lambda: corpus[0])
    cfg = DataConfig(cache_dir=str(tmp_path / "afile" / "cache"), val_fraction=0.3)
    with pytest.raises(DataError, match=r"set data.cache_dir \(now '.*afile/cache'\) to a writable directory"):
        ensure_dataset(cfg)


# --- atomicity and reuse -----------------------------------------------------------------


def test_prepare_leaves_no_temp_dir_and_replaces_old_dataset(
    tmp_path: Path, corpus: tuple[list[Path], dict[str, str]]
) -> None:
    sources, _ = corpus
    out = tmp_path / "out" / "ds"
    prepare(sources, out, 0.3)
    with pytest.raises(DataError, match="already holds a prepared dataset; pass --overwrite"):
        prepare(sources[:12], out, 0.3)
    assert json.loads((out / "meta.json").read_text())["sources"] == len(sources)
    prepare(sources[:12], out, 0.3, overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["ds"]
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "train.bin", "train.idx", "val.bin", "val.idx"
    ]
    assert json.loads((out / "meta.json").read_text())["sources"] == 12


def test_failed_prepare_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError):
        prepare([tmp_path / "one.txt"], tmp_path / "out" / "ds", 0.1)
    assert list((tmp_path / "out").iterdir()) == []


def test_ensure_dataset_prepares_once_then_reuses(
    tmp_path: Path,
    corpus: tuple[list[Path], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sources, docs = corpus
    monkeypatch.setattr(corpus_module, "stdlib_sources", lambda: sources)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    out = ensure_dataset(cfg)
    assert out == tmp_path / "cache" / "stdlib-bytes-v0.3"
    assert f"preparing embedded corpus: {len(sources)} files" in capsys.readouterr().err
    stamp = (out / "meta.json").stat().st_mtime_ns
    os.utime(out / "meta.json", ns=(stamp - 10**9, stamp - 10**9))
    stamp -= 10**9

    assert ensure_dataset(cfg) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""

    sources[0].write_text(docs[next(iter(docs))] + "# changed\n")
    ensure_dataset(cfg)
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    assert "preparing embedded corpus" in capsys.readouterr().err


# --- CLI ---------------------------------------------------------------------------------


def test_prepare_main_exit_codes(
    tmp_path: Path,
    corpus: tuple[list[Path], dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "cli"
    assert prepare_main([str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train" in printed and "val" in printed
    assert load_split(out, "val").tokens.size > 0

    assert prepare_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error: source not found" in capsys.readouterr().err
    assert prepare_main([str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0.9"]) == 2
    assert "error: --val-fraction=0.9" in capsys.readouterr().err
    assert prepare_main(["--out", str(out)]) == 2
    capsys.readouterr()

    meta = (out / "meta.json").read_text()
    assert prepare_main([str(tmp_path / "src" / "pkg0"), "--out", str(out), "--val-fraction", "0.3"]) == 2
    assert "already holds a prepared dataset; pass --overwrite" in capsys.readouterr().err
    assert (out / "meta.json").read_text() == meta
    argv = [str(tmp_path / "src" / "pkg0"), "--out", str(out), "--val-fraction", "0.3", "--overwrite"]
    assert prepare_main(argv) == 0
    assert json.loads((out / "meta.json").read_text())["sources"] == 8


# The child loads a split and reads a batch, then reports how far its peak RSS (VmHWM, kB)
# rose above its RSS after the imports (megatron-core's among them).
_LOAD_CHILD = """
import sys
from pathlib import Path
from launch.data import load_split
from launch.data.stream import _indexed_dataset_module
_indexed_dataset_module()
def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
rss = kb('VmRSS:')
stream = load_split(Path(sys.argv[1]), "train")
x, y = stream.batch(3, 16, 256, 0)
print(kb('VmHWM:') - rss, len(stream), int(x.sum()))
"""


def test_a_split_is_read_as_it_is_sampled_not_loaded(tmp_path: Path) -> None:
    """Loading a 268 MB split and sampling a batch raises the peak RSS by a fixed amount, less
    than a quarter of the split (measured: 26 MB for splits of 130 and 519 MB; 8d08cec, which
    loaded the split and built the stream with EODs, 2.4 times the split: 313 MB and 1.24 GB);
    the batch is the one the whole stream, built in memory here, gives."""
    import subprocess
    import sys

    (tmp_path / "src").mkdir()
    texts = {f"doc{i:02d}.txt": f"document {i} " * 300_000 for i in range(40)}
    for name, text in texts.items():
        (tmp_path / "src" / name).write_text(text)
    prepare(sorted((tmp_path / "src").iterdir()), tmp_path / "ds", 0.1)
    size = (tmp_path / "ds" / "train.bin").stat().st_size
    done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path / "ds")], cwd=Path(__file__).resolve().parent.parent,
                          check=True, capture_output=True, text=True)
    growth_kb, length, checksum = map(int, done.stdout.split())
    assert size > 100e6 and growth_kb * 1024 < 0.25 * size, (growth_kb, size)
    whole = np.concatenate([np.append(np.frombuffer(text.encode(), np.uint8), 256).astype(np.uint16)
                            for name, text in texts.items() if not is_val(name, 0.1)])
    assert length == whole.size
    x, _ = TokenStream(whole, 257, 256).batch(3, 16, 256, 0)
    assert int(x.sum()) == checksum


def test_megatron_documents_of_several_sequences_end_once(tmp_path: Path) -> None:
    """Megatron-LM's preprocessing with --split-sentences writes a document as several
    sequences: the stream ends each document once, not each sequence."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = tmp_path / "ds"
    out.mkdir()
    for split, docs in (("train", [([1, 2, 3], [2, 1]), ([4], [1]), ([5, 6, 7, 8], [1, 2, 1])]), ("val", [([9], [1])])):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        for tokens, lengths in docs:
            builder.add_document(np.array(tokens, dtype=np.uint16), lengths)
        builder.finalize(str(out / f"{split}.idx"))
    meta = {"tokenizer": "bytes", "vocab_size": 257, "eod": 256,
            "train": {"documents": 3, "tokens": 8}, "val": {"documents": 1, "tokens": 1}}
    (out / "meta.json").write_text(json.dumps(meta))
    stream = load_split(out, "train")
    assert np.asarray(stream.tokens).tolist() == [1, 2, 3, 256, 4, 256, 5, 6, 7, 8, 256]
    (x, y), = stream.val_batches(1, 10, 10)
    assert x.tolist() == [[1, 2, 3, 256, 4, 256, 5, 6, 7, 8]] and y.tolist() == [[2, 3, 256, 4, 256, 5, 6, 7, 8, 256]]
