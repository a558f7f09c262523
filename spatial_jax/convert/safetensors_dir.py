"""Reading a HF checkpoint directory: config.json and safetensors shards, tensor by tensor.

Every failure raises `CheckpointError` with one line that names the file and the problem.
Torch pickles (`pytorch_model*.bin`) are refused: unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy (little-endian on disk; bfloat16/fp8 via ml_dtypes).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class CheckpointError(ValueError):
    """A HF checkpoint directory that cannot be read as asked."""


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None


def _read_header(path: str) -> tuple[int, dict]:
    """(offset of the data block, {name: header entry}) of a safetensors file, checked to be
    complete: a truncated shard fails here, before any tensor is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes "
                                  f"in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    try:
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {8 + header_len + end} bytes, "
                              f"has {size})")
    return 8 + header_len, header


def _check_complete(path: str) -> list[str]:
    return list(_read_header(path)[1])


def shard_of_tensor(hf_dir: str) -> dict[str, str]:
    """Tensor name -> shard path, from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        shards = sorted(set(weight_map.values()))
        names: dict[str, str] = {}
        for shard in shards:
            path = os.path.join(hf_dir, shard)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing shard listed in {os.path.basename(index)}")
            for name in _check_complete(path):
                names[name] = path
        missing = sorted(set(weight_map) - set(names))
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} indexed tensors not found in their shards, "
                                  f"e.g. {missing[0]}")
        return names
    if os.path.isfile(single):
        return {name: single for name in _check_complete(single)}
    pickles = [f for f in os.listdir(hf_dir) if f.endswith(".bin") or f.endswith(".pt")]
    if pickles:
        raise CheckpointError(f"{hf_dir}: only pickled torch weights ({pickles[0]}); they are never "
                              "unpickled here: save the model with safetensors")
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


class TensorReader:
    """Reads tensors one at a time as host numpy arrays (bfloat16 via ml_dtypes).

    Each tensor is read with plain file reads into a fresh array: no memory map stays behind
    (mapped pages count in the process's RSS until unmapped) and nothing passes through jax.

    `aliases` ((old_prefix, new_prefix), ...) rename stored tensors to the spelling a key map
    uses, so one table serves every on-disk layout of a family.
    """

    def __init__(self, shard_of: dict[str, str], aliases: tuple[tuple[str, str], ...] = ()):
        self._where: dict[str, tuple[str, str]] = {}
        for stored, path in shard_of.items():
            name = stored
            for old, new in aliases:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            self._where[name] = (path, stored)
        self._headers: dict[str, tuple[int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def nbytes(self, name: str) -> int:
        """Bytes of one stored tensor (from its shard's header)."""
        path, stored = self._where[name]
        start, end = self._header(path)[1][stored]["data_offsets"]
        return end - start

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        return self._headers[path]

    def get(self, name: str, buffer: np.ndarray | None = None) -> np.ndarray:
        """The tensor as a fresh array, or with `buffer` (uint8, at least `nbytes(name)` long) a
        view into it, valid until the buffer is reused: reading every tensor of a checkpoint
        through one buffer allocates nothing per tensor (no heap left fragmented behind)."""
        path, stored = self._where[name]
        data_start, header = self._header(path)
        entry = header[stored]
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {stored} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {stored} holds {end - start} bytes, but shape {shape} "
                                  f"of {entry['dtype']} needs {int(np.prod(shape)) * dtype.itemsize}")
        out = np.empty(shape, dtype) if buffer is None else buffer[:end - start].view(dtype).reshape(shape)
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != end - start:
                raise CheckpointError(f"{path}: truncated safetensors file (tensor {stored})")
        return out
