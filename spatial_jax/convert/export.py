"""Our parameters -> a Hugging Face checkpoint dir (config.json + model.safetensors).

The inverse of `convert_hf`, driven by the same key-map table, so a model trained or edited
here (the model organism) loads in transformers. Needs no torch.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from spatial_jax import families
from spatial_jax.tree_paths import flatten_paths


def _inverse(x: np.ndarray, how: str | None, cfg) -> np.ndarray:
    if how == "T":
        return x.T
    if how == "flat_T":
        return x.T.reshape(cfg.patch_embed_shape)
    return x


def export_hf(out_dir: str, family: str, cfg, params: dict) -> None:
    """family: its registry name; params: the model's pure-dict state (nested dict of arrays),
    float32 on disk."""
    os.makedirs(out_dir, exist_ok=True)
    table = families.get(family).key_map
    flat = flatten_paths(params)
    tensors = {}
    for path, hf_name, how in table:
        if path not in flat:
            continue
        x = np.asarray(flat[path], np.float32)
        if "{i}" in hf_name:
            for i in range(x.shape[0]):
                tensors[hf_name.format(i=i)] = np.ascontiguousarray(_inverse(x[i], how, cfg))
        else:
            tensors[hf_name] = np.ascontiguousarray(_inverse(x, how, cfg))
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    # safetensors writes 0o600 whatever the umask; a shared checkpoint must be readable as the
    # other files are.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
