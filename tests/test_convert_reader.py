"""The safetensors reader behind the converter (in-process, fast): every dtype it reads equals
what safetensors itself loads, and malformed files fail with one-line CheckpointErrors."""
from __future__ import annotations

import json
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spatial_jax.convert.convert import convert_hf
from spatial_jax.convert.safetensors_dir import CheckpointError, TensorReader, shard_of_tensor


def test_reader_equals_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    reader = TensorReader(shard_of_tensor(str(tmp_path)))
    ref = load_file(path)
    assert sorted(reader.names()) == sorted(tensors)
    for name, want in ref.items():
        got = reader.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))
        assert got.flags.writeable and got.flags.c_contiguous


def test_reader_applies_aliases(tmp_path):
    save_file({"model.language_model.norm.weight": np.ones(3, np.float32)}, str(tmp_path / "model.safetensors"))
    reader = TensorReader(shard_of_tensor(str(tmp_path)), (("model.language_model.", "model."),))
    assert "model.norm.weight" in reader and "model.language_model.norm.weight" not in reader
    np.testing.assert_array_equal(reader.get("model.norm.weight"), np.ones(3, np.float32))


def _write_raw(path: str, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, r"holds 12 bytes, but shape \(4,\) of F32 needs 16"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, r"unsupported dtype 'Q4'"),
])
def test_reader_rejects_corrupt_entries(tmp_path, entry, message):
    path = str(tmp_path / "model.safetensors")
    _write_raw(path, {"t": entry}, bytes(16))
    reader = TensorReader(shard_of_tensor(str(tmp_path)))
    with pytest.raises(CheckpointError, match=message) as e:
        reader.get("t")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data, message", [
    (b"\x05", r"truncated safetensors file \(1 bytes\)"),
    (struct.pack("<Q", 10**6) + b"{}", r"truncated safetensors file \(header of 1000000 bytes"),
    (struct.pack("<Q", 4) + b"{{{{", r"corrupt safetensors header"),
    (struct.pack("<Q", 2) + b"[]", r"corrupt safetensors header"),
])
def test_bad_headers(tmp_path, data, message):
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match=message):
        shard_of_tensor(str(tmp_path))


def test_convert_to_bfloat16_matches_a_direct_cast(tiny_qwen2_vl_dir):
    """float32 -> bfloat16 by assignment into the stacked array (no temporary copy) rounds like
    numpy's astype."""
    _, _, _, p32 = convert_hf(tiny_qwen2_vl_dir, "float32")
    _, _, _, p16 = convert_hf(tiny_qwen2_vl_dir, "bfloat16")
    for a, b in zip(_leaves(p32), _leaves(p16)):
        assert b.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).view(np.uint16), b.view(np.uint16))


def _leaves(tree):
    return [tree] if not isinstance(tree, dict) else [x for k in sorted(tree) for x in _leaves(tree[k])]


def test_no_memory_map_left_open(tiny_qwen2_vl_dir, tmp_path):
    """The converter reads with plain reads: no safetensors file stays mapped into the process
    (mapped pages would count against its RSS, doubling the peak of a conversion). A private
    copy of the checkpoint, since transformers (elsewhere in the session) maps the original."""
    src = shutil.copytree(tiny_qwen2_vl_dir, tmp_path / "ckpt")
    convert_hf(str(src), "float32")
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert str(src / "model.safetensors") not in maps
