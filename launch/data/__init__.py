"""Training data: tokenizers (bytes, Hugging Face tokenizer.json), corpus preparation into megatron-core indexed datasets,
and the deterministic batch sampler the trainer reads from.

By job: ``config`` (the ``data`` section, ``DataError``), ``tokenizer``, ``corpus`` (collecting
sources, ``prepare``, the embedded corpus, ``moe data prepare``) and ``stream`` (reading a
prepared dataset, sampling batches). The names other modules import are re-exported here.
"""

from launch.data.config import DATASET_FILES, PREPARE_HINT, SOURCE_SUFFIXES, SPLITS, DataConfig, DataError
from launch.data.corpus import (
    PreparedData,
    SplitStats,
    collect_sources,
    ensure_dataset,
    prepare,
    prepare_main,
    stdlib_sources,
)
from launch.data.stream import TokenStream, load_split, read_meta
from launch.data.tokenizer import ByteTokenizer, HFTokenizer, load_hf_tokenizer

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
