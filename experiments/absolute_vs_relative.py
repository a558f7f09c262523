"""The shifted-squares control: is the ordering signal absolute (where on the canvas) or relative
(which of the three entities)?

The whole three-entity layout is shifted by whole tokens along its axis. For each shift: the
model's accuracy, and a slot probe trained on the unshifted layout (object tokens at the LM
input) tested on the shifted objects' tokens against two labelings: relative (the entity's slot)
and absolute (the slot of the unshifted strip, the canvas band, that holds the token position).
A relative code keeps relative accuracy high under shifts; an absolute one follows the absolute
labels. Where a shift keeps every object inside its unshifted strip the two labelings agree.

    python -m experiments.absolute_vs_relative --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from experiments import common, plotting
from experiments.plotting import plt
from experiments.probe_vision import slot_labels, train_slot_probes, visual_residuals
from spatial_jax import probes
from spatial_jax import program
from spatial_jax.data.synthetic import make_task

FLAGS = common.FLAGS
NAME = "absolute_vs_relative"


def shifted_items(task, shift: int, n: int, seed: int):
    triples = task.triples()
    keep = np.random.default_rng(seed).permutation(len(triples))[:n] if n else np.arange(len(triples))
    return [task.item(triples[i], d, (shift, 0)) for i in keep for d in ("left", "right")]


def run() -> dict:
    model, geometry = common.load_model()
    results = common.Results(common.experiment_dir(NAME), common.run_config())
    (lo, hi), _ = geometry.max_shift()
    for dataset in FLAGS.dataset:
        key = dataset
        if results.done(key):
            continue
        task = make_task(dataset, geometry)
        n_triples = (FLAGS.max_items // 2) if FLAGS.max_items else 0
        base = shifted_items(task, 0, n_triples, FLAGS.seed)[::2]  # one item per image
        p, _, _ = train_slot_probes(visual_residuals(model, base), slot_labels(base, "object"), FLAGS.seed)
        absolute = slot_labels(base[:1], "strip")[0]  # [Ni] unshifted strip of each token position
        rows = {}
        for shift in tqdm(range(lo, hi + 1), desc=f"{NAME} {dataset}"):
            items = shifted_items(task, shift, n_triples, FLAGS.seed)
            answers = common.predict(model, items, FLAGS.batch_size)
            images = items[::2]
            acts = visual_residuals(model, images)[:, 0]  # [n, Ni, D]
            pred = np.asarray(probes.predict(probe_at0(p), acts.reshape(-1, acts.shape[-1]))).reshape(acts.shape[:2])
            rel = slot_labels(images, "object")
            abs_labels = np.where(rel >= 0, np.broadcast_to(absolute, rel.shape), -1)
            rows[str(shift)] = {
                "accuracy": float(np.mean([a == it.answer for a, it in zip(answers, items)])),
                "probe_relative": float((pred == rel)[rel >= 0].mean()),
                "probe_absolute": float((pred == abs_labels)[abs_labels >= 0].mean()),
            }
            logging.info("%s shift %d: %s", dataset, shift, common.brief(rows[str(shift)]))
        results.put(key, rows)
    summary = {d: results.get(d) for d in FLAGS.dataset}
    plot(results.dir, summary)
    return summary


def probe_at0(p: probes.Probes) -> probes.Probes:
    return probes.Probes(p.w[0], p.b[0])


def plot(out_dir: str, summary: dict) -> None:
    fig, axes = plt.subplots(1, len(summary), figsize=(4 * len(summary), 3), squeeze=False)
    rows = []
    for ax, (dataset, by_shift) in zip(axes[0], summary.items()):
        shifts = sorted(by_shift, key=int)
        for name in ("accuracy", "probe_relative", "probe_absolute"):
            vals = [by_shift[s][name] for s in shifts]
            ax.plot([int(s) for s in shifts], vals, marker="o", label=name.replace("_", " "))
        rows += [[dataset, s, *(by_shift[s][k] for k in ("accuracy", "probe_relative", "probe_absolute"))] for s in shifts]
        ax.set_xlabel("layout shift along its axis (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    fig.suptitle("Shifted layouts: absolute vs relative ordering")
    plotting.save(fig, os.path.join(out_dir, "shifts.png"))
    common.write_csv(os.path.join(out_dir, "shifts.csv"),
                     ["dataset", "shift", "accuracy", "probe_relative", "probe_absolute"], rows)


def headline(summary: dict) -> str:
    """Per dataset, the three measures averaged over the shifts that move the layout (shift != 0)."""
    out = []
    for dataset, by_shift in summary.items():
        moved = [v for s, v in by_shift.items() if int(s) != 0]
        if not moved:
            out.append(f"{dataset}: the canvas leaves no room to shift")
            continue
        mean = {k: np.mean([v[k] for v in moved]) for k in ("accuracy", "probe_relative", "probe_absolute")}
        out.append(f"{dataset} over {len(moved)} nonzero shifts: accuracy {mean['accuracy']:.2f}, slot probe "
                   f"vs relative labels {mean['probe_relative']:.2f}, vs absolute {mean['probe_absolute']:.2f}")
    return "; ".join(out)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
