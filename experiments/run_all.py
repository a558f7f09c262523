"""Runs every experiment in order on one checkpoint and writes one report.

    python -m experiments.run_all --checkpoint checkpoints/organism --output_dir outputs/organism

Each experiment resumes from its own results.json, so an interrupted run_all picks up where it
stopped. --only limits the run to some experiments.
"""
from __future__ import annotations

import time

from absl import app, flags, logging

from experiments import (ablation, absolute_vs_relative, amplification, backup, behaviour, common, criss_cross,
                         last_token, probe_lm, probe_vision, report)

EXPERIMENTS = {m.NAME: m for m in (behaviour, probe_vision, probe_lm, last_token, criss_cross, ablation, backup,
                                   amplification, absolute_vs_relative)}
flags.DEFINE_list("only", [], f"Run only these experiments, of {list(EXPERIMENTS)}.")
FLAGS = flags.FLAGS


def run_all() -> str:
    names = FLAGS.only or list(EXPERIMENTS)
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; known: {list(EXPERIMENTS)}")
    timings = []
    for name in names:
        start = time.perf_counter()
        logging.info("=== %s", name)
        EXPERIMENTS[name].run()
        timings.append((name, time.perf_counter() - start))
    header = (f"Checkpoint `{FLAGS.checkpoint}`, datasets {', '.join(FLAGS.dataset)}, "
              f"{'golden pairs only' if FLAGS.golden else 'all pairs (--nogolden)'}, seed {FLAGS.seed}.\n\n"
              + "\n".join(f"- {n}: {t:.0f} s" for n, t in timings))
    return report.write_report(FLAGS.output_dir, names, header)


def main(argv):
    del argv
    path = run_all()
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
