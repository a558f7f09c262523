"""The weakened organism (spatial_jax/organism/weaken.py) and the validation table's amplification
rows (experiments/validation.py) on hand-made inputs, and the shipped weakened organism."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from experiments import validation
from spatial_jax.organism import weaken

D, F = 12, 7


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(D, F)), rng.normal(size=D)
    basis = np.linalg.qr(rng.normal(size=(D, 3)))[0]
    return w, b, basis, rng.normal(size=D), rng.normal(size=(F, 20))


@pytest.mark.parametrize("centred", [False, True])
def test_scale_layout_scales_the_subspace_component_and_keeps_the_rest(centred):
    w, b, basis, mean, x = _layer()
    y = w @ x + b[:, None]
    new_w, new_b = weaken.scale_layout(w, b, basis, mean if centred else None, 0.3)
    got = new_w @ x + new_b[:, None]
    p = basis @ basis.T
    ref = mean[:, None] if centred else 0
    np.testing.assert_allclose(p @ (got - ref), 0.3 * p @ (y - ref), atol=1e-10)
    np.testing.assert_allclose(got - p @ got, y - p @ y, atol=1e-10)
    if not centred:  # amplifying the projection by 1/s - 1 (the experiment's op) undoes the edit
        np.testing.assert_allclose(got + (1 / 0.3 - 1) * p @ got, y, atol=1e-10)


def test_layout_subspace_spans_the_strip_codes():
    rng = np.random.default_rng(1)
    n_tok, codes = 9, rng.normal(size=(2, 3, D))  # per axis, a code per strip
    strips = tuple(np.arange(k * 3, k * 3 + 3) for k in range(3))
    items = [types.SimpleNamespace(horizontal=h, regions=types.SimpleNamespace(strips=strips))
             for h in (True, False) * 10]
    tokens = np.stack([np.concatenate([np.repeat(codes[0 if it.horizontal else 1, k][None], 3, 0) for k in range(3)])
                       + 5.0 for it in items])  # the same offset everywhere: not layout
    assert tokens.shape == (20, n_tok, D)
    basis, mean = weaken.layout_subspace(tokens, items)
    assert basis.shape == (D, 4)
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-10)
    for axis in range(2):
        centred = codes[axis] - codes[axis].mean(0)
        np.testing.assert_allclose(basis @ (basis.T @ centred.T), centred.T, atol=1e-8)
    np.testing.assert_allclose(mean, tokens.reshape(-1, D).mean(0))


def _part(n, golden, probe, random):
    return {"n": n, "golden": golden, "failures": n - golden,  # oracle curves: not read by these rows
            "Probe": {"fixed_by_alpha": probe, "oracle_by_alpha": probe},
            "Random": {"fixed_by_alpha": random, "oracle_by_alpha": random}, "alpha0_replay": {"n": n - golden, "mismatches": 0}}


def test_validation_reads_amplification_fix_rates_at_each_datasets_best_alpha(tmp_path):
    # squares: 10 failures; the best Probe alpha over both axes is 2 (3 + 4 = 7 fixed), Random's 1 (1)
    # shapes: 5 failures; Probe's best alpha 1 (4 fixed), Random's 2 (1)
    parts = {"squares|horizontal": _part(20, 14, [0, 1, 3], [0, 1, 0]),
             "squares|vertical": _part(20, 16, [0, 2, 4], [0, 0, 0]),
             "shapes|horizontal": _part(10, 5, [0, 4, 2], [0, 0, 1]),
             "shapes|vertical": {"n": 10, "golden": 10, "failures": 0}}
    (tmp_path / "amplification").mkdir()
    (tmp_path / "amplification" / "results.json").write_text(json.dumps({"parts": parts}))
    assert validation.MEASURES["amplification: Probe"](str(tmp_path)) == pytest.approx((7 + 4) / 15)
    assert validation.MEASURES["amplification: Random"](str(tmp_path)) == pytest.approx((1 + 1) / 15)
    assert validation.MEASURES["amplification: alpha=0"](str(tmp_path)) == 0
    parts["shapes|horizontal"]["Random"]["fixed_by_alpha"][0] = 2
    (tmp_path / "amplification" / "results.json").write_text(json.dumps({"parts": parts}))
    assert validation.MEASURES["amplification: alpha=0"](str(tmp_path)) == pytest.approx(2 / 15)


WEAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                    "organism_vision_strip_weak")


@pytest.mark.skipif(not os.path.isdir(WEAK), reason="weakened organism not shipped")
def test_shipped_weak_variant_is_its_source_with_one_layer_edited_and_answers_as_recorded():
    from safetensors.numpy import load_file

    import spatial_jax as sj
    from spatial_jax.organism import checkpoint

    meta = checkpoint.read_meta(WEAK)["weakened"]
    source, weak = load_file(os.path.join(meta["source"], "model.safetensors")), load_file(os.path.join(WEAK, "model.safetensors"))
    assert set(source) == set(weak)
    edited = {k for k in source if not np.array_equal(source[k], weak[k])}
    assert edited == {f"{weaken.MERGER_OUT}.weight", f"{weaken.MERGER_OUT}.bias"}
    model = sj.load(WEAK)
    accs = {name: checkpoint.accuracy(model, items) for name, items in checkpoint.held_out_items(WEAK, "test").items()}
    for name, acc in accs.items():
        assert abs(acc - meta["test"][name]) <= 0.05, (name, acc)
    assert 0.5 <= np.mean(list(accs.values())) <= 0.8  # weakened: failures left to fix, far above chance
