"""attribution_sweep (attribution patching): first order in alpha, exact on a linear segment,
equal to central finite differences at every kind of site, verify_top equal to patch_sweep for
the chosen variants, the same on a mesh."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import spatial_jax as sj
from spatial_jax import parallel
from spatial_jax.families.qwen2_vl.model import Qwen2VL
from test_sweep_device_resident import CFG, GRID, IMG, N_TOK, VE, VS  # the same tiny random Qwen2-VL

TOKENS = np.array([1, 2, 3])
B = 2


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(Qwen2VL(CFG, rngs=nnx.Rngs(3)))
    return sj.Model("qwen2_vl", CFG, graphdef, params, "float32", "")


def _batch(seed, rows=B):
    rng = np.random.default_rng(seed)
    ids = np.stack([[3 + r % 5, 4, VS] + [IMG] * N_TOK + [VE, 5 + r % 7, 6, 7] for r in range(rows)])
    pv = rng.standard_normal((rows * int(GRID.prod()), 1176)).astype(np.float32)
    return sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=np.repeat(GRID, rows, 0))


def _readout(batch):
    return sj.Readout(sj.last_positions(np.ones(np.shape(batch.input_ids))), TOKENS)


def _image_index(batch):
    ids = np.asarray(batch.input_ids)
    return np.where(ids == IMG, np.arange(ids.shape[1]), -1)


def _clean_logits(model, batch):
    logits = np.asarray(sj.forward(model, batch).logits)
    return logits[np.arange(B), _readout(batch).position][:, TOKENS]


def test_add_is_first_order_in_alpha(model):
    """An add of a fixed direction at alpha: the estimate's relative error against the exact
    change falls linearly with alpha (halving alpha halves it)."""
    clean = _batch(0)
    rng = np.random.default_rng(1)
    # the residual's own scale (embeddings of std 0.02), so that alpha sets the size of the change
    src = 0.02 * rng.standard_normal((B, clean.input_ids.shape[1], CFG.hidden_size)).astype(np.float32)
    alphas = np.array([0.4, 0.2, 0.1, 0.05], np.float32)
    iv = sj.Intervention(site="lm.resid_post", op="add", layer=np.full(4, 1), index=np.broadcast_to(
        _image_index(clean), (4, B, clean.input_ids.shape[1])), source=np.broadcast_to(src, (4,) + src.shape),
        alpha=alphas)
    est = sj.attribution_sweep(model, clean, [iv], _readout(clean))
    exact = sj.patch_sweep(model, clean, [iv], _readout(clean))
    change = exact.logits - est.clean
    err = np.abs(est.logits - exact.logits).max((1, 2)) / np.abs(change).max((1, 2))
    np.testing.assert_allclose(est.clean, _clean_logits(model, clean), atol=1e-5)
    ratios = err[:-1] / err[1:]
    assert np.all((ratios > 1.6) & (ratios < 2.5)), (err, ratios)
    assert err[-1] < 0.05, err


@pytest.mark.parametrize("op", ["replace", "add", "amplify"])
def test_linear_segment_is_exact(model, op):
    """At lm.final (after the final norm) the logits are linear in the activation and every op's
    change is linear in it: the estimate is the exact result, at any size of change."""
    clean = _batch(0)
    T, D = clean.input_ids.shape[1], CFG.hidden_size
    rng = np.random.default_rng(2)
    index = np.broadcast_to(np.arange(T), (3, B, T)).copy()
    index[1] = np.roll(index[1], 3, axis=-1)
    kw = dict(directions=np.broadcast_to(rng.standard_normal((D, 2)).astype(np.float32), (3, D, 2))) if op == "amplify" else dict(
        source=np.broadcast_to(rng.standard_normal((B, T, D)).astype(np.float32) * 3, (3, B, T, D)))
    iv = sj.Intervention(site="lm.final", op=op, layer=np.zeros(3, int), index=index, alpha=np.array([4.0, -2.0, 8.0], np.float32), **kw)
    est = sj.attribution_sweep(model, clean, [iv], _readout(clean))
    exact = sj.patch_sweep(model, clean, [iv], _readout(clean))
    assert np.abs(exact.logits - est.clean).max() > 0.1  # a real change
    np.testing.assert_allclose(est.logits, exact.logits, rtol=1e-4, atol=1e-4)


SITES = [("lm.resid_pre", 0, True), ("lm.attn_out", 2, True), ("lm.mlp_out", 1, True), ("lm.resid_post", 2, True),
         ("vision.tokens", 0, False), ("vision.block_out", 1, False)]


@pytest.mark.parametrize("site,layer,lm", SITES)
def test_estimate_equals_central_difference(model, site, layer, lm):
    """The estimate of an add of a random direction equals (y(+h) - y(-h)) / 2h from two exact
    patched runs at +-h, at every kind of site (the vision ones per batch row)."""
    clean = _batch(0)
    T = clean.input_ids.shape[1]
    rng = np.random.default_rng(3)
    if lm:
        index, shape = _image_index(clean), (B, T, CFG.hidden_size)
        index[1, 2] = 2  # a text token too, in one row only
    else:
        n = B * (N_TOK if site == "vision.tokens" else int(GRID.prod()))
        dim = CFG.hidden_size if site == "vision.tokens" else CFG.vision_dim
        index, shape = np.where(np.arange(n) % 3 != 1, np.arange(n), -1)[None], (1, n, dim)
    # the site's own scale, at least the LM residual's (random merger outputs are far smaller)
    scale = max(0.02, np.asarray(sj.forward(model, clean, cache=(site,), logits=False).cache[site]).std())
    src = scale * rng.standard_normal(shape).astype(np.float32)
    h = 1e-2

    def iv(alphas):
        k = len(alphas)
        return sj.Intervention(site=site, op="add", layer=np.full(k, layer), index=np.broadcast_to(index, (k,) + index.shape),
                               source=np.broadcast_to(src, (k,) + shape), alpha=np.asarray(alphas, np.float32))

    est = sj.attribution_sweep(model, clean, [iv([1.0])], _readout(clean))
    exact = sj.patch_sweep(model, clean, [iv([h, -h])], _readout(clean)).logits
    fd = (exact[0] - exact[1]) / (2 * h)
    assert np.abs(fd).max() > 1e-4  # a real change, far above float32 noise (~1e-5 here)
    np.testing.assert_allclose(est.logits[0] - est.clean, fd, rtol=2e-2, atol=2e-3 * np.abs(fd).max())


def _slot_replacements(model, clean, cf):
    """resid_pre replaced from the cf run at every layer, on two token sets: [L, 2] variants."""
    L, (rows, T) = CFG.num_layers, clean.input_ids.shape
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    img = _image_index(clean)
    masks = np.stack([img, np.where(np.arange(T) == T - 1, T - 1, -1)[None].repeat(rows, 0)])
    return sj.Intervention(site="lm.resid_pre", op="replace", layer=np.repeat(np.arange(L), 2).reshape(L, 2),
                           index=np.broadcast_to(masks, (L,) + masks.shape),
                           source=np.broadcast_to(np.moveaxis(src, 1, 0)[:, None], (L, 2) + src[:, 0].shape))


def test_replace_matches_its_direction_and_verify_top_equals_patch_sweep(model):
    """A replace is estimated as the add of (source - clean): equal to the central difference
    along that direction; verify_top picks each row's largest estimated effects and returns
    exactly patch_sweep's result for those variants."""
    clean, cf = _batch(0), _batch(1)
    iv = _slot_replacements(model, clean, cf)
    readout = _readout(clean)
    est = sj.attribution_sweep(model, clean, [iv], readout, verify_top=3)
    full = sj.patch_sweep(model, clean, [iv], readout)

    assert est.top.shape == (B, 3) and est.exact.logits.shape == (B, 3, len(TOKENS))
    flat_effect = est.effect.reshape(-1, B)
    for b in range(B):
        assert list(est.top[b]) == list(np.argsort(-flat_effect[:, b], kind="stable")[:3])
        at = np.unravel_index(est.top[b], est.effect.shape[:2])
        np.testing.assert_allclose(est.exact.logits[b], full.logits[at][:, b], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(est.exact.argmax[b], full.argmax[at][:, b])

    # the direction of variant (layer 2, image tokens): (cf - clean) at its tokens
    cache = sj.forward(model, clean, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"]
    delta = np.where(iv.index[2, 0][..., None] >= 0, iv.source[2, 0] - np.asarray(cache)[:, 2], 0)
    h = 1e-2
    add = sj.Intervention(site="lm.resid_pre", op="add", layer=np.full(2, 2), source=np.broadcast_to(delta, (2,) + delta.shape),
                          alpha=np.array([h, -h], np.float32))
    y = sj.patch_sweep(model, clean, [add], readout).logits
    np.testing.assert_allclose(est.logits[2, 0] - est.clean, (y[0] - y[1]) / (2 * h), rtol=2e-2,
                               atol=2e-3 * np.abs(y[0] - y[1]).max() / (2 * h))


def test_mesh_equals_one_device(model):
    """On 8 simulated devices (data:4, model:2) the estimate and the verified variants equal the
    one-device result, with AtP*'s QK-fix (span 2: the sweep has an lm.resid_post site) on the
    per-logit and the metric path. Each variant replaces resid_pre at its layer and resid_post at
    layer 2 (at the image tokens): the exactly run layers cover both for layers 1-3 and the
    'nowhere' slot, only resid_pre for layer 0 (resid_post 2 is then estimated first order at its own site)."""
    clean, cf = _batch(0, rows=4), _batch(1, rows=4)
    pre = _slot_replacements(model, clean, cf)  # [L, 2]
    L = CFG.num_layers
    slots = np.minimum(np.arange(L + 1), L - 1)  # + the 'nowhere' slot L (layer L)
    pre = dataclasses.replace(pre, layer=np.repeat(np.arange(L + 1), 2).reshape(L + 1, 2), index=pre.index[slots],
                              source=pre.source[slots])
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_post",), logits=False).cache["lm.resid_post"])[:, 2]
    # at the image tokens in both token sets (at the last token it would override the resid_pre
    # swaps of layers 0-2 there: tied effects, a top-k order decided by float noise)
    post = dataclasses.replace(pre, site="lm.resid_post", layer=np.full((L + 1, 2), 2), index=np.broadcast_to(
        pre.index[:, :1], pre.index.shape), source=np.broadcast_to(src, pre.source.shape))
    readout = _readout(clean)
    mesh = parallel.make_mesh("data:4,model:2")
    one = sj.attribution_sweep(model, clean, [pre, post], readout, verify_top=2, qk_fix=True)
    got = sj.attribution_sweep(model, clean, [pre, post], readout, verify_top=2, qk_fix=True, mesh=mesh)
    np.testing.assert_allclose(got.logits, one.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.top, one.top)
    np.testing.assert_allclose(got.exact.logits, one.exact.logits, rtol=1e-4, atol=1e-4)
    # the metric path on the mesh against the chain rule of the one-device per-logit estimate
    # (what it equals on one device, test_metric_is_the_chain_rule_of_the_per_logit_estimate)
    got_m = sj.attribution_sweep(model, clean, [pre, post], readout, metric=_odds, qk_fix=True, mesh=mesh)
    grad = np.asarray(jax.vmap(jax.grad(lambda y: _odds(y[None])[0]))(one.clean))  # [B, K]
    chain = np.einsum("...bk,bk->...b", one.logits - one.clean, grad)
    assert np.abs(chain).max() > 1e-2
    np.testing.assert_allclose(got_m.metric_change, chain, rtol=1e-4, atol=1e-5 * np.abs(chain).max())
    assert jax.device_count() == 8


def _odds(y):
    """A nonlinear metric of the read logits [B, K] -> [B]: log(e^y0 + e^y1) - y2."""
    return jax.nn.logsumexp(y[:, :2], axis=-1) - y[:, 2]


def test_metric_is_the_chain_rule_of_the_per_logit_estimate(model):
    """One backward through metric(read logits) gives, for every variant, the gradient of the
    metric at the clean logits times the per-logit path's estimated change; verify_top then
    ranks by |metric change|."""
    clean, cf = _batch(0), _batch(1)
    iv = _slot_replacements(model, clean, cf)
    readout = _readout(clean)
    per_logit = sj.attribution_sweep(model, clean, [iv], readout)
    est = sj.attribution_sweep(model, clean, [iv], readout, metric=_odds, verify_top=2)
    assert est.logits is None and est.metric_change.shape == per_logit.effect.shape
    np.testing.assert_allclose(est.clean, per_logit.clean, atol=1e-6)
    np.testing.assert_allclose(est.metric_clean, np.asarray(_odds(per_logit.clean)), atol=1e-5)
    grad = np.asarray(jax.vmap(jax.grad(lambda y: _odds(y[None])[0]))(per_logit.clean))  # [B, K]
    chain = np.einsum("...bk,bk->...b", per_logit.logits - per_logit.clean, grad)
    assert np.abs(chain).max() > 1e-3
    np.testing.assert_allclose(est.metric_change, chain, rtol=1e-4, atol=1e-5 * np.abs(chain).max())
    np.testing.assert_array_equal(est.effect, np.abs(est.metric_change))
    flat = est.effect.reshape(-1, B)
    for b in range(B):
        assert list(est.top[b]) == list(np.argsort(-flat[:, b], kind="stable")[:2])


def test_metric_equals_central_difference(model):
    """The metric path's estimate of an add equals (m(+h) - m(-h)) / 2h of the metric of two
    exact patched runs."""
    clean = _batch(0)
    T = clean.input_ids.shape[1]
    src = 0.02 * np.random.default_rng(4).standard_normal((B, T, CFG.hidden_size)).astype(np.float32)
    h = 1e-2

    def iv(alphas):
        k = len(alphas)
        return sj.Intervention(site="lm.resid_pre", op="add", layer=np.full(k, 1), source=np.broadcast_to(src, (k,) + src.shape),
                               index=np.broadcast_to(_image_index(clean), (k, B, T)), alpha=np.asarray(alphas, np.float32))

    est = sj.attribution_sweep(model, clean, [iv([1.0])], _readout(clean), metric=_odds)
    y = sj.patch_sweep(model, clean, [iv([h, -h])], _readout(clean)).logits
    fd = (np.asarray(_odds(y[0])) - np.asarray(_odds(y[1]))) / (2 * h)
    assert np.abs(fd).max() > 1e-4
    np.testing.assert_allclose(est.metric_change[0], fd, rtol=2e-2, atol=2e-3 * np.abs(fd).max())


def test_linear_metric_of_linear_segment_is_exact(model):
    """A linear metric of the logits, patched at lm.final (where the logits are linear in the
    activation): the metric path's estimate is the exact change of the metric."""
    clean = _batch(0)
    T, D = clean.input_ids.shape[1], CFG.hidden_size
    rng = np.random.default_rng(5)
    w = rng.standard_normal(len(TOKENS)).astype(np.float32)
    iv = sj.Intervention(site="lm.final", op="replace", layer=np.zeros(2, int),
                         index=np.broadcast_to(np.arange(T), (2, B, T)),
                         source=rng.standard_normal((2, B, T, D)).astype(np.float32) * 3)
    est = sj.attribution_sweep(model, clean, [iv], _readout(clean), metric=lambda y: y @ w)
    exact = sj.patch_sweep(model, clean, [iv], _readout(clean)).logits @ w - est.metric_clean
    assert np.abs(exact).max() > 0.1
    np.testing.assert_allclose(est.metric_change, exact, rtol=1e-4, atol=1e-4)
