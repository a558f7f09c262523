"""Qwen2.5-VL: our Flax port against transformers 5.23 (eager attention, float32), logits and every
site, on the tiny random checkpoints of tests/fixtures_qwen2_5_vl.py; bfloat16 against HF's own
bfloat16 error; the window layout against HF's; real-size parameter counts.

Images are chosen so that windowed attention matters: with 2 x 2-token windows, a 4 x 6-patch image
(2 x 3 tokens) has 2 windows, a 10 x 6-patch one (5 x 3 tokens) 6 windows of 4, 2 and 1 tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_qwen2_5_vl as f25
import fixtures_qwen2_vl as fq
import hf_reference as hr
from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.families.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig, window_layout

TOL = 1e-4  # max abs difference, float32

CASES = {
    "text_only": [[range(3, 20)]],
    "text_padded": [[range(3, 20)], [range(30, 39)]],
    "one_image": [[[5, 6, 7], fq.image(4, 6), [8, 9, 10, 11]]],
    "two_images": [[[5, 6], fq.image(4, 6), [7, 8, 9], fq.image(10, 6), [10, 11]]],
    # two left-padded prompts of different lengths, one image each, different (non-square) sizes
    "padded_batch": [[[5, 6, 7, 8, 9, 10, 11], fq.image(6, 4), [12, 13]],
                     [[5, 6], fq.image(4, 8), [14]]],
}
SITES = hr.LM_SITES + hr.VISION_SITES
_runs: dict = {}


def _run(ckpts, case: str, variant: str = "base"):
    """(inputs, ours, hf) for a case, computed once per module."""
    key = (case, variant)
    if key not in _runs:
        inputs = fq.make_inputs(CASES[case], seed=len(case))
        ours = hr.forward_sites(ckpts.model(variant), fq.to_batch(inputs), "pixel_values" in inputs)
        _runs[key] = (inputs, ours, f25.hf_run(ckpts.hf_model(variant), inputs))
    return _runs[key]


def _real(x: np.ndarray, mask: np.ndarray, layer_axis: bool = False) -> np.ndarray:
    m = mask.astype(bool)
    return np.moveaxis(x, 1, 0)[:, m] if layer_axis else x[m]


@pytest.mark.parametrize("variant", ["base", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(qwen2_5_vl_ckpts, case, variant):
    inputs, ours, ref = _run(qwen2_5_vl_ckpts, case, variant)
    assert ours["logits"].shape == ref["logits"].shape == (*inputs["input_ids"].shape, fq.VOCAB)
    a, b = _real(ours["logits"], inputs["attention_mask"]), _real(ref["logits"], inputs["attention_mask"])
    assert np.abs(b).max() > 1.0
    print(f"PARITY {case} {variant}: max|ours - HF| = {np.abs(a - b).max():.2e}, max|HF| = {np.abs(b).max():.2f}")
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("case", ["two_images", "padded_batch"])
def test_sites_match_hf(qwen2_5_vl_ckpts, case, site):
    inputs, ours, ref = _run(qwen2_5_vl_ckpts, case)
    cfg = qwen2_5_vl_ckpts.model().config
    got, want = ours[site], ref[site]
    N = int(inputs["image_grid_thw"].prod(-1).sum())
    if site == "vision.block_out":  # in the processor's patch order (f25.hf_run un-permutes HF's)
        assert got.shape == want.shape == (1, cfg.vision_depth, N, cfg.vision_dim)
    elif site == "vision.tokens":
        assert got.shape == want.shape == (1, N // 4, cfg.hidden_size)
    else:
        got, want = _real(got, inputs["attention_mask"], site != "lm.final"), \
            _real(want, inputs["attention_mask"], site != "lm.final")
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_window_layout_is_hfs():
    """Our windows are HF's get_vision_window_index: the same patch order and window sizes."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    grid = ((1, 4, 6), (1, 10, 6), (1, 8, 8), (1, 2, 14))
    order, sizes = window_layout(grid, 2, 2)
    np.testing.assert_array_equal(order, f25.hf_window_order(np.array(grid)))
    _, cu = get_vision_window_index(torch.tensor(grid), 2, f25.WINDOW_PX, fq.PATCH)
    np.testing.assert_array_equal(np.cumsum([0, *sizes]), cu.numpy())
    assert sizes[2:8] == [16, 8, 16, 8, 8, 4]  # the 10 x 6-patch image: windows of 4, 2, 4, 2, 2, 1 tokens


def test_windows_and_full_blocks_both_matter(qwen2_5_vl_ckpts):
    """The same weights with every block full-attention, or every block windowed, are far from HF:
    the parity above holds only with the windows and the full-attention block where HF has them."""
    inputs, ours, ref = _run(qwen2_5_vl_ckpts, "two_images")
    model = qwen2_5_vl_ckpts.model()
    for full in ((0, 1, 2), ()):
        cfg = dataclasses.replace(model.config, fullatt_block_indexes=full)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))))
        other = dataclasses.replace(model, config=cfg, graphdef=graphdef)
        logits = np.asarray(sj.forward(other, fq.to_batch(inputs)).logits)
        assert np.abs(logits - ref["logits"]).max() > 100 * TOL, full


def test_bfloat16_within_twice_hf_bf16_error(qwen2_5_vl_ckpts):
    """Our bf16 forward is no further from HF float32 than 2x HF's own bf16 forward is."""
    import torch

    worst = {}
    hf16 = f25.load_hf(qwen2_5_vl_ckpts.hf_dir(), dtype=torch.bfloat16)
    m16 = qwen2_5_vl_ckpts.model(dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(m16.params))
    for case in ("two_images", "padded_batch"):
        inputs, _, ref32 = _run(qwen2_5_vl_ckpts, case)
        real = inputs["attention_mask"].astype(bool)
        ours16 = np.asarray(sj.forward(m16, fq.to_batch(inputs)).logits)
        ref16 = f25.hf_run(hf16, inputs)["logits"]
        err, hf_err = (np.abs(x - ref32["logits"])[real].max() for x in (ours16, ref16))
        print(f"BF16 {case}: max|ours bf16 - HF f32| = {err:.3g}, max|HF bf16 - HF f32| = {hf_err:.3g}, "
              f"max|HF f32| = {np.abs(ref32['logits'][real]).max():.3g}")
        worst[case] = err / hf_err
        assert err <= 2.0 * hf_err, (case, err, hf_err)


def test_config_round_trip_and_hub_layout():
    """from_hf(to_hf(cfg)) == cfg; the hub's flat config.json layout reads the same as the nested one."""
    from transformers import Qwen2_5_VLConfig as HFConfig

    nested = f25.tiny_hf_config().to_dict()
    cfg = Qwen2_5_VLConfig.from_hf(nested)
    assert Qwen2_5_VLConfig.from_hf(cfg.to_hf()) == cfg
    assert HFConfig(**cfg.to_hf()).vision_config.fullatt_block_indexes == f25.FULLATT
    assert (cfg.window_tokens, cfg.fullatt_block_indexes, cfg.vision_mlp_dim) == (2, (1,), 80)
    hub = {**{k: v for k, v in nested.items() if k != "text_config"}, **nested["text_config"],
           "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 10000.0}
    hub.pop("rope_parameters")
    hub["vision_config"] = {**nested["vision_config"], "in_chans": 3}
    hub["vision_config"].pop("in_channels")
    assert Qwen2_5_VLConfig.from_hf(hub) == cfg
    with pytest.raises(ValueError, match="out_hidden_size"):
        Qwen2_5_VLConfig.from_hf({**nested, "vision_config": {**nested["vision_config"], "out_hidden_size": 32}})
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        Qwen2_5_VLConfig.from_hf({**nested, "vision_config": {**nested["vision_config"], "fullatt_block_indexes": [3]}})
