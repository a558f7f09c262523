"""experiments.coco_amplification end to end on a COCO fixture folder in the real layout (generated
photos, a QA file in the official format, an instances file) and a tiny random checkpoint: the
items and both listings asked, the strict partition, the probe data, and the fix counting on
planted answers; the real run on the checkpoint with its alpha = 0 replay check."""
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image
from safetensors.numpy import load_file, save_file

from experiments import coco_amplification as coco
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.data.coco import overlap_tokens
from spatial_jax.data.prompts import COCO_TEMPLATES
from spatial_jax.processing.words import split_words

FLAGS = flags.FLAGS
AXIS_WORDS = ("left", "right", "above", "below")
# (image id, caption, photo size, subject box, object box) in file order; "skip" entries are not spatial.
ENTRIES = [
    (1, "A photo of a cup to the left of a laptop", (320, 240), (20, 100, 80, 160), (180, 60, 300, 200)),
    (2, "A photo of a dog to the right of a cat", (320, 240), (200, 80, 300, 200), (10, 90, 120, 210)),
    (3, "A photo of a cup to the left of a bowl", (240, 320), (10, 10, 100, 100), (130, 20, 230, 120)),
    (4, "A photo of a tv to the right of a couch", (320, 240), (220, 20, 310, 100), (10, 120, 150, 230)),
    (5, "A photo of a cat to the left of a dog", (240, 320), (5, 150, 100, 300), (140, 150, 235, 300)),
    (6, "A photo of a bowl to the right of a cup", (320, 240), (200, 100, 260, 180), (30, 100, 90, 180)),
    (7, "A photo of a tv above a couch", (240, 320), (40, 10, 200, 100), (20, 180, 220, 310)),
    (7, "A photo of a cat and a dog", None, None, None),
    (8, "A photo of a laptop below a cup", (320, 240), (60, 140, 260, 235), (120, 10, 200, 90)),
    (9, "A photo of a cup above a bowl", (240, 320), (80, 20, 160, 90), (60, 200, 180, 300)),
    (10, "A photo of a dog below a tv", (320, 240), (100, 150, 220, 235), (110, 5, 210, 100)),
]
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Planted unintervened answers per caption index: (lr, rl). Truths: 0 left, 1 right, 2 left, 3 right,
# 4 left, 5 right, 6 above, 8 below, 9 above, 10 below.
BASELINE = {0: ("left", "Left"), 1: (" Right.", "right"), 2: ("right", "left"), 3: ("right", "left"),
            4: ("right", "right"), 5: ("above", "right"), 6: ("above", "above"), 8: ("below", "below"),
            9: ("below", "below"), 10: ("above", "below")}
EXPECTED_PARTITION = {"golden": 4, "fail_lr_only": 2, "fail_rl_only": 1, "fail_both": 2, "invalid": 1}
# Planted amplified answers: caption index -> {direction set: {failed order: the alphas at which it
# is right}}; max_alpha 3. Item 4 (fail_both) is right in lr at every alpha with Random, never in rl.
FIXES = {2: {"Probe": {"lr": {2, 3}}, "Random": {}},
         3: {"Probe": {"rl": {1}}, "Random": {"rl": {3}}},
         4: {"Probe": {"lr": {1, 2, 3}, "rl": {2, 3}}, "Random": {"lr": {1, 2, 3}}},
         9: {"Probe": {"lr": {2}, "rl": {2, 3}}, "Random": {}},
         10: {"Probe": {}, "Random": {}}}


def _caption_words():
    words = []
    for _, caption, *_ in ENTRIES:
        words += split_words(caption)
    for template in COCO_TEMPLATES.values():
        words += split_words(template.format(subj="", obj="", a="", b=""))
    return tuple(dict.fromkeys(words + split_words(coco.NEUTRAL_PROMPT) + [*AXIS_WORDS, *(w.capitalize()
                                                                                         for w in AXIS_WORDS)]))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    categories, annotations, images, qa = {}, [], {}, []
    for image_id, caption, size, subj, obj in ENTRIES:
        truth = next(w for w in AXIS_WORDS if f" {w} " in caption) if size else None
        qa.append([image_id, caption, caption.replace(truth, OPPOSITE[truth]) if truth else caption])
        if size is None:
            continue
        photo = Image.new("RGB", size, (200, 200, 200))
        subject_name = caption.split("A photo of a ")[1].split(" to the ")[0].split(" above ")[0].split(" below ")[0]
        object_name = caption.rsplit(" a ", 1)[1]
        for name, box, colour in ((subject_name, subj, (220, 30, 30)), (object_name, obj, (30, 30, 220))):
            photo.paste(colour, tuple(int(v) for v in box))
            cat = categories.setdefault(name, len(categories) + 1)
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": cat,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": float((box[2] - box[0]) * (box[3] - box[1]))})
        photo.save(root / "val2017" / f"{image_id:012d}.jpg")
        images[image_id] = {"id": image_id, "width": size[0], "height": size[1], "file_name": f"{image_id:012d}.jpg"}
    (root / "coco_qa_two_obj.json").write_text(json.dumps(qa))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": list(images.values()), "annotations": annotations,
         "categories": [{"id": i, "name": n} for n, i in categories.items()]}))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2-VL whose head can only prefer the four axis words (every other row of
    lm_head is zero), so its answers are on the axis often enough to have golden items and failures."""
    path = write_random_checkpoint(str(tmp_path_factory.mktemp("coco_ckpt")), layers=2,
                                   extra_words=_caption_words())
    vocab = json.load(open(os.path.join(path, "tokenizer.json")))["model"]["vocab"]
    weights = load_file(os.path.join(path, "model.safetensors"))
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    keep = np.zeros(len(weights[head]), bool)
    keep[[vocab[w] for w in AXIS_WORDS]] = True
    weights[head] = np.where(keep[:, None], weights[head] * 20, 0).astype(weights[head].dtype)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture
def run_flags(checkpoint, coco_dir, tmp_path):
    def set_flags(*extra):
        FLAGS.unparse_flags()
        FLAGS(["test", f"--checkpoint={checkpoint}", f"--coco_dir={coco_dir}", f"--output_dir={tmp_path}",
               "--max_alpha=3", "--batch_size=4", *extra])
        return tmp_path / coco.NAME
    yield set_flags
    FLAGS.unparse_flags()


def _plant(monkeypatch, asked):
    """Planted answers instead of the model's: `ask` from BASELINE, `sweep` from FIXES."""
    def ask(model, questions, style, batch_size):
        asked.append([(q.item.index, q.order, q.item.prompt(style, q.order)) for q in questions])
        return [BASELINE[q.item.index][0 if q.order == "lr" else 1] for q in questions]

    def sweep(model, questions, directions, alphas, style, batch_size):
        out = np.empty((2, len(alphas), len(questions)), object)
        for i, q in enumerate(questions):
            truth = q.item.relation
            for s, name in enumerate(coco.DIRECTION_SETS):
                right_at = FIXES[q.item.index][name].get(q.order, set())
                for a in alphas:
                    out[s, a, i] = truth if a in right_at else BASELINE[q.item.index][0 if q.order == "lr" else 1]
        return out

    monkeypatch.setattr(coco, "ask", ask)
    monkeypatch.setattr(coco, "sweep", sweep)


def test_items_listings_partition_and_fix_counting_on_planted_answers(run_flags, monkeypatch):
    out = run_flags()
    asked = []
    _plant(monkeypatch, asked)
    summary = coco.run()
    # every spatial entry (not the "cat and a dog" one) in both listings, file order (not Gemma 3),
    # with the anchor prompt of the Qwen2-VL family, articles stripped
    spatial = [i for i, e in enumerate(ENTRIES) if e[2] is not None]
    assert [(i, o) for i, o, _ in asked[0]] == [(i, o) for i in spatial for o in ("lr", "rl")]
    assert asked[0][0][2] == ("Using the laptop as the reference point, which side is the cup on? "
                              "Answer with one word: left or right.")
    assert asked[0][13][2] == ("Using the couch as the reference point, where is the tv located? "
                               "Answer with one word: below or above.")
    assert summary["partition"] == EXPECTED_PARTITION
    # golden h: 0, 1; golden v: 6, 8 -> one probe per axis on 2 items (1 train, 1 test)
    assert {a: p["n_items"] for a, p in summary["probes"].items()} == {"horizontal": 2, "vertical": 2}
    t = summary["table"]
    assert (summary["n_golden"], summary["n_failures"]) == ({"horizontal": 2, "vertical": 2},
                                                           {"horizontal": 3, "vertical": 2})
    # Probe fixes per alpha 1..3: {3}, {2, 4, 9}, {2, 4}: best alpha 2; at any alpha: {2, 3, 4, 9}
    assert summary["fixed_by_alpha"]["Probe"] == [0, 1, 3, 2] and t["Probe"]["alpha"] == 2
    assert summary["fixed_by_alpha"]["Random"] == [0, 0, 0, 1] and t["Random"]["alpha"] == 3
    want = {"None": (4, 0, 2, 0, 2, 0), "Random": (5, 1, 3, 1, 2, 0), "Random*": (5, 1, 3, 1, 2, 0),
            "Probe": (7, 3, 4, 2, 3, 1), "Probe*": (8, 4, 5, 3, 3, 1)}
    for column, (acc, fixed, h_acc, h_fixed, v_acc, v_fixed) in want.items():
        assert t[column]["overall"]["accuracy"] == pytest.approx(acc / 9)
        assert t[column]["overall"]["fix_rate"] == pytest.approx(fixed / 5)
        assert t[column]["horizontal"]["accuracy"] == pytest.approx(h_acc / 5)
        assert t[column]["horizontal"]["fix_rate"] == pytest.approx(h_fixed / 3)
        assert t[column]["vertical"]["accuracy"] == pytest.approx(v_acc / 4)
        assert t[column]["vertical"]["fix_rate"] == pytest.approx(v_fixed / 2)
    assert summary["alpha0_mismatches"] == 0
    rows = {r.split(",")[0]: r for r in (out / "table2.csv").read_text().splitlines()}
    assert rows["Probe"].startswith("Probe,2,0.7778,0.6000,0.8000,0.6667,0.7500,0.5000")
    assert os.path.getsize(out / "table2.png") > 10000


def test_alpha_zero_that_changes_an_answer_fails_the_run(run_flags, monkeypatch):
    run_flags()
    _plant(monkeypatch, [])
    planted = coco.sweep

    def broken(*args):
        out = planted(*args)
        out[1, 0, 0] = "above"  # the probe run at alpha 0 answers differently from the unintervened one
        return out

    monkeypatch.setattr(coco, "sweep", broken)
    with pytest.raises(RuntimeError, match="alpha = 0 changed 1 answers"):
        coco.run()


def test_probe_data_uses_overlapping_box_tokens_and_drops_contradicting_boxes():
    assert overlap_tokens((20, 100, 80, 160), (320, 240), (4, 5)).tolist() == [5, 6, 10, 11]
    # a box ending exactly on a cell border does not take the next cell; a point box takes one cell
    assert overlap_tokens((0, 0, 64, 60), (320, 240), (4, 5)).tolist() == [0]
    assert overlap_tokens((100, 100, 100, 100), (320, 240), (4, 5)).tolist() == [6]
    from spatial_jax.data.coco import boxes_agree
    left, right = np.array([0, 5]), np.array([2, 7])
    assert boxes_agree("left", left, right, 5) and not boxes_agree("right", left, right, 5)
    assert boxes_agree("below", np.array([10]), np.array([0]), 5) and not boxes_agree("above", np.array([10]),
                                                                                        np.array([0]), 5)
    tie = np.array([1]), np.array([1])
    assert not boxes_agree("right", *tie, 5) and boxes_agree("right", *tie, 5, ties_agree_second=True)


def test_real_run_on_a_random_checkpoint(run_flags):
    out = run_flags()
    summary = coco.run()
    n_items = sum(e[2] is not None for e in ENTRIES)
    assert sum(summary["partition"].values()) == n_items and summary["n_items_asked"] == n_items
    assert summary["alpha0_mismatches"] == 0  # the sweep at alpha 0 is the unintervened model
    # every golden item is in a probe's data or counted as dropped
    assert sum(p["n_items"] + p["no_box"] + p["outside_view"] + p["boxes_disagree"]
               for p in summary["probes"].values()) == \
        summary["partition"]["golden"]
    if "table" in summary:
        assert sum(summary["n_items"].values()) + summary["partition"]["invalid"] <= n_items
        assert os.path.exists(out / "table2.csv")
    results = json.load(open(out / "results.json"))
    assert len(results["parts"]["baseline"]["answers"]) == 2 * n_items
