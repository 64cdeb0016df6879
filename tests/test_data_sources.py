"""``launch.data.sources``: the source formats ``moe data prepare`` reads. The same records
stored as JSON lines, gzip- and zstd-compressed JSON lines and Parquet (written by pyarrow, the
library Hugging Face datasets use) give the same documents, split by their ids; damaged or
unsuitable files are one error naming the file and the record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from launch.data import DataError, collect_sources, load_split, prepare
from launch.data.sources import documents, unreadable
from test_data import expected_stream, is_val

TEXTS = [f"record {i}: naïve café — ü {'x' * (i % 7)}" for i in range(60)]
TEXTS[9] = ""  # an empty document: skipped, its row number not reused


def _write_all(directory: Path, name: str = "part") -> dict[str, Path]:
    """The records in each format, under one stem, in a directory of their own."""
    paths = {}
    for fmt in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet"):
        paths[fmt] = directory / fmt / f"{name}.{fmt}"
        paths[fmt].parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(TEXTS))
    paths["jsonl"].write_text(lines)
    with gzip.open(paths["jsonl.gz"], "wt") as stream:
        stream.write(lines)
    half = len(lines) // 2  # two frames, as concatenated files have
    paths["jsonl.zst"].write_bytes(b"".join(zstandard.ZstdCompressor().compress(part.encode())
                                            for part in (lines[:half], lines[half:])))
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, paths["parquet"], row_group_size=16)  # several row groups: read batch by batch
    return paths


def test_every_format_gives_the_same_documents(tmp_path: Path) -> None:
    paths = _write_all(tmp_path)
    expected = [(f"part:{n}", text) for n, text in enumerate(TEXTS, start=1) if text]
    for fmt, path in paths.items():
        assert unreadable(path) is None, fmt
        assert list(documents(path, "part")) == expected, fmt


def test_prepared_datasets_split_each_record_by_its_id(tmp_path: Path) -> None:
    """Each format, found by a directory walk and prepared: the record ``n`` of ``F`` has
    the id ``F:n`` and lands on the side its id hashes to (test_data's independent rule)."""
    paths = _write_all(tmp_path, "part")
    for fmt, path in paths.items():
        assert collect_sources([path.parent]) == [path], fmt
        prepare([path], tmp_path / f"ds-{fmt}", 0.3)
        ids = {f"{path.name}:{n}": text for n, text in enumerate(TEXTS, start=1) if text}
        for split, want_val in (("train", False), ("val", True)):
            texts = [text for doc_id, text in ids.items() if is_val(doc_id, 0.3) == want_val]
            assert texts, (fmt, split)
            np.testing.assert_array_equal(np.asarray(load_split(tmp_path / f"ds-{fmt}", split).tokens, dtype=np.int64),
                                          expected_stream(texts))


def test_unsuitable_sources_are_named(tmp_path: Path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    assert unreadable(fake) == "not a Parquet file (no PAR1 magic at its start)"
    for suffix, kind in (("jsonl.gz", "gzip"), ("jsonl.zst", "zstd")):
        fake_compressed = tmp_path / f"fake.{suffix}"
        fake_compressed.write_text('{"text": "plain, not compressed"}\n')
        assert unreadable(fake_compressed).startswith(f"not {kind}-compressed"), suffix
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), numbers)
    with pytest.raises(DataError, match=r"numbers.parquet: no string column 'text' \(it has content \(string\), n \(int64\)\)"):
        list(documents(numbers, "numbers"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    with pytest.raises(DataError, match=r"nulls.parquet: row 2 has a null text"):
        list(documents(nulls, "nulls"))
    bad_line = tmp_path / "bad.json.gz"
    with gzip.open(bad_line, "wt") as stream:
        stream.write('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r'bad.json.gz:2: no string "text" field'):
        list(documents(bad_line, "bad"))
    records = b'{"text": "a"}\n' * 2000
    for suffix, data in (("jsonl.gz", gzip.compress(records)), ("jsonl.zst", zstandard.ZstdCompressor().compress(records))):
        truncated = tmp_path / f"truncated.{suffix}"
        truncated.write_bytes(data[:-8])
        with pytest.raises(DataError, match=rf"truncated.{suffix}: cannot be read to its end .* damaged or truncated"):
            list(documents(truncated, "truncated"))


def test_a_large_zstd_file_streams_across_chunks_and_frames(tmp_path: Path) -> None:
    """Three frames of about 1 MB decompressed each, read 64 KiB of compressed bytes at a time:
    the same documents as the plain file."""
    rng = np.random.default_rng(0)
    lines = "".join(json.dumps({"text": "".join(rng.choice(list("abcdefgh ü\n"), 500))}) + "\n" for _ in range(6000))
    plain, packed = tmp_path / "big.jsonl", tmp_path / "big.jsonl.zst"
    plain.write_text(lines)
    thirds = [lines[i * len(lines) // 3:(i + 1) * len(lines) // 3] for i in range(3)]
    packed.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part.encode()) for part in thirds))
    assert packed.stat().st_size > 3 * (1 << 16)
    assert list(documents(packed, "big")) == list(documents(plain, "big"))
