"""Gemma 3 converter: config parsing (hub and transformers 5.x layouts) and the key map, through the
CLI, from every on-disk key layout: the hub's (`vision_tower.vision_model.*`), what transformers
5.23 save_pretrained writes (`vision_tower.*`), and a 5.x state_dict (`model.*`)."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_gemma3 as fg
import hf_reference as hr
from fixtures_gemma3 import gemma3_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.convert.convert import flatten_paths
from spatial_jax.families.gemma3.model import Gemma3, Gemma3Config

TOL = 1e-4

# google/gemma-3-4b-it's config.json: a sparse text_config that relies on the class defaults,
# rope_scaling for the global layers, no layer_types (sliding_window_pattern 6 by default).
HUB_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_hub_4b_config_reads_as_transformers_does():
    from transformers import Gemma3Config as HFConfig, Gemma3ForConditionalGeneration

    ours = Gemma3Config.from_hf(HUB_4B_CONFIG)
    hf = HFConfig.from_dict(HUB_4B_CONFIG)
    t, v = hf.text_config, hf.vision_config
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == \
        (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    assert (ours.query_pre_attn_scalar, ours.sliding_window, ours.rms_norm_eps) == \
        (t.query_pre_attn_scalar, t.sliding_window, t.rms_norm_eps)
    assert list(ours.layer_types) == list(t.layer_types)
    assert [i for i, s in enumerate(ours.is_sliding) if not s] == [5, 11, 17, 23, 29]
    rope = t.rope_parameters
    assert (ours.rope_local_theta, ours.rope_local_factor) == (rope["sliding_attention"]["rope_theta"], 1.0)
    assert rope["full_attention"]["rope_type"] == "linear"
    assert (ours.rope_global_theta, ours.rope_global_factor) == (rope["full_attention"]["rope_theta"],
                                                                 rope["full_attention"]["factor"]) == (1e6, 8.0)
    assert (ours.vision_layers, ours.vision_dim, ours.vision_heads, ours.vision_mlp_dim, ours.image_size,
            ours.patch_size, ours.vision_eps) == (v.num_hidden_layers, v.hidden_size, v.num_attention_heads,
                                                  v.intermediate_size, v.image_size, v.patch_size, v.layer_norm_eps)
    assert (ours.image_token_id, ours.mm_tokens_per_image, ours.tie_word_embeddings) == (262144, 256, True)
    # the whole parameter tree: 4.300 B, as the model card and HF's own module count
    n_ours, n_hf = hr.param_counts(Gemma3, ours, Gemma3ForConditionalGeneration, hf)
    assert n_ours == n_hf == 4_300_079_472


def test_saved_config_round_trips(gemma3_ckpts):
    """The 5.x config.json (rope_parameters per layer type, layer_types) reads back, and
    Gemma3Config.to_hf() writes what from_hf reads."""
    cfg = gemma3_ckpts.model().config
    assert cfg.layer_types == tuple(fg.LAYER_TYPES) and cfg.sliding_window == fg.SLIDING_WINDOW
    assert cfg.query_pre_attn_scalar == 16 and cfg.head_dim == 24
    assert Gemma3Config.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("bad, message", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "rope_type"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
])
def test_unsupported_configs_are_refused(bad, message):
    d = {**HUB_4B_CONFIG, "text_config": {**HUB_4B_CONFIG["text_config"], **bad}}
    with pytest.raises(ValueError, match=message):
        Gemma3Config.from_hf(d)


def _cli(hf_dir: str, out_dir: str, dtype: str = "float32") -> None:
    """What spatial-jax-convert runs, in-process (tests/test_convert_cli.py runs the console
    script itself; its absl flags cannot share one process with the experiments' flags)."""
    from spatial_jax.convert.checkpoint import write_converted
    from spatial_jax.convert.convert import convert_hf

    family, _, _, params = convert_hf(hf_dir, dtype)
    write_converted(out_dir, hf_dir, family.name, dtype, params)


@pytest.mark.parametrize("layout", ["hub", "saved", "runtime"])
def test_convert_from_every_layout(gemma3_ckpts, tmp_path, layout):
    saved = gemma3_ckpts.hf_dir()
    src = saved
    if layout != "saved":
        src = str(tmp_path / layout)
        names = hr.rename_checkpoint(saved, src, fg.to_hub_layout if layout == "hub" else fg.to_runtime_layout)
        prefix = {"hub": "vision_tower.vision_model.", "runtime": "model.vision_tower."}[layout]
        assert any(n.startswith(prefix) for n in names)
    out = str(tmp_path / f"converted_{layout}")
    _cli(src, out)
    assert os.path.isfile(os.path.join(out, "spatial_jax.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # processor files travel along
    model = sj.load(out)
    assert model.family == "gemma3"
    ref = flatten_paths(nnx.to_pure_dict(gemma3_ckpts.model().params))
    got = flatten_paths(nnx.to_pure_dict(model.params))
    assert got.keys() == ref.keys()
    for path in ref:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(ref[path]), err_msg=path)


def test_hub_layout_is_what_transformers_loads(gemma3_ckpts, tmp_path):
    """Our hub renaming is a layout transformers 5.23 itself loads without missing or unexpected
    keys, to the same logits; and the converted hub checkpoint runs to HF's logits."""
    from transformers import Gemma3ForConditionalGeneration

    hub = str(tmp_path / "hub")
    hr.rename_checkpoint(gemma3_ckpts.hf_dir(), hub, fg.to_hub_layout)
    hf_hub, info = Gemma3ForConditionalGeneration.from_pretrained(hub, attn_implementation="eager",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = fg.make_inputs([[list(range(12, 16)), fg.IMAGE, list(range(16, 20))]], seed=3)
    want = fg.hf_run(gemma3_ckpts.hf_model(), inputs)["logits"]
    np.testing.assert_array_equal(fg.hf_run(hf_hub.eval(), inputs)["logits"], want)
    got = np.asarray(sj.forward(sj.load(hub), fg.to_batch(inputs)).logits)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_bfloat16_conversion(gemma3_ckpts, tmp_path):
    out = str(tmp_path / "bf16")
    _cli(gemma3_ckpts.hf_dir(), out, dtype="bfloat16")
    model = sj.load(out)
    assert model.dtype == "bfloat16"
    ref = flatten_paths(nnx.to_pure_dict(gemma3_ckpts.model().params))
    got = flatten_paths(nnx.to_pure_dict(model.params))
    for path in ref:
        assert got[path].dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(got[path], np.float32),
                                      np.asarray(ref[path].astype(jax.numpy.bfloat16), np.float32))


def test_export_loads_in_transformers(gemma3_ckpts, tmp_path):
    """convert.export (the inverse key map + to_hf) writes a dir transformers loads to the same logits."""
    from spatial_jax.convert.export import export_hf

    model = gemma3_ckpts.model()
    out = str(tmp_path / "exported")
    export_hf(out, "gemma3", model.config, nnx.to_pure_dict(model.params))
    inputs = fg.make_inputs([[list(range(12, 15)), fg.IMAGE, list(range(15, 21))]], seed=4)
    want = fg.hf_run(gemma3_ckpts.hf_model(), inputs)["logits"]
    got = fg.hf_run(fg.load_hf(out), inputs)["logits"]
    np.testing.assert_array_equal(got, want)
