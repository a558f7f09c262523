"""The shipped model organism (checkpoints/organism): loads in transformers and in our port with
equal logits, its processor equals the HF one saved with it, it answers held-out items, and a
left/right swap of visual tokens at the LM input flips its answers.

The second organism (checkpoints/organism_shuffled, trained with visual tokens in random order) is
checked the same way where it is shipped, except that the swap is expected *not* to flip it: its LM
cannot read layout from token positions, so it reads it from the vision tower's content.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import hf_reference as hr
import spatial_jax as sj
from spatial_jax.data.prompts import SYSTEM_TEXT
from spatial_jax.organism import checkpoint

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
ORGANISM = os.path.join(ROOT, "organism")
SHUFFLED = os.path.join(ROOT, "organism_shuffled")
TOL = 1e-4
PER_TASK = 48  # held-out (test-split) items per task checked here


_models: dict = {}


def _model(path: str) -> sj.Model:
    if path not in _models:
        _models[path] = sj.load(path)
    return _models[path]


def _sample(path: str) -> dict:
    """Per task, PER_TASK test-split items (a fixed, direction-balanced subsample)."""
    out = {}
    for name, items in checkpoint.held_out_items(path, "test").items():
        keep = np.random.default_rng(0).permutation(len(items))[:PER_TASK]
        out[name] = [items[i] for i in sorted(keep)]
    return out


def test_shipped_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json", checkpoint.META_FILE):
        assert os.path.isfile(os.path.join(ORGANISM, name)), name
    size = sum(os.path.getsize(os.path.join(ORGANISM, f)) for f in os.listdir(ORGANISM))
    assert size < 10 * 2**20


def test_transformers_and_port_agree():
    """Qwen2VLForConditionalGeneration (eager, float32) and `sj.load` give the same logits on
    prompts made by the HF processor saved with the checkpoint; our processor gives the same
    pixel_values and input_ids."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    with hr.without_video_processor():
        processor = AutoProcessor.from_pretrained(ORGANISM)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(ORGANISM, attn_implementation="eager").eval()
    model = _model(ORGANISM)
    items = [its[i] for its in _sample(ORGANISM).values() for i in (0, 5, 11)]
    texts = [processor.apply_chat_template(
        [{"role": "system", "content": SYSTEM_TEXT},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.prompt}]}],
        add_generation_prompt=True, tokenize=False) for it in items]
    images = [it.image for it in items]
    ref = processor(images=images, text=texts, padding=True, return_tensors="pt")
    ours = model.prepare(images=images, prompts=[it.prompt for it in items], system=SYSTEM_TEXT)
    np.testing.assert_array_equal(np.asarray(ours.pixel_values), ref["pixel_values"].numpy())
    np.testing.assert_array_equal(np.asarray(ours.input_ids), ref["input_ids"].numpy())
    np.testing.assert_array_equal(np.asarray(ours.image_grid_thw), ref["image_grid_thw"].numpy())
    with torch.no_grad():
        hf_logits = hf(**ref).logits.float().numpy()
    got = np.asarray(sj.forward(model, ours).logits)
    mask = ref["attention_mask"].numpy().astype(bool)
    assert not mask.all()  # the prompts of different tasks differ in length: left padding is exercised
    np.testing.assert_allclose(got[mask], hf_logits[mask], rtol=0, atol=TOL)
    # and both answer the same
    np.testing.assert_array_equal(got[:, -1].argmax(-1), hf_logits[:, -1].argmax(-1))


def test_held_out_accuracy():
    """At least 95% on held-out (never trained) triples of every task, prompts by `model.prepare`."""
    model = _model(ORGANISM)
    for name, items in _sample(ORGANISM).items():
        acc = checkpoint.accuracy(model, items)
        assert acc >= 0.95, (name, acc)


def test_left_right_swap_flips_and_identity_swap_does_not():
    """Exchanging the contents of the first and last thirds of the visual tokens (left/right
    columns, or top/bottom rows for above/below) at lm.resid_pre of layer 0 flips most answers to
    the entity at the other end; swapping each third with itself changes nothing."""
    model = _model(ORGANISM)
    items = [it for its in _sample(ORGANISM).values() for it in its]
    clean = checkpoint.accuracy(model, items)
    swapped = checkpoint.swap_rates(model, items)
    identity = checkpoint.swap_rates(model, items, identity=True)
    assert swapped["flip"] >= 0.75, swapped
    assert identity["flip"] <= 0.05 and identity["orig"] == pytest.approx(clean), identity


@pytest.mark.skipif(not os.path.isdir(SHUFFLED), reason="no checkpoints/organism_shuffled")
def test_shuffled_organism_reads_layout_from_content():
    model = _model(SHUFFLED)
    items = [it for its in _sample(SHUFFLED).values() for it in its]
    meta = checkpoint.read_meta(SHUFFLED)
    assert meta["data"] and any(r.get("seed") == meta["seed"] for r in meta["runs"])
    acc = checkpoint.accuracy(model, items)
    swapped = checkpoint.swap_rates(model, items)
    assert acc >= 0.9, acc
    assert swapped["flip"] <= 0.25, swapped
