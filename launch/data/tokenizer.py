"""Tokenizers a dataset can be prepared with: UTF-8 bytes plus an end-of-document id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from launch.data.config import PREPARE_HINT, DataError


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-document id: needs no training or vocabulary file, so any
    text can be prepared offline and the model's vocabulary is fixed at 257."""

    name: ClassVar[str] = "bytes"
    vocab_size: ClassVar[int] = 257
    eod: ClassVar[int] = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``'s UTF-8 bytes, as uint16 (the dtype the dataset is stored in)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

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


def get_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer a dataset was prepared with, by the name recorded in its meta.json."""
    if name != ByteTokenizer.name:
        raise DataError(
            f"tokenizer {name!r}: unknown; this trainer supports '{ByteTokenizer.name}', "
            f"re-prepare the data ({PREPARE_HINT})"
        )
    return ByteTokenizer()
