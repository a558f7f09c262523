"""`make demo`: every experiment on the embedded default checkpoint, with a report; prints the
behaviour table and one headline per experiment.

The default is the model organism shipped in checkpoints/organism (a small Qwen2-VL trained here
on the synthetic tasks). Where it is missing, a random-weight stand-in of the same architecture
is written first and the run says so: the pipeline is real, the numbers are chance-level.
"""
from __future__ import annotations

import os

from absl import flags, logging

from experiments import run_all
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax import program

FLAGS = flags.FLAGS
ORGANISM = "checkpoints/organism"


def main(argv):
    del argv
    if os.path.isfile(os.path.join(ORGANISM, "config.json")):
        FLAGS.checkpoint = ORGANISM
    else:
        FLAGS.checkpoint = os.path.join(FLAGS.output_dir, "random_stand_in")
        if not os.path.isfile(os.path.join(FLAGS.checkpoint, "config.json")):
            write_random_checkpoint(FLAGS.checkpoint)
        FLAGS.golden = False
        FLAGS.max_items = FLAGS.max_items or 24
        FLAGS.n_pairs = min(FLAGS.n_pairs, 4)
        logging.warning("no organism in %s: running on a RANDOM-weight stand-in (%s); results are chance-level",
                        ORGANISM, FLAGS.checkpoint)
    path, headlines = run_all.run_all()
    print(f"\n{run_all.headline_text(headlines)}\n\nreport: {os.path.abspath(path)}\n"
          f"figures: {os.path.abspath(FLAGS.output_dir)}/*/*.png")


if __name__ == "__main__":
    program.run(main, wrote=lambda: os.path.join(FLAGS.output_dir, "report.md"), example="python -m experiments.demo --output_dir outputs/demo --dataset squares,shapes,objects")
