"""AtP*'s fixes in attribution_sweep: qk_fix is exact where everything after the exactly run
layers is linear (and plain AtP is not); grad_drop's score equals its definition computed by
brute force (central differences of exact runs with one layer's contributions frozen)."""
import jax
import numpy as np
import pytest
from flax import nnx

import spatial_jax as sj
from spatial_jax.families.qwen2_vl.model import Qwen2VL
from test_attribution import B, TOKENS, _batch, _image_index, _readout, model  # noqa: F401 (fixture)
from test_sweep_device_resident import CFG

LINEAR_EPS = 1e10  # the final RMSNorm's eps: x * rsqrt(mean x^2 + eps) is then x / 1e5 to ~1e-10


@pytest.fixture(scope="module")
def linear_tail():
    """The tiny model with its final norm made linear (a huge eps, the scale raised to match):
    after the last layer's output the read logits are linear in the residual."""
    module = Qwen2VL(CFG, rngs=nnx.Rngs(3))
    module.norm.eps = LINEAR_EPS
    module.norm.scale[...] = module.norm.scale[...] * np.sqrt(LINEAR_EPS)
    graphdef, params = nnx.split(module)
    return sj.Model("qwen2_vl", CFG, graphdef, params, "float32", "")


def _from_cf(model, clean, cf, site, layers, scale=1.0):
    """Replaces of `site` at `layers` (one variant each) with the cf run's values (times scale)
    at the image tokens."""
    src = scale * np.asarray(sj.forward(model, cf, cache=(site,), logits=False).cache[site])  # [B, L, T, ...]
    n, T = len(layers), clean.input_ids.shape[1]
    return sj.Intervention(site=site, op="replace", layer=np.asarray(layers),
                           index=np.broadcast_to(_image_index(clean), (n, B, T)),
                           source=np.stack([src[:, l] for l in layers]))


@pytest.mark.parametrize("site,layers,scale", [("lm.resid_pre", [3], 1), ("lm.attn_k", [3], 100), ("lm.resid_post", [2, 3], 1)])
def test_qk_fix_is_exact_when_the_rest_is_linear(linear_tail, site, layers, scale):
    """Whole-region replaces from another image at the last layer's input or keys (one layer run
    exactly) and at the last two layers' outputs (two layers: the change reaches the next
    attention; the random model's keys scaled up, so that the softmax moves): with the final norm linear, the QK-fixed estimate is the exact patch; the plain
    first-order estimate is far off."""
    clean, cf = _batch(0), _batch(1)
    iv = _from_cf(linear_tail, clean, cf, site, layers, scale)
    readout = _readout(clean)
    exact = sj.patch_sweep(linear_tail, clean, [iv], readout).logits
    fixed = sj.attribution_sweep(linear_tail, clean, [iv], readout, qk_fix=True)
    plain = sj.attribution_sweep(linear_tail, clean, [iv], readout)
    change = np.abs(exact - fixed.clean).max()
    assert change > 1e-4  # far above float32 noise at these logits (~1e-7)
    np.testing.assert_allclose(fixed.logits, exact, rtol=1e-4, atol=1e-4 * change)
    if site != "lm.resid_post" or layers[0] < 3:  # the last layer's output: no attention after it
        assert np.abs(plain.logits - exact).max() > 0.05 * change


def test_qk_fix_metric_path_and_later_interventions(linear_tail):
    """With a metric and a variant whose second intervention lies after the exactly run layer:
    that one is estimated first order at its own site (lm.final: exact there), the sum is exact."""
    clean, cf = _batch(0), _batch(1)
    first = _from_cf(linear_tail, clean, cf, "lm.resid_pre", [3, 3])
    T, D = clean.input_ids.shape[1], CFG.hidden_size
    final = sj.Intervention(site="lm.final", op="add", layer=np.zeros(2, int), alpha=np.array([0.0, 1.0], np.float32),
                            source=np.random.default_rng(6).standard_normal((2, B, T, D)).astype(np.float32))
    metric = lambda y: y[:, 0] - y[:, 1]  # noqa: E731
    readout = _readout(clean)
    exact = sj.patch_sweep(linear_tail, clean, [first, final], readout).logits
    est = sj.attribution_sweep(linear_tail, clean, [first, final], readout, metric=metric, qk_fix=True)
    want = np.asarray(metric(exact.reshape(-1, len(TOKENS)))).reshape(2, B) - est.metric_clean
    assert np.abs(want[1] - want[0]).max() > 1e-3  # the lm.final add counts
    np.testing.assert_allclose(est.metric_change, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_grad_drop_equals_brute_force(model):
    """GradDrop's score of an add at each layer's input: sum over dropped layers d of |the
    metric's directional derivative with layer d's attn_out and mlp_out frozen at their clean
    values| / (L - 1), the derivatives from exact runs at +-h (patch_sweep with the freeze as base)."""
    clean = _batch(0)
    L, T, D = CFG.num_layers, clean.input_ids.shape[1], CFG.hidden_size
    src = 0.02 * np.random.default_rng(7).standard_normal((B, T, D)).astype(np.float32)
    metric = lambda y: y[:, 0] - y[:, 1]  # noqa: E731
    readout = _readout(clean)

    def adds(alphas):
        k = len(alphas) * L
        return sj.Intervention(site="lm.resid_pre", op="add", layer=np.repeat(np.arange(L), len(alphas)),
                               index=np.broadcast_to(_image_index(clean), (k, B, T)), source=np.broadcast_to(src, (k, B, T, D)),
                               alpha=np.tile(np.asarray(alphas, np.float32), L))

    est = sj.attribution_sweep(model, clean, [adds([1.0])], readout, metric=metric, grad_drop=True)
    plain = sj.attribution_sweep(model, clean, [adds([1.0])], readout, metric=metric)
    cache = sj.forward(model, clean, cache=("lm.attn_out", "lm.mlp_out"), logits=False).cache
    h, total = 1e-2, 0.0
    for d in range(L):
        freeze = [sj.Intervention(site=s, op="replace", layer=d, index=np.broadcast_to(np.arange(T), (B, T)),
                                  source=np.asarray(cache[s])[:, d]) for s in ("lm.attn_out", "lm.mlp_out")]
        y = sj.patch_sweep(model, clean, [adds([h, -h])], readout, base=freeze).logits  # [2L, B, K]
        m = np.asarray(metric(y.reshape(-1, len(TOKENS)))).reshape(L, 2, B)
        total = total + np.abs((m[:, 0] - m[:, 1]) / (2 * h))
    brute = total / (L - 1)
    assert brute.min() > 1e-4
    np.testing.assert_allclose(est.effect, brute, rtol=3e-2, atol=3e-3 * brute.max())
    np.testing.assert_allclose(est.metric_change, plain.metric_change, rtol=1e-5, atol=1e-6)  # the estimate stays AtP
    assert np.abs(est.effect - np.abs(plain.metric_change) * L / (L - 1)).max() > 0.05 * brute.max()  # drops matter
