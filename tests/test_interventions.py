"""The intervention engine: ops, taps, sweeps, and equality with PyTorch forward hooks on HF."""
import tracemalloc

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2VLForConditionalGeneration

import spatial_jax as sj
from spatial_jax.convert.export import export_hf
from spatial_jax.forward import _apply_jit
from spatial_jax.sweeps import sweep as sweep_mod
from spatial_jax.sweeps.sweep import _restart_points_jit, _variants_jit
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig

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

    def sweep(layers, maps):
        n = len(layers)
        iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.broadcast_to(layers[:, None], (n, 2)),
                             index=np.broadcast_to(maps[None], (n,) + maps.shape),
                             source=np.broadcast_to(np.moveaxis(src[:, layers], 1, 0)[:, None], (n, 2) + src[:, 0].shape))
        return sj.patch_sweep(model, clean, [iv], readout, chunk_size=3)

    res = sweep(np.arange(L), maps)
    assert res.logits.shape == (L, 2, 2, 3) and res.argmax.shape == (L, 2, 2)
    for layer in range(L):
        for r in range(2):
            iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=maps[r], source=src[:, layer])
            logits = np.asarray(sj.forward(model, clean, interventions=[iv]).logits)[:, -1]
            np.testing.assert_allclose(res.logits[layer, r], np.take_along_axis(logits, tokens, -1), atol=1e-5)
            np.testing.assert_array_equal(res.argmax[layer, r], logits.argmax(-1))
    compiled = _variants_jit._cache_size(), _restart_points_jit._cache_size()
    other_maps = np.stack([np.stack([sj.swap_index(T, [(grid[0], grid[1])])] * 2), maps[0]])
    sweep(np.array([3, 1, 0, 2]), other_maps)  # other layers, order, chunk split and token maps
    assert (_variants_jit._cache_size(), _restart_points_jit._cache_size()) == compiled
    # forward: a new layer value or token map reuses the compiled function too
    before = _apply_jit._cache_size()
    for layer in (0, 3):
        sj.forward(model, clean, interventions=[sj.Intervention(site="lm.resid_pre", op="replace", layer=layer,
                                                                 index=maps[layer % 2], source=src[:, layer])])
    assert _apply_jit._cache_size() == before  # this structure was compiled by the loop above


def test_paper_sweeps_equal_hand_built_patches_at_every_slot(tiny):
    """Every slot of both paper sweeps equals sj.forward with the replacement built by hand: slot
    s < L replaces lm.resid_pre of layer s, slot L lm.resid_post of layer L - 1, with the cf run's
    values there; region swaps also under interventions on the clean and the cf runs (Fig. 9)."""
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    L, D = model.config.num_layers, model.config.hidden_size
    B, T = clean.input_ids.shape
    tokens = np.array([1, 2, 3, 4, 5])
    rng = np.random.default_rng(4)
    # A non-idempotent op on the clean runs (add) at a slot's layer, an ablation on the cf run.
    clean_ivs = [sj.Intervention(site="lm.resid_pre", op="add", layer=1, alpha=2.0,
                                 source=rng.standard_normal(D).astype(np.float32),
                                 index=sj.mask_index(clean.input_ids == IMG))]
    cf_ivs = [sj.Intervention(site="vision.tokens", op="replace", source=np.zeros((1, 2 * N_TOK, D), np.float32),
                              index=np.where(np.arange(2 * N_TOK) < 3, np.arange(2 * N_TOK), -1)[None])]
    grid = np.arange(N_TOK).reshape(2, 3) + 3
    swaps = np.stack([np.stack([sj.swap_index(T, [(grid[:, 0], grid[:, 2])])] * 2),
                      np.stack([sj.swap_index(T, [(grid[0], grid[1])]), sj.swap_index(T, [(grid[:, 1], grid[:, 2])])])])

    def by_hand(index, source_ivs=(), base=()):
        """[L+1, B, V] last-token logits of the clean run patched at each slot by hand."""
        cache = sj.forward(model, cf, cache=("lm.resid_pre", "lm.resid_post"), interventions=source_ivs,
                           logits=False).cache
        out = []
        for s in range(L + 1):
            site, layer = ("lm.resid_pre", s) if s < L else ("lm.resid_post", L - 1)
            iv = sj.Intervention(site=site, op="replace", layer=layer, index=index, source=cache[site][:, layer])
            out.append(np.asarray(sj.forward(model, clean, interventions=[*base, iv]).logits)[:, -1])
        return np.stack(out)

    last = np.full((B, T), -1)
    last[:, T - 1] = T - 1
    res = sj.last_token_sweep(model, clean, cf, tokens)
    want = by_hand(last)
    np.testing.assert_allclose(res.logits, want[..., tokens], atol=1e-5)
    np.testing.assert_array_equal(res.argmax, want.argmax(-1))

    res = sj.region_swap_sweep(model, clean, cf, swaps, tokens, clean_interventions=clean_ivs,
                               cf_interventions=cf_ivs)
    assert res.logits.shape == (L + 1, 2, B, 5)
    for r in range(2):
        want = by_hand(swaps[r], cf_ivs, clean_ivs)
        np.testing.assert_allclose(res.logits[:, r], want[..., tokens], atol=1e-5)
        np.testing.assert_allclose(res.probs[:, r], np.asarray(jax.nn.softmax(want))[..., tokens], atol=1e-6)
        np.testing.assert_array_equal(res.argmax[:, r], want.argmax(-1))


def test_vision_site_sweep_equals_loop_and_new_masks_do_not_recompile(tiny):
    model, _ = tiny
    b = _batch(0)
    n_tok, n_patch, n = 2 * N_TOK, 2 * int(GRID.prod()), 5
    rng = np.random.default_rng(3)
    blk_src = rng.standard_normal((1, n_patch, 32)).astype(np.float32)
    tok_src = rng.standard_normal((1, n_tok, 48)).astype(np.float32)
    tokens = np.array([7, 8, 9])
    readout = sj.Readout(sj.last_positions(np.ones(b.input_ids.shape)), tokens)

    def sweep(seed):
        """n variants: a block_out patch at a random block and mask, and a vision.tokens patch."""
        r = np.random.default_rng(seed)
        layers = r.integers(0, 2, n)
        blk_index = np.asarray(sj.mask_index(r.random((n, 1, n_patch)) < 0.3))
        tok_index = np.asarray(sj.mask_index(r.random((n, 1, n_tok)) < 0.5))
        ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=layers, index=blk_index,
                               source=np.broadcast_to(blk_src, (n,) + blk_src.shape)),
               sj.Intervention(site="vision.tokens", op="replace", index=tok_index,
                               source=np.broadcast_to(tok_src, (n,) + tok_src.shape))]
        return sj.patch_sweep(model, b, ivs, readout, chunk_size=2), layers, blk_index, tok_index

    res, layers, blk_index, tok_index = sweep(0)
    for i in range(n):
        ivs = [sj.Intervention(site="vision.block_out", op="replace", layer=int(layers[i]), source=blk_src,
                               index=blk_index[i]),
               sj.Intervention(site="vision.tokens", op="replace", source=tok_src, index=tok_index[i])]
        logits = np.asarray(sj.forward(model, b, interventions=ivs).logits)[:, -1]
        np.testing.assert_allclose(res.logits[i], logits[:, tokens], atol=1e-5)
        np.testing.assert_array_equal(res.argmax[i], logits.argmax(-1))
    compiled = _variants_jit._cache_size()
    sweep(1)  # other blocks and masks
    assert _variants_jit._cache_size() == compiled


def _family(request, family):
    """(model, clean batch, cf batch, image-token mask [B, T], the clean rows' last positions [B])
    of a tiny model of `family`."""
    if family == "qwen2_vl":
        model, _ = request.getfixturevalue("tiny")
        clean, cf, img = _batch(0), _batch(1), IMG
    else:
        model, _, make_batch, fg = request.getfixturevalue("tiny_gemma")
        clean, cf, img = make_batch(0), make_batch(1), fg.IMG
    read = sj.last_positions(clean.with_defaults().attention_mask)
    return model, clean, cf, np.asarray(clean.input_ids) == img, read


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_sweep_applies_base_interventions_once(request, family):
    """Non-idempotent bases (add, amplify) at lm.resid_pre of a variant's restart layer, at its
    later sites and at vision.tokens, with variants at that layer and at every other: the sweep
    equals the loop of forwards with the bases first (a restart must not re-apply them)."""
    model, clean, cf, at_img, read = _family(request, family)
    L, D = model.config.num_layers, model.config.hidden_size
    rng = np.random.default_rng(5)
    v = rng.standard_normal((3, D)).astype(np.float32)
    W = rng.standard_normal((D, 2)).astype(np.float32)
    img = sj.mask_index(at_img)
    base = [sj.Intervention(site="vision.tokens", op="add", source=v[0], alpha=0.5),
            sj.Intervention(site="lm.resid_pre", op="add", layer=1, source=v[1], alpha=2.0, index=img),
            sj.Intervention(site="lm.resid_pre", op="amplify", layer=2, directions=W, alpha=3.0, index=img),
            sj.Intervention(site="lm.attn_out", op="add", layer=1, source=v[2]),
            sj.Intervention(site="lm.resid_post", op="amplify", layer=2, directions=W, alpha=-0.5)]
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    half = np.where(at_img & (np.cumsum(at_img, axis=1) % 2 == 0), np.arange(at_img.shape[1]), -1)
    variants = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.arange(L),
                               index=np.broadcast_to(half, (L,) + half.shape), source=np.moveaxis(src, 1, 0))
    tokens = np.array([3, 7, 9])
    res = sj.patch_sweep(model, clean, [variants], sj.Readout(read, tokens), base=base, chunk_size=1)
    for layer in range(L):
        one = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=half, source=src[:, layer])
        logits = np.asarray(sj.forward(model, clean, interventions=[*base, one]).logits)
        logits = logits[np.arange(len(read)), read]
        np.testing.assert_allclose(res.logits[layer], logits[:, tokens], atol=1e-5, err_msg=f"layer {layer}")
        np.testing.assert_array_equal(res.argmax[layer], logits.argmax(-1))


def _assert_equals_loop(model, batch, ivs, res, read, tokens, base=()):
    """Variant i of a sweep result equals one forward with the i-th slice of every intervention
    (after `base`), read at positions `read` [B]."""
    for i in range(res.logits.shape[0]):
        one = [jax.tree.map(lambda a: a[i] if np.ndim(a) else a, iv) for iv in ivs]
        logits = np.asarray(sj.forward(model, batch, interventions=[*base, *one]).logits)[np.arange(len(read)), read]
        np.testing.assert_allclose(res.logits[i], logits[:, tokens], atol=1e-5, err_msg=f"variant {i}")
        np.testing.assert_array_equal(res.argmax[i], logits.argmax(-1))


def _spy_variant_calls(monkeypatch) -> list[dict]:
    """Records each compiled variant call of patch_sweep: its start layer, number of variants and
    x_start shape."""
    calls = []

    def spy(graphdef, params, batch, x_start, start, ivs, *rest):
        calls.append(dict(start=int(start), n=len(ivs[0].layer), x_start=np.shape(x_start)))
        return _variants_jit(graphdef, params, batch, x_start, start, ivs, *rest)

    monkeypatch.setattr(sweep_mod, "_variants_jit", spy)
    return calls


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_sweep_at_the_last_layer_and_final_equals_loop(request, family):
    """A sweep computes the last layer at the read positions only: variants at that layer's
    attn_out / mlp_out / resid_post and at lm.final, with token maps that include the read
    position, exclude it or point it elsewhere, equal the loop of full forwards."""
    model, clean, cf, at_img, read = _family(request, family)
    L, D = model.config.num_layers, model.config.hidden_size
    B, T = at_img.shape
    rng = np.random.default_rng(8)
    n = 4
    index = np.where(rng.random((n, B, T)) < 0.5, rng.integers(0, T, (n, B, T)), -1)
    index[0, np.arange(B), read] = read  # variant 0 acts at the read position, 1 reads it from elsewhere,
    index[1, np.arange(B), read] = 0  # 2 leaves it (and acts elsewhere), 3 is random
    index[2, np.arange(B), read] = -1
    src = rng.standard_normal((n, B, T, D)).astype(np.float32)
    W = rng.standard_normal((n, D, 2)).astype(np.float32)
    layers = np.array([L - 1, L - 1, L - 1, L - 2])
    ivs = [sj.Intervention(site="lm.attn_out", op="add", layer=layers, index=index, source=src, alpha=np.full(n, 0.7)),
           sj.Intervention(site="lm.mlp_out", op="replace", layer=layers, index=index[::-1], source=src[::-1]),
           sj.Intervention(site="lm.resid_post", op="amplify", layer=layers, directions=W, alpha=np.full(n, 2.0)),
           sj.Intervention(site="lm.final", op="add", index=index[[1, 2, 3, 0]], source=src, alpha=np.full(n, -1.5))]
    tokens = np.array([3, 7, 9])
    res = sj.patch_sweep(model, clean, ivs, sj.Readout(read, tokens), chunk_size=2)
    _assert_equals_loop(model, clean, ivs, res, read, tokens)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_sweep_computes_only_the_changed_positions(request, family, monkeypatch):
    """Variants that patch the last 3 positions only (at attn_out, mlp_out and resid_pre of
    several layers) restart with positions T - 4..T - 1 (T - P = 3 rounded up to 4), the prefix's
    keys and values from the clean run, under base interventions that do act on the prefix:
    equal to the loop of full forwards."""
    model, clean, cf, at_img, read = _family(request, family)
    L, D = model.config.num_layers, model.config.hidden_size
    B, T = at_img.shape
    rng = np.random.default_rng(9)
    n = 3
    index = np.full((n, B, T), -1)
    index[:, :, T - 3:] = rng.integers(0, T, (n, B, 3))
    src = rng.standard_normal((n, B, T, D)).astype(np.float32)
    layers = np.array([0, 1, L - 2])
    base = [sj.Intervention(site="lm.resid_pre", op="add", layer=1, source=rng.standard_normal(D).astype(np.float32),
                            index=np.where(np.arange(T) < 4, np.arange(T), -1)[None].repeat(B, 0)),
            sj.Intervention(site="lm.attn_out", op="amplify", layer=0, alpha=2.0,
                            directions=rng.standard_normal((D, 2)).astype(np.float32))]
    ivs = [sj.Intervention(site="lm.attn_out", op="add", layer=layers, index=index, source=src, alpha=np.full(n, 0.5)),
           sj.Intervention(site="lm.resid_pre", op="replace", layer=layers + 1, index=index[::-1], source=src[::-1]),
           sj.Intervention(site="lm.mlp_out", op="replace", layer=layers, index=index, source=src[[1, 2, 0]])]
    tokens = np.array([3, 7, 9])
    calls = _spy_variant_calls(monkeypatch)
    res = sj.patch_sweep(model, clean, ivs, sj.Readout(read, tokens), base=base, chunk_size=2)
    assert calls and all(c["x_start"] == (B, 4, D) for c in calls)
    _assert_equals_loop(model, clean, ivs, res, read, tokens, base)


def test_each_variant_computes_from_its_own_first_changed_position(tiny, monkeypatch):
    """Variants at one start layer whose patches begin at different positions run in separate
    calls, each with its own unchanged prefix (a last-token patch: one position; an image swap:
    every position from the image on, bucketed), and equal the loop of full forwards."""
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    B, T = clean.input_ids.shape
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    grid = np.arange(N_TOK).reshape(2, 3) + 3
    last = np.where(np.arange(T) == T - 1, T - 1, -1)
    index = np.stack([np.broadcast_to(last, (B, T)), np.broadcast_to(sj.swap_index(T, [(grid[:, 0], grid[:, 2])]), (B, T)),
                      np.broadcast_to(last, (B, T))])
    layers = np.array([1, 1, 2])
    ivs = [sj.Intervention(site="lm.resid_pre", op="replace", layer=layers, index=index,
                           source=np.moveaxis(src[:, layers], 1, 0))]
    read, tokens = sj.last_positions(np.ones((B, T))), np.array([3, 7, 9])
    calls = _spy_variant_calls(monkeypatch)
    res = sj.patch_sweep(model, clean, ivs, sj.Readout(read, tokens), chunk_size=4)
    assert sorted((c["start"], c["n"], c["x_start"][1]) for c in calls) == [(1, 1, 1), (1, 1, T), (2, 1, 1)]
    _assert_equals_loop(model, clean, ivs, res, read, tokens)
    calls.clear()  # exact rows: the swap changes positions 3.. (T - 3 of them), not rounded up to T
    exact = sj.patch_sweep(model, clean, ivs, sj.Readout(read, tokens), chunk_size=4, row_quantum=1)
    assert sorted(c["x_start"][1] for c in calls) == [1, 1, T - 3]
    np.testing.assert_allclose(exact.logits, res.logits, atol=1e-5)


def test_row_buckets():
    """Computed positions: powers of two up to ROW_QUANTUM, then its multiples, at most T."""
    q = sweep_mod.ROW_QUANTUM
    rows = np.array([1, 2, 3, q - 1, q, q + 1, 6 * q + 4, 11 * q - 1, 11 * q])
    np.testing.assert_array_equal(sweep_mod._row_bucket(rows, 11 * q - 8),
                                  [1, 2, 4, q, q, 2 * q, 7 * q, 11 * q - 8, 11 * q - 8])
    np.testing.assert_array_equal(sweep_mod._row_bucket(np.array([1, 3, 5, 100, 161]), 176, quantum=176),
                                  [1, 4, 8, 128, 176])  # powers of two only
    np.testing.assert_array_equal(sweep_mod._row_bucket(np.array([1, 3, 5, 100]), 176, quantum=1), [1, 3, 5, 100])


def test_gemma_sweep_recomputes_image_tokens_before_a_patched_one(tiny_gemma, monkeypatch):
    """Gemma 3's image tokens attend to each other both ways, so a patch at an image's last token
    changes the tokens before it too: the computed positions must start at the image block (the
    first that can read a patched token), not just before the patched token."""
    model, _, make_batch, fg = tiny_gemma
    clean = make_batch(0)
    at_img = np.asarray(clean.input_ids) == fg.IMG
    B, T = at_img.shape
    last_img = T - 1 - np.argmax(at_img[:, ::-1], axis=1)
    index = np.full((2, B, T), -1)
    index[:, np.arange(B), last_img] = last_img
    src = np.random.default_rng(10).standard_normal((2, B, T, model.config.hidden_size)).astype(np.float32)
    ivs = [sj.Intervention(site="lm.resid_pre", op="replace", layer=np.array([0, 1]), index=index, source=src)]
    read, tokens = sj.last_positions(clean.attention_mask), np.array([3, 7, 9])
    calls = _spy_variant_calls(monkeypatch)
    res = sj.patch_sweep(model, clean, ivs, sj.Readout(read, tokens), chunk_size=2)
    assert all(T - c["x_start"][1] <= np.argmax(at_img, axis=1).min() for c in calls)
    _assert_equals_loop(model, clean, ivs, res, read, tokens)


def test_region_swap_sweep_runs_the_clean_run_once_and_pads_nothing(tiny, monkeypatch):
    """Every slot in one patch_sweep: one clean run, then per start layer exactly its variants
    (R per layer; the last layer also restarts slot L's R), none padded to the chunk size."""
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    L, R = model.config.num_layers, 2
    T = clean.input_ids.shape[1]
    grid = np.arange(N_TOK).reshape(2, 3) + 3
    swaps = np.stack([np.stack([sj.swap_index(T, [(grid[:, 0], grid[:, 2])])] * 2)] * R)
    restarts = []

    def spy_restart(*args):
        restarts.append(1)
        return _restart_points_jit(*args)

    calls = _spy_variant_calls(monkeypatch)
    monkeypatch.setattr(sweep_mod, "_restart_points_jit", spy_restart)
    sj.region_swap_sweep(model, clean, cf, swaps, np.array([1, 2]), chunk_size=64)
    assert len(restarts) == 1
    assert [(c["start"], c["n"]) for c in calls] == [(s, R) for s in range(L - 1)] + [(L - 1, 2 * R)]


def test_automatic_chunks_equal_one_variant_per_call(tiny, monkeypatch):
    """A memory budget of three to four variants' worth splits each start-layer group of five
    into calls of three and two (a group's remainder runs at the next power of two, not padded
    to the chunk), with the same results as one variant per call."""
    model, _ = tiny
    clean, cf = _batch(0), _batch(1)
    B, T = clean.input_ids.shape
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    layers, R = np.array([1, 3]), 5
    at_img = clean.input_ids == IMG
    masks = np.asarray(sj.mask_index(at_img & (np.random.default_rng(6).random((R, B, T)) < 0.5)))
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.broadcast_to(layers[:, None], (2, R)),
                         index=np.broadcast_to(masks, (2, R, B, T)),
                         source=np.broadcast_to(np.moveaxis(src[:, layers], 1, 0)[:, None], (2, R, B, T, src.shape[-1])))
    readout = sj.Readout(sj.last_positions(np.ones((B, T))), np.array([[1, 2, 3], [4, 5, 6]]))
    budget = 3.5 * sweep_mod.variant_bytes(model, clean, [jax.tree.map(np.asarray, iv)], 2 * R)
    calls = _spy_variant_calls(monkeypatch)
    auto = sj.patch_sweep(model, clean, [iv], readout, memory_budget_bytes=budget)
    assert [c["n"] for c in calls] == [3, 2] * 2  # per layer: 3 + 2
    one = sj.patch_sweep(model, clean, [iv], readout, chunk_size=1)
    np.testing.assert_allclose(auto.logits, one.logits, atol=1e-6)
    np.testing.assert_allclose(auto.probs, one.probs, atol=1e-6)
    np.testing.assert_array_equal(auto.argmax, one.argmax)


def test_sweep_holds_a_shared_source_once(tiny):
    """Sources [4, B, S, D] broadcast over 8 index maps (a 4 x 8 sweep, as the paper sweeps lay
    out layers x regions) are gathered per chunk, never materialised as 32 copies: the sweep's host
    memory peak stays within a few chunks, and the results equal those of materialised sources."""
    model, _ = tiny
    clean = _batch(0)
    B, T = clean.input_ids.shape
    shape, chunk, S = (4, 8), 4, 4096
    rng = np.random.default_rng(7)
    sources = rng.standard_normal((shape[0], B, S, model.config.hidden_size)).astype(np.float32)
    shared = np.broadcast_to(sources[:, None], shape + sources.shape[1:])
    index = np.broadcast_to(rng.integers(-1, S, (shape[1], B, T)), shape + (B, T))
    readout = sj.Readout(sj.last_positions(np.ones((B, T))), np.array([1, 2]))

    def sweep(source):
        iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.full(shape, 2), source=source, index=index)
        return sj.patch_sweep(model, clean, [iv], readout, chunk_size=chunk)

    want = sweep(np.array(shared))  # also compiles, outside the measurement
    tracemalloc.start()
    try:
        got = sweep(shared)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one = sources[0].nbytes
    # 32 materialised copies would be >= 32 sources; a chunk's gathers stay near 3 chunks (in the full
    # suite after the device-resident change: 12.05, alone: below 12; BUILD_NOTES "Test suite")
    assert peak < 4 * chunk * one, f"host peak {peak / 2**20:.1f} MiB; one source {one / 2**20:.1f} MiB"
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(got.argmax, want.argmax)


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
