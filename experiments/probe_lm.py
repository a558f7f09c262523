"""The LM's ordering representations: the slot probe of probe_vision swept over every LM slot
(the LM input, then each layer's output) and over token groups: object tokens (labelled by their
object's slot) and strip-background tokens (non-object tokens, labelled by the strip they lie in).
All (slot, group) probes train in one compiled call.

    python -m experiments.probe_lm --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from absl import app, logging
from tqdm.auto import tqdm

from experiments import common
from experiments.probe_vision import ORIENTATIONS, images_of, slot_labels, visual_residuals
from spatial_jax import probes
from spatial_jax.data.synthetic import make_task

FLAGS = common.FLAGS
NAME = "probe_lm"
GROUPS = ("object", "strip background")


def group_labels(items) -> np.ndarray:
    """[G, n_items, Ni]: object tokens by object slot; non-object tokens by strip slot; -1 elsewhere."""
    obj = slot_labels(items, "object")
    strip = np.where(obj >= 0, -1, slot_labels(items, "strip"))
    return np.stack([obj, strip])


def sweep(acts: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """acts [n, S, Ni, D], labels [G, n, Ni] -> test accuracy [S, G]."""
    n, S, Ni, D = acts.shape
    test_img = ~probes.split_by_group(np.arange(n), 0.25, seed)
    valid = labels >= 0  # [G, n, Ni]
    train = (valid & ~test_img[None, :, None]).reshape(len(labels), -1)
    test = (valid & test_img[None, :, None]).reshape(len(labels), -1)
    x = np.moveaxis(acts, 1, 0).reshape(S, 1, n * Ni, D)  # shared across groups
    y = np.maximum(labels, 0).reshape(len(labels), -1)
    p = probes.train_probes(x, y, train, 3, seed=seed)  # probes [S, G]
    return np.asarray(probes.accuracy(p, x, y, test))


def run() -> dict:
    model, geometry = common.load_model()
    results = common.Results(common.experiment_dir(NAME), common.run_config())
    for dataset in FLAGS.dataset:
        task = make_task(dataset, geometry)
        for orientation in tqdm(ORIENTATIONS, desc=f"{NAME} {dataset}"):
            key = f"{dataset}|{orientation}"
            if results.done(key):
                continue
            items = images_of(task, orientation, FLAGS.max_items, FLAGS.seed)
            acc = sweep(visual_residuals(model, items, layers="all"), group_labels(items), FLAGS.seed)
            results.put(key, {"n_images": len(items), "test_accuracy": acc.tolist()})
            logging.info("%s: object probe accuracy by slot %s", key, np.round(acc[:, 0], 2))
    summary = dict(results.data["parts"])
    plot(results.dir, summary)
    return summary


def plot(out_dir: str, summary: dict) -> None:
    fig, axes = plt.subplots(1, len(summary), figsize=(3.6 * len(summary), 3.0), squeeze=False)
    rows = []
    for ax, (key, v) in zip(axes[0], summary.items()):
        acc = np.array(v["test_accuracy"])  # [S, G]
        for g, name in enumerate(GROUPS):
            ax.plot(acc[:, g], marker="o", ms=3, label=name)
            rows += [[*key.split("|"), name, s, f"{a:.3f}"] for s, a in enumerate(acc[:, g])]
        ax.axhline(1 / 3, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(acc)), ["emb"] + [str(i) for i in range(len(acc) - 1)], fontsize=7)
        ax.set_ylim(0, 1.03)
        ax.set_xlabel("slot (LM input, then output of layer i)")
        ax.set_ylabel("slot-probe test accuracy")
        ax.set_title(key.replace("|", ", "), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_by_layer.png"), dpi=120)
    plt.close(fig)
    common.write_csv(os.path.join(out_dir, "accuracy_by_layer.csv"),
                     ["dataset", "orientation", "tokens", "slot", "test_accuracy"], rows)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    app.run(main)
