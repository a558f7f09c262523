"""Every experiment binary end to end on a tiny random checkpoint of each family added after the
organism's (Qwen2.5-VL: windowed and full-attention vision blocks; LLaVA-1.5: CLIP tower, Llama
decoder, the llava-1.5 processor files and chat template), on the organism's canvas (6 x 6 tokens
of 28 px, one visual token a grid cell): the nine experiments of run_all (one cold run, checked one
by one), coco_amplification's real run on the COCO fixture folder, and show_datasets on the family's
geometry. Smoke tests: they show a family goes through every binary (processor, geometry, token
grids, sites, sweeps), not the figures, which are chance-level by construction."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from absl import flags

import fixtures_llava as fl
import fixtures_qwen2_5_vl as f25
from experiments import coco_amplification as coco, run_all
from test_coco_amplification import _caption_words, coco_dir  # noqa: F401  (module fixture: the COCO folder)
import spatial_jax as sj

FLAGS = flags.FLAGS
SETTINGS = ("--dataset=squares", "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8", "--max_alpha=2")
WRITERS = {"qwen2_5_vl": lambda out, words: f25.write_random_checkpoint(out, layers=2, extra_words=words),
           "llava": lambda out, words: fl.write_random_llava(out, extra_words=words)}
# what makes each checkpoint its family's case: 4 vision windows; 6 x 6 patch tokens after the CLS is dropped
SHAPES = {"qwen2_5_vl": lambda cfg: cfg.window_tokens == 3, "llava": lambda cfg: cfg.tokens_per_image == 36}


@pytest.fixture(scope="module", params=list(WRITERS))
def checkpoint(request, tmp_path_factory):
    family = request.param
    path = WRITERS[family](str(tmp_path_factory.mktemp(f"{family}_random")), _caption_words())
    model = sj.load(path)
    assert model.family == family and SHAPES[family](model.config)
    assert model.prepare(images=[None], prompts=["What is left of the red square ?"]).input_ids.shape[0] == 1
    return family, path


@pytest.fixture(scope="module")
def nine(checkpoint, tmp_path_factory):
    family, path = checkpoint
    out = tmp_path_factory.mktemp(f"{family}_run_all")
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={path}", f"--output_dir={out}", *SETTINGS])
    try:
        report, headlines = run_all.run_all()
    finally:
        FLAGS.unparse_flags()
    return out, report, headlines


@pytest.mark.parametrize("name", list(run_all.EXPERIMENTS))
def test_experiment_runs(nine, name):
    out, report, headlines = nine
    assert headlines[name].strip() and headlines[name] in open(report).read()
    assert json.load(open(out / name / "results.json"))["parts"], name
    assert sorted((out / name).glob("*.csv")), name


def test_coco_amplification_runs(checkpoint, coco_dir, tmp_path):  # noqa: F811
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint[1]}", f"--coco_dir={coco_dir}", f"--output_dir={tmp_path}",
           "--max_alpha=1", "--batch_size=4"])
    try:
        summary = coco.run()
    finally:
        FLAGS.unparse_flags()
    assert summary["n_items_asked"] > 0 and sum(summary["partition"].values()) == summary["n_items_asked"]
    assert summary.get("alpha0_mismatches", 0) == 0  # (only measured when some item is golden)
    assert (tmp_path / coco.NAME / "results.json").exists()


def test_show_datasets_on_the_family_geometry(checkpoint, tmp_path):
    """A binary of its own (it defines --geometry, as experiments.common does)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.show_datasets", f"--geometry={checkpoint[0]}",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(name.endswith(".png") for name in os.listdir(tmp_path))
