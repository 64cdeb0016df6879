"""Corpus preparation: source files collected and checked to be text, tokenized into
megatron-core indexed datasets split by document, published atomically; and the embedded corpus
(the Python standard library) prepared on first use.

A prepared dataset is a directory holding ``train.{bin,idx}``, ``val.{bin,idx}`` (megatron-core's
indexed-dataset format, one sequence per document, no EOD stored) and ``meta.json``. EOD tokens
are inserted when a split is loaded, so the files stay reusable by megatron's own samplers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launch.data.config import (
    DATASET_FILES,
    PREPARE_HINT,
    SOURCE_SUFFIXES,
    SPLITS,
    DataConfig,
    DataError,
    _check_val_fraction,
)
from launch.data.sources import documents, is_source_name, unreadable
from launch.data.stream import _check_dataset_files, _indexed_dataset_module, read_meta
from launch.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    check_same_tokenizer,
    ids_dtype,
    load_hf_tokenizer,
)

Tokenizer = ByteTokenizer | HFTokenizer
# Documents handed to the tokenizer at once: a Hugging Face tokenizer encodes a batch on all cores.
ENCODE_BATCH = 256


@dataclass(frozen=True)
class SplitStats:
    """Size of one split; tokens exclude the EOD added at load time."""

    documents: int
    tokens: int


@dataclass(frozen=True)
class PreparedData:
    """What `prepare` wrote, mirrored in the directory's meta.json."""

    out_dir: Path
    sources: int
    fingerprint: str
    val_fraction: float
    train: SplitStats
    val: SplitStats
    tokenizer: Tokenizer


def stdlib_sources() -> list[Path]:
    """The running Python's standard-library ``.py`` files: a ~30 MB corpus present on every
    machine, so a first run needs no download. Third-party packages are excluded so the corpus
    does not depend on what happens to be installed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in ("site-packages", "dist-packages")]
        relative = Path(directory).relative_to(root)
        found.extend(
            ((relative / name).as_posix(), Path(directory, name))
            for name in files
            if name.endswith(".py") and os.path.isfile(os.path.join(directory, name))
        )
    return [path for _, path in sorted(found)]


def collect_sources(paths: Sequence[Path]) -> list[Path]:
    """Expand directories into their text files (hidden directories skipped, so a repository's
    .git or .venv is not swallowed); files named explicitly are kept whatever their suffix.

    The byte tokenizer would turn a binary file into tokens without complaint, so every file
    is checked to be text: one named explicitly is refused (the user meant it: say so), one
    found in a directory is skipped with a warning naming it (one stray file should not
    block a corpus)."""
    found: dict[Path, Path] = {}
    skipped: list[str] = []
    for path in paths:
        if not path.exists():
            raise DataError(f"source not found: {path}; check the path")
        if path.is_dir():
            files = _walk_text_files(path)
            kept = [file for file in files if not _note_if_not_text(file, skipped)]
            if not kept:
                raise DataError(
                    f"{path}: no {' '.join(SOURCE_SUFFIXES)} source files found; pass files directly "
                    "or a directory that contains some"
                )
            files = kept
        else:
            reason = unreadable(path)
            if reason is not None:
                raise DataError(f"source {path}: {reason}; only text is tokenized, remove it from PATHS")
            files = [path]
        for file in files:
            found.setdefault(file.resolve(), file)
    if skipped:
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        print(f"warning: skipped {len(skipped)} file(s) that are not text: {'; '.join(skipped[:10])}{more}", file=sys.stderr)
    return sorted(found.values(), key=lambda path: path.as_posix())


def _note_if_not_text(path: Path, skipped: list[str]) -> bool:
    """Whether ``path`` is not text; if so, it is added to ``skipped`` with the reason."""
    reason = unreadable(path)
    if reason is not None:
        skipped.append(f"{path} ({reason})")
    return reason is not None


def _walk_text_files(directory: Path) -> list[Path]:
    """Files under ``directory`` with a source suffix; hidden directories are pruned, not
    just filtered, so a large .venv is never traversed."""
    found: list[Path] = []
    for parent, subdirs, files in os.walk(directory):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found.extend(
            Path(parent, name)
            for name in files
            if is_source_name(name)
            and os.path.isfile(os.path.join(parent, name))
        )
    return found


def _document_ids(sources: Sequence[Path]) -> list[str]:
    """Each source's path relative to the sources' common root: ids (and so the split) do not
    depend on where the corpus is checked out."""
    if not sources:
        raise DataError(f"no source files given; {PREPARE_HINT} with at least one file")
    resolved: dict[Path, Path] = {}
    for path in sources:
        if not path.exists():
            raise DataError(f"source not found: {path}; check the path")
        if not path.is_file():
            raise DataError(
                f"source is not a file: {path}; pass files (`moe data prepare` expands directories)"
            )
        real = path.resolve()
        if real in resolved:
            raise DataError(f"source listed twice: {path}; pass each file once")
        resolved[real] = path
    root = os.path.commonpath([str(real.parent) for real in resolved])
    return [real.relative_to(root).as_posix() for real in resolved]


def _fingerprint(sources: Sequence[Path], doc_ids: Sequence[str]) -> str:
    """sha1 over each source's id, size and mtime: cheap enough to check on every start, and
    it changes when the list or any file changes (e.g. a Python upgrade)."""
    digest = hashlib.sha1()
    for path, doc_id in zip(sources, doc_ids):
        stat = path.stat()
        digest.update(f"{doc_id}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _is_val(doc_id: str, val_fraction: float) -> bool:
    """Hash-based split: a document's side depends only on its id, so adding or removing other
    files never moves it between train and validation."""
    return int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < val_fraction


def _documents(sources: Sequence[Path], doc_ids: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(doc id, text) for every non-empty document, in source order (``launch.data.sources``)."""
    for path, doc_id in zip(sources, doc_ids):
        yield from documents(path, doc_id)


def _batched(documents: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    """``documents`` in lists of ``size`` (the last one shorter)."""
    batch: list[tuple[str, str]] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_splits(
    documents: Iterable[tuple[str, str]], directory: Path, val_fraction: float, tokenizer: Tokenizer
) -> dict[str, SplitStats]:
    """Tokenize ``documents`` into ``directory/{train,val}.{bin,idx}``; one sequence per
    document so megatron's document index stays meaningful. Ids are stored as uint16, or
    int32 for a vocabulary over 65,536 (``ids_dtype``)."""
    IndexedDatasetBuilder = _indexed_dataset_module().IndexedDatasetBuilder

    builders = {
        split: IndexedDatasetBuilder(str(directory / f"{split}.bin"), dtype=ids_dtype(tokenizer.vocab_size))
        for split in SPLITS
    }
    counts = {split: [0, 0] for split in SPLITS}
    try:
        for batch in _batched(documents, ENCODE_BATCH):
            encoded = tokenizer.encode_batch([text for _, text in batch])
            for (doc_id, _), tokens in zip(batch, encoded):
                split = "val" if _is_val(doc_id, val_fraction) else "train"
                builders[split].add_document(tokens, [len(tokens)])
                counts[split][0] += 1
                counts[split][1] += len(tokens)
        for split, builder in builders.items():
            builder.finalize(str(directory / f"{split}.idx"))
    finally:
        # The builder has no close(); without this a failed prepare leaks open .bin handles.
        for builder in builders.values():
            builder.data_file.close()
    return {split: SplitStats(*count) for split, count in counts.items()}


def _check_splits(stats: dict[str, SplitStats], sources: int, val_fraction: float) -> None:
    """An empty split would only fail later, at the first batch or validation."""
    if all(split.documents == 0 for split in stats.values()):
        raise DataError(f"no text in {sources} source file(s): every document is empty")
    for name, split in stats.items():
        if split.documents == 0:
            raise DataError(
                f"the {name} split is empty (train {stats['train'].documents} documents, "
                f"val {stats['val'].documents}) at val_fraction={val_fraction}; "
                "add more source documents or change the validation fraction"
            )


def _meta_dict(prepared: PreparedData) -> dict[str, Any]:
    """The meta.json record of a prepared dataset."""
    return {
        **prepared.tokenizer.meta(),
        "val_fraction": prepared.val_fraction,
        "sources": prepared.sources,
        "fingerprint": prepared.fingerprint,
        "train": {"documents": prepared.train.documents, "tokens": prepared.train.tokens},
        "val": {"documents": prepared.val.documents, "tokens": prepared.val.tokens},
    }


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Only an empty directory, or an earlier prepared dataset when ``overwrite`` says so,
    may be replaced: a mistyped output path must never delete someone's files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another output path")
    names = {path.name for path in out_dir.iterdir()}
    foreign = sorted(names - set(DATASET_FILES))
    if foreign:
        raise DataError(
            f"{out_dir}: exists and is not a prepared dataset (it holds {foreign[0]}); "
            "choose a new or empty output directory"
        )
    if names and not overwrite:
        raise DataError(
            f"{out_dir}: already holds a prepared dataset; pass --overwrite to replace it, "
            "or choose another output directory"
        )


def _make_parent(out_dir: Path, fix: str) -> None:
    """Create ``out_dir``'s parent, or say in one line why it cannot be (a file on the
    path, no permission, a read-only file system), before any tokenizing starts."""
    existing = out_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{out_dir}: {existing} is a file, not a directory; {fix}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out_dir}: cannot create {out_dir.parent} ({err.strerror}); {fix}") from None
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise DataError(f"{out_dir}: {out_dir.parent} is not writable; {fix}")


def _publish(built: Path, out_dir: Path) -> None:
    """Move a finished dataset into place with renames, so ``out_dir`` is never half-written:
    it is either the old dataset, absent, or the new one."""
    if out_dir.exists():
        old = built.with_name(built.name.replace(".tmp-", ".old-", 1))
        os.rename(out_dir, old)
        os.rename(built, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(built, out_dir)


def prepare(
    sources: list[Path], out_dir: Path, val_fraction: float, overwrite: bool = False,
    fix: str = "choose a writable output directory", tokenizer: Tokenizer | None = None,
) -> PreparedData:
    """Tokenize ``sources`` into a dataset at ``out_dir``, split by document; an earlier
    dataset there is replaced only with ``overwrite``. ``fix``: what to tell the user when
    ``out_dir`` cannot be written. ``tokenizer``: bytes when None.

    Everything is built in a temporary directory beside ``out_dir`` and renamed into place,
    so a killed prepare leaves only a dot-named temp directory, never a dataset that looks valid.
    """
    _check_val_fraction(val_fraction, "val_fraction")
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    out_dir = Path(os.path.abspath(out_dir))  # "." and "x/.." name a directory: give them a name
    doc_ids = _document_ids(sources)
    fingerprint = _fingerprint(sources, doc_ids)
    _check_replaceable(out_dir, overwrite)
    _make_parent(out_dir, fix)
    # mkdir (not mkdtemp) so the published directory gets the umask's permissions, not 0700.
    building = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        building.mkdir()
    except OSError as err:
        raise DataError(f"{out_dir}: cannot write in {out_dir.parent} ({err.strerror}); {fix}") from None
    try:
        stats = _write_splits(_documents(sources, doc_ids), building, val_fraction, tokenizer)
        _check_splits(stats, len(sources), val_fraction)
        prepared = PreparedData(
            out_dir, len(sources), fingerprint, val_fraction, stats["train"], stats["val"], tokenizer
        )
        (building / "meta.json").write_text(json.dumps(_meta_dict(prepared), indent=2) + "\n")
        _publish(building, out_dir)
    except OSError as err:
        shutil.rmtree(building, ignore_errors=True)
        raise DataError(f"{out_dir}: preparing failed ({err.strerror}: {err.filename}); nothing was written") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return prepared


def ensure_dataset(cfg: DataConfig) -> Path:
    """The dataset directory to train on, preparing the embedded corpus on first use (with
    ``data.tokenizer`` when one is named: cached per tokenizer hash).

    A ``data.path`` dataset prepared with another tokenizer than ``data.tokenizer`` names is
    refused. Call it on one process per machine before the others read: two concurrent
    first-time prepares would both do the work and replace each other's result.
    """
    if cfg.path is not None:
        data_dir = Path(cfg.path)
        _check_dataset_files(data_dir, "data.path")
        check_same_tokenizer(read_meta(data_dir), data_dir, cfg.tokenizer)
        return data_dir
    tokenizer = ByteTokenizer() if cfg.tokenizer is None else load_hf_tokenizer(cfg.tokenizer, "data.tokenizer")
    sources = stdlib_sources()
    tag = "bytes" if isinstance(tokenizer, ByteTokenizer) else f"{tokenizer.name}-{tokenizer.sha256[:12]}"
    out_dir = Path(cfg.cache_dir) / f"stdlib-{tag}-v{cfg.val_fraction}"
    if _is_current(out_dir, _fingerprint(sources, _document_ids(sources)), cfg.val_fraction):
        return out_dir
    megabytes = sum(path.stat().st_size for path in sources) / 1e6
    fix = f"set data.cache_dir (now {cfg.cache_dir!r}) to a writable directory"
    _make_parent(Path(os.path.abspath(out_dir)), fix)
    print(
        f"preparing embedded corpus: {len(sources)} files, {megabytes:.1f} MB -> {out_dir}",
        file=sys.stderr,
    )
    prepare(sources, out_dir, cfg.val_fraction, overwrite=True, fix=fix, tokenizer=tokenizer)
    return out_dir


def _is_current(out_dir: Path, fingerprint: str, val_fraction: float) -> bool:
    """Whether ``out_dir`` already holds this exact corpus, so a restart skips re-preparing."""
    try:
        _check_dataset_files(out_dir, "data.cache_dir")
        meta = read_meta(out_dir)
    except DataError:
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("val_fraction") == val_fraction


def _out_path(text: str) -> Path:
    """``--out``: ``Path("")`` would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give the dataset's directory, e.g. --out data/mycorpus")
    return Path(text)


def _parse_prepare_args(argv: list[str]) -> argparse.Namespace:
    """`moe data prepare` arguments."""
    parser = argparse.ArgumentParser(
        prog="moe data prepare",
        description="Tokenize text files into a dataset for `data.path`. Directories are "
        f"walked for {' '.join(SOURCE_SUFFIXES)} files; each line of JSON lines (plain or gzip) "
        'and each row of Parquet is a document, its "text".',
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATHS", help="files or directories")
    parser.add_argument("--out", required=True, type=_out_path, metavar="DIR", help="dataset directory")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier prepared dataset at --out (a directory of other files is never replaced)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="a Hugging Face tokenizer.json, or a model directory holding one (default: UTF-8 bytes)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DataConfig.val_fraction,
        help="share of documents held out for validation, in (0, 0.5] (default %(default)s)",
    )
    return parser.parse_args(argv)


def prepare_main(argv: list[str]) -> int:
    """`moe data prepare PATHS... --out DIR [--tokenizer PATH] [--val-fraction F] [--overwrite]`;
    returns the exit status."""
    try:
        args = _parse_prepare_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _check_val_fraction(args.val_fraction, "--val-fraction")
        tokenizer = None if args.tokenizer is None else load_hf_tokenizer(args.tokenizer)
        prepared = prepare(
            collect_sources(args.paths), args.out, args.val_fraction, args.overwrite, tokenizer=tokenizer
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prepared {prepared.out_dir} from {prepared.sources} source file(s), tokenizer {prepared.tokenizer.name} "
          f"({prepared.tokenizer.vocab_size} ids)")
    for name in SPLITS:
        stats: SplitStats = getattr(prepared, name)
        print(f"  {name:<5} {stats.documents:>10,} documents {stats.tokens:>14,} tokens")
    return 0
