"""Linear probes: recovery of planted directions, vmapped == looped training, group splits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_jax import probes as pr
from spatial_jax.interventions import ops


def _planted(rng, n, d, sep, n_classes=3, noise=1.0):
    """Classes 0..C-1 at offsets (k - (C-1)/2) * sep along a random unit u, plus N(0, noise^2)."""
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, n_classes, n)
    x = noise * rng.standard_normal((n, d)) + sep * (y - (n_classes - 1) / 2)[:, None] * u
    return x.astype(np.float32), y.astype(np.int32), u


def _cos(a, b):
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_recovers_planted_direction():
    rng = np.random.default_rng(0)
    x, y, u = _planted(rng, 3000, 64, sep=6.0)
    groups = np.arange(len(y)) // 5  # 5 "tokens" per "image"
    train = pr.split_by_group(groups, 0.25, seed=0)
    # The paper's 200 full-batch epochs at lr 1e-3 move each weight by at most ~0.2 (Adam), too
    # little for unit-scale toy features (the middle class needs a bias gap of ~|w| * sep / 2);
    # lr 1e-2 gives the same 200-step recipe the room to converge on this toy problem.
    probes, losses = pr.train_probes(x, y, train, 3, lr=1e-2, return_losses=True)
    assert probes.w.shape == (64, 3) and probes.b.shape == (3,) and losses.shape == (200,)
    assert float(losses[-1]) < 0.5 * float(losses[0])
    acc = float(pr.accuracy(probes, x, y, ~train))
    assert acc > 0.95, acc
    w = np.asarray(pr.class_directions(probes))
    wc = w - w.mean(axis=1, keepdims=True)  # centre across classes
    top = np.linalg.svd(wc)[0][:, 0]
    assert _cos(top, u) > 0.9
    assert _cos(wc[:, 2] - wc[:, 0], u) > 0.9  # the outer classes' directions oppose along u


def test_default_recipe_two_class():
    """The paper's defaults (lr 1e-3, wd 1e-4, 200 epochs, randn/sqrt(D) init) on a 2-class
    (left vs right, §6) problem."""
    rng = np.random.default_rng(1)
    x, y, u = _planted(rng, 1000, 128, sep=10.0, n_classes=2)
    train = pr.split_by_group(np.arange(len(y)) // 4)
    probes = pr.train_probes(x, y, train, 2)
    assert float(pr.accuracy(probes, x, y, ~train)) > 0.95
    w = np.asarray(probes.w)
    assert _cos(w[:, 1] - w[:, 0], u) > 0.5


def _probe_set(rng, p, n, d, c):
    """P probes with their own activations, labels and numbers of examples (padded to n)."""
    xs, ys, masks = [], [], []
    for i in range(p):
        xi, yi, _ = _planted(rng, n, d, sep=2.0 + i, n_classes=c)
        valid = np.arange(n) < n - 37 * i  # probe i has n - 37 i real examples
        xi[~valid] = 1e3 * rng.standard_normal((int((~valid).sum()), d))  # garbage padding
        yi[~valid] = -5
        train = valid & pr.split_by_group(np.arange(n) // 3, seed=i)
        xs.append(xi), ys.append(yi), masks.append(train)
    return np.stack(xs), np.stack(ys), np.stack(masks)


def test_vmapped_equals_loop():
    rng = np.random.default_rng(2)
    x, y, m = _probe_set(rng, 6, 240, 32, 3)
    seeds = np.array([0, 0, 1, 2, 3, 4])
    kw = dict(epochs=60, lr=3e-3, weight_decay=1e-2)
    # chunk=None: one vmapped call (batched matmuls, the accelerator path)
    probes, losses = pr.train_probes(x, y, m, 3, seed=seeds, chunk=None, return_losses=True, **kw)
    assert probes.w.shape == (6, 32, 3) and probes.b.shape == (6, 3) and losses.shape == (6, 60)
    for i in range(6):
        one, loss_i = pr.train_probes(x[i], y[i], m[i], 3, seed=int(seeds[i]), return_losses=True, **kw)
        np.testing.assert_allclose(probes.w[i], one.w, atol=1e-5, rtol=0)
        np.testing.assert_allclose(probes.b[i], one.b, atol=1e-5, rtol=0)
        np.testing.assert_allclose(losses[i], loss_i, atol=1e-5, rtol=1e-5)
    # padding is ignored: the most padded probe, trained on its real examples only
    keep = y[5] >= 0
    alone = pr.train_probes(x[5][keep], y[5][keep], m[5][keep], 3, seed=int(seeds[5]), **kw)
    np.testing.assert_allclose(probes.w[5], alone.w, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probes.b[5], alone.b, atol=1e-5, rtol=0)
    # chunk=1 (a scan over probes inside the same compiled call: the CPU default) agrees too;
    # chunk=K > 1 (lax.map of K-probe vmaps) is checked by benchmarks/bench_probes.py
    other = pr.train_probes(x, y, m, 3, seed=seeds, chunk=1, **kw)
    np.testing.assert_allclose(other.w, probes.w, atol=1e-5, rtol=0)
    np.testing.assert_allclose(other.b, probes.b, atol=1e-5, rtol=0)


def test_shared_activations_broadcast():
    """x [L, 1, N, D] x token-group masks [G, N] x labels [N] -> L x G probes, x never copied;
    equal to training each probe alone, with the layer axis scanned (CPU default) or vmapped."""
    rng = np.random.default_rng(3)
    L, G, N, D = 3, 2, 200, 16
    x = rng.standard_normal((L, 1, N, D)).astype(np.float32)
    y = rng.integers(0, 3, N).astype(np.int32)
    x[..., :3] += 3.0 * np.eye(3, dtype=np.float32)[y]  # class k lifts feature k
    groups = rng.random((G, N)) < 0.6
    train = groups & pr.split_by_group(np.arange(N) // 4)
    kw = dict(epochs=40, lr=1e-2)
    shared = pr.train_probes(x, y, train, 3, **kw)
    assert shared.shape == (L, G) and shared.w.shape == (L, G, D, 3)
    vmapped = pr.train_probes(x, y, train, 3, chunk=None, **kw)  # vmapped over layers as well
    np.testing.assert_allclose(vmapped.w, shared.w, atol=1e-5, rtol=0)
    for l in range(L):
        for g in range(G):
            one = pr.train_probes(x[l, 0], y, train[g], 3, **kw)
            np.testing.assert_allclose(shared[l, g].w, one.w, atol=1e-5, rtol=0)
            np.testing.assert_allclose(shared[l, g].b, one.b, atol=1e-5, rtol=0)
    acc = pr.accuracy(shared, x, y, groups & ~train)
    assert acc.shape == (L, G) and np.all(np.asarray(acc) > 0.6)


def test_new_hyperparameters_do_not_recompile():
    rng = np.random.default_rng(4)
    x, y, _ = _planted(rng, 64, 8, 2.0)
    m = np.ones(64, bool)
    pr.train_probes(x, y, m, 3, epochs=5, lr=1e-3, weight_decay=1e-4, seed=0)
    size = pr.train_probes._cache_size()
    pr.train_probes(x, y, m, 3, epochs=5, lr=5e-3, weight_decay=0.1, seed=7)
    assert pr.train_probes._cache_size() == size


def test_standardize_is_affine_invariant():
    """With standardize=True the probe trains in standardised coordinates and is folded back:
    per-feature rescaled and shifted activations give the same logits on the same examples."""
    rng = np.random.default_rng(5)
    x, y, _ = _planted(rng, 300, 16, 3.0)
    scale = np.exp(rng.uniform(-3, 3, 16)).astype(np.float32)
    shift = rng.uniform(-20, 20, 16).astype(np.float32)
    x2 = x * scale + shift
    train = pr.split_by_group(np.arange(300) // 3)
    p1 = pr.train_probes(x, y, train, 3, standardize=True, epochs=50)
    p2 = pr.train_probes(x2, y, train, 3, standardize=True, epochs=50)
    # float32 cancellation in the folded bias (features up to ~400 in x2) bounds the agreement
    np.testing.assert_allclose(pr.logits(p1, x), pr.logits(p2, x2), atol=2e-2, rtol=0)
    top2 = np.sort(np.asarray(pr.logits(p1, x)), axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # predictions agree wherever the margin is not tiny
    np.testing.assert_array_equal(np.asarray(pr.predict(p1, x))[clear], np.asarray(pr.predict(p2, x2))[clear])
    # the default (faithful) path does not standardise: the same data gives different probes
    q1 = pr.train_probes(x, y, train, 3, epochs=50)
    q2 = pr.train_probes(x2, y, train, 3, epochs=50)
    assert not np.allclose(pr.logits(q1, x), pr.logits(q2, x2), atol=1e-2)


def test_predict_proba_on_all_tokens():
    rng = np.random.default_rng(6)
    L, G, N, M, D = 2, 3, 120, 50, 8
    x = rng.standard_normal((L, 1, N, D)).astype(np.float32)
    y = rng.integers(0, 3, N)
    probes = pr.train_probes(x, y, np.ones((G, N), bool), 3, epochs=10)
    tokens = 10.0 * rng.standard_normal((L, 1, M, D)).astype(np.float32)  # every token, per layer
    prob = np.asarray(pr.predict_proba(probes, tokens))
    assert prob.shape == (L, G, M, 3)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
    assert np.all(prob >= 0)
    np.testing.assert_array_equal(pr.predict(probes, tokens), prob.argmax(-1))
    # one probe on shared tokens [M, D]
    one = np.asarray(pr.predict_proba(probes[1, 2], tokens[1, 0]))
    np.testing.assert_allclose(one, prob[1, 2], atol=1e-6)


def test_class_directions_feed_amplify():
    rng = np.random.default_rng(7)
    x, y, u = _planted(rng, 400, 32, 4.0, n_classes=2)
    probes = pr.train_probes(x, y, np.ones(400, bool), 2, lr=1e-2)
    dirs = pr.class_directions(probes)
    assert dirs.shape == (32, 2)
    h = jnp.asarray(x[None, :10])  # [B=1, T=10, D]
    iv = ops.Intervention(site="lm.resid_pre", op="amplify", layer=0, directions=dirs, alpha=4.0)
    out = np.asarray(ops.apply(h, iv, 0))[0]
    w = np.asarray(dirs)
    coeff = x[:10] @ w / (np.sum(w * w, 0) + 1e-8)
    np.testing.assert_allclose(out, x[:10] + 4.0 * coeff @ w.T, atol=1e-4)
    r = pr.random_directions(jax.random.key(0), 32, 2)
    np.testing.assert_allclose(np.linalg.norm(r, axis=0), 1.0, atol=1e-6)


def test_split_by_group():
    rng = np.random.default_rng(8)
    groups = rng.integers(0, 120, 2000)
    groups[:120] = np.arange(120)  # every one of the 120 images present
    train = pr.split_by_group(groups, 0.25, seed=0)
    assert train.shape == (2000,) and train.dtype == bool
    for g in range(120):  # never on both sides
        sides = set(train[groups == g].tolist())
        assert len(sides) == 1
    assert len(np.unique(groups[~train])) == 30 and len(np.unique(groups[train])) == 90  # 90/30
    np.testing.assert_array_equal(train, pr.split_by_group(groups, 0.25, seed=0))  # deterministic
    assert not np.array_equal(train, pr.split_by_group(groups, 0.25, seed=1))
    perm = rng.permutation(2000)  # independent of the order of the examples
    np.testing.assert_array_equal(pr.split_by_group(groups[perm], 0.25, seed=0), train[perm])
    names = np.array([f"img_{g:04d}" for g in groups])  # string ids work too
    by_name = pr.split_by_group(names, 0.25, seed=0)
    assert len(np.unique(names[~by_name])) == 30
    assert pr.split_by_group(np.arange(20), 0.05).sum() == 19  # the §6 95/5 split
    assert pr.split_by_group(np.array([3, 3, 4, 4]), 0.25).sum() == 2  # >= 1 group each side
    with pytest.raises(ValueError):
        pr.split_by_group(np.zeros((2, 3)))


def test_matches_torch_adamw_recipe():
    """The same probe trained the paper's way in PyTorch (nn.Linear, CrossEntropyLoss, AdamW lr
    1e-3, wd 1e-4, full batch) from the same initial weights ends at the same weights."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x, y, _ = _planted(rng, 300, 32, 3.0)
    train = pr.split_by_group(np.arange(300) // 3)
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 3)
    init = pr.Probes(lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train]).long()
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt), yt).backward()
        opt.step()
    ours = pr.train_probes(x, y, train, 3, init_params=init)
    np.testing.assert_allclose(ours.w, lin.weight.detach().numpy().T, atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours.b, lin.bias.detach().numpy(), atol=2e-5, rtol=0)
