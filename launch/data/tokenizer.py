"""Tokenizers a dataset can be prepared with: UTF-8 bytes plus an end-of-document id (the
default), or a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), e.g. one copied
from a model directory or trained by ``moe data tokenizer train``.

A dataset records its tokenizer in meta.json: ``tokenizer`` is ``"bytes"`` or
``"huggingface"``, ``vocab_size`` and ``eod`` are the ids the model sees, and a Hugging Face
tokenizer adds ``tokenizer_file`` = {path, name, sha256} (sha256 of tokenizer.json's bytes), so
a config naming another tokenizer file is caught before training or evaluating.

Vocabulary: ``vocab_size`` is one more than the largest id the tokenizer can produce (its
added tokens included). EOD is the tokenizer's own end-of-text token when it has one of the
usual names, else the new id ``vocab_size`` (and the vocabulary grows by one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from launch.data.config import PREPARE_HINT, DataError

TOKENIZER_FILE = "tokenizer.json"
# End-of-text tokens by family (GPT-2/Qwen, Llama 3, Mistral/Llama 2, Gemma), first found wins.
EOD_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
HF_NAME = "huggingface"


def ids_dtype(vocab_size: int) -> type[np.integer]:
    """The narrowest dtype a dataset's token ids are stored in: uint16 up to 65,536 ids, else
    int32 (megatron's indexed datasets have no uint32; Qwen's 151,936 ids need it)."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-document id: needs no training or vocabulary file, so any
    text can be prepared offline and the model's vocabulary is fixed at 257."""

    name: ClassVar[str] = "bytes"
    vocab_size: ClassVar[int] = 257
    eod: ClassVar[int] = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``'s UTF-8 bytes, as uint16 (the dtype the dataset is stored in)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text."""
        return [self.encode(text) for text in texts]

    def meta(self) -> dict[str, Any]:
        """What a dataset's meta.json records about this tokenizer."""
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eod": self.eod}

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Text of ``ids`` with EOD dropped; byte runs that are not valid UTF-8 (a model can emit
        them) become U+FFFD instead of raising."""
        array = np.asarray(ids, dtype=np.int64).ravel()
        bad = array[(array < 0) | (array > self.eod)]
        if bad.size:
            raise DataError(
                f"token id {int(bad[0])}: not a '{self.name}' token (ids are 0..{self.eod}); "
                f"mask logits beyond vocab_size={self.vocab_size} before sampling"
            )
        return bytes(array[array != self.eod].astype(np.uint8)).decode("utf-8", errors="replace")


def tokenizer_file(path: str | Path, key: str) -> Path:
    """``path`` itself when it is a file, else ``path/tokenizer.json`` (a model directory);
    ``key`` names the setting or option that gave it."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(
                f"{key}={path.parent}: no {TOKENIZER_FILE} in this directory; give a Hugging Face "
                f"tokenizer.json or a model directory holding one (`moe data tokenizer train` makes one)"
            )
    elif not path.is_file():
        raise DataError(
            f"{key}={path}: not found; give a Hugging Face tokenizer.json or a model directory holding one"
        )
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes: the identity of a tokenizer, whatever its path."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from its tokenizer.json."""

    path: Path
    name: str
    sha256: str
    vocab_size: int
    eod: int
    backend: Any

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, without special tokens (EOD is added at load time; a special
        token's text in a document is encoded as text), in the dataset's dtype; the library
        encodes the batch on all cores."""
        dtype = ids_dtype(self.vocab_size)
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``."""
        return self.encode_batch([text])[0]

    def meta(self) -> dict[str, Any]:
        """What a dataset's meta.json records about this tokenizer."""
        return {
            "tokenizer": HF_NAME,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "tokenizer_file": {"path": str(self.path), "name": self.name, "sha256": self.sha256},
        }


def load_hf_tokenizer(path: str | Path, key: str = "--tokenizer") -> HFTokenizer:
    """The tokenizer at ``path`` (a tokenizer.json or a directory holding one); one DataError
    naming ``key`` and the path when it is missing or not a tokenizer."""
    from tokenizers import Tokenizer  # a Rust extension: loaded only when a tokenizer is named

    file = tokenizer_file(path, key).resolve()
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as err:  # the library raises a bare Exception with serde's message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{key}={path}: not a Hugging Face tokenizer ({reason}); give a tokenizer.json or a model "
            "directory holding one"
        ) from None
    # A special token's text inside a document (an HTML strikethrough's "</s>", a source file
    # quoting "<|endoftext|>") is text: encoded as such, it can never pass for the end of a
    # document, which only the dataset's own separators are (transformers: split_special_tokens).
    backend.encode_special_tokens = True
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        raise DataError(f"{key}={path}: the tokenizer has an empty vocabulary; give a trained tokenizer")
    vocab_size = max(vocab.values()) + 1
    eod = next((vocab[token] for token in EOD_TOKENS if token in vocab), vocab_size)
    name = file.parent.name if file.name == TOKENIZER_FILE else file.stem
    return HFTokenizer(file, name, file_sha256(file), max(vocab_size, eod + 1), eod, backend)


def check_meta_tokenizer(meta: dict[str, Any], where: Path) -> None:
    """A meta.json's tokenizer record is one this trainer reads: ``bytes`` with its fixed ids,
    or ``huggingface`` with an EOD inside its vocabulary and the file's hash."""
    name = meta.get("tokenizer")
    if name == ByteTokenizer.name:
        expected: tuple[Any, Any] = (ByteTokenizer.vocab_size, ByteTokenizer.eod)
        found = (meta.get("vocab_size"), meta.get("eod"))
        if found != expected:
            raise DataError(
                f"{where}: vocab_size={found[0]!r}, eod={found[1]!r} do not match tokenizer "
                f"'{name}' {expected}; {PREPARE_HINT} again"
            )
        return
    if name != HF_NAME:
        raise DataError(
            f"{where}: tokenizer {name!r} is unknown; this trainer supports '{ByteTokenizer.name}' and "
            f"'{HF_NAME}', {PREPARE_HINT} again"
        )
    vocab_size, eod, record = meta.get("vocab_size"), meta.get("eod"), meta.get("tokenizer_file")
    valid = (
        isinstance(vocab_size, int) and vocab_size >= 1 and isinstance(eod, int) and 0 <= eod < vocab_size
        and isinstance(record, dict) and isinstance(record.get("sha256"), str)
    )
    if not valid:
        raise DataError(
            f"{where}: a '{HF_NAME}' tokenizer record needs an integer vocab_size, an eod below it and "
            f"tokenizer_file.sha256 (found vocab_size={vocab_size!r}, eod={eod!r}); {PREPARE_HINT} again"
        )


def check_same_tokenizer(meta: dict[str, Any], data_dir: Path, tokenizer: str | None) -> None:
    """A config's ``data.tokenizer`` must be the file the dataset at ``data_dir`` was prepared
    with (same sha256); a config naming none accepts whatever the dataset holds."""
    if tokenizer is None:
        return
    file = tokenizer_file(tokenizer, "data.tokenizer")
    record = meta.get("tokenizer_file") or {}
    recorded, current = record.get("sha256"), file_sha256(file)
    if recorded != current:
        prepared = f"{record.get('path')} (sha256 {recorded[:12]})" if recorded else "the byte tokenizer"
        raise DataError(
            f"data.tokenizer={tokenizer} (sha256 {current[:12]}) is not the tokenizer {data_dir} was prepared "
            f"with: {prepared}; set data.tokenizer to that file, or prepare the data again with "
            f"`moe data prepare PATHS --tokenizer {tokenizer} --out DIR`"
        )
