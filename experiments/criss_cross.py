"""Paper Figs. 6 and 7: criss-cross swaps of object-only and strip regions at every LM slot.

The counterfactual is the clean image reversed with the same prompt. At each slot (the LM input,
then each layer's output), the clean run's left (top) region takes the cf run's right (bottom)
region and vice versa; the colour at each place is unchanged, only where its tokens came from.
The flip rate is the fraction of pairs whose answer becomes the cf's answer (the entity now at
the queried end), per slot and region set.

    python -m experiments.criss_cross --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

import spatial_jax as sj
from experiments import common, plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "criss_cross"
REGION_SETS = ("object", "strip")


def region_swaps(model, batch, items) -> np.ndarray:
    """[R, B, T] swap maps (object-only, strip) between slot 0 and slot 2 of each row."""
    pos = common.image_positions(model, batch)
    T = np.shape(batch.input_ids)[1]
    maps = np.empty((len(REGION_SETS), len(items), T), np.int32)
    for b, it in enumerate(items):
        for r, regions in enumerate((it.regions.objects, it.regions.strips)):
            maps[r, b] = sj.swap_index(T, [(pos[b, regions[0]], pos[b, regions[2]])])
    return maps


def sweep_pairs(model, pairs, index_fn, batch_size, under=None):
    """Runs a region-swap sweep over golden pairs; returns (flip, keep) rates [L+1, R].

    under(items, batch) -> interventions applied to the clean and the cf runs alike (Fig. 9).
    """
    flips, keeps, n = 0.0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        clean_items, cf_items = [p.clean for p in chunk], [p.counterfactual for p in chunk]
        clean, cf = common.prepare(model, clean_items), common.prepare(model, cf_items)
        tokens = np.array([[common.answer_token(model, w) for w in p.candidates] for p in chunk])
        extra = {} if under is None else dict(clean_interventions=under(clean_items, clean),
                                              cf_interventions=under(cf_items, cf))
        res = sj.region_swap_sweep(model, clean, cf, index_fn(model, clean, clean_items), tokens, **extra)
        flips = flips + (res.argmax == tokens[None, None, :, 2]).sum(-1)
        keeps = keeps + (res.argmax == tokens[None, None, :, 0]).sum(-1)
        n += len(chunk)
    return flips / n, keeps / n


def golden_criss_cross_pairs(model, task, directions):
    return pairs_lib.criss_cross_pairs(task.item, list(task.entities), common.pair_filter(model),
                                       directions=directions, n_per_direction=FLAGS.n_pairs, seed=FLAGS.seed)


def run() -> dict:
    def measure(model, task, direction):
        pairs = golden_criss_cross_pairs(model, task, [direction])[direction]
        if not pairs:
            return {"n_pairs": 0}
        flip, keep = sweep_pairs(model, pairs, region_swaps, FLAGS.batch_size)
        logging.info("%s|%s: %d pairs; strip flip at slot 0 %.2f, object flip at slot 0 %.2f", task.name,
                     direction, len(pairs), flip[0, 1], flip[0, 0])
        return {"n_pairs": len(pairs), "flip": flip.tolist(), "keep": keep.tolist()}

    out_dir, summary = common.run_parts(NAME, DIRECTIONS, measure)
    plot(out_dir, summary, "Criss-cross swaps (paper Figs. 6, 7)")
    return summary


def plot(out_dir: str, summary: dict, title: str, region_sets=REGION_SETS) -> None:
    """Flip rate per slot: one panel per dataset, a line per region set (mean over directions,
    weighted by pairs), thin lines per direction; also a CSV."""
    datasets = sorted({k.split("|")[0] for k in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.2), squeeze=False)
    rows = []
    for ax, dataset in zip(axes[0], datasets):
        parts = {k.split("|")[1]: v for k, v in summary.items() if k.startswith(dataset + "|") and v["n_pairs"]}
        if not parts:
            ax.set_title(f"{dataset}: no golden pairs")
            continue
        mean = common.pair_weighted_mean(list(parts.values()), "flip")  # [L+1, R]
        for r, name in enumerate(region_sets):
            line, = ax.plot(mean[:, r], marker="o", ms=3, label=f"{name} swap")
            for d, v in parts.items():
                ax.plot(np.array(v["flip"])[:, r], color=line.get_color(), alpha=0.25, lw=0.8)
                rows += [[dataset, d, name, s, f"{f:.3f}", v["n_pairs"]] for s, f in enumerate(np.array(v["flip"])[:, r])]
        plotting.slot_axis(ax, len(mean))
        ax.set_ylabel("flip rate")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dataset} ({sum(v['n_pairs'] for v in parts.values())} pairs)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    plotting.save(fig, os.path.join(out_dir, "flip_rate.png"))
    common.write_csv(os.path.join(out_dir, "flip_rate.csv"), ["dataset", "direction", "regions", "slot", "flip_rate", "n_pairs"], rows)


def headline(summary: dict, region_sets=REGION_SETS) -> str:
    """Per region set, the flip rate at the LM input and its peak over slots, over all pairs."""
    parts = list(summary.values())
    n = sum(v["n_pairs"] for v in parts)
    if not n:
        return "no golden pairs"
    flip = common.pair_weighted_mean(parts, "flip")  # [L+1, R]
    return f"{n} pairs; " + "; ".join(
        f"{name} swap flips {flip[0, r]:.2f} at emb, peak {flip[:, r].max():.2f} at {common.slot_text(int(flip[:, r].argmax()))}"
        for r, name in enumerate(region_sets))


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
