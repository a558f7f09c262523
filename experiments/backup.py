"""Paper Fig. 9: the LM's backup mechanism. Under the Table 5 ablation of both the clean and the
counterfactual runs (vision ordering signal erased at the LM input), object-token criss-cross
swaps at every slot. Flips in middle layers mean the LM rebuilt an ordering on the object tokens
itself. Strip swaps are pointless here: the ablation made every background token identical.

    python -m experiments.backup --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

from absl import logging

from experiments import common, criss_cross
from experiments.ablation import ablation_intervention
from experiments.criss_cross import golden_criss_cross_pairs, plot, region_swaps, sweep_pairs
from spatial_jax import program
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "backup"
REGION_SETS = criss_cross.REGION_SETS[:1]  # object swaps only


def object_swaps(model, batch, items):
    return region_swaps(model, batch, items)[:len(REGION_SETS)]


def run() -> dict:
    def measure(model, task, direction):
        pairs = golden_criss_cross_pairs(model, task, [direction])[direction]
        if not pairs:
            return {"n_pairs": 0}
        ablate = lambda items, batch: [ablation_intervention(model, task, items, batch)]
        flip, keep = sweep_pairs(model, pairs, object_swaps, FLAGS.batch_size, under=ablate)
        logging.info("%s|%s: %d pairs; max object-swap flip %.2f at slot %d", task.name, direction, len(pairs),
                     flip.max(), flip[:, 0].argmax())
        return {"n_pairs": len(pairs), "flip": flip.tolist(), "keep": keep.tolist()}

    out_dir, summary = common.run_parts(NAME, DIRECTIONS, measure)
    plot(out_dir, summary, "Object swaps under ablation: the backup mechanism (paper Fig. 9)",
         region_sets=REGION_SETS)
    return summary


def headline(summary: dict) -> str:
    return "under the ablation: " + criss_cross.headline(summary, REGION_SETS)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
