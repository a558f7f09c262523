"""The organism's training step: its forward equals the model's, and training is deterministic."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import spatial_jax as sj
from spatial_jax.organism import data as odata
from spatial_jax.organism import spec
from spatial_jax.organism import train as otrain
from spatial_jax.organism.recipes import RECIPES, Recipe
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("organism_proc")
    vocab = write_word_level_qwen2vl_processor(path, spec.organism_words())
    data_cfg = odata.DataConfig()
    encoder = odata.build(Qwen2VLPrep.from_dir(path), data_cfg)
    return spec.organism_config(vocab), encoder, data_cfg


def _perturbed(params, scale=0.05):
    """Init params plus noise, so that every path (norm scales, biases) matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_training_forward_equals_model_forward(setup, shuffle):
    """`organism_logits` (cell-table patch embedding, shared images, last-position-only last layer,
    optional token shuffle) == `sj.apply` on the processor-equal pixels, at the last position."""
    cfg, encoder, data_cfg = setup
    recipe = Recipe("vision_strip", treatments=(("own/shuffled" if shuffle else "own", 1.0),))
    trainer = otrain.Trainer(cfg, encoder, data_cfg, otrain.TrainConfig(batch_size=8, recipe=recipe))
    params = _perturbed(trainer.params)
    batch = trainer.sampler.next()
    got = np.asarray(trainer._predict(params, trainer.cell_table, batch))
    cells = batch["cells"][batch["image_of_row"]]
    pixels = encoder.cell_table[cells].reshape(-1, encoder.cell_table.shape[-1])
    full = sj.Batch(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                    image_grid_thw=np.tile(encoder.grid_thw, (8, 1)))
    interventions = ()
    n = encoder.geometry.n_visual_tokens
    src = batch["token_src"]
    np.testing.assert_array_equal(src // n, np.repeat(batch["image_of_row"][:, None], n, 1))  # no extra image read
    if shuffle:  # the same as permuting each image's visual tokens (site vision.tokens) before the LM
        perm = src % n
        assert not (perm == np.arange(perm.shape[1])).all()
        tokens = sj.apply(trainer.graphdef, params, full, cache=("vision.tokens",), logits=False).cache["vision.tokens"]
        index = (perm + perm.shape[1] * np.arange(8)[:, None]).reshape(1, -1)
        interventions = (sj.Intervention(site="vision.tokens", op="replace", source=tokens, index=index),)
    ref = np.asarray(sj.apply(trainer.graphdef, params, full, interventions).logits[:, -1])
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("mechanism", list(RECIPES))
def test_training_is_deterministic(setup, mechanism):
    """For every recipe (from random init), two runs of 200 steps from one seed give bit-identical
    parameters, auxiliary heads and losses."""
    cfg, encoder, data_cfg = setup
    recipe = dataclasses.replace(RECIPES[mechanism], init_from="")

    def run(seed):
        trainer = otrain.Trainer(cfg, encoder, data_cfg, otrain.TrainConfig(seed=seed, batch_size=8, recipe=recipe))
        init = jax.device_get(trainer.params)
        losses = [float(trainer.step()[0]) for _ in range(200)]
        return init, jax.device_get((trainer.params, trainer.heads)), losses

    (init, a, la), (_, b, lb) = run(0), run(0)
    assert la == lb and la[-1] < la[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(init)))


def test_chunked_prediction_equals_model(setup):
    """`Trainer.predict` over more rows than one chunk (and a padded last chunk) gives, row by row,
    the arg-max of `sj.apply` on that row's processor-equal pixels."""
    cfg, encoder, data_cfg = setup
    trainer = otrain.Trainer(cfg, encoder, data_cfg, otrain.TrainConfig(batch_size=8))
    params = _perturbed(trainer.params, 0.3)
    task = encoder.tasks["squares"]
    examples = odata.eval_examples(task, task.split.val)[:40]
    arrays = encoder.encode(examples)
    got, labels = trainer.predict(examples, chunk=16, params=params)
    np.testing.assert_array_equal(labels, arrays["labels"])
    pixels = encoder.cell_table[arrays["cells"]].reshape(-1, encoder.cell_table.shape[-1])
    ref = sj.apply(trainer.graphdef, params, sj.Batch(
        input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"], pixel_values=pixels,
        image_grid_thw=np.tile(encoder.grid_thw, (40, 1))))
    ref = np.asarray(ref.logits[:, -1]).argmax(-1)
    assert len(set(ref.tolist())) > 1  # the perturbed model does not answer one token everywhere
    np.testing.assert_array_equal(got, ref)


def test_curriculum_ends_at_the_evaluation_that_meets_warm_until(setup):
    """`train` keeps the sampler on the warm task until an evaluation finds it at warm_until, then
    trains on every task; the curve marks that evaluation."""
    cfg, encoder, _ = setup
    data_cfg = odata.DataConfig(warm_tasks=("squares",), warm_until=0.0)
    trainer = otrain.Trainer(cfg, encoder, data_cfg, otrain.TrainConfig(batch_size=8, max_steps=4, eval_every=2))
    trained = []
    step = trainer.step

    def logged_step():
        out = step()
        trained.append(set(trainer.sampler.last_tasks))
        return out

    trainer.step = logged_step
    result = otrain.train(trainer)
    assert trained[:2] == [{"squares"}] * 2 and set().union(*trained[2:]) > {"squares"}
    assert [p.get("warm_ended", False) for p in result.curve] == [True, False]
