"""Golden pairs: the section 4(a) table, criss-cross reversal, the predicate, seeding."""
import pytest

from spatial_jax.data.pairs import criss_cross_pair, criss_cross_pairs, last_token_pair, last_token_pairs
from spatial_jax.data.synthetic import make_task

SQUARES = make_task("squares", "organism")
COLOURS = list(SQUARES.entities)


def oracle(items):
    return [" " + i.answer.capitalize() for i in items]  # right answers, spelt as a model might


@pytest.mark.parametrize("direction, clean_slots, cf_slots, cf_direction", [
    ("left", ("c0", "c1", "c2"), ("c4", "c1", "c3"), "right"),
    ("above", ("c0", "c1", "c2"), ("c4", "c1", "c3"), "below"),
    ("right", ("c2", "c1", "c0"), ("c3", "c1", "c4"), "left"),
    ("below", ("c2", "c1", "c0"), ("c3", "c1", "c4"), "above"),
])
def test_last_token_pair_follows_the_table(direction, clean_slots, cf_slots, cf_direction):
    names = dict(zip(("c0", "c1", "c2", "c3", "c4"), ("red", "green", "blue", "black", "gray")))
    pair = last_token_pair(list(names.values()), direction, SQUARES.item)
    assert pair.clean.entities == tuple(names[c] for c in clean_slots)
    assert pair.counterfactual.entities == tuple(names[c] for c in cf_slots)
    assert (pair.clean.direction, pair.counterfactual.direction) == (direction, cf_direction)
    assert (pair.clean.answer, pair.counterfactual.answer) == (names["c0"], names["c3"])
    assert pair.candidates == ("red", "green", "blue", "black", "gray")


@pytest.mark.parametrize("direction", ["left", "right", "above", "below"])
def test_criss_cross_pair_reverses_the_image(direction):
    pair = criss_cross_pair(("red", "green", "blue"), direction, SQUARES.item)
    assert pair.counterfactual.entities == pair.clean.entities[::-1]
    assert pair.clean.prompt == pair.counterfactual.prompt
    assert (pair.clean.answer, pair.counterfactual.answer) == ("red", "blue")
    assert pair.clean.entities[pair.clean.target_slot] == "red"


def test_shapes_pairs_answer_with_colours():
    shapes = make_task("shapes", "organism")
    pair = last_token_pair(list(shapes.entities)[:5], "left", shapes.item)
    assert pair.candidates == ("red", "green", "blue", "black", "brown")
    assert pair.counterfactual.answer == "black"


def test_golden_pairs_respect_the_predicate():
    def no_red(items):  # a model that never answers red
        return ["blue" if i.answer == "red" else i.answer for i in items]

    for build in (last_token_pairs, criss_cross_pairs):
        golden = build(SQUARES.item, COLOURS, no_red, n_per_direction=10)
        assert set(golden) == {"left", "right", "above", "below"}
        for direction, pairs in golden.items():
            assert len(pairs) == 10
            assert len({p.candidates for p in pairs}) == 10
            for p in pairs:
                assert "red" not in (p.clean.answer, p.counterfactual.answer)
                assert p.clean.direction == direction


def test_default_size_and_seeding():
    golden = last_token_pairs(SQUARES.item, COLOURS, oracle)
    assert [len(v) for v in golden.values()] == [50] * 4
    again = last_token_pairs(SQUARES.item, COLOURS, oracle, batch_size=7)
    assert all([p.candidates for p in golden[d]] == [p.candidates for p in again[d]] for d in golden)
    other = last_token_pairs(SQUARES.item, COLOURS, oracle, seed=1)
    assert [p.candidates for p in other["left"]] != [p.candidates for p in golden["left"]]


def test_a_wrong_model_gives_no_pairs_and_batches_are_used():
    calls = []

    def wrong(items):
        calls.append(len(items))
        return ["white"] * len(items)

    golden = criss_cross_pairs(SQUARES.item, COLOURS, wrong, directions=["left"], batch_size=16)
    assert golden == {"left": []}
    assert sum(calls) == 2 * 120 and max(calls) == 32  # every distinct triple, clean + cf per call


def test_mapping_pool_keeps_the_middle_in_the_reference_slot():
    objects = make_task("objects", "organism")
    pool = {"key": ["orange", "apple", "pot", "bell", "hat"], "bomb": ["rose", "apple", "pot", "hat"]}
    golden = last_token_pairs(objects.item, pool, oracle, directions=["left", "right"], n_per_direction=20)
    for pairs in golden.values():
        for p in pairs:
            middle = p.candidates[1]
            assert p.clean.entities[1] == p.counterfactual.entities[1] == middle
            assert set(p.candidates) - {middle} <= set(pool[middle])
    with pytest.raises(ValueError, match="enough distinct"):
        criss_cross_pairs(objects.item, {"key": ["orange"]}, oracle)
