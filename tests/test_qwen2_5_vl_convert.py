"""Qwen2.5-VL converter: the key map from both on-disk layouts (the hub's `visual.*` / `model.*` /
`lm_head.*`, which transformers 5.23's save_pretrained writes too, and a 5.x state_dict's
`model.visual.*` / `model.language_model.*`), through the spatial-jax-convert console script and
sj.load; export back to a dir transformers loads; the real-size configs' parameter counts."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import fixtures_qwen2_5_vl as f25
import fixtures_qwen2_vl as fq
import hf_reference as hr
from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.families.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
from spatial_jax.tree_paths import flatten_paths

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "spatial-jax-convert")

# The hub config.json files (flat text keys, rope_scaling "mrope", vision in_chans), written from
# Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct.
_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}
_COMMON = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
           "video_token_id": 151656, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 128000,
           "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
           "torch_dtype": "bfloat16", "use_cache": True,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
HUB_7B_CONFIG = {**_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28,
                 "tie_word_embeddings": False, "vocab_size": 152064,
                 "vision_config": {**_VISION, "out_hidden_size": 3584}}
HUB_3B_CONFIG = {**_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "max_window_layers": 70,
                 "tie_word_embeddings": True, "vocab_size": 151936,
                 "vision_config": {**_VISION, "out_hidden_size": 2048}}


@pytest.mark.parametrize("name, config, expected", [("7B", HUB_7B_CONFIG, 8_292_166_656),
                                                    ("3B", HUB_3B_CONFIG, 3_754_622_976)])
def test_real_size_configs_give_hfs_parameter_count(name, config, expected):
    """Our abstract model (nnx.eval_shape) has exactly as many parameters as transformers' model
    (meta device) for the hub config.json, which reads as transformers reads it."""
    from transformers import Qwen2_5_VLConfig as HFConfig, Qwen2_5_VLForConditionalGeneration

    ours, hf = Qwen2_5_VLConfig.from_hf(config), HFConfig(**config)
    t, v = hf.text_config, hf.vision_config
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.intermediate_size,
            ours.vocab_size, ours.tie_word_embeddings, ours.mrope_section) == \
        (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
         t.vocab_size, hf.tie_word_embeddings, tuple(t.rope_parameters["mrope_section"]))
    assert (ours.vision_depth, ours.vision_dim, ours.vision_mlp_dim, ours.vision_heads, ours.window_size,
            list(ours.fullatt_block_indexes), ours.window_tokens) == \
        (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.window_size, list(v.fullatt_block_indexes), 4)
    n_ours, n_hf = hr.param_counts(Qwen2_5_VL, ours, Qwen2_5_VLForConditionalGeneration, hf)
    print(f"PARAMS Qwen2.5-VL-{name}: ours {n_ours:,}, HF {n_hf:,}")
    assert n_ours == n_hf == expected


def to_runtime_layout(name: str) -> str:
    """Hub (= save_pretrained) name -> the 5.x module (state_dict) name."""
    for old, new in (("visual.", "model.visual."), ("model.", "model.language_model.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


@pytest.fixture(scope="module")
def converted(qwen2_5_vl_ckpts, tmp_path_factory):
    """The save_pretrained (= hub) dir through the spatial-jax-convert console script (float32);
    the same renamed to the 5.x runtime layout, loaded by sj.load directly."""
    root = tmp_path_factory.mktemp("qwen2_5_vl_cli")
    out = str(root / "saved")
    proc = subprocess.run([CONSOLE_SCRIPT, f"--hf_dir={qwen2_5_vl_ckpts.hf_dir()}", f"--output_dir={out}",
                           "--dtype=float32"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})  # this checkout's package, not the installed one
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"spatial-jax-convert: wrote {out} (qwen2_5_vl, float32)"
    runtime = str(root / "runtime")
    names = hr.rename_checkpoint(qwen2_5_vl_ckpts.hf_dir(), runtime, to_runtime_layout)
    assert any(n.startswith("model.visual.blocks.") for n in names)
    assert any(n.startswith("model.language_model.layers.") for n in names)
    return {"saved": out, "runtime": runtime}


@pytest.mark.parametrize("layout", ["saved", "runtime"])
def test_convert_round_trip(qwen2_5_vl_ckpts, converted, layout):
    model = sj.load(converted[layout])
    assert model.family == "qwen2_5_vl" and model.dtype == "float32"
    ref = flatten_paths(nnx.to_pure_dict(qwen2_5_vl_ckpts.model().params))
    got = flatten_paths(nnx.to_pure_dict(model.params))
    assert got.keys() == ref.keys()
    for path in ref:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(ref[path]), err_msg=path)
    inputs = fq.make_inputs([[[5, 6], fq.image(6, 6), [7, 8]]], seed=3)
    want = f25.hf_run(qwen2_5_vl_ckpts.hf_model(), inputs)["logits"]
    np.testing.assert_allclose(np.asarray(sj.forward(model, fq.to_batch(inputs)).logits), want, rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", ["base", "tied"])
def test_export_loads_in_transformers(qwen2_5_vl_ckpts, tmp_path, variant):
    """convert.export (the inverse key map + to_hf) writes a dir transformers loads, without missing
    or unexpected keys, to the same logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from spatial_jax.convert.export import export_hf

    model = qwen2_5_vl_ckpts.model(variant)
    out = str(tmp_path / "exported")
    export_hf(out, "qwen2_5_vl", model.config, nnx.to_pure_dict(model.params))
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = fq.make_inputs([[[5], fq.image(4, 6), [6, 7]]], seed=5)
    want = f25.hf_run(qwen2_5_vl_ckpts.hf_model(variant), inputs)["logits"]
    np.testing.assert_array_equal(f25.hf_run(hf.eval(), inputs)["logits"], want)
