"""Every experiment binary that runs a model, on a tiny random LLaVA-1.5 checkpoint (CLIP tower,
Llama decoder, the llava-1.5 processor files and chat template): the nine run_all experiments in one
cold run (checked one by one), coco_amplification on the COCO fixture folder, and show_datasets on
the llava geometry. Smoke tests: they show the family goes through every binary (processor,
geometry, token grids, sites, sweeps), not the figures, which are chance-level by construction.

The checkpoint's canvas is the organism geometry's (6 x 6 tokens of 28 px = 168 px: a 28-px
patch here, so that one visual token is one grid cell as on llava-1.5's 24 x 24 grid of 14-px
patches) to keep the sequences short; its processor resizes and crops to 168 px.
"""
import json
import os
import subprocess
import sys
import types

import pytest
from absl import flags
from flax import nnx

import fixtures_llava as fl
from experiments import coco_amplification, common, run_all
from spatial_jax.convert.export import export_hf
from spatial_jax.data.geometry import get_geometry
from spatial_jax.data.vocabulary import synthetic_words
from spatial_jax.families.llava.model import Llava, LlavaConfig
from spatial_jax.processing.words import split_words
from test_coco_amplification import _caption_words, coco_dir  # noqa: F401  (module fixture)

FLAGS = flags.FLAGS
SETTINGS = ("--dataset=squares", "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8", "--max_alpha=2")


def write_random_llava(out_dir: str, extra_words=(), geometry: str = "organism", seed: int = 0) -> str:
    """A tiny random LLaVA-1.5 checkpoint dir whose processor makes the `geometry` canvas one visual
    token a grid cell; vocabulary: the synthetic tasks' words, the template's, and extra_words."""
    g = get_geometry(geometry)
    words = [*split_words("USER: ASSISTANT:"), *synthetic_words(), *extra_words]
    tokens = tuple(dict.fromkeys((*fl.SPECIAL_TOKENS, "\n", *words)))
    fl.write_processor_dir(out_dir, image_size=g.canvas_px, tokens=tokens, patch=g.token_px)
    cfg = LlavaConfig(vision_layers=2, vision_dim=32, vision_heads=2, vision_mlp_dim=64, vision_act="quick_gelu",
                      vision_eps=1e-5, image_size=g.canvas_px, patch_size=g.token_px, in_channels=3,
                      vocab_size=len(tokens), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, hidden_act="silu", rms_norm_eps=1e-5, image_token_id=fl.IMG,
                      projector_act="gelu", projector_bias=True, feature_select="default", vision_feature_layer=-2,
                      tie_word_embeddings=False, rope_theta=1e4)
    export_hf(out_dir, "llava", cfg, nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(seed)))))
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, common.GEOMETRY_KEY: geometry}, f, indent=2)
    return out_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_llava(str(tmp_path_factory.mktemp("llava_random")), extra_words=_caption_words())


@pytest.fixture(scope="module")
def nine(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_run_all")
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={out}", *SETTINGS])
    try:
        path, headlines = run_all.run_all()
    finally:
        FLAGS.unparse_flags()
    return types.SimpleNamespace(out=out, report=path, headlines=headlines)


def test_checkpoint_is_a_llava_one(checkpoint):
    import spatial_jax as sj

    model = sj.load(checkpoint)
    assert model.family == "llava" and model.config.tokens_per_image == 36
    batch = model.prepare(images=[None], prompts=["What is left of the red square ?"])
    assert batch.input_ids.shape[0] == 1


@pytest.mark.parametrize("name", list(run_all.EXPERIMENTS))
def test_experiment_runs(nine, name):
    results = nine.out / name / "results.json"
    assert results.exists(), name
    assert json.load(open(results))["parts"], name
    assert nine.headlines[name].strip()
    assert f"## " in open(nine.report).read()


def test_coco_amplification_runs(checkpoint, coco_dir, tmp_path):  # noqa: F811
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--coco_dir={coco_dir}", f"--output_dir={tmp_path}",
           "--max_alpha=2", "--batch_size=4"])
    try:
        summary = coco_amplification.run()
    finally:
        FLAGS.unparse_flags()
    assert summary["n_items_asked"] > 0 and sum(summary["partition"].values()) == summary["n_items_asked"]
    assert summary.get("alpha0_mismatches", 0) == 0  # where any item was golden: alpha 0 is the plain model


def test_show_datasets_on_the_llava_geometry(tmp_path):
    """A binary of its own (it defines --geometry, as experiments.common does)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.show_datasets", "--geometry=llava",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(name.endswith(".png") for name in os.listdir(tmp_path))
