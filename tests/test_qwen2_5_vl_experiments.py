"""Every experiment binary end to end on a tiny random Qwen2.5-VL (fixtures_qwen2_5_vl.
write_random_checkpoint: windowed and full-attention vision blocks on the organism's canvas): the
nine experiments of run_all (one cold run, checked one by one), coco_amplification's real run on
the COCO fixture folder, and show_datasets on the qwen2_5_vl geometry. The answers are chance-level by construction; what is tested is that each binary runs
on this family and writes its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from absl import flags

import fixtures_qwen2_5_vl as f25
from experiments import coco_amplification as coco, run_all
from test_coco_amplification import coco_dir  # noqa: F401  (module fixture: the COCO folder)
import spatial_jax as sj

FLAGS = flags.FLAGS
SETTINGS = ("--dataset=squares", "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8", "--max_alpha=2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = f25.write_random_checkpoint(str(tmp_path_factory.mktemp("qwen2_5_vl_random")), layers=2,
                                       extra_words=tuple(coco.NEUTRAL_PROMPT.replace("?", " ").split()))
    model = sj.load(path)
    assert model.family == "qwen2_5_vl" and model.config.window_tokens == 3
    return path


@pytest.fixture(scope="module")
def nine(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all")
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={out}", *SETTINGS])
    try:
        path, headlines = run_all.run_all()
    finally:
        FLAGS.unparse_flags()
    return out, path, headlines


@pytest.mark.parametrize("name", list(run_all.EXPERIMENTS))
def test_experiment_runs(nine, name):
    out, report, headlines = nine
    assert headlines[name] and headlines[name] in open(report).read()
    results = json.load(open(out / name / "results.json"))
    assert results["parts"], name
    assert sorted((out / name).glob("*.csv")), name


def test_coco_amplification_runs(checkpoint, coco_dir, tmp_path):  # noqa: F811
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--coco_dir={coco_dir}", f"--output_dir={tmp_path}",
           "--max_alpha=1", "--batch_size=4"])
    try:
        summary = coco.run()
    finally:
        FLAGS.unparse_flags()
    assert summary["n_items_asked"] > 0 and sum(summary["partition"].values()) == summary["n_items_asked"]
    assert summary.get("alpha0_mismatches", 0) == 0  # (only measured when some item is golden)
    assert (tmp_path / coco.NAME / "results.json").exists()


def test_show_datasets_on_the_qwen2_5_vl_geometry(tmp_path):
    """A binary of its own (it defines --geometry, as experiments.common does)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.show_datasets", "--geometry=qwen2_5_vl",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(name.endswith(".png") for name in os.listdir(tmp_path))
