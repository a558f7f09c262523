"""HF safetensors -> our parameter tree, streamed tensor by tensor through the family's key map."""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax.convert.safetensors_dir import CheckpointError, TensorReader, read_config, shard_of_tensor
from spatial_jax.families import Family, family_of
from spatial_jax.tree_paths import flatten_paths, unflatten_paths

# float64 needs jax_enable_x64 (forward.load checks): it runs the port without rounding, for parity checks.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def abstract_model(family: Family, cfg, dtype) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: shapes and dtypes without allocating weights."""
    return nnx.eval_shape(lambda: family.model_cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary: jax.device_put on CPU adopts such a buffer without a copy
    (numpy's own are 16-byte aligned, which jax copies)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _transform(x: np.ndarray, how: str | None) -> np.ndarray:
    if how == "T":
        return x.T
    if how == "flat_T":
        return x.reshape(x.shape[0], -1).T
    return x


def resolve_config(hf_dir: str):
    """config.json -> (family, family config, raw dict)."""
    raw = read_config(hf_dir)
    try:
        family = family_of(raw)
        return family, family.config_cls.from_hf(raw), raw
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {e}") from None


def convert_hf(hf_dir: str, dtype: str = "float32", place: Optional[Callable[[str, np.ndarray], Any]] = None):
    """Reads a HF checkpoint dir. Returns (family, config, raw config dict, params as a nested
    dict of host numpy arrays in `dtype`, laid out like the model's pure-dict state).

    place(path, array): called on each parameter as soon as it is filled; its result stands in
    the tree instead of the host array, which is then dropped. Putting each on a device this way
    keeps one host array alive at a time, not a second copy of the whole tree.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    family, cfg, raw = resolve_config(hf_dir)
    table = family.key_map
    np_dtype = np.dtype(DTYPES[dtype])
    reader = TensorReader(shard_of_tensor(hf_dir), family.key_aliases)
    expected = flatten_paths(nnx.to_pure_dict(nnx.state(abstract_model(family, cfg, DTYPES[dtype]))))

    scratch = np.empty(max(map(reader.nbytes, reader.names()), default=0), np.uint8)  # every read lands here
    params, used = {}, set()
    for path, hf_name, how in table:
        if path not in expected:  # e.g. lm_head of a model with tied embeddings
            continue
        want = expected[path]
        names = [hf_name.format(i=i) for i in range(want.shape[0])] if "{i}" in hf_name else [hf_name]
        out = aligned_empty(want.shape, np_dtype)
        for i, name in enumerate(names):
            if name not in reader:
                raise CheckpointError(f"{hf_dir}: missing tensor {name} (for {path})")
            x = reader.get(name, scratch)
            if not np.issubdtype(x.dtype, np.floating) and x.dtype != np.dtype(jnp.bfloat16):
                raise CheckpointError(f"{hf_dir}: tensor {name} has dtype {x.dtype}, expected a float type")
            x = _transform(x, how)
            target = out[i] if len(names) > 1 or "{i}" in hf_name else out
            if x.shape != target.shape:
                raise CheckpointError(f"{hf_dir}: tensor {name} has shape {tuple(x.shape)} after transform "
                                      f"{how}, expected {tuple(target.shape)} (for {path})")
            target[...] = x  # casts to np_dtype in place, no temporary copy
            used.add(name)
        params[path] = out if place is None else place(path, out)
        del out
    missing = sorted(set(expected) - set(params))
    if missing:
        raise CheckpointError(f"{hf_dir}: no key-map entry fills {missing[0]} ({len(missing)} params)")
    unused = sorted(n for n in set(reader.names()) - used if not any(re.search(p, n) for p in family.ignored_keys))
    if unused:
        head = next(hf for path, hf, _ in table if path == "lm_head/kernel")
        tied = cfg.tie_word_embeddings and unused == [head]
        if not tied:
            raise CheckpointError(f"{hf_dir}: {len(unused)} tensors not in the {family.name} key map, "
                                  f"e.g. {unused[0]}")
    logging.info("converted %d tensors from %s", len(used), hf_dir)
    return family, cfg, raw, unflatten_paths(params)
