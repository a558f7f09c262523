"""The LM's ordering representations: the slot probe of probe_vision swept over every LM slot
(the LM input, then each layer's output) and over three token groups that partition the canvas.
All (slot, group) probes train in one compiled call.

The groups, each token labelled by the slot (0, 1, 2) of the object it belongs to:
  object:     the object's own S x S tokens;
  strip:      the rest of the band through the object across the canvas, i.e. the tokens that
              share a column with it (a row, for vertical layouts): the "background tokens in the
              band above and below an object" that paper Fig. 4 finds classified as its slot;
  background: every other token (the spacing between those bands and the canvas margins),
              labelled by the strip of Regions.strips it lies in (the official code's strips,
              swapped in Fig. 7, which tile the canvas by nearest object).
"Background = tokens in no strip" cannot be the meaning here: the official strips tile the
synthetic canvas, so that set is empty; the paper's own "background" (Table 5: every non-object
token) is the union of our strip and background groups, which this split takes apart to show
whether the ordering reaches tokens that are not in line with any object.

    python -m experiments.probe_lm --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from experiments import common, plotting
from experiments.plotting import plt
from experiments.probe_vision import ORIENTATIONS, images_of, slot_labels, visual_residuals
from spatial_jax import probes
from spatial_jax import program

FLAGS = common.FLAGS
NAME = "probe_lm"
GROUPS = ("object", "strip", "background")


def in_line_labels(items) -> np.ndarray:
    """[n_items, Ni]: the slot of the object a token shares a column (horizontal layouts) or a row
    (vertical ones) with; -1 for tokens in line with no object."""
    labels = np.full((len(items), items[0].regions.n_tokens), -1, np.int32)
    for i, it in enumerate(items):
        rows, cols = np.divmod(np.arange(it.regions.n_tokens), it.regions.grid[1])
        along = cols if it.horizontal else rows
        for slot, region in enumerate(it.regions.objects):
            labels[i, np.isin(along, along[region])] = slot
    return labels


def group_labels(items) -> np.ndarray:
    """[G, n_items, Ni] slot labels of the GROUPS (see the module docstring); -1 outside a group."""
    obj = slot_labels(items, "object")
    in_line = in_line_labels(items)
    strip = np.where(obj >= 0, -1, in_line)
    background = np.where(in_line >= 0, -1, slot_labels(items, "strip"))
    return np.stack([obj, strip, background])


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
    def measure(model, task, orientation):
        items = images_of(task, orientation, FLAGS.max_items, FLAGS.seed)
        acc = sweep(visual_residuals(model, items, layers="all"), group_labels(items), FLAGS.seed)
        logging.info("%s|%s: probe accuracy by slot: %s", task.name, orientation,
                     "; ".join(f"{g} " + " ".join(f"{a:.2f}" for a in row) for g, row in zip(GROUPS, acc.T)))
        return {"n_images": len(items), "test_accuracy": acc.tolist()}

    out_dir, summary = common.run_parts(NAME, ORIENTATIONS, measure, groups=list(GROUPS))
    plot(out_dir, summary)
    return summary


def plot(out_dir: str, summary: dict) -> None:
    fig, axes = plt.subplots(1, len(summary), figsize=(3.6 * len(summary), 3.0), squeeze=False)
    rows = []
    for ax, (key, v) in zip(axes[0], summary.items()):
        acc = np.array(v["test_accuracy"])  # [S, G]
        for g, name in enumerate(GROUPS):
            ax.plot(acc[:, g], marker="o", ms=3, label=name)
            rows += [[*key.split("|"), name, s, f"{a:.3f}"] for s, a in enumerate(acc[:, g])]
        plotting.chance_line(ax)
        plotting.slot_axis(ax, len(acc))
        ax.set_ylim(0, 1.03)
        ax.set_ylabel("slot-probe test accuracy")
        ax.set_title(key.replace("|", ", "), fontsize=9)
        ax.legend(fontsize=7)
    plotting.save(fig, os.path.join(out_dir, "accuracy_by_layer.png"))
    common.write_csv(os.path.join(out_dir, "accuracy_by_layer.csv"),
                     ["dataset", "orientation", "tokens", "slot", "test_accuracy"], rows)


def headline(summary: dict) -> str:
    """Each group's best slot of the accuracy curve averaged over the dataset/orientation parts."""
    acc = np.mean([v["test_accuracy"] for v in summary.values()], axis=0)  # [S, G]
    best = acc.argmax(0)
    return (f"peak slot-probe test accuracy (mean of {len(summary)} parts): "
            + ", ".join(f"{g} {acc[s, i]:.2f} at {common.slot_text(s)}" for i, (g, s) in enumerate(zip(GROUPS, best))))


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
