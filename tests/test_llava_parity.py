"""LLaVA-1.5: our Flax port against transformers (eager attention, float32): logits, every site,
bfloat16.

The reference is `LlavaForConditionalGeneration` (CLIP tower, Llama decoder) loaded from the same
tiny random checkpoint (tests/fixtures_llava.py), run with forward hooks that capture each site
(`fl.hf_run`). Every image has the tower's size (LLaVA-1.5's processor crops each to it), so the
cases are: text only, one image, two images in one prompt, and a left-padded batch of two, one and
no images.

Positions: ours `where(mask, cumsum(mask) - 1, 0)`; HF is given the same `position_ids`. Logits
and sites are compared at every position, padding included.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_llava as fl
import hf_reference as hr
from fixtures_llava import llava_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj

TOL = 1e-4  # max abs difference, float32
W = list(range(fl.TOKENS.index("You"), fl.TOKENS.index("You") + 20))  # ordinary word ids

CASES = {
    "text_only": [[W[:20]]],
    "one_image": [["image", W[:5]]],
    "two_images": [["image", W[:2], "image", W[2:7]]],
    "padded_batch": [["image", "image", W[:3]], ["image", W[10:12]], [W[:8]]],
}
LM_SITES, VISION_SITES = hr.LM_SITES, hr.VISION_SITES

_runs: dict = {}


def _run(ckpts, case: str, variant: str = "base"):
    """(inputs, ours, hf) for a case, computed once per module (one compile per case)."""
    key = (case, variant)
    if key not in _runs:
        n = ckpts.model(variant).config.tokens_per_image
        inputs = fl.make_inputs(CASES[case], seed=len(case), tokens_per_image=n)
        ours = hr.forward_sites(ckpts.model(variant), fl.to_batch(inputs), "pixel_values" in inputs)
        _runs[key] = (inputs, ours, fl.hf_run(ckpts.hf_model(variant), inputs))
    return _runs[key]


def test_tiny_config_exercises_what_matters(llava_ckpts):
    cfg = llava_ckpts.model().config
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size  # head_dim read from the config
    assert cfg.num_heads > cfg.num_kv_heads  # GQA
    assert cfg.patch_size == 14 and cfg.patches_per_side == 4 and cfg.vision_act == "quick_gelu"
    # -2: the input of the last of 3 layers, so that layer's weights do not reach the LM
    assert cfg.feature_layers == (2,) and cfg.vision_layers == 3 and cfg.feature_select == "default"
    assert cfg.tokens_per_image == 16 and cfg.projector_bias and not cfg.tie_word_embeddings
    assert cfg.image_token_id == fl.IMG
    features = llava_ckpts.model("features").config
    assert features.feature_layers == (0, 2) and features.tokens_per_image == 17


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(llava_ckpts, case):
    inputs, ours, ref = _run(llava_ckpts, case)
    hr.assert_logits_match(case, inputs, ours, ref, fl.VOCAB, TOL)


@pytest.mark.parametrize("site", LM_SITES + VISION_SITES)
@pytest.mark.parametrize("case", ["two_images", "padded_batch"])
def test_sites_match_hf(llava_ckpts, case, site):
    """vision.block_out: every CLIP layer, the CLS position at index 0, patch (r, c) at 1 + 4 r + c."""
    inputs, ours, ref = _run(llava_ckpts, case)
    cfg = llava_ckpts.model().config
    B, T = inputs["input_ids"].shape
    n_img = inputs["pixel_values"].shape[0]
    shapes = {
        "vision.block_out": (n_img, cfg.vision_layers, 1 + 16, cfg.vision_dim),
        "vision.tokens": (n_img, 16, cfg.hidden_size),
        "lm.final": (B, T, cfg.hidden_size),
    }
    assert ours[site].shape == ref[site].shape == shapes.get(site, (B, cfg.num_layers, T, cfg.hidden_size))
    np.testing.assert_allclose(ours[site], ref[site], rtol=0, atol=TOL)


def test_sites_are_hf_hidden_states(llava_ckpts):
    """resid_pre[l] = HF hidden_states[l]; HF's last entry is final-normed (our lm.final); the
    visual tokens sit on the <image> slots in order."""
    inputs, ours, ref = _run(llava_ckpts, "padded_batch")
    hs = ref["hidden_states"]
    np.testing.assert_allclose(np.moveaxis(ours["lm.resid_pre"], 1, 0), hs[:-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["lm.final"], hs[-1], rtol=0, atol=TOL)
    slots = inputs["input_ids"] == fl.IMG
    np.testing.assert_array_equal(ours["lm.resid_pre"][:, 0][slots], ours["vision.tokens"].reshape(-1, 64))


def test_feature_layers_and_full_strategy_match_hf(llava_ckpts):
    """vision_feature_layer [0, -2] with strategy "full": the pre_layrnorm output and layer 1's
    output, CLS kept, concatenated (17 tokens an image)."""
    inputs, ours, ref = _run(llava_ckpts, "two_images", variant="features")
    assert ours["vision.tokens"].shape == (2, 17, 64)
    print(f"features [0, -2] full, two_images: vision.tokens "
          f"{np.abs(ours['vision.tokens'] - ref['vision.tokens']).max():.2g}, "
          f"logits {np.abs(ours['logits'] - ref['logits']).max():.2g}")
    np.testing.assert_allclose(ours["vision.tokens"], ref["vision.tokens"], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)


def test_last_vision_layer_does_not_reach_the_lm(llava_ckpts):
    """With feature layer -2, changing the last CLIP layer's output leaves the logits as they are
    (and HF agrees: the same replace, hooked there, changes nothing either)."""
    inputs, ours, _ = _run(llava_ckpts, "one_image")
    model = llava_ckpts.model()
    last = model.config.vision_layers - 1
    src = np.full((1, 17, model.config.vision_dim), 3.0, np.float32)
    iv = sj.Intervention(site="vision.block_out", op="replace", layer=last, source=src, index=np.arange(17)[None])
    out = sj.forward(model, fl.to_batch(inputs), interventions=[iv])
    np.testing.assert_array_equal(np.asarray(out.logits), ours["logits"])
    first = sj.Intervention(site="vision.block_out", op="replace", layer=0, source=src, index=np.arange(17)[None])
    assert np.abs(np.asarray(sj.forward(model, fl.to_batch(inputs), interventions=[first]).logits)
                  - ours["logits"]).max() > 0.05


def test_bad_batches_are_refused(llava_ckpts):
    inputs, _, _ = _run(llava_ckpts, "two_images")
    model = llava_ckpts.model()
    with pytest.raises(ValueError, match="no pixel_values"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"]))
    with pytest.raises(ValueError, match="<image> slots"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[n_img, 3, 56, 56\]"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:, :, :42]))


def test_bfloat16_close_to_float32(llava_ckpts):
    """Our bf16 forward is no further from our float32 forward than 2x HF's own bf16-vs-float32
    difference on the same inputs (each case), and within 2.5% of the logit range."""
    import torch

    m16 = llava_ckpts.model(dtype="bfloat16")
    assert m16.params["embed"][...].dtype == jnp.bfloat16
    hf16 = fl.load_hf(llava_ckpts.hf_dir(), dtype=torch.bfloat16)
    for case in CASES:
        inputs, ours32, ref32 = _run(llava_ckpts, case)
        ours16 = np.asarray(sj.forward(m16, fl.to_batch(inputs)).logits)
        ref16 = fl.hf_run(hf16, inputs)["logits"]
        real = inputs["attention_mask"].astype(bool)
        err = np.abs(ours16 - ref32["logits"])[real].max()
        hf_err = np.abs(ref16 - ref32["logits"])[real].max()
        scale = np.abs(ref32["logits"]).max()
        print(f"bf16 {case}: ours vs HF f32 {err:.3g}, HF bf16 vs HF f32 {hf_err:.3g}, ours vs HF bf16 "
              f"{np.abs(ours16 - ref16)[real].max():.3g}, largest logit {scale:.3g}")
        assert err <= 2.0 * hf_err, (case, err, hf_err)
        assert err <= 0.025 * scale, (case, err, scale)
