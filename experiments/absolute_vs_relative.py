"""The shifted-layout control: is the ordering signal absolute (where on the canvas) or relative
(which of the three entities)?

A slot probe is trained on the paper's layout (object tokens at the LM input, one probe per
orientation) and tested on moved layouts against two labelings: relative (the entity's slot) and
absolute (the slot of the unshifted strip, the canvas band, that holds the token). Moved layouts,
in both orientations: the paper's spacing shifted by whole tokens along its axis ("spaced"), and
the three objects packed side by side (spacing 0) at every position along the axis ("packed").
Shifting the spaced layout keeps each object inside its own strip on every registered geometry,
so there the two labelings coincide; packed layouts carry objects across strip boundaries, and
only where the labelings differ ("crossing" > 0) can the control tell a relative code (relative
accuracy high) from an absolute one (absolute accuracy high). The model's accuracy on each layout
is reported beside.

    python -m experiments.absolute_vs_relative --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from experiments import common, plotting
from experiments.plotting import plt
from experiments.probe_vision import ORIENTATIONS, slot_labels, train_slot_probes, visual_residuals
from spatial_jax import probes
from spatial_jax import program
from spatial_jax.data.prompts import OPPOSITE

FLAGS = common.FLAGS
NAME = "absolute_vs_relative"
LAYOUTS = {"spaced": None, "packed": 0}  # name -> spacing between objects (None: the geometry's)
MEASURES = ("accuracy", "probe_relative", "probe_absolute")


def shifted_items(task, orientation: str, shift: int, n: int, seed: int, spacing: int | None = None):
    """Both directions of the orientation for n triples (0: all), layout moved `shift` tokens."""
    triples = task.triples()
    keep = np.random.default_rng(seed).permutation(len(triples))[:n] if n else np.arange(len(triples))
    first = ORIENTATIONS[orientation]
    return [task.item(triples[i], d, (shift, 0), spacing) for i in keep for d in (first, OPPOSITE[first])]


def layouts(geometry) -> list[tuple[str, int]]:
    """(layout, shift) of every moved layout: each spaced shift but 0, each packed position."""
    out = []
    for name, spacing in LAYOUTS.items():
        (lo, hi), _ = geometry.max_shift(spacing)
        out += [(name, s) for s in range(lo, hi + 1) if not (spacing is None and s == 0)]
    return out


def run() -> dict:
    def measure(model, task, orientation):
        n_triples = (FLAGS.max_items // 2) if FLAGS.max_items else 0
        base = shifted_items(task, orientation, 0, n_triples, FLAGS.seed)[::2]  # one item per image
        p, _, _ = train_slot_probes(visual_residuals(model, base), slot_labels(base, "object"), FLAGS.seed)
        absolute = slot_labels(base[:1], "strip")[0]  # [Ni] unshifted strip of each token position
        rows = {}
        for layout, shift in layouts(task.geometry):
            items = shifted_items(task, orientation, shift, n_triples, FLAGS.seed, LAYOUTS[layout])
            answers = common.predict(model, items, FLAGS.batch_size)
            images = items[::2]
            acts = visual_residuals(model, images)[:, 0]  # [n, Ni, D]
            pred = np.asarray(probes.predict(probe_at0(p), acts.reshape(-1, acts.shape[-1]))).reshape(acts.shape[:2])
            rel = slot_labels(images, "object")
            abs_labels = np.where(rel >= 0, np.broadcast_to(absolute, rel.shape), -1)
            on_objects = rel >= 0
            key = f"{layout} {shift:+d}"
            rows[key] = {
                "accuracy": float(np.mean([a == it.answer for a, it in zip(answers, items)])),
                "probe_relative": float((pred == rel)[on_objects].mean()),
                "probe_absolute": float((pred == abs_labels)[on_objects].mean()),
                "crossing": float((rel != abs_labels)[on_objects].mean()),
            }
            logging.info("%s %s %s: %s", task.name, orientation, key, common.brief(rows[key]))
        return rows

    out_dir, summary = common.run_parts(NAME, ORIENTATIONS, measure, setup="probing")
    plot(out_dir, summary)
    return summary


def probe_at0(p: probes.Probes) -> probes.Probes:
    return probes.Probes(p.w[0], p.b[0])


def plot(out_dir: str, summary: dict) -> None:
    """A panel per (dataset, orientation): the three measures per moved layout, the layouts whose
    labelings differ shaded by how many object tokens cross a strip boundary."""
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 3.4), squeeze=False)
    rows = []
    for ax, (key, by_layout) in zip(axes[0], summary.items()):
        names = list(by_layout)
        x = np.arange(len(names))
        for name, marker in zip(MEASURES, "osv"):
            ax.plot(x, [by_layout[n][name] for n in names], marker=marker, ls="", label=name.replace("_", " "))
        ax.bar(x, [by_layout[n]["crossing"] for n in names], color="gray", alpha=0.25, label="tokens crossing a strip")
        rows += [[*key.split("|"), n, *(f"{by_layout[n][k]:.3f}" for k in (*MEASURES, "crossing"))] for n in names]
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(key.replace("|", ", "), fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Moved layouts: absolute vs relative ordering (probe trained on the paper's layout)")
    plotting.save(fig, os.path.join(out_dir, "shifts.png"))
    common.write_csv(os.path.join(out_dir, "shifts.csv"),
                     ["dataset", "orientation", "layout", *MEASURES, "crossing"], rows)


def headline(summary: dict) -> str:
    """Per dataset and orientation, the three measures averaged over the layouts where the two
    labelings differ (some object token crosses a strip boundary)."""
    out = []
    for key, by_layout in summary.items():
        crossing = [v for v in by_layout.values() if v["crossing"] > 0]
        if not crossing:
            out.append(f"{key.replace('|', ' ')}: no layout crosses a strip (the labelings coincide)")
            continue
        mean = {k: np.mean([v[k] for v in crossing]) for k in MEASURES}
        out.append(f"{key.replace('|', ' ')} over {len(crossing)} crossing layouts: accuracy {mean['accuracy']:.2f}, "
                   f"probe vs relative {mean['probe_relative']:.2f}, vs absolute {mean['probe_absolute']:.2f}")
    return "; ".join(out)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
