"""Paper Fig. 4 (and its LM-side extension): 3-class slot probes on visual tokens.

probe_vision: a linear probe predicts an entity's slot (0/1/2 = left/middle/right, or
top/middle/bottom) from its visual tokens as the LM receives them (`lm.resid_pre` of layer 0 at
the image positions: the merger / projector output), trained on object tokens, 75/25 split by
image, one probe per orientation. Applied to every token of the test images it gives the "strip"
heatmap: background tokens classified by the column (row) band they share with an object.

    python -m experiments.probe_vision --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

import spatial_jax as sj
from experiments import common, plotting
from experiments.plotting import plt
from spatial_jax import probes
from spatial_jax import program

FLAGS = common.FLAGS
NAME = "probe_vision"
ORIENTATIONS = {"horizontal": "left", "vertical": "above"}  # one direction per image layout


def images_of(task, orientation: str, max_images: int, seed: int):
    """One item per distinct image of an orientation (the query direction does not change it)."""
    items = task.items(directions=[ORIENTATIONS[orientation]])
    if 0 < max_images < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), max_images, replace=False))
        items = [items[i] for i in keep]
    return items


def visual_residuals(model, items, layers: str = "input") -> np.ndarray:
    """Residual stream at every visual token: [n_items, S, Ni, D] with S = 1 slot (layers="input",
    the LM input) or L + 1 slots (layers="all": input of every layer, then the last output)."""
    sites = ("lm.resid_pre",) if layers == "input" else ("lm.resid_pre", "lm.resid_post")
    out = []
    for chunk, batch in common.batches(model, items, FLAGS.batch_size):
        cache = sj.forward(model, batch, cache=sites, logits=False).cache
        pos = common.image_positions(model, batch)  # [B, Ni]
        pre = np.asarray(cache["lm.resid_pre"])
        acts = pre[:, :1] if layers == "input" else np.concatenate([pre, np.asarray(cache["lm.resid_post"])[:, -1:]], 1)
        out.append(np.take_along_axis(acts, pos[:, None, :, None], axis=2))
    return np.concatenate(out)


def slot_labels(items, kind: str) -> np.ndarray:
    """[n_items, Ni] slot label (0, 1, 2) of each token's object ("object") or strip ("strip"); -1 elsewhere."""
    labels = np.full((len(items), items[0].regions.n_tokens), -1, np.int32)
    for i, it in enumerate(items):
        for slot, region in enumerate(it.regions.objects if kind == "object" else it.regions.strips):
            labels[i, region] = slot
    return labels


def train_slot_probes(acts: np.ndarray, labels: np.ndarray, seed: int):
    """acts [n, S, Ni, D], labels [n, Ni] -> (probes [S], test accuracy [S], test image mask [n])."""
    n, S, Ni, D = acts.shape
    train_img = probes.split_by_group(np.arange(n), 0.25, seed)
    valid = labels >= 0
    train = (valid & train_img[:, None]).reshape(-1)
    test = (valid & ~train_img[:, None]).reshape(-1)
    x = np.moveaxis(acts, 1, 0).reshape(S, n * Ni, D)
    y = np.maximum(labels, 0).reshape(-1)
    p = probes.train_probes(x, y, train, 3, seed=seed)
    return p, np.asarray(probes.accuracy(p, x, y, test)), train_img


def heatmap(p, acts: np.ndarray, test_img: np.ndarray, grid) -> np.ndarray:
    """Mean class probabilities of every token over the test images: [rows, cols, 3]."""
    x = acts[test_img, 0]  # [n_test, Ni, D]
    proba = np.asarray(probes.predict_proba(p, x.reshape(-1, x.shape[-1])))  # [n_test * Ni, 3]
    return proba.reshape(len(x), grid[0], grid[1], 3).mean(0)


def run() -> dict:
    def measure(model, task, orientation):
        items = images_of(task, orientation, FLAGS.max_items, FLAGS.seed)
        acts = visual_residuals(model, items)
        p, acc, train_img = train_slot_probes(acts, slot_labels(items, "object"), FLAGS.seed)
        hm = heatmap(probe_at(p, 0), acts, ~train_img, items[0].regions.grid)
        logging.info("%s|%s: object-token probe test accuracy %.3f", task.name, orientation, acc[0])
        return {"n_images": len(items), "test_accuracy": float(acc[0]), "heatmap": hm.tolist()}

    out_dir, summary = common.run_parts(NAME, ORIENTATIONS, measure)
    rows = [[k.split("|")[0], k.split("|")[1], v["n_images"], f"{v['test_accuracy']:.3f}"] for k, v in summary.items()]
    common.write_csv(os.path.join(out_dir, "accuracy.csv"), ["dataset", "orientation", "images", "test_accuracy"], rows)
    plot_heatmaps(out_dir, {k: np.array(v["heatmap"]) for k, v in summary.items()})
    return summary


def probe_at(p: probes.Probes, i: int) -> probes.Probes:
    return probes.Probes(p.w[i], p.b[i])


def plot_heatmaps(out_dir: str, maps: dict) -> None:
    """Each token coloured by the probe's mean (slot 0, slot 1, slot 2) probabilities as (R, G, B)."""
    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 3.0), squeeze=False)
    for ax, (key, m) in zip(axes[0], maps.items()):
        ax.imshow(np.clip(m, 0, 1), interpolation="nearest")
        ax.set_title(key.replace("|", "\n"), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Slot probe on every visual token (R = slot 0, G = slot 1, B = slot 2)", fontsize=9)
    plotting.save(fig, os.path.join(out_dir, "strip_heatmaps.png"), dpi=130)


def headline(summary: dict) -> str:
    return "object-token slot probe test accuracy " + ", ".join(
        f"{k.replace('|', ' ')} {v['test_accuracy']:.2f}" for k, v in summary.items())


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
