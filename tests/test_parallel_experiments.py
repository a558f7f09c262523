"""An experiment binary, run unchanged with --mesh=data:4,model:2 on 8 simulated CPU devices,
gives the results of its single-device run.

The binary is experiments.last_token: its results are probabilities (five candidates at every
slot), so a mesh that moved a number would show, where criss-cross flip rates and behaviour
accuracies are counts that a random model's near-uniform answers rarely change.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.data.vocabulary import synthetic_words
from spatial_jax.families.qwen2_vl.word_tokenizer import word_level_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "data:4,model:2"
# Sharded logits are within 1e-5 of one device's (tests/test_parallel_qwen2_vl.py), so log-probs
# are within 2e-5, i.e. each probability within a relative 2e-5. Measured: 1.7e-7. Rows or
# variants placed one step off on `data` (an injected fault) move every value, by up to 1.5e-3.
RTOL = 2e-5


def _even_vocabulary() -> tuple[str, ...]:
    """Extra words for the random checkpoint so its vocabulary is even: then embed and lm_head
    split over model:2 like every other weight (an odd one is left unsharded). "8" has no
    Capitalized twin, so it adds one word."""
    return () if len(word_level_vocab(synthetic_words())) % 2 == 0 else ("8",)


def _run(args: list[str], n_devices: int) -> subprocess.Popen:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"]))
    return subprocess.Popen([sys.executable, "-m", "experiments.last_token", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_last_token_on_a_mesh_equals_one_device(tmp_path):
    ckpt = write_random_checkpoint(str(tmp_path / "ckpt"), layers=2, extra_words=_even_vocabulary())
    common = [f"--checkpoint={ckpt}", "--dataset=squares", "--max_items=8", "--n_pairs=4", "--nogolden",
              "--batch_size=8"]
    runs = {"single": _run(common + [f"--output_dir={tmp_path / 'single'}"], 1),
            "mesh": _run(common + [f"--output_dir={tmp_path / 'mesh'}", f"--mesh={MESH}"], 8)}
    logs = {}
    for name, proc in runs.items():  # both run at once: most of each is importing and compiling
        _, logs[name] = proc.communicate()
        assert proc.returncode == 0, f"{name}:\n{logs[name][-3000:]}"
    assert f"mesh: {MESH} over 8 cpu devices" in logs["mesh"]
    assert "does not divide" not in logs["mesh"]  # every weight has its rule's split, vocabulary too
    assert "mesh: " not in logs["single"]

    parts = {name: json.loads((tmp_path / name / "last_token" / "results.json").read_text())["parts"]
             for name in runs}
    assert parts["mesh"].keys() == parts["single"].keys() == {f"squares|{d}" for d in
                                                               ("left", "right", "above", "below")}
    for key, want in parts["single"].items():
        got = parts["mesh"][key]
        assert got["n_pairs"] == want["n_pairs"] == 4
        assert np.shape(want["probs"]) == (2 + 1, 5)  # slots (LM input + 2 layers) x candidates
        np.testing.assert_allclose(got["probs"], want["probs"], rtol=RTOL, atol=0, err_msg=key)
