"""Data configuration: the ``data`` YAML section, the error type every data problem raises, and
the names shared by preparation and loading (splits, dataset files, the fix to print)."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "val")
# What a directory walk takes as sources (launch.data.sources): text files, JSON lines (plain,
# gzip or zstd), Parquet.
SOURCE_SUFFIXES: tuple[str, ...] = (".py", ".txt", ".md", ".rst", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst",
                                    ".parquet")
DATASET_FILES: tuple[str, ...] = ("meta.json", "train.bin", "train.idx", "val.bin", "val.idx")
PREPARE_HINT = "run `moe data prepare PATHS --out DIR`"


class DataError(ValueError):
    """A problem with the data or its configuration that the user can fix; the message says how."""


def _check_val_fraction(value: object, key: str) -> None:
    """Reject a val_fraction the split cannot honour: 0 would leave no validation set, and more
    than half would starve training."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and 0 < value <= 0.5):  # type: ignore[operator]
        raise DataError(f"{key}={value!r}: must be a number in (0, 0.5]")


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from, how they are tokenized and how much is held out for
    validation. ``tokenizer``: a Hugging Face tokenizer.json (or a directory holding one) for the
    embedded corpus, and the one a ``path`` dataset must have been prepared with; None: bytes."""

    path: str | None = None
    cache_dir: str = "data/cache"
    val_fraction: float = 0.05
    val_tokens: int = 65536
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        """Fail at config load rather than minutes into a run."""
        _check_val_fraction(self.val_fraction, "data.val_fraction")
        if isinstance(self.val_tokens, bool) or not isinstance(self.val_tokens, int):
            raise DataError(f"data.val_tokens={self.val_tokens!r}: must be an integer >= 1")
        if self.val_tokens < 1:
            raise DataError(f"data.val_tokens={self.val_tokens}: must be an integer >= 1")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise DataError(
                f"data.tokenizer={self.tokenizer!r}: must be a path to a tokenizer.json (or a model directory "
                "holding one), or null for bytes"
            )
