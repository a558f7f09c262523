"""Pixtral converter: config parsing (hub and transformers 5.x layouts) and the key map, through the
spatial-jax-convert console script, from both on-disk key layouts: the hub's (which transformers
5.23's save_pretrained writes too: `language_model.model.*`, `vision_tower.*`) and a 5.x
state_dict (`model.language_model.*`, `lm_head.*`); export back to a dir transformers loads."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import fixtures_pixtral as fp
import hf_reference as hr
from fixtures_pixtral import pixtral_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.convert.convert import convert_hf
from spatial_jax.convert.safetensors_dir import CheckpointError
from spatial_jax.families.pixtral.model import Pixtral, PixtralConfig
from spatial_jax.tree_paths import flatten_paths

TOL = 1e-4
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "spatial-jax-convert")

# mistral-community/pixtral-12b's config.json: sparse sub-configs that rely on the class defaults,
# legacy rope_theta keys, no sliding window.
HUB_12B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_seq_length": 1,
    "image_token_index": 10, "model_type": "llava", "projector_hidden_act": "gelu",
    "text_config": {"hidden_size": 5120, "head_dim": 128, "intermediate_size": 14336, "is_composition": True,
                    "max_position_embeddings": 1024000, "model_type": "mistral", "num_hidden_layers": 40,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                    "sliding_window": None, "vocab_size": 131072},
    "torch_dtype": "bfloat16", "transformers_version": None,
    "vision_config": {"head_dim": 64, "hidden_act": "silu", "image_size": 1024, "is_composition": True,
                      "model_type": "pixtral", "patch_size": 16, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
}


def test_hub_12b_config_reads_as_transformers_does():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    ours = PixtralConfig.from_hf(HUB_12B_CONFIG)
    hf = LlavaConfig.from_dict(HUB_12B_CONFIG)
    t, v = hf.text_config, hf.vision_config
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim,
            ours.intermediate_size, ours.hidden_act, ours.rms_norm_eps, ours.sliding_window) == \
        (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
         t.intermediate_size, t.hidden_act, t.rms_norm_eps, t.sliding_window)
    assert ours.rope_theta == t.rope_parameters["rope_theta"] == 1e9
    assert (ours.vision_layers, ours.vision_dim, ours.vision_heads, ours.vision_mlp_dim, ours.vision_act,
            ours.patch_size, ours.vision_rope_theta) == \
        (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size, v.hidden_act, v.patch_size,
         v.rope_parameters["rope_theta"])
    assert (ours.image_token_id, ours.feature_layers, ours.projector_bias, ours.tie_word_embeddings) == \
        (hf.image_token_id, (24,), hf.multimodal_projector_bias, hf.tie_word_embeddings)
    # the whole parameter tree, as HF's own module count
    n_ours, n_hf = hr.param_counts(Pixtral, ours, LlavaForConditionalGeneration, hf)
    assert n_ours == n_hf == 12_682_739_712


def test_saved_config_round_trips(pixtral_ckpts):
    """The 5.x config.json (rope_parameters) reads back, and PixtralConfig.to_hf() writes what
    from_hf and transformers read."""
    from transformers import LlavaConfig

    for variant in ("base", "features"):
        cfg = pixtral_ckpts.model(variant).config
        assert PixtralConfig.from_hf(cfg.to_hf()) == cfg
        assert PixtralConfig.from_hf(LlavaConfig.from_dict(cfg.to_hf()).to_dict()) == cfg
    assert pixtral_ckpts.model().config.head_dim == 24


@pytest.mark.parametrize("change, message", [
    ({"vision_config": {"model_type": "clip_vision_model"}}, "only Pixtral vision towers"),
    ({"vision_feature_select_strategy": "default"}, "needs 'full'"),
    ({"text_config": {**HUB_12B_CONFIG["text_config"], "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}},
     "rope_type 'yarn'"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"vision_feature_layer": -26}, "outside the 25 vision hidden states"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        PixtralConfig.from_hf({**HUB_12B_CONFIG, **change})


def test_other_llava_checkpoints_fail_with_one_line(pixtral_ckpts, tmp_path):
    """A Llava checkpoint with a CLIP tower (llava-1.5) is recognised as Llava and refused by name."""
    import json
    import shutil

    d = shutil.copytree(pixtral_ckpts.hf_dir(), str(tmp_path / "clip"))
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["vision_config"]["model_type"] = "clip_vision_model"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="clip_vision_model"):
        convert_hf(d)


@pytest.fixture(scope="module")
def converted(pixtral_ckpts, tmp_path_factory):
    """The saved (= hub) layout in float32 through the spatial-jax-convert console script; a 5.x
    state_dict layout in bfloat16 through what the script runs, in-process (a second subprocess
    would spend its time importing jax again)."""
    from spatial_jax.convert.checkpoint import write_converted

    root = tmp_path_factory.mktemp("pixtral_cli")
    proc = subprocess.Popen([CONSOLE_SCRIPT, f"--hf_dir={pixtral_ckpts.hf_dir()}", f"--output_dir={root / 'saved'}",
                             "--dtype=float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runtime = str(root / "runtime_src")
    names = hr.rename_checkpoint(pixtral_ckpts.hf_dir(), runtime, fp.to_runtime_layout)
    assert "lm_head.weight" in names and any(n.startswith("model.vision_tower.") for n in names)
    family, _, _, params = convert_hf(runtime, "bfloat16")
    write_converted(str(root / "runtime"), runtime, family.name, "bfloat16", params)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == f"spatial-jax-convert: wrote {root / 'saved'} (pixtral, float32)"
    return {"saved": str(root / "saved"), "runtime": str(root / "runtime")}


@pytest.mark.parametrize("layout", ["saved", "runtime"])
def test_convert_round_trip(pixtral_ckpts, converted, layout):
    out_dir = converted[layout]
    dtype = "float32" if layout == "saved" else "bfloat16"
    assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))  # processor files travel along
    model = sj.load(out_dir)
    assert model.family == "pixtral" and model.dtype == dtype
    ref = flatten_paths(nnx.to_pure_dict(pixtral_ckpts.model().params))
    got = flatten_paths(nnx.to_pure_dict(model.params))
    assert got.keys() == ref.keys()
    for path in ref:
        want = np.asarray(ref[path].astype(dtype), np.float32)
        np.testing.assert_array_equal(np.asarray(got[path], np.float32), want, err_msg=path)
    if layout == "saved":  # the converted dir runs to HF's logits and prepares inputs itself
        inputs = fp.make_inputs([[[20, 21], (32, 48), [22, 23]]], seed=3)
        want = fp.hf_run(pixtral_ckpts.hf_model(), inputs)["logits"]
        np.testing.assert_allclose(np.asarray(sj.forward(model, fp.to_batch(inputs)).logits), want, rtol=0, atol=TOL)
        assert model.prepare(images=[None], prompts=["What is left ?"]).input_ids.shape[0] == 1


def test_tied_embeddings(pixtral_ckpts, tmp_path):
    """Tied embeddings (not Pixtral-12B's, but a Llava option): HF saves no head; one stored anyway
    (here under its runtime name) is ignored, as HF ties over it."""
    from safetensors.numpy import load_file, save_file

    d = fp.build_tiny_pixtral(str(tmp_path / "tied"), seed=5, processor=False, tie_word_embeddings=True)
    inputs = fp.make_inputs([[[20], (16, 32), [21, 22]]], seed=4)
    want = fp.hf_run(fp.load_hf(d), inputs)["logits"]
    model = sj.load(d)
    assert model.config.tie_word_embeddings and "lm_head" not in nnx.to_pure_dict(model.params)
    np.testing.assert_allclose(np.asarray(sj.forward(model, fp.to_batch(inputs)).logits), want, rtol=0, atol=TOL)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    save_file({**tensors, "lm_head.weight": tensors["language_model.model.embed_tokens.weight"]}, path,
              metadata={"format": "pt"})
    convert_hf(d)


def test_export_loads_in_transformers(pixtral_ckpts, tmp_path):
    """convert.export (the inverse key map + to_hf) writes a dir transformers loads, without missing
    or unexpected keys, to the same logits."""
    from transformers import LlavaForConditionalGeneration

    from spatial_jax.convert.export import export_hf

    model = pixtral_ckpts.model("features")
    out = str(tmp_path / "exported")
    export_hf(out, "pixtral", model.config, nnx.to_pure_dict(model.params))
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = fp.make_inputs([[[20, 21, 22], (48, 16), [23]]], seed=5)
    want = fp.hf_run(pixtral_ckpts.hf_model("features"), inputs)["logits"]
    np.testing.assert_array_equal(fp.hf_run(hf.eval(), inputs)["logits"], want)
