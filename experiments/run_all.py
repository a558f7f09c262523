"""Runs every experiment in order on one checkpoint and writes one report.

    python -m experiments.run_all --checkpoint checkpoints/organism --output_dir outputs/organism

Each experiment resumes from its own results.json, so an interrupted run_all picks up where it
stopped. --only limits the run to some experiments. Prints the behaviour table and one headline
per experiment; the report holds the same headlines above each experiment's tables and figures.
"""
from __future__ import annotations

import os
import time

from absl import flags, logging

from experiments import (ablation, absolute_vs_relative, amplification, backup, behaviour, common, criss_cross,
                         last_token, probe_lm, probe_vision, report)
from spatial_jax import program

EXPERIMENTS = {m.NAME: m for m in (behaviour, probe_vision, probe_lm, last_token, criss_cross, ablation, backup,
                                   amplification, absolute_vs_relative)}
flags.DEFINE_list("only", [], f"Run only these experiments, of {list(EXPERIMENTS)}.")
FLAGS = flags.FLAGS


def run_all() -> tuple[str, dict[str, str]]:
    """Runs the experiments in order; returns the report's path and each experiment's headline."""
    names = FLAGS.only or list(EXPERIMENTS)
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; known: {list(EXPERIMENTS)}")
    timings, headlines = [], {}
    for name in names:
        start = time.perf_counter()
        logging.info("=== %s", name)
        module = EXPERIMENTS[name]
        headlines[name] = module.headline(module.run())
        timings.append((name, time.perf_counter() - start))
        logging.info("%s: %s", name, headlines[name])
    header = (f"Checkpoint `{FLAGS.checkpoint}`, datasets {', '.join(FLAGS.dataset)}, "
              f"{'golden pairs only' if FLAGS.golden else 'all pairs (--nogolden)'}, seed {FLAGS.seed}.\n\n"
              + "\n".join(f"- {n}: {t:.0f} s" for n, t in timings))
    return report.write_report(FLAGS.output_dir, names, header, headlines), headlines


def headline_text(headlines: dict[str, str]) -> str:
    """What run_all and `make demo` print: the behaviour table (paper Table 1), if behaviour ran,
    then one line per experiment."""
    lines = []
    if behaviour.NAME in headlines:
        table = os.path.join(common.experiment_dir(behaviour.NAME), "accuracy.csv")
        lines += ["Behaviour, top-1 accuracy (paper Table 1):", report.markdown_table(table), ""]
    return "\n".join(lines + [f"{name}: {line}" for name, line in headlines.items()])


def main(argv):
    del argv
    path, headlines = run_all()
    print(f"{headline_text(headlines)}\n\nreport: {path}")


if __name__ == "__main__":
    program.run(main, wrote=lambda: os.path.join(FLAGS.output_dir, "report.md"))
