"""Qwen2.5-VL's geometry, prompt style and sharding rules: Qwen2-VL's canvas (12 x 12 tokens of
28 px), the "anchor" COCO prompts, and a rule for every parameter (the vision blocks' gated MLP
split over `model`), under which a sharded forward equals the single-device one."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_qwen2_vl as fq
from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax import parallel
from spatial_jax.data.geometry import get_geometry
from spatial_jax import families
from spatial_jax.data.prompts import MODEL_PROMPT_STYLES
from spatial_jax.families.qwen2_5_vl.rules import SHARDING_RULES
from spatial_jax.parallel import rules
from spatial_jax.tree_paths import flatten_paths


def test_geometry_and_prompt_style():
    g = get_geometry("qwen2_5_vl")
    assert dataclasses.replace(g, name="qwen2_vl") == get_geometry("qwen2_vl")
    assert (g.n_tokens, g.token_px, g.object_tokens, g.spacing, g.grid_rounding) == (12, 28, 2, 2, "round")
    assert g.strip_widths() == (4, 4, 4)
    assert MODEL_PROMPT_STYLES["qwen2_5_vl"] == "anchor"
    assert families.get("qwen2_5_vl").geometry is g  # registered by the family


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_every_param_has_a_rule_and_sharded_forward_equals_single(qwen2_5_vl_ckpts):
    single = qwen2_5_vl_ckpts.model()
    assert rules.unmatched(nnx.to_pure_dict(single.params), SHARDING_RULES) == []
    assert families.get("qwen2_5_vl").sharding_rules is SHARDING_RULES
    mesh = parallel.make_mesh("data:2,model:4")
    model = sj.load(qwen2_5_vl_ckpts.hf_dir(), mesh=mesh)
    local = {p: tuple(x.addressable_shards[0].data.shape) for p, x in flatten_paths(nnx.to_pure_dict(model.params)).items()}
    # vision Dv 48, MLP 80, 3 blocks; model = 4
    assert local["vision/blocks/gate/kernel"] == local["vision/blocks/up/kernel"] == (3, 48, 20)
    assert local["vision/blocks/gate/bias"] == (3, 20)
    assert local["vision/blocks/down/kernel"] == (3, 20, 48)
    assert local["vision/blocks/down/bias"] == (3, 48)
    assert local["vision/blocks/qkv/kernel"] == (3, 48, 144)  # fused qkv replicated
    assert local["layers/q/kernel"] == (3, 64, 16)
    batch = fq.to_batch(fq.make_inputs([[[5, 6], fq.image(6, 6), [7]], [[8], fq.image(4, 6), [9, 10]]], seed=1))
    want = np.asarray(sj.forward(single, batch).logits)
    np.testing.assert_allclose(np.asarray(sj.forward(model, batch).logits), want, rtol=0, atol=1e-5)
