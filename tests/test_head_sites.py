"""Head-level sites (lm.attn_q/k/v/z, lm.attn_pattern) on every family against transformers'
hooks, head-masked patches against the same patches done with hooks on HF's model, the ops on
[B, T, H, hd], and the sweep engine over heads against a loop of forwards.

HF's side (hr.hf_head_run): forward hooks on self_attn.q_proj/k_proj/v_proj outputs, a forward
pre-hook on o_proj (its input), and output_attentions (eager) for the pattern.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_gemma3 as fg
import fixtures_pixtral as fp
import fixtures_qwen2_vl as fq
import hf_reference as hr
from fixtures_gemma3 import gemma3_ckpts  # noqa: F401  (session fixture)
from fixtures_pixtral import pixtral_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.interventions.taps import Taps
from spatial_jax.runner import run_layers

CACHE_TOL = 1e-5  # max abs difference of cached values, float32
PATCH_TOL = 1e-4  # max abs difference of patched logits, float32
FAMILIES = ("qwen2_vl", "gemma3", "pixtral")
SITES = hr.HEAD_SITES + ("lm.attn_pattern",)


class Family:
    """A tiny checkpoint of one family: our model, HF's (eager), and two left-padded rows with an
    image each whose counterfactual differs in its pixels only (seed)."""

    def __init__(self, request, name: str):
        if name == "qwen2_vl":
            ckpts = request.getfixturevalue("qwen2_vl_ckpts")
            self.model, self.hf = ckpts.model("untied"), ckpts.hf_model("untied")
            self.img, self.fixtures = fq.IMAGE_PAD, fq
            self.prompts = [[[5, 6], fq.image(4, 4), [7]], [[8], fq.image(4, 4), [9, 10, 11]]]
        elif name == "gemma3":
            ckpts = request.getfixturevalue("gemma3_ckpts")
            self.model, self.hf = ckpts.model(), ckpts.hf_model()
            self.img, self.fixtures = fg.IMG, fg
            self.prompts = [[[12, 13], fg.IMAGE, [14]], [[15], fg.IMAGE, [16, 17, 18]]]
        else:
            ckpts = request.getfixturevalue("pixtral_ckpts")
            self.model, self.hf = ckpts.model(), ckpts.hf_model()
            self.img, self.fixtures = fp.IMG, fp
            self.prompts = [[[16], (32, 48), [17, 18]], [[19, 20, 21], (32, 48), [22]]]

    def inputs(self, seed: int) -> dict[str, np.ndarray]:
        return self.fixtures.make_inputs(self.prompts, seed=seed)

    def batch(self, seed: int):
        return self.fixtures.to_batch(self.inputs(seed))

    def counterfactual(self) -> tuple[dict, dict]:
        """(ours, HF's) head sites on the seed-1 inputs, every site and layer (hr.hf_head_run's
        layout), run once per family and module."""
        key = self.model.path
        if key not in _counterfactuals:
            out = sj.forward(self.model, self.batch(1), cache=SITES)
            ours = {"logits": np.asarray(out.logits), **{k: np.asarray(v) for k, v in out.cache.items()}}
            _counterfactuals[key] = ours, hr.hf_head_run(self.hf, self.inputs(1))
        return _counterfactuals[key]


_counterfactuals: dict = {}


@pytest.fixture(params=FAMILIES)
def family(request) -> Family:
    return Family(request, request.param)


def torch_head_replace(index: np.ndarray, source: np.ndarray, head_mask: np.ndarray):
    """The hook-side head patch: a projection's output / o_proj's input h [B, T, H * hd] -> h with
    head j of token t replaced by source[b, index[b, t], j] where index >= 0 and head_mask[j]."""
    import torch

    H, hd = source.shape[-2:]
    src = torch.tensor(np.maximum(index, 0))[..., None, None].expand(-1, -1, H, hd)
    sel = torch.tensor(index >= 0)[..., None, None] & torch.tensor(head_mask)[:, None]
    source = torch.tensor(np.asarray(source))

    def fn(h):
        B, T, _ = h.shape
        return torch.where(sel, torch.gather(source, 1, src), h.view(B, T, H, hd)).reshape(B, T, H * hd)
    return fn


def test_cached_head_sites_equal_hf_hooks(family):
    """q/k/v: the projections' outputs split into heads (Gemma 3: before q_norm/k_norm), z: o_proj's
    input, pattern: HF's eager attention weights; every layer, padding rows included."""
    ours, ref = family.counterfactual()
    cfg = family.model.config
    B, T = family.inputs(1)["input_ids"].shape
    L, H, Hkv, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"lm.attn_q": (B, L, T, H, hd), "lm.attn_k": (B, L, T, Hkv, hd), "lm.attn_v": (B, L, T, Hkv, hd),
              "lm.attn_z": (B, L, T, H, hd), "lm.attn_pattern": (B, L, H, T, T)}
    for site in SITES:
        assert ours[site].shape == shapes[site], (site, ours[site].shape)
        np.testing.assert_allclose(ours[site], ref[site], rtol=0, atol=CACHE_TOL, err_msg=site)
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=PATCH_TOL)


def _image_reversed(ids: np.ndarray, img: int) -> np.ndarray:
    """[B, T] source map: each row's image tokens read in reverse order, the rest kept."""
    index = np.full(ids.shape, -1)
    for b, row in enumerate(ids):
        at = np.flatnonzero(row == img)
        index[b, at] = at[::-1]
    return index


@pytest.mark.parametrize("site", ["lm.attn_z", "lm.attn_v"])
def test_one_head_patch_equals_hf_hook(family, site):
    """One head of lm.attn_z (query head 1) or one KV head of lm.attn_v (KV head 1, read by every
    query head of its group) at layer 1, replaced at the image tokens (in reverse order) by the
    counterfactual's: our logits equal HF's with the same patch as a hook (o_proj pre-hook /
    v_proj forward hook), the source taken from each side's own counterfactual run."""
    model, hf = family.model, family.hf
    clean = family.inputs(0)
    layer, head = 1, 1
    index = _image_reversed(clean["input_ids"], family.img)
    ours_cf, hf_cf = family.counterfactual()
    mask = np.arange(ours_cf[site].shape[-2]) == head
    iv = sj.Intervention(site=site, op="replace", layer=layer, source=ours_cf[site][:, layer], index=index,
                         head_mask=mask)
    ours = np.asarray(sj.forward(model, family.batch(0), interventions=[iv]).logits)

    attn = hf.model.language_model.layers[layer].self_attn
    hook = (attn.o_proj, "pre") if site == "lm.attn_z" else (attn.v_proj, "post")
    ref = hr.hf_head_run(hf, clean, hooks=[(*hook, torch_head_replace(index, hf_cf[site][:, layer], mask))])["logits"]
    assert np.abs(ref - hr.hf_head_run(hf, clean)["logits"]).max() > 1e-2  # the patch changes the output
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PATCH_TOL)


def test_kv_head_patch_changes_exactly_its_query_group(request):
    """GQA: replacing KV head j of lm.attn_v changes the outputs (lm.attn_z) of query heads
    j * G .. j * G + G - 1 at that layer and leaves the other query heads as they were."""
    fam = Family(request, "gemma3")
    cfg = fam.model.config
    G = cfg.num_heads // cfg.num_kv_heads
    layer = 2
    cf = fam.counterfactual()[0]["lm.attn_v"]
    clean = sj.forward(fam.model, fam.batch(0), cache=("lm.attn_z",), logits=False).cache
    assert set(clean) == {"lm.attn_z"}  # a site is cached only when asked for
    clean = np.asarray(clean["lm.attn_z"])
    for j in range(cfg.num_kv_heads):
        iv = sj.Intervention(site="lm.attn_v", op="replace", layer=layer, source=cf[:, layer],
                             head_mask=np.arange(cfg.num_kv_heads) == j)
        z = np.asarray(sj.forward(fam.model, fam.batch(0), cache=("lm.attn_z",), interventions=[iv],
                                  logits=False).cache["lm.attn_z"])[:, layer]
        changed = np.abs(z - clean[:, layer]).max(axis=(0, 1, 3))  # per query head
        group = np.arange(cfg.num_heads) // G == j
        assert (changed[group] > 1e-3).all(), (j, changed)
        assert (changed[~group] == 0).all(), (j, changed)


def test_ops_on_heads_follow_their_formulas(request):
    """replace / add / amplify at a head site act on [B, T, H, hd] per token and head: the cached
    value after the intervention (the site records what the ops leave) equals the formula on the
    clean value, only at the chosen tokens and heads. add takes a per-token [H, hd] vector;
    amplify's directions [hd, K] act in each chosen head's own space."""
    fam = Family(request, "qwen2_vl")
    cfg = fam.model.config
    batch = fam.batch(0)
    B, T = np.shape(batch.input_ids)
    H, hd, layer = cfg.num_heads, cfg.head_dim, 1
    rng = np.random.default_rng(0)
    index = np.where(rng.random((B, T)) < 0.5, rng.integers(0, T, (B, T)), -1)
    chosen = (index >= 0)[..., None, None]
    clean = np.asarray(sj.forward(fam.model, batch, cache=("lm.attn_q",), logits=False).cache["lm.attn_q"][:, layer])
    source = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    vector = rng.standard_normal((H, hd)).astype(np.float32)
    W = rng.standard_normal((hd, 2)).astype(np.float32)
    gathered = np.take_along_axis(source, np.maximum(index, 0)[..., None, None], axis=1)
    amplified = clean + 3.0 * (clean @ W / (np.sum(W * W, 0) + 1e-8)) @ W.T
    # One op per head (disjoint head masks, one forward): each head's value is its op's formula.
    cases = [(dict(op="replace", source=source), gathered),
             (dict(op="add", source=source, alpha=0.5), clean + 0.5 * gathered),
             (dict(op="add", source=vector, alpha=-2.0), clean - 2.0 * vector),
             (dict(op="amplify", directions=W, alpha=3.0), amplified)]
    assert len(cases) == H
    ivs = [sj.Intervention(site="lm.attn_q", layer=layer, index=index, head_mask=np.arange(H) == j, **fields)
           for j, (fields, _) in enumerate(cases)]
    got = np.asarray(sj.forward(fam.model, batch, cache=("lm.attn_q",), interventions=ivs,
                                logits=False).cache["lm.attn_q"][:, layer])
    for j, (fields, changed) in enumerate(cases):
        want = np.where(chosen, changed, clean)[:, :, j]
        np.testing.assert_allclose(got[:, :, j], want, rtol=0, atol=1e-5, err_msg=fields["op"])


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_head_sweep_equals_loop(request, name):
    """patch_sweep with head-masked variants at every head site (q: add, k: amplify, v and z:
    replace from the counterfactual) at the first, a middle and the last layer (computed at the
    read rows only), over token maps that start early (Gemma 3: inside the image, where a k/v change
    reaches earlier image queries) or late (a restart with the clean prefix's keys and values):
    equal to one forward per variant."""
    fam = Family(request, name)
    model, batch = fam.model, fam.batch(0)
    cfg = model.config
    L, H, Hkv, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T = np.shape(batch.input_ids)
    read = sj.last_positions(batch.with_defaults().attention_mask)
    cf = fam.counterfactual()[0]
    rng = np.random.default_rng(3)
    # Variant i patches site site_of[i] (0..3: q, k, v, z) at layers[i], its other sites at
    # layer L (nowhere); even variants act in the image, odd ones at the last 3 positions. Each
    # (start layer, computed rows) group holds one variant: two compiled shapes in all.
    site_of = np.array([3, 1, 2, 0, 1, 3])
    layers = np.array([1, 0, L - 1, L - 1, 0, 1])
    n = len(layers)
    ids = np.asarray(batch.input_ids)
    late = np.where(np.arange(T) >= T - 3, rng.integers(0, T, (B, T)), -1)  # includes the read positions
    image = np.where(ids == fam.img, np.roll(np.arange(T), 1), -1)
    index = np.stack([late if i % 2 else image for i in range(n)])
    index[2, np.arange(B), read] = read  # acts at the read position of the last layer

    def at(site_id):
        return np.where(site_of == site_id, layers, L)

    def one_hot(heads):
        return np.arange(heads)[None] == rng.integers(0, heads, n)[:, None]

    take = lambda site: cf[site][:, np.minimum(layers, L - 1)].swapaxes(0, 1)  # [n, B, T, H, hd]
    ivs = [sj.Intervention(site="lm.attn_q", op="add", layer=at(0), index=index, head_mask=one_hot(H),
                           source=rng.standard_normal((n, H, hd)).astype(np.float32), alpha=np.full(n, 2.0)),
           sj.Intervention(site="lm.attn_k", op="amplify", layer=at(1), index=index, head_mask=one_hot(Hkv),
                           directions=rng.standard_normal((n, hd, 2)).astype(np.float32), alpha=np.full(n, 3.0)),
           sj.Intervention(site="lm.attn_v", op="replace", layer=at(2), index=index, head_mask=one_hot(Hkv),
                           source=take("lm.attn_v")),
           sj.Intervention(site="lm.attn_z", op="replace", layer=at(3), index=index, head_mask=one_hot(H),
                           source=take("lm.attn_z"))]
    tokens = np.array([3, 7, 9])
    res = sj.patch_sweep(model, batch, ivs, sj.Readout(read, tokens))

    def forward(i, layer=None):  # variant i alone (at `layer` if given), read at `read`
        one = [jax.tree.map(lambda a: a[i] if np.ndim(a) else a, iv) for iv in ivs]
        one = one if layer is None else [dataclasses.replace(iv, layer=layer) for iv in one]
        return np.asarray(sj.forward(model, batch, interventions=one).logits)[np.arange(B), read]

    clean = forward(0, layer=np.int64(L))[:, tokens]  # the dtype of the variants' layers: one compile
    moved = 0
    for i in range(n):
        logits = forward(i)
        np.testing.assert_allclose(res.logits[i], logits[:, tokens], rtol=0, atol=1e-5, err_msg=f"variant {i}")
        np.testing.assert_array_equal(res.argmax[i], logits.argmax(-1))
        moved += np.abs(logits[:, tokens] - clean).max() > 1e-3
    assert moved >= n - 1, moved  # the variants do change the readout


def test_a_run_that_computes_some_rows_refuses_to_cache_head_sites(request):
    """The last layer computes only the read rows' queries: caching a head site there is refused
    with a clear error rather than returning part of the layer."""
    fam = Family(request, "qwen2_vl")
    module = nnx.merge(fam.model.graphdef, fam.model.params)
    B, T = np.shape(fam.batch(0).input_ids)
    x = np.zeros((B, T, fam.model.config.hidden_size), np.float32)
    for site in SITES:
        with pytest.raises(ValueError, match="cached only by a run from layer 0 that computes every row"):
            run_layers(module.layers, x, None, Taps(cache=(site,)), rows=np.full((B, 1), T - 1))
