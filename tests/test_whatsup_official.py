"""What'sUp as the official code runs it: the hand-labelled criss-cross regions and the probing boxes
equal the official tables (transcribed here as data from criss_cross_patching/src/regions.py and
probing/src/whatsup.py), the stitched size per experiment, the probe's images and split, the pair
pools, the positional swap; and probe_vision, criss_cross and last_token end to end on a fixture
What'sUp folder with a tiny random checkpoint."""
import json
import random

import numpy as np
import pytest
from absl import flags
from PIL import Image

import spatial_jax as sj
from experiments import amplification, criss_cross, last_token, probe_lm, probe_vision
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.data.geometry import get_geometry
from spatial_jax.data.whatsup import probe_items, whatsup_item, whatsup_task
from spatial_jax.data.whatsup_regions import bbox_norm_to_patches, BBOX_NORM, hand_labelled_regions

FLAGS = flags.FLAGS
# Official WHATSUP_OBJECT_REGIONS / WHATSUP_STRIP_REGIONS: (rows start, stop, cols start, stop) of the
# left and right regions, per (model grid, middle).
OFFICIAL_OBJECTS = {
    ("qwen2_vl", "chair"): ((8, 11, 1, 4), (8, 11, 8, 11)),
    ("qwen2_vl", "table"): ((6, 11, 0, 3), (6, 11, 9, 12)),
    ("qwen2_vl", "armchair"): ((9, 11, 1, 4), (9, 11, 8, 11)),
    ("gemma3", "chair"): ((12, 15, 3, 6), (12, 15, 10, 13)),
    ("gemma3", "table"): ((10, 15, 2, 4), (10, 15, 12, 14)),
    ("gemma3", "armchair"): ((13, 15, 2, 5), (13, 15, 11, 14)),
}
OFFICIAL_STRIPS = {
    ("qwen2_vl", "chair"): ((0, 12, 0, 4), (0, 12, 8, 12)),
    ("qwen2_vl", "table"): ((0, 12, 0, 3), (0, 12, 9, 12)),
    ("qwen2_vl", "armchair"): ((0, 12, 0, 4), (0, 12, 8, 12)),
    ("gemma3", "chair"): ((0, 16, 0, 6), (0, 16, 10, 16)),
    ("gemma3", "table"): ((0, 16, 0, 6), (0, 16, 12, 16)),
    ("gemma3", "armchair"): ((0, 16, 0, 5), (0, 16, 11, 16)),
}
SIDES = {"chair": ("mug", "book", "cap", "bowl", "lemon"), "table": ("mug", "book", "cap")}


def _tokens(n, r0, r1, c0, c1):
    return [n * r + c for r in range(r0, r1) for c in range(c0, c1)]


@pytest.mark.parametrize("key", list(OFFICIAL_OBJECTS))
def test_hand_labelled_regions_equal_the_official_tables(key):
    geometry, middle = key
    n = {"qwen2_vl": 12, "gemma3": 16}[geometry]
    r = hand_labelled_regions(get_geometry(geometry), middle)
    assert r.grid == (n, n)
    for got, want in ((r.objects, OFFICIAL_OBJECTS[key]), (r.strips, OFFICIAL_STRIPS[key])):
        assert got[0].tolist() == _tokens(n, *want[0]) and got[2].tolist() == _tokens(n, *want[1])
        assert got[1].size == 0  # the official tables have no middle region
    if key == ("qwen2_vl", "chair"):
        assert (len(r.objects[0]), len(r.objects[2])) == (9, 9)  # the box regions gave 4 and 6


def test_hand_labelled_regions_only_where_the_official_code_has_them():
    with pytest.raises(ValueError, match="no official hand-labelled"):
        hand_labelled_regions(get_geometry("pixtral"), "chair")


def test_probing_boxes_equal_the_official_bbox_norm_to_patches():
    assert BBOX_NORM["table"]["middle"] == ((20 / 64, 60 / 64), (16 / 64, 48 / 64))
    # rows int(r0 n) .. round(r1 n), columns alike (Python's round: round(4.5) = 4)
    assert bbox_norm_to_patches(BBOX_NORM["chair"]["left"], 12).tolist() == _tokens(12, 9, 11, 2, 4)
    assert bbox_norm_to_patches(BBOX_NORM["chair"]["middle"], 12).tolist() == _tokens(12, 3, 11, 4, 8)
    assert bbox_norm_to_patches(BBOX_NORM["chair"]["right"], 12).tolist() == _tokens(12, 9, 11, 7, 10)
    assert bbox_norm_to_patches(BBOX_NORM["chair"]["middle"], 15).tolist() == _tokens(15, 3, 14, 5, 9)
    assert bbox_norm_to_patches(BBOX_NORM["armchair"]["right"], 16).tolist() == _tokens(16, 13, 15, 11, 14)
    assert bbox_norm_to_patches(((0.5, 0.5), (0.2, 0.2)), 12).tolist() == [6 * 12 + 2]  # never empty


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("whatsup")
    for middle, sides in SIDES.items():
        for i, obj in enumerate(sides):
            for direction in ("left", "right"):
                image = Image.new("RGB", (160, 120), (120, 120, 120))
                image.paste((30 * i, 200 - 20 * i, 90), (0, 60, 80, 120) if direction == "left" else (80, 60, 160, 120))
                image.save(root / f"{obj}_{direction}_of_{middle}.jpeg")
    return root


def test_stitched_size_per_experiment(folder):
    pixtral = get_geometry("pixtral")
    # behaviour, last-token, criss-cross: the native size; probing: the synthetic canvas (15 x 15 tokens)
    item = whatsup_task(folder, pixtral).item(("mug", "chair", "cap"), "left")
    assert item.image.size == (512, 512) and item.regions.grid == (32, 32)
    probe, n_train = probe_items(folder, pixtral)
    assert probe[0].image.size == (240, 240) and probe[0].regions.grid == (15, 15)
    assert probe[0].regions.objects[0].tolist() == bbox_norm_to_patches(BBOX_NORM[probe[0].entities[1]]["left"], 15).tolist()
    gemma = whatsup_item(folder, get_geometry("gemma3"), ("mug", "table", "cap"), "right", regions="hand_labelled")
    assert gemma.regions.grid == (16, 16) and gemma.image.size == (896, 896)
    with pytest.raises(ValueError, match="no official hand-labelled"):
        whatsup_item(folder, get_geometry("organism"), ("mug", "chair", "cap"), "left", regions="hand_labelled")


def test_probe_images_are_the_official_shuffled_tuples(folder):
    items, n_train = probe_items(folder, get_geometry("qwen2_vl"), seed=0)
    tuples = [(a, m, b) for m in ("chair", "table") for a in sorted(SIDES[m]) for b in sorted(SIDES[m]) if a != b]
    random.Random(0).shuffle(tuples)
    assert [it.entities for it in items] == tuples and n_train == int(0.75 * len(tuples)) == 19


def test_pair_pools_follow_the_official_candidate_pool(folder):
    from test_data_whatsup import word_tokenizer
    tok = word_tokenizer(["mug", "Mug", "book", "Book", "cap", "Cap", "bowl", "Bowl", "lemon", "Lemon",
                          "chair", "Chair", "table", "Table"])
    criss_cross_task = whatsup_task(folder, get_geometry("qwen2_vl"), tokenizer=tok, pair_sides=3)
    assert criss_cross_task.pair_pool(tok) == {"chair": tuple(sorted(SIDES["chair"])),
                                               "table": tuple(sorted(SIDES["table"]))}
    last_token_task = whatsup_task(folder, get_geometry("qwen2_vl"), tokenizer=tok, pair_sides=5)
    assert last_token_task.pair_pool(tok) == {"chair": tuple(sorted(SIDES["chair"]))}  # last-token needs 5 sides


def test_swap_pairs_positions_as_the_official_code():
    a, b = np.array([1, 2]), np.array([7, 8])
    np.testing.assert_array_equal(criss_cross.region_index(10, a, b), sj.swap_index(10, [(a, b)]))
    # uneven regions (official Gemma 3 "table" strips): clean[a + b] <- cf[b + a], position by position
    index = criss_cross.region_index(10, np.array([1, 2, 3]), np.array([7, 8]))
    assert {i: int(index[i]) for i in np.flatnonzero(index >= 0)} == {1: 7, 2: 8, 3: 1, 7: 2, 8: 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    words = tuple(dict.fromkeys(w for m, sides in SIDES.items() for w in (m, *sides, "floor", "on")))
    return write_random_checkpoint(str(tmp_path_factory.mktemp("whatsup_ckpt")), geometry="qwen2_vl", layers=2,
                                   extra_words=words)


@pytest.fixture
def whatsup_flags(checkpoint, folder, tmp_path):
    FLAGS.unparse_flags()
    FLAGS(["test", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", "--dataset=whatsup",
           f"--whatsup_dir={folder}", "--nogolden", "--n_pairs=2", "--batch_size=8"])
    yield tmp_path
    FLAGS.unparse_flags()


def test_binaries_end_to_end_on_a_whatsup_folder(whatsup_flags, monkeypatch):
    probe = probe_vision.run()
    assert list(probe) == ["whatsup|horizontal"]
    assert probe["whatsup|horizontal"]["n_images"] == 26
    assert np.array(probe["whatsup|horizontal"]["heatmap"]).shape == (12, 12, 3)

    swapped = []
    real = criss_cross.region_index
    monkeypatch.setattr(criss_cross, "region_index", lambda T, a, b: swapped.append((len(a), len(b))) or real(T, a, b))
    cc = criss_cross.run()
    assert list(cc) == ["whatsup|left", "whatsup|right"]
    for part in cc.values():
        assert part["n_pairs"] == 2 and np.array(part["flip"]).shape == (3, 2)
    # the official tables' sizes: chair objects 3 x 3 and strips 4 x 12, table 5 x 3 and 3 x 12
    assert swapped and set(swapped) <= {(9, 9), (48, 48), (15, 15), (36, 36)}

    lt = last_token.run()
    assert list(lt) == ["whatsup|left", "whatsup|right"]
    for part in lt.values():
        assert part["n_pairs"] == 2 and np.array(part["probs"]).shape == (3, 5)
    results = json.load(open(whatsup_flags / "criss_cross" / "results.json"))
    assert results["config"]["whatsup_regions"] == "hand_labelled"


@pytest.mark.parametrize("module", [amplification, probe_lm])
def test_experiments_the_official_code_runs_without_whatsup_refuse_it(whatsup_flags, module):
    with pytest.raises(ValueError, match="does not run on What'sUp"):
        module.run()
