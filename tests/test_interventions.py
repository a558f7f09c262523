"""The intervention engine: ops, taps, sweeps, and equality with PyTorch forward hooks on HF."""
import json

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2VLForConditionalGeneration

import spatial_jax as sj
from spatial_jax.convert.export import export_hf
from spatial_jax.forward import _apply_jit
from spatial_jax.interventions.sweep import _variants_jit
from spatial_jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig

IMG, VS, VE = 60, 61, 62
GRID = np.array([[1, 4, 6]])  # 2 x 3 merged tokens
N_TOK = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2-VL (4 LM layers) exported to HF format, loaded by both sides."""
    d = str(tmp_path_factory.mktemp("tiny_qwen_iv"))
    cfg = Qwen2VLConfig(vision_depth=2, vision_dim=32, vision_heads=4, vision_mlp_dim=64, patch_size=14,
                        temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4,
                        vocab_size=64, hidden_size=48, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=12,
                        intermediate_size=80, rms_norm_eps=1e-6, rope_theta=1e4, mrope_section=(2, 2, 2),
                        tie_word_embeddings=False, image_token_id=IMG, vision_start_token_id=VS,
                        vision_end_token_id=VE)
    export_hf(d, "qwen2_vl", cfg, nnx.to_pure_dict(nnx.state(Qwen2VL(cfg, rngs=nnx.Rngs(3)))))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    return sj.load(d), hf


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = np.array([[3, 4, VS] + [IMG] * N_TOK + [VE, 5, 6, 7], [1, 2, VS] + [IMG] * N_TOK + [VE, 8, 9, 10]])
    pv = rng.standard_normal((2 * int(GRID.prod()), 1176)).astype(np.float32)
    return sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=np.concatenate([GRID, GRID]))


def _hf_logits(hf, batch, hooks):
    """HF forward with (module, pre?, fn) hooks installed, as the paper's code patches."""
    handles = []
    for module, pre, fn in hooks:
        if pre:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw, fn=fn: ((fn(a[0]),) + a[1:], kw) if a else (a, {**kw, "hidden_states": fn(kw["hidden_states"])}),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, fn=fn: (fn(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else fn(o)))
    try:
        with torch.no_grad():
            return hf(input_ids=torch.tensor(batch.input_ids), pixel_values=torch.tensor(batch.pixel_values),
                      image_grid_thw=torch.tensor(batch.image_grid_thw),
                      mm_token_type_ids=torch.tensor((batch.input_ids == IMG).astype(np.int64))).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def _torch_replace(index, source):
    src, sel = torch.tensor(np.maximum(index, 0)), torch.tensor(index >= 0)
    source = torch.tensor(np.asarray(source))

    def fn(x):
        gathered = torch.gather(source, 1, src[..., None].expand(-1, -1, x.shape[-1]))
        return torch.where(sel[..., None], gathered, x)
    return fn


def test_identity_intervention_gives_clean_logits_exactly(tiny):
    model, _ = tiny
    b = _batch(0)
    clean = sj.forward(model, b, cache=("lm.resid_post",))
    keep = np.full(b.input_ids.shape, -1)
    same = sj.Intervention(site="lm.resid_post", op="replace", layer=2,
                           source=clean.cache["lm.resid_post"][:, 2], index=sj.mask_index(np.ones_like(keep, bool)))
    for iv in (sj.Intervention(site="lm.resid_pre", op="replace", layer=1, source=clean.cache["lm.resid_post"][:, 0],
                               index=keep), same):
        np.testing.assert_array_equal(np.asarray(sj.forward(model, b, interventions=[iv]).logits),
                                      np.asarray(clean.logits))


def test_replacing_every_position_at_layer0_gives_source_logits(tiny):
    model, _ = tiny
    base, source = _batch(0), _batch(1)  # same text, different images
    src = sj.forward(model, source, cache=("lm.resid_pre",))
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=0, source=src.cache["lm.resid_pre"][:, 0])
    out = sj.forward(model, base, interventions=[iv])
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(src.logits), atol=1e-6)


def test_ops_follow_their_formulas(tiny):
    model, _ = tiny
    b = _batch(0)
    clean = sj.forward(model, b, cache=("lm.resid_pre",)).cache["lm.resid_pre"]
    rng = np.random.default_rng(0)
    D = clean.shape[-1]
    at = np.zeros(b.input_ids.shape, bool)
    at[:, 3:9] = True
    W = rng.standard_normal((D, 2)).astype(np.float32)
    v = rng.standard_normal((D,)).astype(np.float32)
    amp = sj.Intervention(site="lm.resid_pre", op="amplify", layer=2, directions=W, alpha=3.0, index=sj.mask_index(at))
    add = sj.Intervention(site="lm.resid_pre", op="add", layer=2, source=v, alpha=2.0, index=sj.mask_index(at))
    h = np.asarray(clean[:, 2])
    coeff = h @ W / (W * W).sum(0)
    want_amp = np.where(at[..., None], h + 3.0 * coeff @ W.T, h)
    want_add = np.where(at[..., None], h + 2.0 * v, h)
    for iv, want in ((amp, want_amp), (add, want_add)):
        got = sj.forward(model, b, cache=("lm.resid_pre",), interventions=[iv]).cache["lm.resid_pre"]
        np.testing.assert_allclose(np.asarray(got[:, 2]), want, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got[:, 1]), np.asarray(clean[:, 1]))  # other layers untouched


def test_last_token_patch_matches_hf_hooks(tiny):
    model, hf = tiny
    clean, cf = _batch(0), _batch(1)
    src = sj.forward(model, cf, cache=("lm.resid_pre",)).cache["lm.resid_pre"]
    T = clean.input_ids.shape[1]
    index = np.full((2, T), -1)
    index[:, T - 1] = T - 1
    layer = 2
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, source=src[:, layer], index=index)
    ours = np.asarray(sj.forward(model, clean, interventions=[iv]).logits)
    ref = _hf_logits(hf, clean, [(hf.model.language_model.layers[layer], True, _torch_replace(index, src[:, layer]))])
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert np.abs(ours - np.asarray(sj.forward(model, clean).logits)).max() > 1e-3  # the patch did something


@pytest.mark.parametrize("layer", [0, 2])
def test_criss_cross_swap_matches_hf_hooks(tiny, layer):
    model, hf = tiny
    clean, cf = _batch(0), _batch(1)
    src = sj.forward(model, cf, cache=("lm.resid_pre",)).cache["lm.resid_pre"][:, layer]
    grid = np.arange(N_TOK).reshape(2, 3) + 3  # token positions of the 2 x 3 image
    swap = sj.swap_index(clean.input_ids.shape[1], [(grid[:, 0], grid[:, 2])])  # left column <-> right column
    index = np.stack([swap, swap])
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, source=src, index=index)
    ours = np.asarray(sj.forward(model, clean, interventions=[iv]).logits)
    ref = _hf_logits(hf, clean, [(hf.model.language_model.layers[layer], True, _torch_replace(index, src))])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_amplification_at_layer0_matches_hf_hooks(tiny):
    model, hf = tiny
    b = _batch(0)
    W = np.random.default_rng(1).standard_normal((48, 2)).astype(np.float32)
    at = b.input_ids == IMG
    iv = sj.Intervention(site="lm.resid_pre", op="amplify", layer=0, directions=W, alpha=8.0, index=sj.mask_index(at))
    ours = np.asarray(sj.forward(model, b, interventions=[iv]).logits)
    Wt, sel = torch.tensor(W), torch.tensor(at)

    def amplify(h):  # the official coco_amplification hook
        coeff = (h @ Wt) / ((Wt * Wt).sum(0) + 1e-8)
        return torch.where(sel[..., None], h + 8.0 * coeff @ Wt.T, h)

    ref = _hf_logits(hf, b, [(hf.model.language_model.layers[0], True, amplify)])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_vision_token_and_block_interventions_match_hf_hooks(tiny):
    model, hf = tiny
    b = _batch(0)
    n_tok, n_patch = 2 * N_TOK, 2 * int(GRID.prod())
    rng = np.random.default_rng(2)
    tok_src = rng.standard_normal((1, n_tok, 48)).astype(np.float32)
    blk_src = rng.standard_normal((1, n_patch, 32)).astype(np.float32)
    tok_index = np.where(np.arange(n_tok) % 2 == 0, np.arange(n_tok), -1)[None]
    blk_index = np.where(np.arange(n_patch) < 8, np.arange(n_patch), -1)[None]
    ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=0, source=blk_src, index=blk_index),
           sj.Intervention(site="vision.tokens", op="replace", source=tok_src, index=tok_index)]
    ours = np.asarray(sj.forward(model, b, interventions=ivs).logits)

    def unbatched(index, source):
        fn = _torch_replace(index, source)
        return lambda x: fn(x[None])[0]

    visual = hf.model.visual
    ref = _hf_logits(hf, b, [(visual.blocks[0], False, unbatched(blk_index, blk_src)),
                             (visual.merger, False, unbatched(tok_index, tok_src))])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_sweep_equals_loop_and_never_recompiles(tiny):
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    L = model.config.num_layers
    T = clean.input_ids.shape[1]
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",)).cache["lm.resid_pre"])
    grid = np.arange(N_TOK).reshape(2, 3) + 3
    maps = np.stack([np.stack([sj.swap_index(T, [(grid[:, 0], grid[:, 2])])] * 2),
                     np.stack([sj.swap_index(T, [(grid[:, 0], grid[:, 1])])] * 2)])  # [R=2, B, T]
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    readout = sj.Readout(position=sj.last_positions(np.ones((2, T))), tokens=tokens)

    def sweep(layers):
        n = len(layers)
        iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.broadcast_to(layers[:, None], (n, 2)),
                             index=np.broadcast_to(maps[None], (n,) + maps.shape),
                             source=np.broadcast_to(np.moveaxis(src[:, layers], 1, 0)[:, None], (n, 2) + src[:, 0].shape))
        return sj.patch_sweep(model, clean, [iv], readout, chunk_size=3)

    res = sweep(np.arange(L))
    assert res.logits.shape == (L, 2, 2, 3) and res.argmax.shape == (L, 2, 2)
    for layer in range(L):
        for r in range(2):
            iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=maps[r], source=src[:, layer])
            logits = np.asarray(sj.forward(model, clean, interventions=[iv]).logits)[:, -1]
            np.testing.assert_allclose(res.logits[layer, r], np.take_along_axis(logits, tokens, -1), atol=1e-5)
            np.testing.assert_array_equal(res.argmax[layer, r], logits.argmax(-1))
    compiled = _variants_jit._cache_size()
    sweep(np.array([3, 1, 0, 2]))  # other layers, other order, other chunk split
    assert _variants_jit._cache_size() == compiled
    # forward: a new layer value or token map reuses the compiled function too
    before = _apply_jit._cache_size()
    for layer in (0, 3):
        sj.forward(model, clean, interventions=[sj.Intervention(site="lm.resid_pre", op="replace", layer=layer,
                                                                 index=maps[layer % 2], source=src[:, layer])])
    assert _apply_jit._cache_size() == before  # this structure was compiled by the loop above


def test_paper_sweeps_shapes_and_slots(tiny):
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    L = model.config.num_layers
    tokens = np.array([1, 2, 3, 4, 5])
    res = sj.last_token_sweep(model, clean, cf, tokens)
    assert res.probs.shape == (L + 1, 2, 5)
    # slot L patches the last layer's output at the last token: the cf's last-token prediction
    cf_logits = np.asarray(sj.forward(model, cf).logits)[:, -1]
    np.testing.assert_allclose(res.logits[L], cf_logits[:, tokens], atol=1e-5)
    T = clean.input_ids.shape[1]
    grid = np.arange(N_TOK).reshape(2, 3) + 3
    index = np.stack([np.stack([sj.swap_index(T, [(grid[:, 0], grid[:, 2])])] * 2)])
    swap = sj.region_swap_sweep(model, clean, cf, index, tokens)
    assert swap.logits.shape == (L + 1, 1, 2, 5)


# ----------------------------------------------------------------------------------------------
# The same engine on Gemma 3, with no family-specific code


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    import fixtures_gemma3 as fg
    d = fg.build_tiny_gemma3(str(tmp_path_factory.mktemp("tiny_gemma_iv")), processor=False)
    batch = lambda seed: fg.to_batch(fg.make_inputs([[fg.IMAGE, [fg.vocab_id("What"), fg.vocab_id("is")]],
                                                     [[fg.vocab_id("left")], fg.IMAGE, [fg.vocab_id("is")]]],
                                                    seed=seed))
    return sj.load(d), fg.load_hf(d), batch, fg


def test_gemma_criss_cross_and_amplify_match_hf_hooks(tiny_gemma):
    model, hf, make_batch, fg = tiny_gemma
    clean, cf = make_batch(0), make_batch(1)
    inputs = fg.make_inputs([[fg.IMAGE, [fg.vocab_id("What"), fg.vocab_id("is")]],
                             [[fg.vocab_id("left")], fg.IMAGE, [fg.vocab_id("is")]]], seed=0)
    layer = 2
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",)).cache["lm.resid_pre"][:, layer])
    T = clean.input_ids.shape[1]
    index = np.stack([sj.swap_index(T, [(row[:3], row[-3:])])
                      for row in (np.flatnonzero(r == fg.IMG) for r in np.asarray(clean.input_ids))])
    W = np.random.default_rng(0).standard_normal((model.config.hidden_size, 2)).astype(np.float32)
    at = np.asarray(clean.input_ids) == fg.IMG
    ivs = [sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, source=src, index=index),
           sj.Intervention(site="lm.resid_pre", op="amplify", layer=0, directions=W, alpha=4.0, index=sj.mask_index(at))]
    ours = np.asarray(sj.forward(model, clean, interventions=ivs).logits)
    Wt, sel = torch.tensor(W), torch.tensor(at)

    def amplify(h):
        coeff = (h @ Wt) / ((Wt * Wt).sum(0) + 1e-8)
        return torch.where(sel[..., None], h + 4.0 * coeff @ Wt.T, h)

    layers = hf.model.language_model.layers
    hooks = [(layers[0], amplify), (layers[layer], _torch_replace(index, src))]
    handles = [m.register_forward_pre_hook(
        lambda mod, a, kw, fn=fn: ((fn(a[0]),) + a[1:], kw) if a else (a, {**kw, "hidden_states": fn(kw["hidden_states"])}),
        with_kwargs=True) for m, fn in hooks]
    try:
        ref = fg.hf_run(hf, inputs)["logits"]
    finally:
        for h in handles:
            h.remove()
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4)


def test_gemma_sweep_equals_loop(tiny_gemma):
    model, _, make_batch, fg = tiny_gemma
    clean, cf = make_batch(0), make_batch(1)
    L = model.config.num_layers
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",)).cache["lm.resid_pre"])
    T = clean.input_ids.shape[1]
    index = np.stack([sj.swap_index(T, [(row[:3], row[-3:])])
                      for row in (np.flatnonzero(r == fg.IMG) for r in np.asarray(clean.input_ids))])
    tokens = np.array([3, 7, 9])
    readout = sj.Readout(position=sj.last_positions(clean.attention_mask), tokens=tokens)
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.arange(L),
                         index=np.broadcast_to(index, (L,) + index.shape), source=np.moveaxis(src, 1, 0))
    res = sj.patch_sweep(model, clean, [iv], readout, chunk_size=2)
    for layer in range(L):
        one = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=index, source=src[:, layer])
        logits = np.asarray(sj.forward(model, clean, interventions=[one]).logits)[:, -1]
        np.testing.assert_allclose(res.logits[layer], logits[:, tokens], atol=1e-5)
