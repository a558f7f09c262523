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

Controls (results.json, beside the test accuracy [S, G]):
  train_accuracy and shuffled_test_accuracy (labels of the training tokens permuted: must sit at
  chance, which for a group with unbalanced classes is its majority_baseline), as probe_vision's;
  empty_canvas_test_accuracy: the same probes on the same labels over an empty white canvas (no
  objects, same prompts): whatever this reaches is read off the token's position alone;
  cross_shift_test_accuracy: probes trained on the paper's layout and tested on the layout moved
  along its axis by the largest allowed shift (labels follow the objects), so that a "slot" read
  off the row / column band, and so the sequence position, alone does not carry over.
The split is probing/'s (random.Random(seed) over the images, 75/25).

    python -m experiments.probe_lm --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from absl import logging

from experiments import common, plotting
from experiments.plotting import plt
from experiments.probe_vision import ORIENTATIONS, images_of, shuffled, slot_labels, visual_residuals
from spatial_jax import probes
from spatial_jax import program
from spatial_jax.data.synthetic import render_layout

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


def sweep(acts: np.ndarray, labels: np.ndarray, train_img: np.ndarray, test_img: np.ndarray, seed: int) -> dict:
    """acts [n, S, Ni, D], labels [G, n, Ni], train / test image masks [n] -> accuracies [S, G]:
    "test", "train", and "shuffled_test" (trained from zero weights on the training labels permuted)."""
    n, S, Ni, D = acts.shape
    valid = labels >= 0  # [G, n, Ni]
    train = (valid & train_img[None, :, None]).reshape(len(labels), -1)
    test = (valid & test_img[None, :, None]).reshape(len(labels), -1)
    x = np.moveaxis(acts, 1, 0).reshape(S, 1, n * Ni, D)  # shared across groups
    y = np.maximum(labels, 0).reshape(len(labels), -1)
    p = probes.train_probes(x, y, train, 3, seed=seed)  # probes [S, G]
    q = probes.train_probes(x, shuffled(y, train, seed), train, 3, init="zeros")  # see probe_vision
    return {"test": np.asarray(probes.accuracy(p, x, y, test)), "train": np.asarray(probes.accuracy(p, x, y, train)),
            "shuffled_test": np.asarray(probes.accuracy(q, x, y, test))}


def empty_canvas(items, geometry):
    """The items with their objects removed: the same prompts over an empty white canvas."""
    return [dataclasses.replace(it, render=functools.partial(render_layout, geometry, (), it.horizontal))
            for it in items]


def run() -> dict:
    def measure(model, task, orientation):
        items = images_of(task, orientation, FLAGS.max_items, FLAGS.seed)
        labels = group_labels(items)
        acts = visual_residuals(model, items, layers="all")
        train_img = probes.shuffle_split(len(items), 0.75, FLAGS.seed)
        acc = sweep(acts, labels, train_img, ~train_img, FLAGS.seed)
        empty = visual_residuals(model, empty_canvas(items, task.geometry), layers="all")
        test_labels = labels[:, ~train_img]  # [G, n_test, Ni]
        value = {"n_images": len(items), "test_accuracy": acc["test"], "train_accuracy": acc["train"],
                 "majority_baseline": [float(np.bincount(l[l >= 0], minlength=3).max() / max((l >= 0).sum(), 1))
                                       for l in test_labels],
                 "shuffled_test_accuracy": acc["shuffled_test"],
                 "empty_canvas_test_accuracy": sweep(empty, labels, train_img, ~train_img, FLAGS.seed)["test"]}
        (lo, hi), _ = task.geometry.max_shift()
        shift = hi if hi >= -lo else lo
        if shift:
            moved = [task.item(it.entities, it.direction, (shift, 0)) for it in items]
            both = np.concatenate([acts, visual_residuals(model, moved, layers="all")])
            none = np.zeros_like(train_img)
            value["cross_shift"] = shift
            value["cross_shift_test_accuracy"] = sweep(both, np.concatenate([labels, group_labels(moved)], axis=1),
                                                       np.concatenate([train_img, none]),
                                                       np.concatenate([none, ~train_img]), FLAGS.seed)["test"]
        logging.info("%s|%s: probe test accuracy by slot: %s; empty canvas: %s", task.name, orientation,
                     *("; ".join(f"{g} " + " ".join(f"{a:.2f}" for a in row) for g, row in zip(GROUPS, v.T))
                       for v in (acc["test"], value["empty_canvas_test_accuracy"])))
        return value

    out_dir, summary = common.run_parts(NAME, ORIENTATIONS, measure, setup="probing", groups=list(GROUPS))
    plot(out_dir, summary)
    return summary


CURVES = {"test_accuracy": ("-", "test"), "empty_canvas_test_accuracy": (":", "empty canvas"),
          "cross_shift_test_accuracy": ("--", "train shift 0, test moved"),
          "shuffled_test_accuracy": ("-.", "shuffled labels")}


def plot(out_dir: str, summary: dict) -> None:
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 3.0), squeeze=False)
    rows = []
    for ax, (key, v) in zip(axes[0], summary.items()):
        acc = np.array(v["test_accuracy"])  # [S, G]
        for g, name in enumerate(GROUPS):
            line, = ax.plot(acc[:, g], marker="o", ms=3, label=name)
            for field, (style, label) in list(CURVES.items())[1:]:
                if field in v:
                    ax.plot(np.array(v[field])[:, g], color=line.get_color(), ls=style, lw=1,
                            label=label if g == 0 else None)
            rows += [[*key.split("|"), name, s, *(f"{np.array(v[f])[s, g]:.3f}" if f in v else "" for f in
                                                  ("train_accuracy", *CURVES))] for s in range(len(acc))]
        plotting.chance_line(ax)
        plotting.slot_axis(ax, len(acc))
        ax.set_ylim(0, 1.03)
        ax.set_ylabel("slot-probe test accuracy")
        ax.set_title(key.replace("|", ", "), fontsize=9)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plotting.save(fig, os.path.join(out_dir, "accuracy_by_layer.png"))
    common.write_csv(os.path.join(out_dir, "accuracy_by_layer.csv"),
                     ["dataset", "orientation", "tokens", "slot", "train_accuracy", *CURVES], rows)


def headline(summary: dict) -> str:
    """Each group's best slot of the accuracy curve averaged over the dataset/orientation parts."""
    mean = {f: np.mean([v[f] for v in summary.values() if f in v], axis=0) for f in CURVES
            if any(f in v for v in summary.values())}  # each [S, G]
    acc = mean["test_accuracy"]
    best = acc.argmax(0)
    controls = "; ".join(f"{label} {', '.join(f'{g} {mean[f][s, i]:.2f}' for i, (g, s) in enumerate(zip(GROUPS, best)))}"
                         for f, (_, label) in list(CURVES.items())[1:] if f in mean)
    majority = np.mean([v["majority_baseline"] for v in summary.values()], axis=0)
    controls += "; majority class " + ", ".join(f"{g} {m:.2f}" for g, m in zip(GROUPS, majority))
    return (f"peak slot-probe test accuracy (mean of {len(summary)} parts): "
            + ", ".join(f"{g} {acc[s, i]:.2f} at {common.slot_text(s)}" for i, (g, s) in enumerate(zip(GROUPS, best)))
            + f"; at those slots, {controls}")


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
