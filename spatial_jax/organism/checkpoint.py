"""Saving the organism as a Hugging Face checkpoint, and the checks run on a saved one through the
public API only (`sj.load`, `model.prepare`, `sj.next_token_logits`, `sj.Intervention`).

A saved organism directory holds config.json (with `spatial_jax_geometry: "organism"`),
model.safetensors, the word-level tokenizer and processor files, and organism.json: how it was
trained (flags, seed, steps, time, curves) and its train / val / test triples per task.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional, Sequence

import numpy as np

import spatial_jax as sj
from spatial_jax.convert.checkpoint import partial_dir
from spatial_jax.convert.export import export_hf
from spatial_jax.data import scoring
from spatial_jax.data.geometry import get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import SYSTEM_TEXT
from spatial_jax.data.synthetic import make_task
from spatial_jax.organism.spec import GEOMETRY, GEOMETRY_KEY
from spatial_jax.processing.word_tokenizer import write_word_level_qwen2vl_processor

META_FILE = "organism.json"


def save(out_dir: str, cfg, params: dict, words: Sequence[str], meta: dict[str, Any]) -> None:
    """Writes the checkpoint to a sibling temp dir and moves it into place (no half-written dir)."""
    tmp = partial_dir(out_dir)
    try:
        export_hf(tmp, "qwen2_vl", cfg, params)
        write_word_level_qwen2vl_processor(tmp, words)
        config_file = os.path.join(tmp, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        config[GEOMETRY_KEY] = meta.get("geometry", GEOMETRY)
        with open(config_file, "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, META_FILE)) as f:
        return json.load(f)


def held_out_items(model_dir: str, split: str = "test", tasks: Optional[Sequence[str]] = None) -> dict[str, list[Item]]:
    """Per task, the paper's items (unshifted layout, every direction) of the saved split's triples."""
    meta = read_meta(model_dir)
    geometry = get_geometry(meta.get("geometry", GEOMETRY))
    out = {}
    for name, splits in meta["splits"].items():
        if tasks is None or name in tasks:
            out[name] = make_task(name, geometry).items(triples=[tuple(t) for t in splits[split]])
    return out


def predictions(model: sj.Model, items: Sequence[Item], batch_size: int = 64, system: Optional[str] = SYSTEM_TEXT,
                interventions=None) -> list[str]:
    """Top-1 next token (decoded, normalised) for each item, prompts made by `model.prepare`."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = model.prepare(images=[it.image for it in chunk], prompts=[it.prompt for it in chunk], system=system)
        ivs = interventions(model, chunk, batch) if interventions else None
        logits = np.asarray(sj.next_token_logits(model, batch, ivs))
        out += scoring.top1_tokens(logits, model.processor.tokenizer)
    return out


def accuracy(model: sj.Model, items: Sequence[Item], batch_size: int = 64, system: Optional[str] = SYSTEM_TEXT) -> float:
    preds = predictions(model, items, batch_size, system)
    return float(np.mean([p == scoring.normalize(it.answer) for p, it in zip(preds, items)]))


def strip_swap(identity: bool = False):
    """An `interventions(model, items, batch)` builder: at the LM input (resid_pre of layer 0), the
    visual tokens of the first and last strips (left/right thirds for horizontal layouts, top/bottom
    for vertical ones) exchange their contents; `identity` swaps each strip with itself instead."""

    def build(model: sj.Model, items: Sequence[Item], batch: sj.Batch):
        ids = np.asarray(batch.input_ids)
        T = ids.shape[1]
        index = []
        for row, item in zip(ids, items):
            positions = np.flatnonzero(row == model.config.image_token_id)
            a, b = positions[item.regions.strips[0]], positions[item.regions.strips[2]]
            index.append(sj.swap_index(T, [(a, a) if identity else (a, b)]))
        clean = sj.forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0]
        return [sj.Intervention(site="lm.resid_pre", layer=0, op="replace", source=clean, index=np.stack(index))]

    return build


def swap_rates(model: sj.Model, items: Sequence[Item], identity: bool = False, batch_size: int = 64,
               system: Optional[str] = SYSTEM_TEXT) -> dict[str, float]:
    """Under `strip_swap`: fraction of answers that are the original answer ("orig") and that are the
    entity at the other end ("flip", the answer of the opposite direction)."""
    preds = predictions(model, items, batch_size, system, strip_swap(identity))
    other = [it.attributes[2 - it.target_slot] for it in items]
    return {"orig": float(np.mean([p == it.answer for p, it in zip(preds, items)])),
            "flip": float(np.mean([p == o for p, o in zip(preds, other)]))}

