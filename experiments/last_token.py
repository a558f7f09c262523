"""Paper Fig. 3: last-token residual patching at every slot, tracking five candidate answers.

Clean (c0, c1, c2) asked in direction d answers c0; the counterfactual (c4, c1, c3) asked in the
opposite direction answers c3 (layouts mirrored for right/below, paper section 4a). Patching the
cf's last-token residual into the clean run at slot s shows, as s grows, the clean answer c0,
then c2 (the clean image's entity at the cf's queried ordinal position: the "ordering" layers),
then c3 (the cf's answer itself: the "attribute" layers). Probabilities are summed over
spellings, as the paper reports them. Pairs come from the official last_token_exp stream: Squares
draws from the 7 colours of its COLOR_RGB (the palette plus Orange) for every model, one
random.Random(seed) across the four directions in the official order.

    python -m experiments.last_token --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

import spatial_jax as sj
from experiments import common, estimates, plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.data import scoring
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "last_token"
CANDIDATES = ("c0 (clean answer)", "c1 (reference)", "c2 (clean entity at cf's position)", "c3 (cf answer)",
              "c4 (cf only)")


ODDS = "change of log p(c3) - log p(c0)"  # the estimate's quantity: the cf answer against the clean one


def candidate_probs(model, pairs, batch_size, method: str = "exact") -> dict:
    """Over `pairs`: "probs", the mean probability [L+1, 5] of (c0..c4) at each slot, each summed
    over its spellings (exact); "attribution", the estimated change of log p(c3) - log p(c0) from
    the clean run per slot and pair beside the exact one (`estimates.summarise`; methods attribution, both)."""
    total, parts = 0.0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        run = common.padded(chunk, batch_size)  # one batch shape per prompt length; the copies are dropped
        n = len(chunk)
        cands = scoring.Candidates.of(model.processor.tokenizer, [p.candidates for p in run])
        clean = common.prepare(model, [p.clean for p in run])
        cf = common.prepare(model, [p.counterfactual for p in run])
        if method in ("exact", "both"):
            res = sj.last_token_sweep(model, clean, cf, cands.readout)
            total = total + cands.probs(res.probs)[:, :n].sum(1)  # [L+1, 5]
        if method in ("attribution", "both"):
            parts.append(estimates.estimate(sj.last_token_sweep, (model, clean, cf, cands.readout), cands, 3, 0, n,
                                            res.logits if method == "both" else None))
    out = {} if method == "attribution" else {"probs": total / len(pairs)}
    if parts:
        cat = {k: np.concatenate([p[k] for p in parts], -1) for k in parts[0]}
        out["attribution"] = estimates.summarise(cat["estimate_odds"], cat.get("exact_odds"), ODDS, cat.get("score"))
    return out


def run() -> dict:
    golden = {}  # dataset -> direction -> pairs: one official stream for all four directions

    def measure(model, task, direction):
        if task.name not in golden:
            golden[task.name] = pairs_lib.last_token_pairs(
                task.item, common.pair_pool(model, task), common.pair_filter(model), directions=common.directions_of(task),
                n_per_direction=FLAGS.n_pairs, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
        pairs = golden[task.name][direction]
        logging.info("%s|%s: %d golden pairs", task.name, direction, len(pairs))
        if not pairs:
            return {"n_pairs": 0}
        return {"n_pairs": len(pairs), **candidate_probs(model, pairs, FLAGS.batch_size, FLAGS.method)}

    out_dir, summary = common.run_parts(NAME, DIRECTIONS, measure, setup="last_token", whatsup={"pair_sides": 5},
                                        **estimates.run_config())
    if estimates.exact_wanted():
        plot(out_dir, summary)
    estimates.plot(out_dir, summary, "Last-token patching (paper Fig. 3)")
    return summary


def plot(out_dir: str, summary: dict) -> None:
    datasets = sorted({k.split("|")[0] for k in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.4), squeeze=False)
    rows = []
    for ax, dataset in zip(axes[0], datasets):
        parts = [v for k, v in summary.items() if k.startswith(dataset + "|") and v["n_pairs"]]
        if not parts:
            ax.set_title(f"{dataset}: no golden pairs")
            continue
        n = sum(v["n_pairs"] for v in parts)
        mean = common.pair_weighted_mean(parts, "probs")  # [L+1, 5]
        for k, label in enumerate(CANDIDATES):
            ax.plot(mean[:, k], marker="o", ms=3, label=label)
        rows += [[dataset, s, *(f"{p:.4f}" for p in mean[s]), n] for s in range(len(mean))]
        plotting.slot_axis(ax, len(mean), "patched " + plotting.SLOT_AXIS_LABEL)
        ax.set_ylabel("probability")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{dataset} ({n} pairs)")
        ax.legend(fontsize=6)
    fig.suptitle("Last-token patching (paper Fig. 3)")
    plotting.save(fig, os.path.join(out_dir, "candidate_probs.png"))
    common.write_csv(os.path.join(out_dir, "candidate_probs.csv"), ["dataset", "slot", "c0", "c1", "c2", "c3", "c4", "n_pairs"], rows)


def headline(summary: dict) -> str:
    """The most probable of c0..c4 at each patched slot, over all pairs: c0 (clean answer) early,
    c2 in the ordering layers and c3 (cf answer) in the attribute layers is the paper's Fig. 3."""
    parts = list(summary.values())
    n = sum(v["n_pairs"] for v in parts)
    if not n:
        return "no golden pairs"
    estimated = estimates.headline(summary)
    if not any("probs" in v for v in parts):
        return f"{n} pairs; {estimated}"
    leader = common.pair_weighted_mean(parts, "probs").argmax(-1)  # [L+1]
    return (f"{n} pairs; most probable candidate per patched slot (emb, 0, 1, ...): " + " ".join(f"c{c}" for c in leader)
            + (f"; {estimated}" if estimated else ""))


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
