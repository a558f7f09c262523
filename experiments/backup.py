"""Paper Fig. 9: the LM's backup mechanism. Under the Table 5 ablation of both the clean and the
counterfactual runs (vision ordering signal erased at the LM input), object-token criss-cross
swaps at every slot. Flips in middle layers mean the LM rebuilt an ordering on the object tokens
itself. Strip swaps are pointless here: the ablation made every background token identical.

As the official criss_cross_wo_ve_oi, the golden pairs are the ones the *ablated* model answers
correctly (clean and cf), from the same official stream as criss_cross; the metrics (candidate
probabilities mean +- std, flip rate) and the controls (identity, whole image from the reversed
image) are criss_cross's, every run under the ablation.

    python -m experiments.backup --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import numpy as np
from absl import logging

import spatial_jax as sj
from experiments import common, criss_cross, estimates
from experiments.ablation import ablation_intervention
from spatial_jax import program
from spatial_jax.data import scoring
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "backup"
REGION_SETS = criss_cross.REGION_SETS[:1]  # object swaps only


def object_swaps(model, batch, items):
    return criss_cross.region_swaps(model, batch, items)[:len(REGION_SETS)]


def ablated_predict(model, task):
    """predict(items) -> the ablated model's decoded, normalised top-1 answers (the pair filter)."""
    def predict(items):
        out = []
        for i in range(0, len(items), FLAGS.batch_size):
            chunk = common.padded(items[i:i + FLAGS.batch_size], FLAGS.batch_size)  # copies dropped below
            batch = common.prepare(model, chunk)
            logits = sj.next_token_logits(model, batch, [ablation_intervention(model, task, chunk, batch)])
            out += scoring.top1_tokens(np.asarray(logits), model.processor.tokenizer)[:len(items[i:i + FLAGS.batch_size])]
        return out
    return predict


def run() -> dict:
    golden = {}  # dataset -> direction -> pairs, golden under the ablation

    def measure(model, task, direction):
        if task.name not in golden:
            keep = ablated_predict(model, task) if FLAGS.golden else common.pair_filter(model)
            golden[task.name] = criss_cross.golden_pairs(model, task, keep)
        ablate = lambda items, batch: [ablation_intervention(model, task, items, batch)]
        value = criss_cross.measure_direction(model, golden[task.name][direction], object_swaps, under=ablate)
        if value["n_pairs"] and estimates.exact_wanted():
            flip = np.asarray(value["flip"])
            logging.info("%s|%s: %d pairs; max object-swap flip %.2f at slot %d; controls %s", task.name, direction,
                         value["n_pairs"], flip.max(), flip[:, 0].argmax(), common.brief(value["controls"]["passed"]))
        return value

    out_dir, summary = common.run_parts(NAME, DIRECTIONS, measure, **estimates.run_config())
    criss_cross.plot_all(out_dir, summary, "Object swaps under ablation: the backup mechanism (paper Fig. 9)",
                     region_sets=REGION_SETS)
    return summary


def headline(summary: dict) -> str:
    return "under the ablation: " + criss_cross.headline(summary, REGION_SETS)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
