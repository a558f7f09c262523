"""Converted checkpoints: an Orbax parameter tree plus the HF config and tokenizer/processor files.

Layout of a converted dir:
  spatial_jax.json   family and dtype
  config.json        the HF config, unchanged
  params/            Orbax checkpoint of the parameter tree
  tokenizer*, chat_template*, preprocessor_config.json, ...   copied from the HF dir
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import uuid
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from spatial_jax.convert.convert import DTYPES, abstract_model, resolve_config
from flax import nnx

META_FILE = "spatial_jax.json"
PARAMS_DIR = "params"
RESTORE_CONCURRENT_GB = 1
# Everything a processor/tokenizer needs; never the weights themselves.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template*", "preprocessor_config.json",
              "processor_config.json", "video_preprocessor_config.json")


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def check_output_dir(out_dir: str) -> str:
    """The absolute output path; FileExistsError unless it is absent or an empty directory."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir}: output directory exists and is not empty")
    return out_dir


def _save_params(path: str, params: dict) -> None:
    """Orbax save of a tree of host numpy arrays, without the copy Orbax makes by default.

    Orbax's NumpyHandler deep-copies every host array before its (async) write, which doubles
    the peak memory of a conversion; this save is synchronous and the arrays are not touched
    while it runs, so the copy buys nothing. The on-disk format is the standard PyTree one
    (read back by `StandardCheckpointer.restore`).
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)).save(
        path, args=ocp.args.PyTreeSave(params))


def partial_dir(out_dir: str) -> str:
    """A new empty dir beside `out_dir` to write into before renaming it to `out_dir`.

    os.mkdir, not tempfile.mkdtemp: the renamed dir keeps the user's umask, not mkdtemp's 0o700.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    return tmp


def write_converted(out_dir: str, hf_dir: str, family: str, dtype: str, params: dict) -> None:
    """Writes a converted checkpoint atomically: into a temp dir beside `out_dir`, then renamed.

    `out_dir` must not exist or be empty; on any failure nothing is left at `out_dir`.
    """
    out_dir = check_output_dir(out_dir)
    tmp = partial_dir(out_dir)
    try:
        _save_params(os.path.join(tmp, PARAMS_DIR), params)
        for pattern in SIDE_FILES:
            for f in glob.glob(os.path.join(hf_dir, pattern)):
                if os.path.isfile(f):
                    shutil.copy2(f, tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"family": family, "dtype": dtype, "format": 1}, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_converted(path: str, shardings=None):
    """Restores a converted dir -> (family, config, raw config, params pure dict of jax arrays).

    `shardings`, a pytree of jax.sharding.Sharding matching the params, restores each array
    straight into its sharding (no full copy gathered on one device).
    """
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    family, cfg, raw = resolve_config(path)
    dtype = DTYPES[meta["dtype"]]
    target = nnx.to_pure_dict(nnx.state(abstract_model(family, cfg, dtype)))
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    # Host buffers in flight limited to ~1 GB, or the largest array (Orbax's default is 96 GB:
    # a whole real-size checkpoint in host buffers beside its device copies).
    largest = max((np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(target)), default=0)
    restorer = ocp.Checkpointer(ocp.StandardCheckpointHandler(
        restore_concurrent_gb=max(RESTORE_CONCURRENT_GB, int(np.ceil(largest / 1e9)))))
    params = restorer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), args=ocp.args.StandardRestore(target))
    return family, cfg, raw, meta["dtype"], params


def checkpoint_param_bytes(path: str, dtype: Optional[str] = None) -> int:
    """Bytes of a checkpoint's parameters (converted or HF dir), from its config alone."""
    family, cfg, _ = resolve_config(path)
    if dtype is None:
        dtype = "float32"
        if is_converted(path):
            with open(os.path.join(path, META_FILE)) as f:
                dtype = json.load(f)["dtype"]
    state = nnx.state(abstract_model(family, cfg, DTYPES[dtype]))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
