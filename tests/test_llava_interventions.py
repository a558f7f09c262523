"""LLaVA-1.5 interventions against HF forward hooks (the paper's patching), on the tiny checkpoint:
LM-site patches, a vision.block_out patch (CLS at index 0, patch (r, c) at 1 + 4 r + c) and a
vision.tokens patch; cached values equal the hooks' captures (test_llava_parity); a sweep equals
one forward per layer."""
from __future__ import annotations

import numpy as np

import fixtures_llava as fl
import hf_reference as hr
from fixtures_llava import llava_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj

TOL = 1e-4
W = list(range(fl.TOKENS.index("You"), fl.TOKENS.index("You") + 10))
# Two left-padded rows, one image each, at different offsets.
PROMPTS = [["image", W[:3]], [W[3:6], "image", W[6:7]]]


def _inputs(seed: int):
    return fl.make_inputs(PROMPTS, seed=seed)


def test_criss_cross_and_amplify_match_hf_hooks(llava_ckpts):
    """Left <-> right image columns swapped in lm.resid_pre of layer 2 with the counterfactual's
    activations, after amplifying the visual tokens at lm.resid_pre of layer 0."""
    clean = _inputs(0)
    index = hr.swap_columns_index(clean["input_ids"], fl.IMG, (fl.SIDE, fl.SIDE))
    hr.check_criss_cross_and_amplify(llava_ckpts.model(), llava_ckpts.hf_model(), clean, _inputs(1), fl.to_batch,
                                     fl.hf_run, index, fl.IMG, TOL)


def test_vision_block_and_token_patches_match_hf_hooks(llava_ckpts):
    """vision.block_out of layer 0 replaced at the CLS position and the first patch row of each
    image (block index over 1 + 16 positions), and vision.tokens (patch index over 16) replaced
    on some positions; HF hooks on the first CLIP encoder layer and on the projector."""
    model, hf = llava_ckpts.model(), llava_ckpts.hf_model()
    clean = _inputs(0)
    n_pos, n_tok = 1 + 16, 16
    rng = np.random.default_rng(2)
    blk_src = rng.standard_normal((2, n_pos, model.config.vision_dim)).astype(np.float32)
    tok_src = rng.standard_normal((2, n_tok, model.config.hidden_size)).astype(np.float32)
    blk_index = np.broadcast_to(np.where(np.arange(n_pos) < 5, np.arange(n_pos), -1), (2, n_pos))
    tok_index = np.stack([np.where(np.arange(n_tok) % 3 == 1, (np.arange(n_tok) + 4) % n_tok, -1),
                          np.where(np.arange(n_tok) < 2, np.arange(n_tok), -1)])
    ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=0, source=blk_src, index=blk_index),
           sj.Intervention(site="vision.tokens", op="replace", source=tok_src, index=tok_index)]
    out = sj.forward(model, fl.to_batch(clean), interventions=ivs, cache=("vision.tokens", "vision.block_out"))
    ref = fl.hf_run(hf, clean, hooks=[(hf.model.vision_tower.encoder.layers[0], "post",
                                       fl.torch_replace(blk_index, blk_src)),
                                      (hf.model.multi_modal_projector, "post", fl.torch_replace(tok_index, tok_src))])
    np.testing.assert_allclose(np.asarray(out.cache["vision.block_out"]), ref["vision.block_out"], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(out.cache["vision.tokens"]), ref["vision.tokens"], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], rtol=0, atol=TOL)
    assert np.abs(ref["logits"] - fl.hf_run(hf, clean)["logits"]).max() > 0.05


def test_cls_patch_alone_changes_the_image_tokens(llava_ckpts):
    """The CLS position (block index 0) is dropped from the projector's input, but the patches
    attend to it: patching only it at layer 0 changes vision.tokens, as in HF."""
    model, hf = llava_ckpts.model(), llava_ckpts.hf_model()
    clean = _inputs(0)
    src = np.full((2, 17, model.config.vision_dim), 2.0, np.float32)
    index = np.broadcast_to(np.where(np.arange(17) == 0, 0, -1), (2, 17))
    iv = sj.Intervention(site="vision.block_out", op="replace", layer=0, source=src, index=index)
    out = sj.forward(model, fl.to_batch(clean), interventions=[iv], cache=("vision.tokens",))
    ref = fl.hf_run(hf, clean, hooks=[(hf.model.vision_tower.encoder.layers[0], "post", fl.torch_replace(index, src))])
    np.testing.assert_allclose(np.asarray(out.cache["vision.tokens"]), ref["vision.tokens"], rtol=0, atol=TOL)
    assert np.abs(ref["vision.tokens"] - fl.hf_run(hf, clean)["vision.tokens"]).max() > 0.01


def test_sweep_equals_one_forward_per_layer(llava_ckpts):
    """A criss-cross sweep over every layer (vmapped, restarting the LM at the patched layer)
    equals a full forward per layer."""
    clean = _inputs(0)
    tokens = np.array([fl.vocab_id("left"), fl.vocab_id("right"), fl.vocab_id("above")])
    hr.check_sweep_equals_one_forward_per_layer(
        llava_ckpts.model(), fl.to_batch(clean), fl.to_batch(_inputs(1)),
        hr.swap_columns_index(clean["input_ids"], fl.IMG, (fl.SIDE, fl.SIDE)), tokens)
