"""The organism's training data: pixels and prompts equal the processor's, held-out triples stay out."""
from __future__ import annotations

import numpy as np
import pytest

from spatial_jax.data.prompts import DIRECTIONS, SYSTEM_TEXT
from spatial_jax.organism import data as odata
from spatial_jax.organism import spec
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    path = tmp_path_factory.mktemp("organism_proc")
    write_word_level_qwen2vl_processor(path, spec.organism_words())
    return Qwen2VLPrep.from_dir(path)


@pytest.fixture(scope="module")
def encoder(prep):
    return odata.build(prep, odata.DataConfig())


def test_cells_give_the_processors_pixels_and_prompts_its_ids(prep, encoder):
    """Random training images (shifted layouts, extra colours, every task) rebuilt from the cell
    table equal the processor's pixel_values bit for bit; prompts equal its input_ids."""
    sampler = odata.Sampler(encoder, odata.DataConfig(rows_per_image=1), batch_size=24, seed=3)
    examples = sampler.examples(24)
    assert {e[0] for e in examples} == {"squares", "shapes", "objects"}
    assert any(e[3] != (0, 0) for e in examples) and {e[4] for e in examples} == {SYSTEM_TEXT, None}
    arrays = encoder.encode(examples)
    for b, (task, triple, direction, shift, system) in enumerate(examples):
        item = encoder.tasks[task].extended.item(triple, direction, shift)
        ref = prep(images=[item.image], prompts=[item.prompt], system=system)
        pixels = encoder.cell_table[arrays["cells"][b]].reshape(ref["pixel_values"].shape)
        np.testing.assert_array_equal(pixels, ref["pixel_values"])
        mask = arrays["attention_mask"][b].astype(bool)
        np.testing.assert_array_equal(arrays["input_ids"][b][mask], ref["input_ids"][0])
        assert mask[-1] and not mask[:-mask.sum()].any()  # left padding
        assert prep.tokenizer.convert_ids_to_tokens(int(arrays["labels"][b])) == item.answer


def test_paired_rows_share_one_image(encoder):
    sampler = odata.Sampler(encoder, odata.DataConfig(), batch_size=16, seed=0)
    batch = sampler.next()
    assert batch["cells"].shape == (9, 36)  # 8 images + the empty canvas (`treat` reads it for some treatments)
    np.testing.assert_array_equal(batch["image_of_row"], np.arange(16) // 2)
    examples = odata.Sampler(encoder, odata.DataConfig(), batch_size=16, seed=0).examples(8)
    for a, b in zip(examples[::2], examples[1::2]):
        assert a[:2] == b[:2] and a[3] == b[3] and {a[2], b[2]} in ({"left", "right"}, {"above", "below"})


def test_held_out_triples_never_trained(encoder):
    for task in encoder.tasks.values():
        split = task.split
        train, val, test = set(split.train), set(split.val), set(split.test)
        assert not (train & val or train & test or val & test)
        assert len(train | val | test) == len(task.standard.triples())
        # a held-out triple's mirror image is held out in the same part
        assert {t[::-1] for t in val} == val and {t[::-1] for t in test} == test
    sampler = odata.Sampler(encoder, odata.DataConfig(), batch_size=32, seed=1)
    seen = set()
    for _ in range(200):
        seen |= {(e[0], tuple(e[1])) for e in sampler.examples(16)}
    for name, task in encoder.tasks.items():
        assert not {(name, t) for t in task.held} & seen
        # and training does see the test entity set's other triples
        assert {(name, t) for t in task.split.train} & seen


def test_sampling_is_deterministic(encoder):
    treatments = (("own/shuffled", 0.5), ("ablated", 0.25), ("bgother/shuffled", 0.25))
    a, b = (odata.Sampler(encoder, odata.DataConfig(), batch_size=8, seed=7, treatments=treatments, aux="strip",
                          aux_on=("own/shuffled",)) for _ in range(2))
    for _ in range(3):
        x, y = a.next(), b.next()
        assert x.keys() == y.keys() and {"token_src", "aux_strip", "aux_weight"} <= set(x)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_eval_items_are_the_papers(encoder):
    task = encoder.tasks["squares"]
    examples = odata.eval_examples(task, task.split.test)
    assert len(examples) == 4 * len(task.split.test)
    assert {e[2] for e in examples} == set(DIRECTIONS) and {e[3] for e in examples} == {(0, 0)}


def test_curriculum_draws_warm_tasks_first(encoder):
    """While the sampler is warm, batches hold only the warm tasks; after, every task; an unknown
    warm task is refused."""
    sampler = odata.Sampler(encoder, odata.DataConfig(warm_tasks=("squares",)), batch_size=32, seed=0)
    seen = []
    for _ in range(5):
        if len(seen) == 3:
            sampler.warm = False
        sampler.next()
        seen.append(set(sampler.last_tasks))
    assert seen[:3] == [{"squares"}] * 3
    assert seen[3] | seen[4] == {"squares", "shapes", "objects"}
    with pytest.raises(ValueError, match="warm_tasks"):
        odata.Sampler(encoder, odata.DataConfig(warm_tasks=("coco",)), batch_size=32, seed=0)


def test_treatments_route_visual_tokens(encoder):
    """`treat`: which image and token fills each LM image slot. own = itself; ablated = the empty
    canvas, each object from its isolated image's middle slot; bgother = own objects on another
    image's background (its objects replaced by the empty canvas); objother = own background, slot
    k's object from another image's slot k; /shuffled = a permutation of the unshuffled map."""
    n = encoder.geometry.n_visual_tokens
    examples = [("squares", ("red", "green", "blue"), "left", (0, 0), SYSTEM_TEXT),
                ("shapes", ("red circle", "green square", "blue triangle"), "above", (1, 0), SYSTEM_TEXT)]
    examples = [(t, tuple(encoder.tasks[t].standard.triples()[0]), d, s, y) for t, _, d, s, y in examples]
    batch = encoder.encode(examples)
    objs = [encoder.object_tokens(d == "left", s) for _, _, d, s, _ in examples]
    own = np.arange(2)[:, None] * n + np.arange(n)
    rng = np.random.default_rng(0)

    def src(treatments):
        out = odata.treat(encoder, batch, examples, treatments, rng)
        return out["token_src"], out["cells"]

    s, cells = src(["own", "own"])
    np.testing.assert_array_equal(s, own)
    assert len(cells) == 3  # + the empty canvas
    s, cells = src(["ablated", "own"])
    assert len(cells) == 6 and not cells[2].any()
    background = np.setdiff1d(np.arange(n), objs[0].ravel())
    np.testing.assert_array_equal(s[0, background], 2 * n + background)
    middle = encoder.object_tokens(True)[1]
    for k in range(3):
        np.testing.assert_array_equal(s[0, objs[0][k]], (3 + k) * n + middle)
        task, triple = examples[0][:2]
        np.testing.assert_array_equal(cells[3 + k], encoder.isolated_cells(task, triple[k], True))
    np.testing.assert_array_equal(s[1], own[1])
    s, _ = src(["bgother", "own"])
    np.testing.assert_array_equal(s[0, objs[0].ravel()], own[0, objs[0].ravel()])
    other_objects = np.setdiff1d(objs[1].ravel(), objs[0].ravel())
    np.testing.assert_array_equal(s[0, other_objects], 2 * n + other_objects)
    rest = np.setdiff1d(np.arange(n), np.concatenate([objs[0].ravel(), objs[1].ravel()]))
    np.testing.assert_array_equal(s[0, rest], own[1, rest])
    s, _ = src(["objother", "own"])
    np.testing.assert_array_equal(s[0, objs[0]], own[1, objs[1]])
    np.testing.assert_array_equal(s[0, background], own[0, background])
    s, _ = src(["objother/shuffled", "own"])
    unshuffled, _ = src(["objother", "own"])
    assert not np.array_equal(s[0], unshuffled[0])
    np.testing.assert_array_equal(np.sort(s[0]), np.sort(unshuffled[0]))
