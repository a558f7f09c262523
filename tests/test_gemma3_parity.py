"""Gemma 3: our Flax port against transformers (eager attention, float32): logits, every site,
an intervention, bfloat16.

The reference is `Gemma3ForConditionalGeneration` loaded from the same tiny random checkpoint
(tests/fixtures_gemma3.py), run with forward hooks that capture each site (`fg.hf_run`).

Positions: our port uses `where(mask, cumsum(mask) - 1, 0)` (HF generate's rule); HF is given the
same `position_ids`. HF's forward default (`arange(T)` over the pads too) gives the same logits at
real tokens, since RoPE is relative (test_hf_default_positions). Logits and sites are compared at
every position, padding included (a fully masked pad row attends uniformly in both).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_gemma3 as fg
import hf_reference as hr
from fixtures_gemma3 import gemma3_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.nn import layers as L

TOL = 1e-4  # max abs difference, float32
W = list(range(12, 42))  # ordinary word ids

CASES = {
    # 31 tokens: longer than the sliding window (4), so sliding and global layers differ
    "text_only": [[W[:30]]],
    "one_image": [[W[:3], fg.IMAGE, W[3:8]]],
    "two_images": [[W[:2], fg.IMAGE, W[2:4], fg.IMAGE, W[4:9]]],
    # left-padded: 2 images / 1 image / text only
    "padded_batch": [[W[:2], fg.IMAGE, W[2:4], fg.IMAGE, W[4:7]], [W[10:12], fg.IMAGE, W[12:13]], [W[:8]]],
}
LM_SITES, VISION_SITES = hr.LM_SITES, hr.VISION_SITES

_runs: dict = {}


def _run(ckpts, case: str, variant: str = "base", token_types: bool = True):
    """(inputs, ours, hf) for a case, computed once per module (one compile per case)."""
    key = (case, variant, token_types)
    if key not in _runs:
        inputs = fg.make_inputs(CASES[case], seed=len(case), token_types=token_types)
        ours = hr.forward_sites(ckpts.model(variant), fg.to_batch(inputs), "pixel_values" in inputs)
        _runs[key] = (inputs, ours, fg.hf_run(ckpts.hf_model(variant), inputs))
    return _runs[key]


def test_tiny_config_exercises_what_matters(gemma3_ckpts):
    cfg = gemma3_ckpts.model().config
    assert cfg.query_pre_attn_scalar != cfg.head_dim  # a head_dim-derived scale would fail
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size
    assert cfg.num_heads > cfg.num_kv_heads  # GQA
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[-1] == "full_attention"
    assert cfg.mm_tokens_per_image > cfg.sliding_window  # image blocks longer than the window
    assert cfg.patches_per_side // cfg.tokens_per_side == 2  # the projector really pools
    assert cfg.rope_global_factor == 8.0 and cfg.rope_local_theta != cfg.rope_global_theta
    assert cfg.tie_word_embeddings


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(gemma3_ckpts, case):
    inputs, ours, ref = _run(gemma3_ckpts, case)
    assert ours["logits"].dtype == np.float32
    assert ours["logits"].shape == ref["logits"].shape == (*inputs["input_ids"].shape, fg.VOCAB)
    assert np.abs(ref["logits"]).max() > 1.0  # not degenerate, so the tolerance means something
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)


def test_without_token_type_ids_is_causal_like_hf(gemma3_ckpts):
    """HF silently uses plain causal masks when token_type_ids is absent; so do we."""
    inputs, ours, ref = _run(gemma3_ckpts, "two_images", token_types=False)
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)
    _, with_types, _ = _run(gemma3_ckpts, "two_images")
    assert np.abs(with_types["logits"] - ours["logits"]).max() > 0.1  # the bidirectional blocks matter


def test_attention_softcapping_is_ignored_like_hf(gemma3_ckpts):
    """transformers 5.23's Gemma3Attention stores attn_logit_softcapping but never passes it to the
    attention function, so a config that sets it (null for gemma-3-4b-it) runs uncapped; ours too."""
    assert gemma3_ckpts.hf_model("softcap").config.text_config.attn_logit_softcapping == 2.0
    _, ours, ref = _run(gemma3_ckpts, "padded_batch", variant="softcap")
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=TOL)


def test_hf_default_positions(gemma3_ckpts):
    """HF's forward without position_ids (arange over the pads) agrees with ours at real tokens."""
    inputs, ours, _ = _run(gemma3_ckpts, "padded_batch")
    ref = hr.hf_logits(gemma3_ckpts.hf_model(), {k: v for k, v in inputs.items() if k != "position_ids"})
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours["logits"][real], ref[real], rtol=0, atol=TOL)


@pytest.mark.parametrize("site", LM_SITES + VISION_SITES)
@pytest.mark.parametrize("case", ["two_images", "padded_batch"])
def test_sites_match_hf(gemma3_ckpts, case, site):
    inputs, ours, ref = _run(gemma3_ckpts, case)
    cfg = gemma3_ckpts.model().config
    B, T = inputs["input_ids"].shape
    n_img = inputs["pixel_values"].shape[0]
    shapes = {
        "vision.block_out": (n_img, cfg.vision_layers, cfg.patches_per_side**2, cfg.vision_dim),
        "vision.tokens": (n_img, cfg.mm_tokens_per_image, cfg.hidden_size),
        "lm.final": (B, T, cfg.hidden_size),
    }
    assert ours[site].shape == ref[site].shape == shapes.get(site, (B, cfg.num_layers, T, cfg.hidden_size))
    np.testing.assert_allclose(ours[site], ref[site], rtol=0, atol=TOL)


def test_sites_are_hf_hidden_states(gemma3_ckpts):
    """resid_pre[l] = HF hidden_states[l]; HF's last entry is final-normed (our lm.final)."""
    _, ours, ref = _run(gemma3_ckpts, "two_images")
    hs = ref["hidden_states"]
    np.testing.assert_allclose(np.moveaxis(ours["lm.resid_pre"], 1, 0), hs[:-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["lm.final"], hs[-1], rtol=0, atol=TOL)
    # the visual tokens replace the (sqrt(D)-scaled) embeddings one for one, unscaled
    inputs = fg.make_inputs(CASES["two_images"], seed=len("two_images"))
    slots = inputs["input_ids"] == fg.IMG
    np.testing.assert_allclose(ours["lm.resid_pre"][:, 0][slots], ours["vision.tokens"].reshape(-1, hs.shape[-1]),
                               rtol=0, atol=0)


def test_patch_equals_hf_forward_hook(gemma3_ckpts):
    """Replacing lm.resid_post at layer 2 on the image tokens of row 0 with row 1's (a swap across
    prompts) equals the same patch done with a forward hook on the HF decoder layer."""
    import torch

    inputs, ours, _ = _run(gemma3_ckpts, "padded_batch")
    layer = 2
    img0 = np.flatnonzero(inputs["token_type_ids"][0])[:fg.MM_TOKENS]
    img1 = np.flatnonzero(inputs["token_type_ids"][1])[:fg.MM_TOKENS]
    index = np.full(inputs["input_ids"].shape, -1, np.int32)
    index[0, img0] = img1
    source = ours["lm.resid_post"][:, layer][[1, 1, 2]]  # row 0 reads row 1's activations
    iv = sj.Intervention(site="lm.resid_post", layer=layer, op="replace", source=source, index=index)
    got = np.asarray(sj.forward(gemma3_ckpts.model(), fg.to_batch(inputs), interventions=[iv]).logits)

    hf = gemma3_ckpts.hf_model()

    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[0, torch.from_numpy(img0)] = h[1, torch.from_numpy(img1)]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hf.model.language_model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=False).logits.numpy()
    finally:
        handle.remove()
    assert np.abs(want[0] - ours["logits"][0]).max() > 0.1  # the patch changes row 0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_bfloat16_close_to_float32(gemma3_ckpts):
    """Our bf16 forward is within 2.5% of the logit range of our float32 forward, and no further
    from it than 2x HF's own bf16-vs-float32 difference on the same inputs."""
    import torch

    inputs, ours32, ref32 = _run(gemma3_ckpts, "padded_batch")
    m16 = gemma3_ckpts.model(dtype="bfloat16")
    assert m16.params["embed"][...].dtype == jnp.bfloat16
    ours16 = np.asarray(sj.forward(m16, fg.to_batch(inputs)).logits)
    hf16 = fg.load_hf(gemma3_ckpts.hf_dir(), dtype=torch.bfloat16)
    ref16 = fg.hf_run(hf16, inputs)["logits"]
    real = inputs["attention_mask"].astype(bool)
    err = np.abs(ours16 - ours32["logits"])[real].max()
    hf_err = np.abs(ref16 - ref32["logits"])[real].max()
    scale = np.abs(ours32["logits"]).max()
    assert err <= 0.025 * scale, (err, scale)
    assert err <= 2.0 * hf_err, (err, hf_err)
    agree = (ours16.argmax(-1) == ours32["logits"].argmax(-1))[real].mean()
    assert agree >= 0.95


@pytest.mark.parametrize("dtype, want", [(jnp.float32, np.float32(math.sqrt(2560))), (jnp.bfloat16, 50.5)])
def test_embedding_scale_is_cast_to_param_dtype(gemma3_ckpts, dtype, want):
    """sqrt(2560) = 50.596 in float32 but 50.5 in bfloat16, as HF's embed_scale.to(weight.dtype)."""
    import dataclasses

    import torch
    from flax import nnx

    from spatial_jax.interventions.taps import Taps
    from spatial_jax.families.gemma3.model import Gemma3
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    cfg = dataclasses.replace(gemma3_ckpts.model().config, hidden_size=2560, num_layers=1,
                              layer_types=("full_attention",), intermediate_size=8)
    model = Gemma3(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    model.embed[...] = jnp.ones_like(model.embed[...])
    x = model.embed_inputs(sj.Batch(input_ids=np.array([[3, 4]])), Taps())
    assert x.dtype == dtype and np.all(np.asarray(x, np.float32) == np.float32(want))
    hf = Gemma3TextScaledWordEmbedding(8, 2560, 0, embed_scale=2560**0.5)
    with torch.no_grad():
        hf.weight.fill_(1.0)
        hf = hf.to(torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32)
        assert hf(torch.tensor([[3]])).float().numpy().max() == np.float32(want)


def test_attention_a_row_at_a_time_matches_hf(gemma3_ckpts, monkeypatch):
    """On CPU, attention takes the batch a few rows per step when the scores are large: here one
    row per step (three images in the vision tower, three prompts under sliding, global and
    bidirectional image masks), against the same HF reference."""
    inputs, _, ref = _run(gemma3_ckpts, "padded_batch")
    monkeypatch.setattr(L, "CPU_SCORE_CHUNK_BYTES", 1)
    jax.clear_caches()  # trace anew under the patched budget
    try:
        ours = np.asarray(sj.forward(gemma3_ckpts.model(), fg.to_batch(inputs)).logits)
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(ours, ref["logits"], rtol=0, atol=TOL)
