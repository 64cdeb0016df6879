"""Training data: tokenizers (bytes, Hugging Face tokenizer.json), corpus preparation into megatron-core indexed datasets,
and the deterministic batch sampler the trainer reads from.

By job: ``config`` (the ``data`` section, ``DataError``), ``tokenizer``, ``corpus`` (collecting
sources, ``prepare``, the embedded corpus, ``moe data prepare``) and ``stream`` (reading a
prepared dataset, sampling batches). The names other modules import are re-exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

from launch.data.config import DATASET_FILES, PREPARE_HINT, SOURCE_SUFFIXES, SPLITS, DataConfig, DataError

# The rest is imported on first use (PEP 562): `corpus` and `stream` import torch and
# megatron-core, and the command line reads its config through `launch.data.config`, so a bad
# config is refused before those seconds of imports.
_LAZY = {
    "PreparedData": "corpus", "SplitStats": "corpus", "collect_sources": "corpus", "ensure_dataset": "corpus",
    "prepare": "corpus", "prepare_main": "corpus", "stdlib_sources": "corpus",
    "TokenStream": "stream", "load_split": "stream", "read_meta": "stream",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_hf_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'launch.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"launch.data.{_LAZY[name]}"), name)


__all__ = [
    "DATASET_FILES",
    "PREPARE_HINT",
    "SOURCE_SUFFIXES",
    "SPLITS",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "HFTokenizer",
    "PreparedData",
    "SplitStats",
    "TokenStream",
    "collect_sources",
    "ensure_dataset",
    "load_hf_tokenizer",
    "load_split",
    "prepare",
    "prepare_main",
    "read_meta",
    "stdlib_sources",
]
