"""Every experiment binary end to end on a tiny random checkpoint: outputs well-formed, resumable."""
import csv
import json
import os

import numpy as np
import pytest
from absl import flags

from experiments import ablation, backup, behaviour, common, criss_cross, last_token, run_all
from experiments.random_checkpoint import write_random_checkpoint

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("random_ckpt")), layers=2)


@pytest.fixture
def flag_values(checkpoint, tmp_path):
    def set_flags(*extra):
        FLAGS.unparse_flags()
        FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", "--dataset=squares",
               "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8", *extra])
        return tmp_path
    yield set_flags
    FLAGS.unparse_flags()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_behaviour_writes_table_and_figure(flag_values):
    out = flag_values()
    summary = behaviour.run()
    assert summary["squares"]["n"] == 8 and 0.0 <= summary["squares"]["accuracy"] <= 1.0
    rows = _csv(out / "behaviour" / "accuracy.csv")
    assert [r["dataset"] for r in rows] == ["squares"]
    assert os.path.getsize(out / "behaviour" / "accuracy.png") > 1000


def test_patching_experiments_have_one_value_per_slot(flag_values):
    out = flag_values()
    n_slots = 2 + 1  # 2 LM layers + the LM input
    for module, csv_name in ((criss_cross, "flip_rate.csv"), (last_token, "candidate_probs.csv"),
                             (backup, "flip_rate.csv")):
        summary = module.run()
        assert set(summary) == {f"squares|{d}" for d in ("left", "right", "above", "below")}
        for part in summary.values():
            values = np.array(part.get("flip", part.get("probs")))
            assert part["n_pairs"] == 2 and values.shape[0] == n_slots
            assert np.all((values >= 0) & (values <= 1))
        assert _csv(out / module.NAME / csv_name)
        assert any(name.endswith(".png") for name in os.listdir(out / module.NAME))


def test_ablation_erases_position_but_keeps_identity(flag_values, checkpoint):
    flag_values()
    model, geometry = common.load_model()
    task = ablation.make_task("squares", geometry)
    items = [task.item(("red", "green", "blue"), "left"), task.item(("blue", "green", "red"), "left")]
    batch = common.prepare(model, items)
    iv = ablation.ablation_intervention(model, task, items, batch)
    at_image = np.asarray(batch.input_ids) == model.config.image_token_id
    assert np.array_equal(np.asarray(iv.index) >= 0, at_image)  # every visual token, nothing else
    src, pos = np.asarray(iv.source), common.image_positions(model, batch)
    regions = items[0].regions
    # "red" stood in slot 0 of one image and slot 2 of the other: after the ablation both carry
    # the same tokens (red alone at the centre); the background is the same empty canvas in both
    np.testing.assert_allclose(src[0, pos[0, regions.objects[0]]], src[1, pos[1, regions.objects[2]]], atol=1e-6)
    np.testing.assert_allclose(src[0, pos[0, regions.background]], src[1, pos[1, regions.background]], atol=1e-6)
    assert np.abs(src[0, pos[0, regions.objects[0]]] - src[0, pos[0, regions.objects[2]]]).max() > 1e-4
    summary = ablation.run()
    assert 0.0 <= summary["squares"]["accuracy"] <= 1.0


def test_resumed_run_reproduces_an_uninterrupted_one(flag_values, monkeypatch):
    out = flag_values("--dataset=squares,shapes")
    full = behaviour.run()
    path = out / "behaviour" / "results.json"
    data = json.loads(path.read_text())
    del data["parts"]["shapes"]  # as if interrupted after the first dataset
    path.write_text(json.dumps(data))
    calls = []
    real_predict = common.predict
    monkeypatch.setattr(common, "predict", lambda m, items, bs: calls.append(items[0].task) or real_predict(m, items, bs))
    resumed = behaviour.run()
    assert calls == ["shapes"]  # the finished part was not redone
    assert resumed == full


def test_run_all_writes_one_report(flag_values):
    out = flag_values("--only=behaviour,criss_cross")
    path = run_all.run_all()
    text = open(path).read()
    assert "paper Table 1" in text and "criss_cross/flip_rate.png" in text


def test_probe_experiments_write_accuracies_and_heatmaps(flag_values):
    from experiments import probe_lm, probe_vision
    out = flag_values("--max_items=12")
    vision = probe_vision.run()
    assert set(vision) == {"squares|horizontal", "squares|vertical"}
    for part in vision.values():
        assert 0 <= part["test_accuracy"] <= 1
        heat = np.array(part["heatmap"])
        assert heat.shape == (6, 6, 3) and np.allclose(heat.sum(-1), 1, atol=1e-5)
    lm = probe_lm.run()
    assert np.array(lm["squares|horizontal"]["test_accuracy"]).shape == (3, 2)  # slots x token groups
    assert (out / "probe_vision" / "strip_heatmaps.png").exists()
    assert (out / "probe_lm" / "accuracy_by_layer.png").exists()


def test_amplification_at_alpha_zero_changes_nothing(flag_values):
    from experiments import amplification
    flag_values("--max_items=24", "--max_alpha=2")
    summary = amplification.run()
    for part in summary.values():
        assert part["replay_fixed_at_alpha0"] == 0  # failures stay failures at alpha = 0
        assert part["Probe_by_alpha"][0] == 0 and part["Random_by_alpha"][0] == 0
        assert 0 <= part["Probe*"] <= 1


def test_absolute_vs_relative_covers_every_shift(flag_values):
    from experiments import absolute_vs_relative
    flag_values("--max_items=8")
    summary = absolute_vs_relative.run()
    assert sorted(summary["squares"], key=int) == ["0", "1"]  # the organism geometry allows shifts 0..1


def test_behaviour_on_whatsup_folder(tmp_path, flag_values):
    """What'sUp from a controlled_images-style folder: items whose names are single tokens."""
    from PIL import Image
    folder = tmp_path / "whatsup"
    folder.mkdir()
    for i, obj in enumerate(("mug", "book", "cap")):
        for side in ("left", "right"):
            Image.new("RGB", (120, 90), (40 * i, 100, 200)).save(folder / f"{obj}_{side}_of_chair.jpeg")
    Image.new("RGB", (120, 90)).save(folder / "water-bottle_left_of_chair.jpeg")  # no right_of photo
    ckpt = write_random_checkpoint(str(tmp_path / "ckpt"), extra_words=("mug", "book", "cap", "chair", "floor"))
    flag_values(f"--checkpoint={ckpt}", "--dataset=whatsup", f"--whatsup_dir={folder}", "--max_items=0")
    summary = behaviour.run()
    # one middle (chair) x P(3, 2) ordered (left, right) side pairs x 2 directions = 12 items
    assert summary["whatsup"]["n"] == 12
    assert set(summary["whatsup"]["per_direction"]) == {"left", "right"}
