"""LLaVA-1.5 converter and config: llava-1.5-7b-hf's config.json read as transformers reads it and
giving HF's parameter count; the family told apart from Pixtral by vision_config.model_type; the
key map from the three on-disk layouts (transformers 5.23's save_pretrained, `vision_tower.*`; the
hub's, `vision_tower.vision_model.*`; a 5.x state_dict, `model.vision_tower.*`, `lm_head.*`)
through the spatial-jax-convert console script / what it runs, then sj.load; export back to a dir
transformers loads; the sharding rules cover every parameter."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import fixtures_llava as fl
import fixtures_pixtral as fp
import hf_reference as hr
from fixtures_llava import llava_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax import families
from spatial_jax.convert.convert import abstract_model, convert_hf
from spatial_jax.families.llava.model import Llava, LlavaConfig
from spatial_jax.families.llava.rules import SHARDING_RULES
from spatial_jax.parallel.mesh import MODEL
from spatial_jax.parallel.rules import COLUMN, COLUMN_BIAS, REPLICATED, ROW, match, unmatched
from spatial_jax.tree_paths import flatten_paths

TOL = 1e-4
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "spatial-jax-convert")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14-336 and Vicuna-7B (Llama-2) as sparse
# sub-configs on their class defaults (Llama's rms_norm_eps overridden, no rope keys).
HUB_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
PARAMS_7B = 7_063_427_072  # transformers 5.23's LlavaForConditionalGeneration at HUB_7B_CONFIG


def test_hub_7b_config_reads_as_transformers_does():
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    ours = LlavaConfig.from_hf(HUB_7B_CONFIG)
    hf = HFLlavaConfig.from_dict(HUB_7B_CONFIG)
    t, v = hf.text_config, hf.vision_config
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim,
            ours.intermediate_size, ours.hidden_act, ours.rms_norm_eps) == \
        (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
         t.hidden_size // t.num_attention_heads, t.intermediate_size, t.hidden_act, t.rms_norm_eps) == \
        (32064, 4096, 32, 32, 32, 128, 11008, "silu", 1e-5)
    assert ours.rope_theta == t.rope_parameters["rope_theta"] == 10_000.0
    assert (ours.vision_layers, ours.vision_dim, ours.vision_heads, ours.vision_mlp_dim, ours.vision_act,
            ours.vision_eps, ours.image_size, ours.patch_size) == \
        (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size, v.hidden_act,
         v.layer_norm_eps, v.image_size, v.patch_size) == (24, 1024, 16, 4096, "quick_gelu", 1e-5, 336, 14)
    assert (ours.image_token_id, ours.feature_layers, ours.feature_select, ours.tokens_per_image) == \
        (hf.image_token_id, (23,), hf.vision_feature_select_strategy, hf.image_seq_length) == (32000, (23,), "default", 576)
    # the whole parameter tree, as HF's own module count: the last CLIP layer and post_layernorm,
    # which feature layer -2 never reads, are kept (see key_map.py)
    n_ours, n_hf = hr.param_counts(Llava, ours, LlavaForConditionalGeneration, hf)
    print(f"llava-1.5-7b parameters: ours {n_ours:,}, HF {n_hf:,}")
    assert n_ours == n_hf == PARAMS_7B


def test_saved_config_round_trips(llava_ckpts):
    """The 5.x config.json reads back, and LlavaConfig.to_hf() writes what from_hf and transformers read."""
    from transformers import LlavaConfig as HFLlavaConfig

    for variant in ("base", "features"):
        cfg = llava_ckpts.model(variant).config
        assert LlavaConfig.from_hf(cfg.to_hf()) == cfg
        assert LlavaConfig.from_hf(HFLlavaConfig.from_dict(cfg.to_hf()).to_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"vision_config": {**HUB_7B_CONFIG["vision_config"], "model_type": "siglip_vision_model"}}, "needs a CLIP tower"),
    ({"text_config": {**HUB_7B_CONFIG["text_config"], "model_type": "mistral"}}, "Llama decoders only"),
    ({"text_config": {**HUB_7B_CONFIG["text_config"], "attention_bias": True}}, "attention_bias"),
    ({"text_config": {**HUB_7B_CONFIG["text_config"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
     "rope_type 'linear'"),
    ({"vision_feature_select_strategy": "cls"}, "expected one of"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"vision_feature_layer": -26}, "outside the 25 vision hidden states"),
    ({"vision_config": {**HUB_7B_CONFIG["vision_config"], "image_size": 330}}, "multiple of"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        LlavaConfig.from_hf({**HUB_7B_CONFIG, **change})


def test_llava_and_pixtral_claim_their_own():
    """One architecture string, two families: vision_config.model_type decides."""
    pixtral = {**HUB_7B_CONFIG, "vision_config": {"model_type": "pixtral"}}
    assert families.family_of(HUB_7B_CONFIG).name == "llava"
    assert families.family_of(pixtral).name == "pixtral"
    assert families.family_of({**HUB_7B_CONFIG, "architectures": None}).name == "llava"  # by model_type
    with pytest.raises(ValueError, match="'siglip_vision_model' vision tower"):
        families.family_of({**HUB_7B_CONFIG, "vision_config": {"model_type": "siglip_vision_model"}})


def test_sharding_rules_cover_every_parameter():
    """Every parameter of the real-size model has a rule of its own; the Llama decoder is split as
    Pixtral's Mistral, the CLIP layers column / row like Gemma 3's SigLIP."""
    from jax.sharding import PartitionSpec as P

    params = nnx.to_pure_dict(nnx.state(abstract_model(families.get("llava"), LlavaConfig.from_hf(HUB_7B_CONFIG),
                                                       np.float32)))
    assert unmatched(params, SHARDING_RULES) == []
    want = {"layers/q/kernel": COLUMN, "layers/down/kernel": ROW, "embed": P(MODEL, None),
            "lm_head/kernel": P(None, MODEL), "vision/layers/q/kernel": COLUMN, "vision/layers/q/bias": COLUMN_BIAS,
            "vision/layers/fc1/kernel": COLUMN, "vision/layers/fc2/kernel": ROW, "vision/layers/o/bias": REPLICATED,
            "vision/projector_fc1/kernel": COLUMN, "vision/projector_fc2/kernel": ROW,
            "vision/class_embed": REPLICATED, "vision/pos_embed": REPLICATED, "vision/pre_norm/scale": REPLICATED}
    assert {path: match(path, SHARDING_RULES)[1] for path in want} == want
    assert set(want) <= set(flatten_paths(params))


@pytest.fixture(scope="module")
def converted(llava_ckpts, tmp_path_factory):
    """The save_pretrained layout in float32 through the spatial-jax-convert console script; the hub
    layout (float32) and a 5.x state_dict (bfloat16) through what the script runs, in-process."""
    from spatial_jax.convert.checkpoint import write_converted

    root = tmp_path_factory.mktemp("llava_cli")
    # The script imports the spatial_jax of this checkout (the venv may have another installed).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([CONSOLE_SCRIPT, f"--hf_dir={llava_ckpts.hf_dir()}", f"--output_dir={root / 'saved'}",
                             "--dtype=float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = {"saved": (str(root / "saved"), "float32")}
    for layout, rename, dtype in (("hub", fl.to_hub_layout, "float32"), ("runtime", fp.to_runtime_layout, "bfloat16")):
        src = str(root / f"{layout}_src")
        names = hr.rename_checkpoint(llava_ckpts.hf_dir(), src, rename)
        prefix = {"hub": "vision_tower.vision_model.encoder.", "runtime": "model.vision_tower.encoder."}[layout]
        assert any(n.startswith(prefix) for n in names)
        family, _, _, params = convert_hf(src, dtype)
        write_converted(str(root / layout), src, family.name, dtype, params)
        out[layout] = (str(root / layout), dtype)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == f"spatial-jax-convert: wrote {root / 'saved'} (llava, float32)"
    return out


@pytest.mark.parametrize("layout", ["saved", "hub", "runtime"])
def test_convert_round_trip(llava_ckpts, converted, layout):
    out_dir, dtype = converted[layout]
    assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))  # processor files travel along
    model = sj.load(out_dir)
    assert model.family == "llava" and model.dtype == dtype
    ref = flatten_paths(nnx.to_pure_dict(llava_ckpts.model().params))
    got = flatten_paths(nnx.to_pure_dict(model.params))
    assert got.keys() == ref.keys()
    for path in ref:
        want = np.asarray(ref[path].astype(dtype), np.float32)
        np.testing.assert_array_equal(np.asarray(got[path], np.float32), want, err_msg=path)
    if dtype == "float32":  # the converted dir runs to HF's logits and prepares inputs itself
        inputs = fl.make_inputs([["image", [20, 21, 22]]], seed=3)
        want = fl.hf_run(llava_ckpts.hf_model(), inputs)["logits"]
        np.testing.assert_allclose(np.asarray(sj.forward(model, fl.to_batch(inputs)).logits), want, rtol=0, atol=TOL)
        assert model.prepare(images=[None], prompts=["What is left ?"]).input_ids.shape[0] == 1


def test_export_loads_in_transformers(llava_ckpts, tmp_path):
    """convert.export (the inverse key map + to_hf) writes a dir transformers loads, without missing
    or unexpected keys, to the same logits."""
    from transformers import LlavaForConditionalGeneration

    from spatial_jax.convert.export import export_hf

    model = llava_ckpts.model("features")
    out = str(tmp_path / "exported")
    export_hf(out, "llava", model.config, nnx.to_pure_dict(model.params))
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = fl.make_inputs([["image", [20, 21]]], seed=5, tokens_per_image=17)
    want = fl.hf_run(llava_ckpts.hf_model("features"), inputs)["logits"]
    np.testing.assert_array_equal(fl.hf_run(hf.eval(), inputs)["logits"], want)
