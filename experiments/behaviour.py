"""Paper Table 1: top-1 next-token accuracy per dataset and direction.

    python -m experiments.behaviour --checkpoint checkpoints/organism --dataset squares,shapes,objects
    python -m experiments.behaviour --checkpoint ckpt --dataset whatsup --whatsup_dir data/controlled_images
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from experiments import common, plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "behaviour"


def run() -> dict:
    model, geometry = common.load_model()
    results = common.Results(common.experiment_dir(NAME), common.run_config())
    for dataset in tqdm(FLAGS.dataset, desc=NAME):
        if results.done(dataset):
            continue
        items = common.task_items(dataset, geometry, FLAGS.max_items, FLAGS.seed, model.processor.tokenizer)
        answers = common.predict(model, items, FLAGS.batch_size)
        correct = np.array([a == it.answer for a, it in zip(answers, items)])
        per_dir = {d: float(correct[[it.direction == d for it in items]].mean()) for d in DIRECTIONS
                   if any(it.direction == d for it in items)}
        results.put(dataset, {"accuracy": float(correct.mean()), "n": len(items), "per_direction": per_dir})
        logging.info("%s: accuracy %.3f over %d items", dataset, correct.mean(), len(items))
    summary = {d: results.get(d) for d in FLAGS.dataset}
    _write(results.dir, summary)
    return summary


def _write(out_dir: str, summary: dict) -> None:
    rows = [[d, s["n"], f"{s['accuracy']:.3f}", *(f"{s['per_direction'].get(k, float('nan')):.3f}" for k in DIRECTIONS)]
            for d, s in summary.items()]
    common.write_csv(os.path.join(out_dir, "accuracy.csv"), ["dataset", "n", "accuracy", *DIRECTIONS], rows)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(DIRECTIONS)
    x = np.arange(len(summary))
    for i, d in enumerate(DIRECTIONS):
        ax.bar(x + i * width, [s["per_direction"].get(d, 0.0) for s in summary.values()], width, label=d)
    plotting.chance_line(ax, "chance (1/3)")
    ax.set_xticks(x + 0.4 - width / 2, list(summary))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Behaviour (paper Table 1)")
    ax.legend(fontsize=7, ncol=5, loc="lower center")
    plotting.save(fig, os.path.join(out_dir, "accuracy.png"))


def headline(summary: dict) -> str:
    return "top-1 accuracy " + ", ".join(f"{d} {s['accuracy']:.2f} (n={s['n']})" for d, s in summary.items())


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
