"""The intervention engine on Pixtral, with no family-specific code: patches done by our engine
equal the same patches done with PyTorch forward hooks on transformers' model (as the paper's code
patches), and a batched sweep equals one forward per variant."""
from __future__ import annotations

import numpy as np

import fixtures_pixtral as fp
import hf_reference as hr
from fixtures_pixtral import pixtral_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj

TOL = 1e-4
W = list(range(16, 16 + len(fp.WORDS)))
# Two left-padded rows, one 2 x 3-patch image each, at different offsets.
PROMPTS = [[W[:1], (32, 48), W[1:3]], [W[3:6], (32, 48), W[6:7]]]


def _inputs(seed: int):
    return fp.make_inputs(PROMPTS, seed=seed)


def test_criss_cross_and_amplify_match_hf_hooks(pixtral_ckpts):
    """Left <-> right image columns swapped in lm.resid_pre of layer 2 with the counterfactual's
    activations, after amplifying the visual tokens at lm.resid_pre of layer 0."""
    clean = _inputs(0)
    index = hr.swap_columns_index(clean["input_ids"], fp.IMG, (2, 3))
    hr.check_criss_cross_and_amplify(pixtral_ckpts.model(), pixtral_ckpts.hf_model(), clean, _inputs(1), fp.to_batch,
                                     fp.hf_run, index, fp.IMG, TOL)


def test_vision_block_and_token_patches_match_hf_hooks(pixtral_ckpts):
    """vision.block_out of block 0 (patch index) and vision.tokens (token index) replaced with
    given values on some positions; HF hooks on the first Pixtral layer and on the projector."""
    model, hf = pixtral_ckpts.model(), pixtral_ckpts.hf_model()
    clean = _inputs(0)
    n = 2 * 6  # two 2 x 3-patch images: one token per patch
    rng = np.random.default_rng(2)
    blk_src = rng.standard_normal((1, n, model.config.vision_dim)).astype(np.float32)
    tok_src = rng.standard_normal((1, n, model.config.hidden_size)).astype(np.float32)
    blk_index = np.where(np.arange(n) < 5, np.arange(n), -1)[None]
    tok_index = np.where(np.arange(n) % 3 == 1, (np.arange(n) + 4) % n, -1)[None]
    ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=0, source=blk_src, index=blk_index),
           sj.Intervention(site="vision.tokens", op="replace", source=tok_src, index=tok_index)]
    out = sj.forward(model, fp.to_batch(clean), interventions=ivs, cache=("vision.tokens",))
    ref = fp.hf_run(hf, clean, hooks=[(hf.model.vision_tower.transformer.layers[0], "post",
                                       fp.torch_replace(blk_index, blk_src)),
                                      (hf.model.multi_modal_projector, "post", fp.torch_replace(tok_index, tok_src))])
    np.testing.assert_allclose(np.asarray(out.cache["vision.tokens"]), ref["vision.tokens"], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], rtol=0, atol=TOL)


def test_sweep_equals_one_forward_per_layer(pixtral_ckpts):
    """A criss-cross sweep over every layer (one vmapped call per chunk, restarting the LM at the
    patched layer) equals a full forward per layer."""
    clean = _inputs(0)
    tokens = np.array([fp.vocab_id("left"), fp.vocab_id("right"), fp.vocab_id("above")])
    hr.check_sweep_equals_one_forward_per_layer(pixtral_ckpts.model(), fp.to_batch(clean), fp.to_batch(_inputs(1)),
                                                hr.swap_columns_index(clean["input_ids"], fp.IMG, (2, 3)), tokens)
