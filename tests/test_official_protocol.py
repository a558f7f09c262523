"""The official code's protocol (github Nix07/spatial-variable-binding), issue 15: scoring on a
real byte-level BPE tokenizer, the datasets' definitions, the pair stream against the pairs the
official repo ships, the probe split. Every expectation here is data transcribed from reading the
official code or its shipped files, not computed with our code."""
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from experiments import amplification, criss_cross
from spatial_jax import probes
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.data import scoring, sprites
from spatial_jax.data.synthetic import LAST_TOKEN_COLOURS, make_task, setup_task

# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer in which "red", "Red", " red", " Red" are four ids, and "Red."
    and " Red" are what a model may answer."""
    words = ["red", "Red", "blue", "Blue"]
    merges = [(w[:k - 1], w[k - 1]) for w in words for k in range(2, len(w) + 1)]
    merges += [("Red", ".")] + [("Ġ", w) for w in words]  # "Red." and the space-led spellings
    pieces = sorted(set("".join(words)) | {"Ġ", "."}) + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_bpe_fixture_has_four_spellings(bpe):
    ids = [bpe.encode(s).ids for s in ("red", "Red", " red", " Red")]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4
    assert len(bpe.encode("Red.").ids) == 1 and bpe.decode(bpe.encode(" Red").ids) == " Red"


def test_answers_are_counted_as_the_official_norm_token_counts(bpe):
    red_dot, space_red, blue = (bpe.encode(s).ids[0] for s in ("Red.", " Red", "blue"))
    # behaviour / golden filters / fixes: official norm_token("Red.") == norm_token(" Red") == "red"
    assert scoring.normalize("Red.") == scoring.normalize(" Red") == scoring.normalize("**red") == "red"
    np.testing.assert_array_equal(scoring.answers_match([red_dot, space_red, blue], ["red", "red", "red"], bpe),
                                  [True, True, False])
    logits = np.zeros((2, bpe.get_vocab_size()))
    logits[0, red_dot] = logits[1, space_red] = 9.0
    np.testing.assert_array_equal(scoring.top1_correct(logits, ["red", "Red"], bpe), [True, True])
    # golden filter: a model that answers right, spelt " Red" on clean items and "Red." on the
    # counterfactuals, keeps every pair; one that answers "Redd" keeps none
    task = make_task("squares", "organism")

    def spelt(items):
        half = len(items) // 2
        return [" " + i.answer.capitalize() for i in items[:half]] + [i.answer.capitalize() + "." for i in items[half:]]

    golden = pairs_lib.criss_cross_pairs(task.item, list(task.entities), spelt, directions=["left"], n_per_direction=5)
    assert len(golden["left"]) == 5
    typo = pairs_lib.criss_cross_pairs(task.item, list(task.entities), lambda items: [i.answer + "d" for i in items],
                                       directions=["left"], n_per_direction=5)
    assert typo["left"] == []
    # flip / keep over a sweep's arg-max [S, B] (criss_cross counts c2 / c0 this way)
    argmax = np.array([[red_dot, space_red], [blue, red_dot]])
    flips = scoring.answers_match(argmax, ["blue", "red"], bpe)
    np.testing.assert_array_equal(flips, [[False, True], [True, True]])


def test_probabilities_sum_the_four_spellings_once(bpe):
    cands = scoring.Candidates.of(bpe, [["red", "blue"]])
    ids = {s: bpe.encode(s).ids[0] for s in ("red", "Red", " red", " Red", "blue", "Blue", " blue", " Blue")}
    assert sorted(cands.ids[0, 0]) == sorted(ids[s] for s in ("red", "Red", " red", " Red"))
    probs = np.zeros((1, bpe.get_vocab_size()))
    probs[0, [ids["Red"], ids[" red"]]] = [0.25, 0.5]
    probs[0, ids[" Blue"]] = 0.125
    np.testing.assert_allclose(cands.probs(probs[:, cands.readout[0]]), [[0.75, 0.125]])


# ----------------------------------------------------------------------------- datasets


def _mask(draw_fn, size=56):
    image = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(image))
    return np.asarray(image) > 0


# Official shared/images.py at a 56-px sprite (Qwen2-VL's 2 x 28 px): each shape's PIL call with its
# parameters worked out by hand from the official formulas.
OFFICIAL_SHAPES_56 = {
    "square": lambda d: d.rectangle([5.6, 5.6, 49.4, 49.4], fill=1),  # s = 0.8 * 56, off = 5.6
    "circle": lambda d: d.ellipse([2.8, 2.8, 52.2, 52.2], fill=1),  # s = 0.9 * 56
    "triangle": lambda d: d.polygon([(28.0, 0), (0, 48.4974), (55, 48.4974)], fill=1),  # h = 56 sqrt(3) / 2
    "star": lambda d: d.polygon([(27.5, 0.0), (33.9919, 19.002), (55.0, 19.002), (38.0041, 30.7459),
                                 (44.4959, 49.748), (27.5, 38.0041), (10.5041, 49.748), (16.9959, 30.7459),
                                 (0.0, 19.002), (21.0081, 19.002)], fill=1),
    "cross": lambda d: (d.rectangle([19.0, 0, 36.0, 55], fill=1), d.rectangle([0, 19.0, 55, 36.0], fill=1)),
}


@pytest.mark.parametrize("shape", sorted(OFFICIAL_SHAPES_56))
def test_shapes_are_drawn_as_the_official_code_draws_them(shape):
    ours = np.asarray(sprites.shape_sprite(shape, (10, 20, 30), 56))[..., 3] > 0
    np.testing.assert_array_equal(ours, _mask(OFFICIAL_SHAPES_56[shape]))


def test_heart_is_the_official_100_point_curve():
    t = 2 * np.pi * np.arange(100) / 100
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    for size in (28, 56, 168):
        points = list(zip((x - x.min()) / np.ptp(x) * (size - 1), (1 - (y - y.min()) / np.ptp(y)) * (size - 1)))
        want = _mask(lambda d: d.polygon(points, fill=1), size)
        np.testing.assert_array_equal(np.asarray(sprites.shape_sprite("heart", (0, 0, 0), size))[..., 3] > 0, want)


def test_pixtral_palette_and_object_set():
    squares = make_task("squares", "pixtral")
    assert {n: e.sprite.args[0] for n, e in squares.entities.items()} == {
        "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
        "orange": (255, 165, 0), "gray": (128, 128, 128)}
    shapes = make_task("shapes", "pixtral")
    assert shapes.entities["orange cross"].sprite.args[1] == (255, 165, 0) and "brown cross" not in shapes.entities
    assert len(make_task("objects", "pixtral").items()) == 840 and "bomb" not in make_task("objects", "pixtral").entities
    assert len(make_task("objects", "qwen2_vl").items()) == 1344
    assert "brown" in make_task("squares", "qwen2_vl").entities
    # probing/ uses the default palette and all 8 objects on every model
    assert "brown" in setup_task("squares", "pixtral", "probing").entities
    assert len(setup_task("objects", "pixtral", "probing").entities) == 8


# ----------------------------------------------------------------------------- the pair stream

C = {"R": "red", "G": "green", "B": "blue", "K": "black", "N": "brown", "Y": "gray", "O": "orange"}
# last_token_exp/cf_pairs/squares.json, "qwen2-vl-7b": every "left" tuple and the first 10 "right"
# ones (R red, G green, B blue, K black, N brown, Y gray, O orange).
SHIPPED_LAST_TOKEN_LEFT = """OKYRG NKYBG BNGYK GRNBK YNGBR YRBKN RBKYN YGNKO ONBRY ROKYB KBGYO ORGNY OGNKR RBNKO
BNORY RNKBY GBONR RNBKO RYGNO NBOGR YNKBG KYBRG NRKBY GRBYN GBOYN GRNYK RBONY RGYON GYRNB KNRBY GRBNO GRNKY
NRKGO BYKGO YGRON KYGRN YKNBO BKOGN YRKOG YRNBO GKBNY BNYGO BKYRN NGBYR GYKNB YNKRG OYNKB YRGKO BYGKO
KNYRO""".split()
SHIPPED_LAST_TOKEN_RIGHT = "OKGRB GRKNO RGONB NORGY NYGBO YGRKO YROBG NYBRK BRYNK YBNOG".split()
# criss_cross_patching/cf_pairs/squares.json, "qwen2-vl-7b": every "left" tuple, the first 8 "right".
SHIPPED_CRISS_CROSS_LEFT = """KYR BNK KBY BNG NGB GRB NYG BRN YBK NRB KBG NKY NBR NRY YKR NKB GBR GNY GYK RYB NKR BNY
YRB KRY BGN KRN YGN RYK YNB NGY YNK NBK KBR BNR KNB GYR YBR YGB GBK RYG YGR NYR KRB RYN KGR YRK RGY YBN NRK
GBN""".split()
SHIPPED_CRISS_CROSS_RIGHT = "YKG YGR YGN BNY RNK KYB YBK YBG".split()


def _tuples(codes):
    return [tuple(C[c] for c in code) for code in codes]


def _passing(shipped: dict, answer_of):
    """predict() of a model that answers correctly exactly the pairs whose tuple the official run kept."""
    keep = {d: set(ts) for d, ts in shipped.items()}

    def predict(items):
        half = len(items) // 2
        out = []
        for clean, cf in zip(items[:half], items[half:]):
            ok = answer_of(clean, cf) in keep[clean.direction]
            out.append(clean.answer if ok else "none")
        return out + [cf.answer for cf in items[half:]]
    return predict


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_last_token_stream_reproduces_the_shipped_pairs(batch_size):
    task = setup_task("squares", "qwen2_vl", "last_token")
    assert list(task.entities) == ["red", "green", "blue", "black", "brown", "gray", "orange"]  # COLOR_RGB - White
    assert task.entities["orange"].sprite.args[0] == LAST_TOKEN_COLOURS["orange"] == (255, 165, 0)
    shipped = {"left": _tuples(SHIPPED_LAST_TOKEN_LEFT), "right": _tuples(SHIPPED_LAST_TOKEN_RIGHT)}
    predict = _passing(shipped, lambda clean, cf: _last_token_tuple(clean, cf))
    got = pairs_lib.last_token_pairs(task.item, list(task.entities), predict, directions=["left", "right"],
                                     n_per_direction=50, seed=0, batch_size=batch_size)
    assert [p.candidates for p in got["left"]] == shipped["left"]
    assert [p.candidates for p in got["right"]] == shipped["right"]  # the stream goes on from "left"'s stop


def _last_token_tuple(clean, cf):
    """(c0..c4) back from a last-token pair's items (see pairs.last_token_pair)."""
    if clean.target_slot == 0:
        (c0, c1, c2), (c4, _, c3) = clean.entities, cf.entities
    else:
        (c2, c1, c0), (c3, _, c4) = clean.entities, cf.entities
    return (c0, c1, c2, c3, c4)


def test_criss_cross_stream_reproduces_the_shipped_pairs():
    task = make_task("squares", "qwen2_vl")  # the shipped criss-cross pairs use the 6-colour palette
    shipped = {"left": _tuples(SHIPPED_CRISS_CROSS_LEFT), "right": _tuples(SHIPPED_CRISS_CROSS_RIGHT)}
    predict = _passing(shipped, lambda clean, cf: clean.entities if clean.target_slot == 0 else clean.entities[::-1])
    got = pairs_lib.criss_cross_pairs(task.item, list(task.entities), predict, directions=["left", "right"],
                                      n_per_direction=50, seed=0, batch_size=16)
    assert [p.candidates for p in got["left"]] == shipped["left"]
    assert [p.candidates for p in got["right"]] == shipped["right"]


def test_a_perfect_model_gets_the_first_distinct_draws():
    task = setup_task("squares", "qwen2_vl", "last_token")
    got = pairs_lib.last_token_pairs(task.item, list(task.entities), lambda items: [i.answer for i in items],
                                     directions=["left"], n_per_direction=6)
    assert [p.candidates for p in got["left"]] == _tuples(SHIPPED_LAST_TOKEN_LEFT[:6])


# ----------------------------------------------------------------------------- probe splits

# probing/src/data.py: permutations of the 6 colours, random.Random(0).shuffle, first int(0.75 n)
# train. The 30 test images of Squares, as indices into itertools.permutations order.
SQUARES_TEST_IMAGES = [5, 12, 17, 18, 27, 32, 33, 36, 38, 39, 45, 49, 51, 53, 61, 62, 64, 65, 68, 74, 77, 79, 90, 96,
                       97, 100, 101, 106, 108, 113]


def test_probe_split_is_the_official_one():
    train = probes.shuffle_split(120, 0.75, 0)
    assert train.sum() == 90
    np.testing.assert_array_equal(np.flatnonzero(~train), SQUARES_TEST_IMAGES)
    assert probes.shuffle_split(336, 0.75, 0).sum() == 252  # Objects: int(0.75 * 336)
    triples = make_task("squares", "qwen2_vl").triples()
    assert triples[SQUARES_TEST_IMAGES[0]] == ("red", "blue", "black")


def test_amplification_split_is_95_5_by_item():
    for n, n_train in ((4, 3), (20, 19), (100, 95), (41, 38)):
        assert amplification.item_split(n, 0).sum() == n_train == min(max(1, int(0.95 * n)), n - 1)


def test_probe_init_draws_the_bias_too():
    x = np.zeros((4, 16), np.float32)
    p = probes.train_probes(x, np.array([0, 1, 0, 1]), np.ones(4, bool), 2, epochs=0, seed=0)
    b = np.asarray(p.b)
    assert np.all(b != 0) and np.abs(b).max() < 5 / math.sqrt(16)
    w = np.asarray(p.w)
    assert 0.5 / math.sqrt(16) < w.std() < 2 / math.sqrt(16)


def test_criss_cross_control_verdicts():
    ok = {"identity": {"flip": [0.0, 0.0, 0.0]}, "whole_image": {"flip": [0.9, 0.5, 0.1]}}
    assert criss_cross.control_verdicts(ok) == {"identity": True, "whole_image": True}
    noop = {"identity": {"flip": [0.0, 0.0, 0.0]}, "whole_image": {"flip": [0.0, 0.0, 0.0]}}  # a no-op index map
    assert criss_cross.control_verdicts(noop)["whole_image"] is False
    leaky = {"identity": {"flip": [0.0, 0.1, 0.0]}, "whole_image": {"flip": [1.0, 1.0, 1.0]}}
    assert criss_cross.control_verdicts(leaky)["identity"] is False


def test_criss_cross_controls_on_the_organism_and_a_no_op_index_map(monkeypatch):
    """The organism answers correctly: the whole image from the reversed image flips its answers at
    the LM input and the identity swap flips none; with a no-op index map the positive control
    flips nothing and its verdict fails."""
    import spatial_jax as sj
    model = sj.load("checkpoints/organism")
    task = make_task("squares", "organism")
    pairs = pairs_lib.criss_cross_pairs(task.item, list(task.entities), lambda items: [i.answer for i in items],
                                        directions=["left"], n_per_direction=4)["left"]
    controls = criss_cross.control_sweeps(model, pairs, 4)
    assert controls["passed"] == {"identity": True, "whole_image": True}
    assert max(controls["identity"]["flip"]) == 0 and controls["whole_image"]["flip"][0] == 1.0
    monkeypatch.setattr(criss_cross, "image_map", lambda m, batch: np.full((1,) + np.shape(batch.input_ids), -1, np.int32))
    broken = criss_cross.control_sweeps(model, pairs, 4)
    assert broken["passed"]["whole_image"] is False and max(broken["whole_image"]["flip"]) == 0
