"""Every experiment binary end to end on a tiny random checkpoint: outputs well-formed, one report
with every table and figure, resumable after an interruption, headlines printed by `make demo`.

Compiling dominates the time here (XLA:CPU takes seconds per distinct batch shape or sweep
chunk), so every test runs with the same SETTINGS: one cold run of all nine experiments (the
module fixture `nine`) pays each compile once, and the other tests reuse the compiled functions.
"""
import contextlib
import csv
import json
import os
import re
import time
import types

import numpy as np
import pytest
from absl import flags

import spatial_jax as sj
from experiments import (ablation, absolute_vs_relative, amplification, behaviour, common, demo, probe_lm,
                         probe_vision, report, run_all)
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.data.geometry import get_geometry
from spatial_jax.data.prompts import DIRECTIONS
from spatial_jax.data.synthetic import make_task

FLAGS = flags.FLAGS
DATASETS = ("squares", "shapes")
# Two datasets because behaviour, ablation and absolute_vs_relative have one part per dataset and
# an interrupted run needs a finished and an unfinished part. Squares and Shapes prompts have the
# same number of tokens, so the second dataset adds run time but no compiles.
SETTINGS = (f"--dataset={','.join(DATASETS)}", "--max_items=8", "--n_pairs=2", "--nogolden", "--batch_size=8",
            "--max_alpha=2")
N_SLOTS = 2 + 1  # the checkpoint's 2 LM layers + the LM input


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("random_ckpt")), layers=2)


def _set_flags(checkpoint, output_dir, *extra):
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={output_dir}", *SETTINGS, *extra])


@pytest.fixture
def flag_values(checkpoint, tmp_path):
    def set_flags(*extra):
        _set_flags(checkpoint, tmp_path, *extra)
        return tmp_path
    yield set_flags
    FLAGS.unparse_flags()


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def watched(interrupt_after=None):
    """Records the experiments' work: `images`, the number of images given to model.prepare (every
    model call of every binary starts there), and `parts`, {(experiment, key): images prepared for
    that part} in the order Results.put saw them. With interrupt_after=n the (n+1)-th put raises
    Interrupted instead of saving, as if the run had been killed while on that part."""
    log = types.SimpleNamespace(images=0, parts={})
    real_prepare, real_put = sj.Model.prepare, common.Results.put

    def prepare(self, images, prompts, system=None):
        log.images += len(images)
        return real_prepare(self, images, prompts, system)

    def put(self, key, value):
        if len(log.parts) == interrupt_after:
            raise Interrupted(key)
        log.parts[(os.path.basename(self.dir), key)] = log.images - sum(log.parts.values())
        real_put(self, key, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sj.Model, "prepare", prepare)
        mp.setattr(common.Results, "put", put)
        yield log


@pytest.fixture(scope="module")
def nine(checkpoint, tmp_path_factory):
    """All nine experiments through run_all, once: output dir, report path, headlines, work per part."""
    out = tmp_path_factory.mktemp("run_all")
    _set_flags(checkpoint, out)
    start = time.perf_counter()
    with watched() as log:
        path, headlines = run_all.run_all()
    print(f"\nrun_all, nine experiments, cold: {time.perf_counter() - start:.0f} s")
    FLAGS.unparse_flags()
    return types.SimpleNamespace(out=out, report=path, headlines=headlines, work=log.parts)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _parts(out, name):
    with open(out / name / "results.json") as f:
        return json.load(f)["parts"]


def test_run_all_report_has_every_table_and_figure(nine):
    text = open(nine.report).read()
    assert list(nine.headlines) == list(run_all.EXPERIMENTS)
    for name in run_all.EXPERIMENTS:
        section = text.split(f"## {report.TITLES[name]}\n")[1].split("\n## ")[0]
        assert nine.headlines[name] in section
        tables = sorted((nine.out / name).glob("*.csv"))
        assert tables, name
        for table in tables:
            header, first, *_ = _csv(table)
            assert "| " + " | ".join(header) + " |" in section and "| " + " | ".join(first) + " |" in section
        figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", section)
        assert {nine.out / f for f in figures} == set((nine.out / name).glob("*.png")) and figures, name
        assert all(os.path.getsize(nine.out / f) > 5000 for f in figures)


def test_demo_prints_the_behaviour_table_and_a_line_per_experiment(nine, checkpoint, monkeypatch, capsys, tmp_path):
    # the demo runs each organism into <output_dir>/<mechanism>: point one organism at the finished run
    (tmp_path / "lm_position").symlink_to(nine.out, target_is_directory=True)
    _set_flags(checkpoint, tmp_path)
    monkeypatch.setattr(demo, "ORGANISMS", {"lm_position": checkpoint})
    monkeypatch.setattr(demo, "WEAK", str(tmp_path / "no_weak_variant"))
    monkeypatch.setattr(demo, "SETTINGS", {})
    try:
        with watched() as log:
            demo.main([])
    finally:
        FLAGS.unparse_flags()
    assert log.images == 0  # every part came from the finished run's results.json
    printed = capsys.readouterr().out
    assert "| dataset | n | accuracy | left | right | above | below |" in printed
    for dataset in DATASETS:
        assert re.search(rf"^\| {dataset} \| 8 \| [01]\.\d{{3}} \|", printed, re.M)
    for name, line in nine.headlines.items():
        assert f"\n{name}: {line}\n" in printed
    assert f"report: {tmp_path / 'report.md'}" in printed
    assert "validation" in (tmp_path / "report.md").read_text().lower()


@pytest.mark.parametrize("name", list(run_all.EXPERIMENTS))
def test_resumed_run_reproduces_an_uninterrupted_one(name, nine, flag_values):
    module = run_all.EXPERIMENTS[name]
    out = flag_values()  # a fresh output dir, same settings as the uninterrupted run in `nine`
    full = _parts(nine.out, name)
    keys = list(full)
    n_done = len(keys) // 2
    assert 0 < n_done < len(keys)
    with watched(interrupt_after=n_done), pytest.raises(Interrupted):
        module.run()
    assert list(_parts(out, name)) == keys[:n_done]
    with watched() as log:
        resumed = module.run()
    # only the unfinished parts were computed, and no model work was spent on the finished ones
    assert [key for _, key in log.parts] == keys[n_done:]
    assert log.images == sum(nine.work[name, key] for key in keys[n_done:])
    assert json.loads(json.dumps(resumed, default=lambda x: x.tolist())) == {k: full[k] for k in resumed}
    assert _parts(out, name) == full
    for table in (nine.out / name).glob("*.csv"):
        assert (out / name / table.name).read_text() == table.read_text()


def test_behaviour_writes_table_and_figure(nine):
    for part in _parts(nine.out, "behaviour").values():
        assert part["n"] == 8 and 0.0 <= part["accuracy"] <= 1.0
    assert [r[0] for r in _csv(nine.out / "behaviour" / "accuracy.csv")[1:]] == list(DATASETS)


def test_patching_experiments_have_one_value_per_slot(nine):
    for name, field, width in (("criss_cross", "flip", 2), ("last_token", "probs", 5), ("backup", "flip", 1)):
        parts = _parts(nine.out, name)
        assert set(parts) == {f"{d}|{direction}" for d in DATASETS for direction in DIRECTIONS}
        for part in parts.values():
            values = np.array(part[field])
            assert part["n_pairs"] == 2 and values.shape == (N_SLOTS, width)
            assert np.all((values >= 0) & (values <= 1))


def test_ablation_erases_position_but_keeps_identity(flag_values):
    flag_values()
    model, geometry = common.load_model()
    task = make_task("squares", geometry)
    # 8 items as in the other tests' batches (compiled shapes are reused); the first two matter
    triples = [("red", "green", "blue"), ("blue", "green", "red")] + task.triples()[:6]
    items = [task.item(t, "left") for t in triples]
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


def test_probe_experiments_write_accuracies_and_heatmaps(nine):
    vision = _parts(nine.out, "probe_vision")
    assert set(vision) == {f"{d}|{o}" for d in DATASETS for o in ("horizontal", "vertical")}
    for part in vision.values():
        assert 0 <= part["test_accuracy"] <= 1
        heat = np.array(part["heatmap"])
        assert heat.shape == (6, 6, 3) and np.allclose(heat.sum(-1), 1, atol=1e-5)
    for part in _parts(nine.out, "probe_lm").values():
        assert np.array(part["test_accuracy"]).shape == (N_SLOTS, len(probe_lm.GROUPS))


@pytest.mark.parametrize("direction", ["left", "above"])
def test_probe_lm_token_groups_partition_the_canvas(direction):
    """Qwen2-VL canvas (12 x 12 tokens): 2 x 2 objects at columns 1, 5, 9 of rows 5-6 (horizontal;
    vertical is the transpose) and official strips of 4 columns each."""
    task = make_task("squares", get_geometry("qwen2_vl"))
    labels = probe_lm.group_labels([task.item(("red", "green", "blue"), direction)])[:, 0]  # [G, 144]
    rows, cols = np.divmod(np.arange(144), 12)
    along, across = (cols, rows) if direction == "left" else (rows, cols)
    in_line = np.isin(along, [1, 2, 5, 6, 9, 10])
    group = np.where(in_line & np.isin(across, [5, 6]), 0, np.where(in_line, 1, 2))
    assert probe_lm.GROUPS == ("object", "strip", "background")
    assert np.array_equal((labels >= 0).sum(0), np.ones(144))  # each token in exactly one group
    np.testing.assert_array_equal(np.argmax(labels >= 0, axis=0), group)
    np.testing.assert_array_equal(labels.max(0), along // 4)  # labelled by the nearest object's slot


def test_amplification_at_alpha_zero_changes_nothing(nine):
    parts = [p for p in _parts(nine.out, "amplification").values() if "Probe" in p]
    assert parts  # the untrained model fails most items: there is something to fix
    for part in parts:
        assert part["alpha0_replay"] == {"n": part["failures"], "mismatches": 0}  # answers replayed exactly
        assert 0 <= part["probe"]["test_acc"] <= 1 and 0 <= part["probe"]["train_acc"] <= 1
        for name in ("Random", "Probe"):
            at_alpha, oracle = np.array(part[name]["fixed_by_alpha"]), np.array(part[name]["oracle_by_alpha"])
            assert at_alpha[0] == 0 and oracle[0] == 0  # failures stay failures at alpha = 0
            assert np.all(np.diff(oracle) >= 0) and np.all(oracle >= at_alpha) and oracle[-1] <= part["failures"]


def test_amplification_uses_one_best_alpha_per_dataset_and_reports_accuracy():
    def part(golden, failures, probe):
        return {"n": golden + failures, "golden": golden, "failures": failures, "alpha0_replay": {"mismatches": 0},
                "probe": {"test_acc": 1.0, "train_acc": 1.0},
                "Probe": {"fixed_by_alpha": probe, "oracle_by_alpha": list(np.maximum.accumulate(probe))},
                "Random": {"fixed_by_alpha": [0, 1, 0], "oracle_by_alpha": [0, 1, 1]}}
    # horizontal alone would pick alpha 1, vertical alpha 2; over both axes alpha 2 fixes more (2 + 3 > 3 + 0)
    summary = {"squares|horizontal": part(4, 4, [0, 3, 2]), "squares|vertical": part(6, 4, [0, 0, 3])}
    t = amplification.tables(summary)["squares"]
    assert t["overall"]["best_alpha"] == {"Probe": 2, "Random": 1}
    assert t["horizontal"]["Probe"] == {"accuracy": (4 + 2) / 8, "fix_rate": 2 / 4, "fixed": 2}
    assert t["vertical"]["Probe"]["fixed"] == 3 and t["overall"]["Probe"]["fixed"] == 5
    assert t["overall"]["Probe*"]["fixed"] == 3 + 3 and t["overall"]["None"]["accuracy"] == 10 / 18


def test_amplification_figure_and_headline_cover_parts_without_a_probe(tmp_path):
    curve = {"alpha0_replay": {"n": 4, "mismatches": 0}, "probe": {"test_acc": 0.5, "train_acc": 1.0},
             "Probe": {"fixed_by_alpha": [0, 1, 2], "oracle_by_alpha": [0, 1, 3]},
             "Random": {"fixed_by_alpha": [0, 1, 0], "oracle_by_alpha": [0, 1, 2]}}
    summary = {"squares|horizontal": {"n": 8, "golden": 4, "failures": 4, **curve},
               "squares|vertical": {"n": 8, "golden": 8, "failures": 0},
               "shapes|horizontal": {"n": 8, "golden": 2, "failures": 6},
               "shapes|vertical": {"n": 8, "golden": 4, "failures": 4, **curve}}
    amplification.plot(str(tmp_path), summary)
    assert os.path.getsize(tmp_path / "accuracy_by_alpha.png") > 5000
    line = amplification.headline(summary)
    assert "shapes: accuracy 0.38 (horizontal: 6 failures, but fewer than 4 items to train a probe on; vertical: None 0.50, Random 0.62 (0.25)" in line
    assert ("squares (4 failures of 16): None 0.75, Random 0.81 (0.25), Random* 0.88 (0.50), Probe 0.88 (0.50), "
            "Probe* 0.94 (0.75) at alpha 2; probe held-out acc h/v 0.50/-; alpha=0 replays") in line


def test_amplification_raises_when_alpha_zero_changes_an_answer(flag_values, monkeypatch):
    out = flag_values("--dataset=squares")
    real = amplification.sweep_alphas

    def broken(*args):  # a deliberately broken amplification: alpha = 0 moves every answer
        fixed, argmax = real(*args)
        return fixed, np.where(np.arange(argmax.shape[1])[None, :, None] == 0, argmax + 1, argmax)

    monkeypatch.setattr(amplification, "sweep_alphas", broken)
    with pytest.raises(RuntimeError, match="alpha = 0 changed the unintervened answers"):
        amplification.run()
    parts = _parts(out, "amplification")
    assert any(p.get("alpha0_replay", {}).get("mismatches") for p in parts.values())  # recorded before raising


def test_probe_controls(nine):
    for part in _parts(nine.out, "probe_vision").values():
        assert 0 <= part["train_accuracy"] <= 1 and part["shuffled_at_chance"] in (True, False)
    for part in _parts(nine.out, "probe_lm").values():
        for field in ("train_accuracy", "shuffled_test_accuracy", "empty_canvas_test_accuracy",
                      "cross_shift_test_accuracy"):
            assert np.array(part[field]).shape == (N_SLOTS, len(probe_lm.GROUPS)), field
        assert part["cross_shift"] == 1


def test_shuffled_label_probe_sits_at_chance_and_a_broken_shuffle_does_not():
    """On features that give the slot away, the true-label probe is right, the shuffled-label one at
    chance; a 'shuffle' that leaves the labels in place scores far above chance, and is flagged."""
    rng = np.random.default_rng(0)
    n, ni, d = 60, 9, 128
    labels = np.tile(np.repeat([0, 1, 2], 3), (n, 1))  # [n, Ni]
    acts = 0.3 * rng.normal(size=(n, 1, ni, d)).astype(np.float32) + 3 * np.eye(d, dtype=np.float32)[labels][:, None]
    _, acc, _ = probe_vision.train_slot_probes(acts, labels, 0)
    assert acc["test"][0] > 0.85 and acc["train"][0] > 0.95
    assert abs(acc["shuffled_test"][0] - 1 / 3) < probe_vision.SHUFFLED_MARGIN
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_vision, "shuffled", lambda y, train, seed: np.array(y))  # broken: no shuffle
        _, broken, _ = probe_vision.train_slot_probes(acts, labels, 0)
    assert broken["shuffled_test"][0] > 1 / 3 + probe_vision.SHUFFLED_MARGIN


def test_absolute_vs_relative_moves_objects_across_strips(nine):
    parts = _parts(nine.out, "absolute_vs_relative")
    assert set(parts) == {f"{d}|{o}" for d in DATASETS for o in ("horizontal", "vertical")}
    for by_layout in parts.values():
        # the organism's 6 tokens: the spaced layout shifts by +1 only (inside its strips), the
        # packed one sits at 4 positions, each with objects across a strip boundary
        assert list(by_layout) == ["spaced +1", "packed -1", "packed +0", "packed +1", "packed +2"]
        assert by_layout["spaced +1"]["crossing"] == 0
        assert all(by_layout[k]["crossing"] > 0 for k in by_layout if k.startswith("packed"))


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3", "organism"])
def test_moved_layouts_cross_strips_in_both_orientations(name):
    g = get_geometry(name)
    task = make_task("squares", g)
    for orientation, direction in (("horizontal", "left"), ("vertical", "above")):
        strips = probe_vision.slot_labels([task.item(("red", "green", "blue"), direction)], "strip")[0]
        crossing = []
        for layout, shift in absolute_vs_relative.layouts(g):
            item = task.item(("red", "green", "blue"), direction, (shift, 0), absolute_vs_relative.LAYOUTS[layout])
            crossing.append(any((strips[region] != slot).any() for slot, region in enumerate(item.regions.objects)))
        assert any(crossing), (name, orientation)


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
