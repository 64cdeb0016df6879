"""Hugging Face safetensors directories, read one tensor at a time and written in 5 GB shards.

A model directory holds ``model.safetensors``, or shards named in
``model.safetensors.index.json`` (``{"weight_map": {tensor: file}}``). ``SafetensorsReader``
opens every file once (``safe_open`` reads only the header; a truncated file fails there,
as its header no longer covers the file) and reads a tensor only when asked, so a
conversion holds one tensor of the source at a time. ``safe_open`` maps its file, and the
pages a read touches stay resident in the process while the map lives: each read goes
through a handle of its own, unmapped once the tensor is copied out, so reading the whole
model leaves none of it mapped. ``write_safetensors`` writes
transformers' layout: one ``model.safetensors`` when everything fits in one shard, else
``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` each (a tensor larger
than that gets a shard of its own) and the index.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parallel.checkpoint import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _weight_map(directory: Path) -> dict[str, str]:
    """``{tensor: file name}`` from the index, or every tensor of ``model.safetensors``."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{str(index)!r} is not a safetensors index (no JSON object with a 'weight_map': {err}); "
                "restore it from the model's source"
            ) from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(index)!r}: 'weight_map' is not an object of tensor -> file; restore it from the model's source")
        return {str(k): str(v) for k, v in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        return {}
    raise CheckpointError(
        f"{str(directory)!r} holds no {SINGLE_FILE} and no {INDEX_FILE}; give a Hugging Face model directory "
        "saved with safetensors (save_pretrained(..., safe_serialization=True))"
    )


class SafetensorsReader:
    """The tensors of a safetensors model directory: names, shapes and dtypes from the
    headers, each tensor read when ``get`` asks for it."""

    def __init__(self, directory: Path) -> None:
        weight_map = _weight_map(directory)
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {name: self._open(directory, name, weight_map) for name in files}
        if not weight_map:
            weight_map = {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}
        for key, name in weight_map.items():
            if key not in self._handles[name].keys():
                raise CheckpointError(
                    f"{str(directory / INDEX_FILE)!r} names tensor {key!r} in {name}, which does not hold it; "
                    "the index and the shards come from different saves"
                )
        self._where = weight_map
        self._directory = directory

    @staticmethod
    def _open(directory: Path, name: str, weight_map: dict[str, str]) -> object:
        path = directory / name
        if not path.is_file():
            tensor = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(
                f"shard {str(path)!r} is missing: {INDEX_FILE} names it for {tensor!r} and others; "
                "copy every shard the index lists into the directory"
            )
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file ({err}); it is truncated or damaged: "
                "copy it again from the model's source"
            ) from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file(self, key: str) -> str:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._handles[self._where[key]].get_slice(key).get_dtype()]

    def get(self, key: str) -> torch.Tensor:
        try:
            return safe_open(str(self._directory / self._where[key]), framework="pt").get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"tensor {key!r} in {self._where[key]} cannot be read ({err}); the file is damaged") from None


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write ``(name, tensor)`` pairs in order into shards of at most ``max_shard_bytes``
    (and the index when there are several); returns the files written. A shard is written
    as soon as it is full, so only one shard's tensors are held at a time; shards are
    renamed to their final ``-of-n`` names once ``n`` is known."""
    written: list[tuple[str, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        part = f".part-{len(written):05d}.safetensors"
        save_file(shard, str(directory / part), metadata={"format": "pt"})
        written.append((part, list(shard), size))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
    if shard or not written:
        flush()
    files = [_shard_name(i, len(written)) for i in range(len(written))]
    for (part, _, _), final in zip(written, files, strict=True):
        (directory / part).rename(directory / final)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(s for _, _, s in written)},
                 "weight_map": {name: f for (_, names, _), f in zip(written, files, strict=True) for name in names}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_FILE)
    return files
