"""Saving the organism as a Hugging Face checkpoint, and the checks run on a saved one through the
public API only (`load`, `model.prepare`, `next_token_logits`, `Intervention`).

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
from PIL import Image

from spatial_jax.batch import Batch
from spatial_jax.forward import Model, forward, load, next_token_logits
from spatial_jax.interventions.ops import Intervention
from spatial_jax.sweeps.paper_sweeps import swap_index
from spatial_jax.convert.checkpoint import partial_dir
from spatial_jax.convert.export import export_hf
from spatial_jax.data import scoring
from spatial_jax.data.geometry import GEOMETRY_KEY, get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import SYSTEM_TEXT
from spatial_jax.data.synthetic import SyntheticTask, make_task, render_layout
from spatial_jax.organism.spec import GEOMETRY
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor

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


def write_meta(model_dir: str, meta: dict[str, Any]) -> None:
    """Rewrites organism.json (through a temp file: never half-written)."""
    path = os.path.join(model_dir, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


def held_out_items(model_dir: str, split: str = "test", tasks: Optional[Sequence[str]] = None) -> dict[str, list[Item]]:
    """Per task, the paper's items (unshifted layout, every direction) of the saved split's triples."""
    meta = read_meta(model_dir)
    geometry = get_geometry(meta.get("geometry", GEOMETRY))
    out = {}
    for name, splits in meta["splits"].items():
        if tasks is None or name in tasks:
            out[name] = make_task(name, geometry).items(triples=[tuple(t) for t in splits[split]])
    return out


def predictions(model: Model, items: Sequence[Item], batch_size: int = 64, system: Optional[str] = SYSTEM_TEXT,
                interventions=None) -> list[str]:
    """Top-1 next token (decoded, normalised) for each item, prompts made by `model.prepare`."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = model.prepare(images=[it.image for it in chunk], prompts=[it.prompt for it in chunk], system=system)
        ivs = interventions(model, chunk, batch) if interventions else None
        logits = np.asarray(next_token_logits(model, batch, ivs))
        out += scoring.top1_tokens(logits, model.processor.tokenizer)
    return out


def accuracy(model: Model, items: Sequence[Item], batch_size: int = 64, system: Optional[str] = SYSTEM_TEXT) -> float:
    preds = predictions(model, items, batch_size, system)
    return float(np.mean([p == scoring.normalize(it.answer) for p, it in zip(preds, items)]))


def strip_swap(identity: bool = False):
    """An `interventions(model, items, batch)` builder: at the LM input (resid_pre of layer 0), the
    visual tokens of the first and last strips (left/right thirds for horizontal layouts, top/bottom
    for vertical ones) exchange their contents; `identity` swaps each strip with itself instead."""

    def build(model: Model, items: Sequence[Item], batch: Batch):
        ids = np.asarray(batch.input_ids)
        T = ids.shape[1]
        index = []
        for row, item in zip(ids, items):
            positions = np.flatnonzero(row == model.config.image_token_id)
            a, b = positions[item.regions.strips[0]], positions[item.regions.strips[2]]
            index.append(swap_index(T, [(a, a) if identity else (a, b)]))
        clean = forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0]
        return [Intervention(site="lm.resid_pre", layer=0, op="replace", source=clean, index=np.stack(index))]

    return build


def swap_rates(model: Model, items: Sequence[Item], identity: bool = False, batch_size: int = 64,
               system: Optional[str] = SYSTEM_TEXT) -> dict[str, float]:
    """Under `strip_swap`: fraction of answers that are the original answer ("orig") and that are the
    entity at the other end ("flip", the answer of the opposite direction)."""
    preds = predictions(model, items, batch_size, system, strip_swap(identity))
    other = [it.attributes[2 - it.target_slot] for it in items]
    return {"orig": float(np.mean([p == it.answer for p, it in zip(preds, items)])),
            "flip": float(np.mean([p == o for p, o in zip(preds, other)]))}



# Certificate conditions (organism/recipes.py CONDITIONS) measured through the public API.
CERTIFICATE = ("clean", "shuffled", "ablated", "ablated_shuffled")


def _lm_input(model: Model, images, prompts, system) -> np.ndarray:
    batch = model.prepare(images=list(images), prompts=list(prompts), system=system)
    return np.asarray(forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0])


def _transparent(side: int) -> Image.Image:
    return Image.new("RGBA", (side, side), (0, 0, 0, 0))


def certificate_interventions(task: SyntheticTask, condition: str, rng: np.random.Generator):
    """An `interventions(model, items, batch)` builder for one certificate condition, at the LM
    input (resid_pre of layer 0), independent of the experiment binaries:

    shuffled: the visual tokens' contents are permuted at random among the image positions (each
      position keeps its M-RoPE position); ablated: Table 5 (each object's tokens <- the middle-slot
      tokens of its isolated-at-centre image, every other visual token <- the empty canvas's);
      ablated_shuffled: both, ablation first. clean: none.
    """
    if condition not in CERTIFICATE:
        raise ValueError(f"unknown condition {condition!r}; known: {CERTIFICATE}")

    def build(model: Model, items: Sequence[Item], batch: Batch):
        if condition == "clean":
            return None
        ids = np.asarray(batch.input_ids)
        prompts = [it.prompt for it in items]
        source = np.asarray(forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0])
        positions = [np.flatnonzero(row == model.config.image_token_id) for row in ids]
        if condition.startswith("ablated"):
            g = task.geometry
            empty = _lm_input(model, [render_layout(g, (), it.horizontal) for it in items], prompts, SYSTEM_TEXT)
            ablated = source.copy()
            for b, pos in enumerate(positions):
                ablated[b, pos] = empty[b, pos]
            for slot in range(3):
                isolated = [render_layout(g, (_transparent, task.entities[it.entities[slot]].sprite, _transparent),
                                          it.horizontal) for it in items]
                acts = _lm_input(model, isolated, prompts, SYSTEM_TEXT)
                for b, (pos, it) in enumerate(zip(positions, items)):
                    ablated[b, pos[it.regions.objects[slot]]] = acts[b, pos[it.regions.objects[1]]]
            source = ablated
        index = np.full(ids.shape, -1, np.int32)
        for b, pos in enumerate(positions):
            index[b, pos] = rng.permutation(pos) if condition.endswith("shuffled") else pos
        return [Intervention(site="lm.resid_pre", layer=0, op="replace", source=source, index=index)]

    return build


def certificate(model: Model, geometry: str, items_by_task: dict[str, Sequence[Item]], seed: int = 0,
                batch_size: int = 64, system: Optional[str] = SYSTEM_TEXT) -> dict[str, dict[str, float]]:
    """Per task, top-1 accuracy under each CERTIFICATE condition (permutations seeded by `seed`)."""
    out = {}
    for name, items in items_by_task.items():
        task = make_task(name, get_geometry(geometry))
        out[name] = {}
        for condition in CERTIFICATE:
            build = certificate_interventions(task, condition, np.random.default_rng(seed))
            preds = predictions(model, items, batch_size, system, build)
            out[name][condition] = float(np.mean([p == scoring.normalize(it.answer) for p, it in zip(preds, items)]))
    return out
