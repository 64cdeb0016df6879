"""Reading a prepared dataset: meta.json and the megatron-core .bin/.idx files checked against
each other, one split as a token stream read on demand from a memory map (``DocumentStream``),
and the deterministic batch sampler the trainer reads from.

megatron-core is imported inside the functions that need it: the import takes seconds and
prints fallback warnings, and loading a ``DataConfig`` or running ``moe --help`` should pay for
neither.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from launch.data.config import DATASET_FILES, PREPARE_HINT, SPLITS, DataError
from launch.data.tokenizer import check_meta_tokenizer

# megatron-core's .idx layout: magic, version <Q, dtype code <B, sequence count <Q,
# document count <Q, then int32 lengths, int64 pointers, int64 document indices.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = struct.Struct("<9sQBQQ")
_INDEX_DTYPES: MappingProxyType[int, type[np.integer]] = MappingProxyType(
    {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
)


def _indexed_dataset_module() -> types.ModuleType:
    """megatron-core's indexed dataset module, imported quietly: megatron warns at import
    that TransformerEngine/Apex are absent, which says nothing about reading tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("megatron.core.datasets.indexed_dataset")


def read_meta(data_dir: Path) -> dict[str, Any]:
    """A dataset's meta.json, checked against the tokenizer it names."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: not a prepared dataset; {PREPARE_HINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); {PREPARE_HINT} again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object; {PREPARE_HINT} again")
    check_meta_tokenizer(meta, path)
    return meta


def _check_dataset_files(data_dir: Path, key: str) -> None:
    """Presence of every file a prepared dataset needs, named in terms of the setting that
    pointed here."""
    if not data_dir.is_dir():
        raise DataError(f"{key}={data_dir}: directory not found; {PREPARE_HINT}")
    for name in DATASET_FILES:
        if not (data_dir / name).is_file():
            raise DataError(f"{key}={data_dir}: {name} not found; {PREPARE_HINT}")


def _read_index_header(idx_path: Path) -> tuple[type[np.integer], int]:
    """(token dtype, sequence count) of an .idx file, after checking its size matches its
    header: megatron only asserts on the header and never checks sizes."""
    actual = idx_path.stat().st_size
    with idx_path.open("rb") as stream:
        header = stream.read(_INDEX_HEADER.size)
    if len(header) < _INDEX_HEADER.size:
        raise DataError(f"{idx_path}: {actual} bytes, too short for an index; {PREPARE_HINT} again")
    magic, version, code, sequences, documents = _INDEX_HEADER.unpack(header)
    if magic != _INDEX_MAGIC or version != 1 or code not in _INDEX_DTYPES or documents < 1:
        raise DataError(
            f"{idx_path}: not a megatron-core integer token index (magic={magic!r}, "
            f"version={version}, dtype code={code}); {PREPARE_HINT} again"
        )
    expected = _INDEX_HEADER.size + sequences * (4 + 8) + documents * 8
    if actual != expected:
        raise DataError(
            f"{idx_path}: size mismatch: {actual} bytes but its header implies {expected}; "
            f"the file is truncated or corrupt, {PREPARE_HINT} again"
        )
    return _INDEX_DTYPES[code], sequences


def _read_documents(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the split's tokens, documents back to back, as a read-only memory map of its .bin;
    per-document lengths) of one split, with .idx and .bin checked against each other before
    any token is trusted. Nothing but the index is read here."""
    IndexedDataset = _indexed_dataset_module().IndexedDataset

    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"{path} not found; {PREPARE_HINT}")
    dtype, sequences = _read_index_header(idx_path)
    if sequences == 0:
        raise DataError(f"{idx_path}: the split has no documents; {PREPARE_HINT} with more text")
    try:
        # mmap=False: megatron's mmap reader cannot open an empty .bin (the size check below
        # refuses one); only its index is used, the tokens are mapped here after that check.
        dataset = IndexedDataset(str(prefix), mmap=False)
    except AssertionError as exc:
        raise DataError(f"{idx_path}: inconsistent index ({exc}); {PREPARE_HINT} again") from None
    lengths = dataset.sequence_lengths.astype(np.int64)
    expected = int(lengths.sum()) * np.dtype(dtype).itemsize
    actual = bin_path.stat().st_size
    if actual != expected or expected == 0:
        raise DataError(
            f"{bin_path}: size mismatch with {idx_path.name}: the index lists {int(lengths.sum())} "
            f"tokens ({expected} bytes) but the file has {actual} bytes; it is truncated or from "
            f"another prepare, {PREPARE_HINT} again"
        )
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    sequence_ends = np.concatenate([[0], np.cumsum(lengths)])
    return tokens, np.diff(sequence_ends[dataset.document_indices])


def _check_against_meta(meta: dict[str, Any], meta_path: Path, split: str, tokens: np.ndarray,
                        doc_lengths: np.ndarray) -> None:
    """The split's size must be the one meta.json recorded (catches files mixed from two
    prepares). Token ids are checked against the vocabulary as windows are read
    (``DocumentStream``): a whole-split scan here would read every token on every start."""
    recorded = meta.get(split)
    found = {"documents": int(doc_lengths.size), "tokens": int(tokens.size)}
    if recorded != found:
        raise DataError(
            f"{meta_path}: records {split}={recorded!r} but {split}.idx holds {found}; "
            f"the files come from different prepares, {PREPARE_HINT} again"
        )


class DocumentStream:
    """The stream ``doc EOD doc EOD ...`` of a split, read on demand: ``tokens`` holds the
    documents back to back (a memory map of the split's .bin) and the EODs are put in as
    positions are read, so a rank holds the windows it samples, never the split (a 100B-token
    split is 200 GB as uint16, four times that as int64). Position ``p`` of the stream is
    token ``p - i`` of ``tokens`` when it lies in document ``i``, or that document's EOD.
    What is kept per document is its start: 8 bytes (1.2 GB for 150M documents).
    Reading a token outside ``[0, vocab_size)`` is one ``DataError`` naming its position."""

    def __init__(self, tokens: np.ndarray, doc_lengths: np.ndarray, vocab_size: int, eod: int, where: str) -> None:
        self._tokens, self._eod, self._vocab_size, self._where = tokens, eod, vocab_size, where
        # Stream position of each document's first token, then the stream's end: the one
        # array kept per document (8 bytes each; document i's EOD is at _bounds[i + 1] - 1).
        self._bounds = np.concatenate([[0], np.cumsum(doc_lengths.astype(np.int64) + 1)])
        self.size = int(self._bounds[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        """The stream's values (int64) at an array of positions, of any shape."""
        positions = np.asarray(positions, dtype=np.int64)
        doc = np.searchsorted(self._bounds, positions, side="right") - 1
        is_eod = positions == self._bounds[doc + 1] - 1
        # Each earlier document put one EOD before ``positions``. An EOD reads the next
        # document's first token (clipped to the last one): a value overwritten below, read
        # only to keep the gather one vectorised read.
        read = np.minimum(positions - doc, self._tokens.size - 1)
        values = self._tokens[read].astype(np.int64)
        values[is_eod] = self._eod
        bad = np.flatnonzero((values < 0) | (values >= self._vocab_size))
        if bad.size:
            at = int(positions.reshape(-1)[bad[0]])
            raise DataError(
                f"{self._where}: token id {int(values.reshape(-1)[bad[0]])} at stream position {at} is outside "
                f"vocab_size={self._vocab_size}; the data was tokenized differently, {PREPARE_HINT} again"
            )
        return values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole stream, read (small splits and tests)."""
        values = self[np.arange(self.size)]
        return values if dtype is None else values.astype(dtype)


def load_split(data_dir: Path, split: str) -> TokenStream:
    """One split as a token stream, each document followed by EOD, read as it is sampled."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    tokens, doc_lengths = _read_documents(data_dir / split)
    _check_against_meta(meta, data_dir / "meta.json", split, tokens, doc_lengths)
    vocab_size, eod = int(meta["vocab_size"]), int(meta["eod"])
    return TokenStream(DocumentStream(tokens, doc_lengths, vocab_size, eod, f"{data_dir / split}.bin"), vocab_size, eod)


def _check_at_least(name: str, value: int, minimum: int) -> None:
    """Sampling arguments come from config; a bad one should name itself."""
    if value < minimum:
        raise DataError(f"{name}={value}: must be >= {minimum}")


@dataclass(frozen=True, eq=False)
class TokenStream:
    """A split's tokens as one stream, sampled in fixed-length windows: ``tokens`` is an
    array of the stream (EODs in place) or a ``DocumentStream`` reading a prepared split on
    demand; either is indexed with arrays of positions."""

    tokens: np.ndarray | DocumentStream
    vocab_size: int
    eod: int

    def __len__(self) -> int:
        return int(self.tokens.size)

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, next-token targets) of the (seq_len + 1)-token windows at ``starts``."""
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(seq_len + 1)]).astype(np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def _check_fits(self, seq_len: int) -> None:
        """A window needs seq_len inputs plus one more target token."""
        _check_at_least("seq_len", seq_len, 1)
        if len(self) < seq_len + 1:
            raise DataError(
                f"seq_len={seq_len}: the split has only {len(self)} tokens, fewer than "
                f"seq_len + 1; use a shorter seq_len or prepare more text"
            )

    def batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_BS, y_BS`` (int64, y is x shifted by one) at random starts: the ``rows`` of the
        global batch (a data-parallel rank's), the only windows read.

        The batch is a pure function of (seed, step): resuming at a step reproduces it exactly,
        and data-parallel ranks each take a slice of the same global batch.
        """
        _check_at_least("step", step, 0)
        _check_at_least("seed", seed, 0)
        _check_at_least("batch_size", batch_size, 1)
        self._check_fits(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self) - seq_len - 1, size=batch_size, endpoint=True)
        return self._windows(starts[rows], seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, n_tokens: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed windows tiling the start of the stream, every target token counted once, so
        validation losses are comparable across evaluations and runs.

        Covers at least ``n_tokens`` targets, rounded up to whole batches; a split too small
        for that yields all its complete windows, with a smaller last batch.
        """
        _check_at_least("batch_size", batch_size, 1)
        _check_at_least("n_tokens", n_tokens, 1)
        self._check_fits(seq_len)
        wanted = math.ceil(math.ceil(n_tokens / seq_len) / batch_size) * batch_size
        count = min(wanted, (len(self) - 1) // seq_len)
        starts = np.arange(count, dtype=np.int64) * seq_len
        return [
            self._windows(starts[first : first + batch_size], seq_len)
            for first in range(0, count, batch_size)
        ]
