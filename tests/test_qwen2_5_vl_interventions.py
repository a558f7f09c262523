"""The intervention engine on Qwen2.5-VL: patches at lm.*, vision.block_out and vision.tokens done
by our engine equal the same patches done with PyTorch forward hooks on transformers' model.

HF's vision blocks and merger run in window order; ours in the processor's patch order (see the
model's docstring). The hooks therefore patch HF's rows in window order with the same values:
HF row j is our patch order[j] (merged token order[::4] // 4)."""
from __future__ import annotations

import numpy as np
import torch

import fixtures_qwen2_5_vl as f25
import fixtures_qwen2_vl as fq
import hf_reference as hr
from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj

TOL = 1e-4
# Two left-padded rows, a 6 x 6-patch image each (3 x 3 tokens: windows of 4, 2, 2 and 1 tokens).
PROMPTS = [[[5], fq.image(6, 6), [6, 7]], [[8, 9, 10], fq.image(6, 6), [11]]]


def _columns(ids: np.ndarray):
    """Per row: sequence positions of the image's left and right token columns."""
    return [(grid[:, 0], grid[:, 2]) for grid in (np.flatnonzero(row == fq.IMAGE_PAD).reshape(3, 3) for row in ids)]


def _replace_rows(index: np.ndarray, source: np.ndarray):
    """Hook-side `replace` on an unbatched [N, D] output: row n <- source[0, index[0, n]] where >= 0."""
    src, sel, source = torch.tensor(np.maximum(index[0], 0)), torch.tensor(index[0] >= 0), torch.tensor(source[0])
    return lambda h: torch.where(sel[:, None], source[src], h)


def test_criss_cross_and_amplify_match_hf_hooks(qwen2_5_vl_ckpts):
    """Left <-> right image columns swapped in lm.resid_pre of layer 2 with the counterfactual's
    activations, after amplifying the visual tokens at lm.resid_pre of layer 0."""
    clean = fq.make_inputs(PROMPTS, seed=0)
    T = clean["input_ids"].shape[1]
    index = np.stack([sj.swap_index(T, [cols]) for cols in _columns(clean["input_ids"])])
    hr.check_criss_cross_and_amplify(qwen2_5_vl_ckpts.model(), qwen2_5_vl_ckpts.hf_model(), clean,
                                     fq.make_inputs(PROMPTS, seed=1), fq.to_batch, f25.hf_run, index, fq.IMAGE_PAD, TOL,
                                     where=clean["attention_mask"].astype(bool))


def test_vision_block_and_token_patches_match_hf_hooks(qwen2_5_vl_ckpts):
    """vision.block_out of block 0 (a windowed block) replaced at some patches and vision.tokens at
    some tokens, given in the processor's order; HF hooks patch the same rows in window order."""
    model, hf = qwen2_5_vl_ckpts.model(), qwen2_5_vl_ckpts.hf_model()
    clean = fq.make_inputs(PROMPTS, seed=0)
    n = 2 * 36  # patches of the two images
    rng = np.random.default_rng(2)
    blk_src = rng.standard_normal((1, n, model.config.vision_dim)).astype(np.float32)
    tok_src = rng.standard_normal((1, n // 4, model.config.hidden_size)).astype(np.float32)
    blk_index = np.where(np.arange(n) % 5 == 0, (np.arange(n) * 7) % n, -1)[None]
    tok_index = np.where(np.arange(n // 4) % 3 == 1, (np.arange(n // 4) + 4) % (n // 4), -1)[None]
    ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=0, source=blk_src, index=blk_index),
           sj.Intervention(site="vision.tokens", op="replace", source=tok_src, index=tok_index)]
    out = sj.forward(model, fq.to_batch(clean), interventions=ivs, cache=("vision.block_out", "vision.tokens"))

    order = f25.hf_window_order(clean["image_grid_thw"])  # HF row j = our patch order[j]
    tokens = order[::4] // 4
    ref = f25.hf_run(hf, clean, hooks=[(hf.model.visual.blocks[0], "post", _replace_rows(blk_index[:, order], blk_src)),
                                       (hf.model.visual.merger, "post", _replace_rows(tok_index[:, tokens], tok_src))])
    assert not np.array_equal(order, np.arange(n))  # the window order differs from the processor's
    for site in ("vision.block_out", "vision.tokens"):
        np.testing.assert_allclose(np.asarray(out.cache[site]), ref[site], rtol=0, atol=TOL, err_msg=site)
    np.testing.assert_array_equal(np.asarray(out.cache["vision.block_out"])[0, 0, blk_index[0] >= 0],
                                  blk_src[0, blk_index[0][blk_index[0] >= 0]])
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], rtol=0, atol=TOL)
