"""Pixtral: our Flax port against transformers (eager attention, float32): logits, every site,
bfloat16.

The reference is `LlavaForConditionalGeneration` (Pixtral tower, Mistral decoder) loaded from the
same tiny random checkpoint (tests/fixtures_pixtral.py), run with forward hooks that capture each
site (`fp.hf_run`). Images are 16-px multiples of different sizes, zero-padded into one
pixel_values as the processor pads them, with `image_sizes`.

Positions: our port uses `where(mask, cumsum(mask) - 1, 0)` (HF generate's rule); HF is given the
same `position_ids`. HF's forward default (`arange(T)` over the pads too) gives the same logits at
real tokens (test_hf_default_positions). Logits and sites are compared at every position, padding
included.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_pixtral as fp
import hf_reference as hr
from fixtures_pixtral import pixtral_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj

TOL = 1e-4  # max abs difference, float32
W = list(range(16, 16 + len(fp.WORDS)))  # ordinary word ids

CASES = {
    "text_only": [[W[:24]]],
    "one_image": [[W[:3], (32, 48), W[3:8]]],  # 2 x 3 patches, non-square
    "two_images": [[W[:2], (48, 32), W[2:4], (16, 64), W[4:9]]],  # 3 x 2 and 1 x 4: two attention blocks
    # left-padded: 2 equal images (one attention run) / 1 image of another size / text only
    "padded_batch": [[W[:2], (32, 48), W[2:4], (32, 48), W[4:7]], [W[10:12], (64, 32), W[12:13]], [W[:8]]],
}
LM_SITES, VISION_SITES = hr.LM_SITES, hr.VISION_SITES

_runs: dict = {}


def _run(ckpts, case: str, variant: str = "base"):
    """(inputs, ours, hf) for a case, computed once per module (one compile per case)."""
    key = (case, variant)
    if key not in _runs:
        inputs = fp.make_inputs(CASES[case], seed=len(case))
        ours = hr.forward_sites(ckpts.model(variant), fp.to_batch(inputs), "pixel_values" in inputs)
        _runs[key] = (inputs, ours, fp.hf_run(ckpts.hf_model(variant), inputs))
    return _runs[key]


def test_tiny_config_exercises_what_matters(pixtral_ckpts):
    cfg = pixtral_ckpts.model().config
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size  # head_dim read from the config
    assert cfg.num_heads > cfg.num_kv_heads  # GQA
    assert cfg.patch_size == 16 and (cfg.vision_dim // cfg.vision_heads) // 4 >= 2  # >1 rotary pair per axis
    assert cfg.feature_layers == (cfg.vision_layers,) and cfg.projector_bias and not cfg.tie_word_embeddings
    assert cfg.sliding_window is None and cfg.image_token_id == fp.IMG
    assert pixtral_ckpts.model("window").config.sliding_window == 4
    assert pixtral_ckpts.model("features").config.feature_layers == (0, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(pixtral_ckpts, case):
    inputs, ours, ref = _run(pixtral_ckpts, case)
    hr.assert_logits_match(case, inputs, ours, ref, fp.VOCAB, TOL)


@pytest.mark.parametrize("site", LM_SITES + VISION_SITES)
@pytest.mark.parametrize("case", ["two_images", "padded_batch"])
def test_sites_match_hf(pixtral_ckpts, case, site):
    inputs, ours, ref = _run(pixtral_ckpts, case)
    cfg = pixtral_ckpts.model().config
    B, T = inputs["input_ids"].shape
    n_patches = int((inputs["image_sizes"] // fp.PATCH).prod(-1).sum())
    shapes = {
        "vision.block_out": (1, cfg.vision_layers, n_patches, cfg.vision_dim),
        "vision.tokens": (1, n_patches, cfg.hidden_size),
        "lm.final": (B, T, cfg.hidden_size),
    }
    assert ours[site].shape == ref[site].shape == shapes.get(site, (B, cfg.num_layers, T, cfg.hidden_size))
    np.testing.assert_allclose(ours[site], ref[site], rtol=0, atol=TOL)


def test_sites_are_hf_hidden_states(pixtral_ckpts):
    """resid_pre[l] = HF hidden_states[l]; HF's last entry is final-normed (our lm.final); the
    visual tokens sit on the [IMG] slots in order, [IMG_BREAK] / [IMG_END] keep their embeddings."""
    inputs, ours, ref = _run(pixtral_ckpts, "padded_batch")
    hs = ref["hidden_states"]
    np.testing.assert_allclose(np.moveaxis(ours["lm.resid_pre"], 1, 0), hs[:-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["lm.final"], hs[-1], rtol=0, atol=TOL)
    slots = inputs["input_ids"] == fp.IMG
    np.testing.assert_array_equal(ours["lm.resid_pre"][:, 0][slots], ours["vision.tokens"][0])
    embed = np.asarray(pixtral_ckpts.model().params["embed"][...])
    breaks = inputs["input_ids"] == fp.IMG_BREAK
    np.testing.assert_array_equal(ours["lm.resid_pre"][:, 0][breaks], embed[fp.IMG_BREAK][None].repeat(breaks.sum(), 0))


def test_hf_default_positions(pixtral_ckpts):
    """HF's forward without position_ids (arange over the pads) agrees with ours at real tokens."""
    inputs, ours, _ = _run(pixtral_ckpts, "padded_batch")
    ref = hr.hf_logits(pixtral_ckpts.hf_model(), {k: v for k, v in inputs.items() if k != "position_ids"})
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours["logits"][real], ref[real], rtol=0, atol=TOL)


def test_sliding_window_matches_hf(pixtral_ckpts):
    """A Mistral config with a sliding window (4 keys, shorter than every prompt) masks like HF's."""
    import torch

    inputs, ours, ref = _run(pixtral_ckpts, "padded_batch", variant="window")
    print(f"window 4, padded_batch: logits max abs diff {np.abs(ours['logits'] - ref['logits']).max():.2g}")
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)
    hf = pixtral_ckpts.hf_model("window")
    hf.config.text_config.sliding_window = None  # the same weights without the window ...
    try:
        with torch.no_grad():
            full = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=False).logits.numpy()
    finally:
        hf.config.text_config.sliding_window = 4
    assert np.abs(full - ref["logits"]).max() > 0.05  # ... give other logits: the window is exercised


def test_feature_layers_match_hf(pixtral_ckpts):
    """vision_feature_layer [0, -2]: the ln_pre output and block 0's output, concatenated."""
    _, ours, ref = _run(pixtral_ckpts, "two_images", variant="features")
    print(f"features [0, -2], two_images: vision.tokens {np.abs(ours['vision.tokens'] - ref['vision.tokens']).max():.2g}, "
          f"logits {np.abs(ours['logits'] - ref['logits']).max():.2g}")
    np.testing.assert_allclose(ours["vision.tokens"], ref["vision.tokens"], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)


def test_image_sizes_default_to_the_whole_image(pixtral_ckpts):
    """Without image_sizes every image is its whole pixel_values, as in HF."""
    inputs, ours, _ = _run(pixtral_ckpts, "one_image")
    batch = sj.Batch(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert inputs["pixel_values"].shape[2:] == tuple(inputs["image_sizes"][0])
    np.testing.assert_array_equal(np.asarray(sj.forward(pixtral_ckpts.model(), batch).logits), ours["logits"])


def test_bad_batches_are_refused(pixtral_ckpts):
    inputs, _, _ = _run(pixtral_ckpts, "two_images")
    model = pixtral_ckpts.model()
    with pytest.raises(ValueError, match="no pixel_values"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"]))
    with pytest.raises(ValueError, match=r"\[IMG\] slots"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                   image_sizes=[[48, 32], [16, 48]]))
    with pytest.raises(ValueError, match="fit in"):
        sj.forward(model, sj.Batch(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                   image_sizes=[[48, 32], [16, 80]]))


def test_bfloat16_close_to_float32(pixtral_ckpts):
    """Our bf16 forward is within 2.5% of the logit range of our float32 forward, and no further
    from it than 2x HF's own bf16-vs-float32 difference on the same inputs."""
    import torch

    inputs, ours32, ref32 = _run(pixtral_ckpts, "padded_batch")
    m16 = pixtral_ckpts.model(dtype="bfloat16")
    assert m16.params["embed"][...].dtype == jnp.bfloat16
    ours16 = np.asarray(sj.forward(m16, fp.to_batch(inputs)).logits)
    ref16 = fp.hf_run(fp.load_hf(pixtral_ckpts.hf_dir(), dtype=torch.bfloat16), inputs)["logits"]
    real = inputs["attention_mask"].astype(bool)
    err = np.abs(ours16 - ours32["logits"])[real].max()
    hf_err = np.abs(ref16 - ref32["logits"])[real].max()
    scale = np.abs(ours32["logits"]).max()
    print(f"bf16: ours vs ours-f32 {err:.3g}, HF bf16 vs HF f32 {hf_err:.3g}, ours vs HF bf16 "
          f"{np.abs(ours16 - ref16)[real].max():.3g}, largest logit {scale:.3g}")
    assert err <= 0.025 * scale, (err, scale)
    assert err <= 2.0 * hf_err, (err, hf_err)
    agree = (ours16.argmax(-1) == ours32["logits"].argmax(-1))[real].mean()
    assert agree >= 0.95
