"""``moe data tokenizer train``: a byte-level BPE tokenizer (GPT-2's construction, the Hugging
Face ``tokenizers`` library) trained on local text, so a run can use subword tokens with
nothing downloaded.

Byte-level: text is split by GPT-2's pre-tokenization regex, each piece's UTF-8 bytes are
mapped to 256 printable symbols, and BPE merges the most frequent adjacent pair until the
vocabulary holds ``vocab_size`` ids: 256 bytes + 1 ``<|endoftext|>`` (the EOD id a dataset uses)
+ ``vocab_size - 257`` merges. Any text encodes (no unknown token) and decodes back exactly.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from launch.data.config import DataError
from launch.data.corpus import _document_ids, _documents, collect_sources, stdlib_sources
from launch.data.tokenizer import EOD_TOKENS, TOKENIZER_FILE

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOD_TOKEN = EOD_TOKENS[0]
MIN_VOCAB = 256 + 1 + 1  # every byte, EOD, and at least one merge


def _texts(sources: Sequence[Path]) -> Iterator[str]:
    """Every document's text, as ``moe data prepare`` reads them (.jsonl "text" fields, files)."""
    for _, text in _documents(sources, _document_ids(sources)):
        yield text


def train_bpe(sources: Sequence[Path], vocab_size: int) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` ids trained on ``sources``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size={vocab_size}: must be >= {MIN_VOCAB} (256 bytes, {EOD_TOKEN} and one merge)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(sources), trainer=trainer)
    return tokenizer


def output_file(out: Path) -> Path:
    """``--out``: a file path, or an existing directory to write tokenizer.json into; never a
    file that exists."""
    file = out / TOKENIZER_FILE if out.is_dir() else out
    if file.exists():
        raise DataError(f"--out {file}: exists; choose another path (a tokenizer is never overwritten)")
    parent = file.parent
    if not parent.is_dir():
        raise DataError(f"--out {file}: {parent} is not a directory; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {file}: {parent} is not writable; choose another path")
    return file


def save_new(tokenizer: Tokenizer, file: Path) -> None:
    """Write ``tokenizer`` to ``file`` atomically without replacing anything: saved to a temp
    name beside it, then hard-linked to ``file`` (which fails if ``file`` appeared meanwhile)."""
    temp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tokenizer.save(str(temp))
        os.link(temp, file)
    except FileExistsError:
        raise DataError(f"--out {file}: appeared while training; choose another path") from None
    except OSError as err:
        raise DataError(f"--out {file}: cannot write ({err.strerror}); choose another path") from None
    finally:
        temp.unlink(missing_ok=True)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe data tokenizer train",
        description="Train a byte-level BPE tokenizer (tokenizer.json) for `moe data prepare --tokenizer` "
        "and data.tokenizer.",
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, metavar="FILES",
        help="text files or directories (default: the embedded corpus, the standard library's .py files)",
    )
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N", help="ids in the vocabulary")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="PATH",
        help="the tokenizer.json to write, or a directory to write tokenizer.json into (never overwritten)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """`moe data tokenizer train [FILES...] --vocab-size N --out PATH`; returns the exit status."""
    if argv[:1] != ["train"]:
        print("usage: moe data tokenizer train [FILES...] --vocab-size N --out PATH", file=sys.stderr)
        return 2
    try:
        args = _parse_args(argv[1:])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        file = output_file(args.out)
        sources = collect_sources(args.paths) if args.paths else stdlib_sources()
        tokenizer = train_bpe(sources, args.vocab_size)
        save_new(tokenizer, file)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    print(f"wrote {file}: byte-level BPE, {size} ids, trained on {len(sources)} file(s)")
    return 0
