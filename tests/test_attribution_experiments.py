"""--method for last_token, criss_cross and backup: with both, results.json, the CSV, the figure
and the headline carry the estimate against the exact change per slot with their correlation;
with attribution only the estimate runs; the default (exact) is unchanged."""
import json

import numpy as np
import pytest
from absl import flags

from experiments import backup, criss_cross, last_token
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.data import scoring

FLAGS = flags.FLAGS
N_SLOTS = 2 + 1
SETTINGS = ("--dataset=squares", "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8")
EXPERIMENTS = ((criss_cross, (N_SLOTS, 2)), (last_token, (N_SLOTS,)), (backup, (N_SLOTS, 1)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("random_ckpt")), layers=2)


def _run(module, checkpoint, out, method):
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={out}", *SETTINGS, f"--method={method}"])
    try:
        summary = module.run()
        return summary, module.headline(summary)
    finally:
        FLAGS.unparse_flags()


def _parts(out, name):
    with open(out / name / "results.json") as f:
        return [v for v in json.load(f)["parts"].values() if v["n_pairs"]]


@pytest.mark.parametrize("module,shape", EXPERIMENTS, ids=[m.NAME for m, _ in EXPERIMENTS])
def test_both_reports_estimate_against_exact(module, shape, checkpoint, tmp_path):
    _, headline = _run(module, checkpoint, tmp_path, "both")
    parts = _parts(tmp_path, module.NAME)
    assert parts
    for part in parts:
        a = part["attribution"]
        est, exact = np.array(a["estimate"]), np.array(a["exact"])
        assert est.shape == exact.shape == shape + (part["n_pairs"],)
        assert np.abs(exact).max() > 0  # the patches change the answer's log-odds
        assert a["r"] is None or -1 <= a["r"] <= 1
        assert len(a["r_per_slot"]) == N_SLOTS
        assert "flip" in part or "probs" in part  # the official exact results are still there
    assert "attribution vs exact" in headline and "r = " in headline
    assert (tmp_path / module.NAME / "attribution.png").exists()
    rows = (tmp_path / module.NAME / "attribution.csv").read_text().splitlines()
    assert len(rows) == 1 + N_SLOTS * (shape[1] if len(shape) > 1 else 1)


def test_attribution_alone_runs_no_exact_sweep(checkpoint, tmp_path):
    _, headline = _run(criss_cross, checkpoint, tmp_path, "attribution")
    for part in _parts(tmp_path, "criss_cross"):
        assert "flip" not in part and "controls" not in part and "exact" not in part["attribution"]
    assert not (tmp_path / "criss_cross" / "flip_rate.png").exists()
    assert (tmp_path / "criss_cross" / "attribution.png").exists()
    assert "attribution estimate" in headline


def test_exact_default_has_no_estimate(checkpoint, tmp_path):
    _run(last_token, checkpoint, tmp_path, "exact")
    assert all("attribution" not in p for p in _parts(tmp_path, "last_token"))


def test_word_logits_differences_are_log_odds_of_summed_spellings():
    """word_logits(a) - word_logits(b) = log(p(a) / p(b)), each summed over its spellings, whatever
    the rest of the vocabulary: the quantity the estimate and the exact sweep are compared on."""
    rng = np.random.default_rng(0)
    ids = np.array([[[3, 7], [5, 0]], [[1, 2], [4, 6]]])  # [B, K, M]; row 0's second word has one spelling
    mask = np.array([[[1, 1], [1, 0]], [[1, 1], [1, 1]]], bool)
    cands = scoring.Candidates((("a", "b"), ("c", "d")), ids, mask)
    logits = rng.standard_normal((2, 10)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_logits = np.take_along_axis(logits, cands.readout, -1)
    probs = cands.probs(np.exp(np.take_along_axis(logp, cands.readout, -1)))
    words = cands.word_logits(token_logits)
    np.testing.assert_allclose(words[:, 0] - words[:, 1], np.log(probs[:, 0] / probs[:, 1]), rtol=1e-10)


def test_atp_star_flags(checkpoint, tmp_path):
    """--qk_fix --grad_drop: the run records them, and beside the estimate the GradDrop score per
    slot and pair (non-negative) with its correlation with |exact|."""
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", *SETTINGS, "--method=both", "--qk_fix",
           "--grad_drop"])
    try:
        criss_cross.run()
    finally:
        FLAGS.unparse_flags()
    with open(tmp_path / "criss_cross" / "results.json") as f:
        stored = json.load(f)
    assert "qk_fix" in json.dumps(stored) and "grad_drop" in json.dumps(stored)
    parts = [v for v in stored["parts"].values() if v["n_pairs"]]
    for part in parts:
        a = part["attribution"]
        score = np.array(a["grad_drop_score"])
        assert score.shape == np.shape(a["estimate"]) and (score >= 0).all() and score.max() > 0
        assert "r_grad_drop_abs" in a and "r_abs" in a
