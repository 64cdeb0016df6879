"""The source files ``moe data prepare`` reads, told apart by name (``SOURCE_SUFFIXES``):

- text (``.py .txt .md .rst``, or any file named on the command line): the file is one
  document, UTF-8 (an invalid byte becomes U+FFFD);
- JSON lines (``.jsonl``; gzip-compressed ``.jsonl.gz`` or ``.json.gz``, as Dolma and
  RedPajama ship; zstd-compressed ``.jsonl.zst``, as the Pile, SlimPajama and DCLM ship):
  one document per line, its string ``"text"`` field;
- Parquet (``.parquet``, as FineWeb and most Hugging Face datasets ship): one document per
  row, its string ``text`` column, read a record batch at a time (``pyarrow``).

A record's document id (what the split hashes) is ``<file id>:<n>``, its 1-based line or
row number, as for ``.jsonl`` before the other formats came. Empty documents are skipped
(their numbers are not reused); a record without a string text is one ``DataError`` naming
the file and the record.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from launch.data.config import SOURCE_SUFFIXES, DataError

_GZIP_JSONL = (".jsonl.gz", ".json.gz")
_ZSTD_JSONL = (".jsonl.zst",)
_PARQUET_MAGIC = b"PAR1"
_RECORD_FIX = 'must be a JSON object with a string "text" field'


def is_source_name(name: str) -> bool:
    """Whether a file found while walking a directory is a source, by its name."""
    return name.lower().endswith(SOURCE_SUFFIXES)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_GZIP_JSONL):
        return "jsonl.gz"
    if name.endswith(_ZSTD_JSONL):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


class _ZstdReader(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame (files are often concatenated
    frames). A file that ends inside a frame raises ``zstandard.ZstdError``, where the
    library's own stream reader returns what it has and a truncated download would lose
    its tail without a word."""

    def __init__(self, path: Path) -> None:
        import zstandard

        super().__init__()
        self._zstd = zstandard
        self._file = path.open("rb")
        self._frame: Any = None  # the current frame's decompressor
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset == len(self._pending):
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame: it is truncated")
                return 0
            self._pending, self._offset = self._decompress(chunk), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset:self._offset + n]
        self._offset += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""  # the next frame's start
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _zstd_open(path: Path) -> IO[bytes]:
    return io.BufferedReader(_ZstdReader(path))


def _opener(kind: str) -> Callable[[Path], IO[bytes]]:
    """How a text or JSON-lines source of ``kind`` is opened: its decompressed bytes."""
    return {"jsonl.gz": lambda path: gzip.open(path, "rb"), "jsonl.zst": _zstd_open}.get(kind, lambda path: path.open("rb"))


def _damaged() -> tuple[type[BaseException], ...]:
    """What a damaged compressed stream raises (gzip, zstd)."""
    import zstandard

    return gzip.BadGzipFile, EOFError, zstandard.ZstdError


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be a source of its kind (judged on its first 8 KiB, decompressed
    for gzip, as git and grep judge binary files; a Parquet file by its magic), or None."""
    try:
        if _kind(path) == "parquet":
            with path.open("rb") as stream:
                head = stream.read(4)
            return None if head == _PARQUET_MAGIC else "not a Parquet file (no PAR1 magic at its start)"
        with _opener(_kind(path))(path) as stream:
            head = stream.read(8192)
    except _damaged() as err:
        return f"not {'gzip' if _kind(path) == 'jsonl.gz' else 'zstd'}-compressed ({err})"
    except OSError as err:
        raise DataError(f"source {path}: cannot be read ({err.strerror})") from None
    nul = head.find(b"\0")
    if nul >= 0:
        return f"binary, a NUL byte at offset {nul}"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        return f"not UTF-8 text, byte 0x{head[err.start]:02x} at offset {err.start}"
    return None


def documents(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    """(document id, text) of every non-empty document of the source ``path`` (its id ``doc_id``)."""
    kind = _kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, doc_id)
    elif kind == "text":
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text:
            yield doc_id, text
    else:
        with _opener(kind)(path) as lines:
            yield from _jsonl_documents(lines, path, doc_id)


def _jsonl_documents(lines: IO[bytes], path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    """One document per line's "text" field; blank lines (a trailing newline) are skipped."""
    try:
        for lineno, raw in enumerate(lines, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line of a JSON-lines source {_RECORD_FIX}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: no string "text" field; each line of a JSON-lines source {_RECORD_FIX}')
            if text:
                yield f"{doc_id}:{lineno}", text
    except (*_damaged(), OSError) as err:
        raise DataError(f"{path}: cannot be read to its end ({err}): the file (or its compressed stream) is damaged or "
                        "truncated; replace it or remove it from PATHS") from None


def _parquet_documents(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    """One document per row's ``text`` (a string column; a null is an error), a record batch
    at a time, so a file larger than memory streams."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err}); replace the file or remove it from PATHS") from None
    field = file.schema_arrow.field("text") if "text" in file.schema_arrow.names else None
    if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        columns = ", ".join(f"{f.name} ({f.type})" for f in file.schema_arrow)
        raise DataError(f"{path}: no string column 'text' (it has {columns}); a Parquet source needs one, "
                        "one document per row")
    row = 0
    for batch in file.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row} has a null text; drop such rows, or remove the file from PATHS")
            if text:
                yield f"{doc_id}:{row}", text
