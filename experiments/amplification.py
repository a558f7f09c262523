"""Paper Table 2 and section 5.4: amplifying the vision-derived ordering directions fixes errors.

Per axis (horizontal, vertical): a 2-class probe (slot 0 vs slot 2: left vs right, above vs
below) is trained on the mean-pooled object tokens, as the LM receives them, of the items the
model answers correctly ("golden"; 95/5 split by item). On the items it gets wrong, every visual
token at the LM input gets h += alpha * sum_k (h.w_k / |w_k|^2) w_k for alpha in 0..15, with the
probe's class directions or, as the control, fresh random unit directions. Fix rates (fraction of
failures answered correctly): None (no intervention), Random / Probe at the best single alpha,
Random* / Probe* at each item's best alpha > 0. alpha = 0 is a replay check: it must fix nothing.
The figure draws each column against alpha: Random / Probe at that alpha, Random* / Probe* over
the alphas 1..alpha (so the curve ends at the table's value), None flat at 0.

    python -m experiments.amplification --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os
import textwrap

import jax
import numpy as np
from absl import flags, logging

import spatial_jax as sj
from experiments import common, plotting
from experiments.plotting import plt
from experiments.probe_vision import visual_residuals
from spatial_jax import probes
from spatial_jax import program

FLAGS = common.FLAGS
NAME = "amplification"
AXES = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
flags.DEFINE_integer("max_alpha", 15, "Amplification strengths 0..max_alpha.")
COLUMNS = ("None", "Random", "Random*", "Probe", "Probe*")
MIN_PROBE_ITEMS = 4  # fewer items than this leave no probe to train (an axis's part is then reported without one)


def axis_probe(acts: np.ndarray, items, seed: int) -> np.ndarray:
    """acts [n, 1, Ni, D] of golden items -> the probe's class directions [D, 2]."""
    slot0 = np.stack([acts[i, 0, it.regions.objects[0]].mean(0) for i, it in enumerate(items)])
    slot2 = np.stack([acts[i, 0, it.regions.objects[2]].mean(0) for i, it in enumerate(items)])
    x = np.concatenate([slot0, slot2])
    y = np.repeat([0, 1], len(items))
    train = probes.split_by_group(np.tile(np.arange(len(items)), 2), 0.05, seed)
    return np.asarray(probes.class_directions(probes.train_probes(x, y, train, 2, seed=seed)))


def fixed_by_alpha(model, failures, directions: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """[n_dirs, n_alpha, n_failures] bool: answered correctly under each (directions, alpha)."""
    out = []
    for chunk, batch in common.batches(model, failures, FLAGS.batch_size):
        at_image = np.asarray(batch.input_ids) == model.config.image_token_id
        shape = (len(directions), len(alphas))
        iv = sj.Intervention(site="lm.resid_pre", op="amplify",
                             layer=np.zeros(shape, np.int32),
                             index=np.broadcast_to(sj.mask_index(at_image), shape + at_image.shape),
                             directions=np.broadcast_to(directions[:, None], shape + directions.shape[1:]),
                             alpha=np.broadcast_to(alphas[None].astype(np.float32), shape))
        answers = np.array([[common.answer_token(model, it.answer)] for it in chunk])
        res = sj.patch_sweep(model, batch, [iv], sj.Readout(sj.last_positions(batch.attention_mask), answers))
        out.append(res.argmax == answers[None, None, :, 0])
    return np.concatenate(out, axis=-1)


def oracle_curve(fixed: np.ndarray) -> np.ndarray:
    """fixed [n_alpha, n] -> [n_alpha]: fraction of failures fixed at some alpha in 1..a (0 at a = 0)."""
    return np.concatenate([[0.0], np.logical_or.accumulate(fixed[1:], axis=0).mean(-1)])


def fix_rates(fixed: np.ndarray) -> tuple[float, float, int]:
    """fixed [n_alpha, n] -> (rate at the best single alpha > 0, rate at any alpha > 0, best alpha)."""
    per_alpha = fixed[1:].mean(-1)
    best = int(np.argmax(per_alpha)) + 1
    return float(per_alpha.max()), float(oracle_curve(fixed)[-1]), best


def run() -> dict:
    alphas = np.arange(FLAGS.max_alpha + 1)

    def measure(model, task, axis):
        items = [it for it in common.task_items(task.name, task.geometry, FLAGS.max_items, FLAGS.seed)
                 if it.direction in AXES[axis]]
        correct = np.array([a == it.answer for a, it in zip(common.predict(model, items, FLAGS.batch_size), items)])
        # --nogolden (smoke runs on untrained models): the probe trains on every item
        golden = [it for it, c in zip(items, correct) if c or not FLAGS.golden]
        failures = [it for it, c in zip(items, correct) if not c]
        value = {"n": len(items), "golden": int(correct.sum()), "failures": len(failures)}
        if len(golden) >= MIN_PROBE_ITEMS and failures:
            w_probe = axis_probe(visual_residuals(model, golden), golden, FLAGS.seed)
            rand = np.asarray(probes.random_directions(jax.random.key(FLAGS.seed), w_probe.shape[0], 2))
            fixed = fixed_by_alpha(model, failures, np.stack([rand, w_probe]), alphas)
            value["replay_fixed_at_alpha0"] = int(fixed[:, 0].sum())
            for name, f in (("Random", fixed[0]), ("Probe", fixed[1])):
                rate, oracle, best = fix_rates(f)
                value |= {name: rate, name + "*": oracle, name + "_best_alpha": best,
                          name + "_by_alpha": f.mean(-1).tolist(), name + "*_by_alpha": oracle_curve(f).tolist()}
            value["None"] = 0.0
        logging.info("%s|%s: %d failures of %d; %s", task.name, axis, len(failures), len(items),
                     common.brief({c: value.get(c) for c in COLUMNS}))
        return value

    out_dir, summary = common.run_parts(NAME, list(AXES), measure, max_alpha=FLAGS.max_alpha)
    rows = [[*k.split("|"), v["n"], v["failures"], *(f"{v[c]:.3f}" if c in v else "" for c in COLUMNS),
             v.get("Probe_best_alpha", ""), v.get("replay_fixed_at_alpha0", "")] for k, v in summary.items()]
    common.write_csv(os.path.join(out_dir, "fix_rates.csv"),
                     ["dataset", "axis", "items", "failures", *COLUMNS, "probe_best_alpha", "fixed_at_alpha0"], rows)
    plot(out_dir, summary)
    return summary


# (colour, line style, marker) per column: a direction set and its oracle share a colour, the
# oracle is dotted; markers keep lines that coincide (e.g. all at 0) distinguishable
STYLES = {"None": ("gray", "-", ""), "Random": ("tab:blue", "--", "s"), "Random*": ("tab:blue", ":", "v"),
          "Probe": ("tab:red", "-", "o"), "Probe*": ("tab:red", ":", "^")}


def _why_no_probe(v: dict) -> str:
    if not v["failures"]:
        return "no failures"
    return f"{v['failures']} failures, but fewer than {MIN_PROBE_ITEMS} items to train a probe on"


def plot(out_dir: str, summary: dict) -> None:
    """Fix rate against alpha: a panel per (dataset, axis) part with a probe, a line per column of
    Table 2; the parts without one are listed under the panels (a trained model may have none)."""
    drawn = {k: v for k, v in summary.items() if "Probe" in v}
    cols = min(max(len(drawn), 1), len(AXES))
    rows = -(-len(drawn) // cols)
    # each panel's legend (which holds the table's values) sits to its right, off the curves;
    # without panels the figure is only the line saying why
    fig, axes = plt.subplots(max(rows, 1), cols, figsize=(6.6 * cols, 3.0 * rows + (0.9 if rows else 1.6)), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_axis_off()
    for ax, (key, v) in zip(axes.flat, drawn.items()):
        alphas = np.arange(len(v["Probe_by_alpha"]))
        for column, (colour, style, marker) in STYLES.items():
            if column == "None":
                curve, label = np.zeros(len(alphas)), "None: 0.00"
            elif column.endswith("*"):
                curve, label = v[column + "_by_alpha"], f"{column}: {v[column]:.2f} (any alpha)"
            else:
                curve = v[column + "_by_alpha"]
                label = f"{column}: {v[column]:.2f} at alpha {v[column + '_best_alpha']}"
            ax.plot(alphas, curve, color=colour, ls=style, marker=marker, ms=4, mfc="none", label=label)
        ax.set_title(f"{key.replace('|', ', ')}: {v['failures']} failures of {v['n']}", fontsize=9)
        ax.set_xticks(alphas)
        ax.set_xlabel("alpha")
        ax.set_ylabel("fix rate (fraction of failures)")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    skipped = [f"{k.replace('|', ' ')}: {_why_no_probe(v)}" for k, v in summary.items() if "Probe" not in v]
    if skipped:
        fig.supxlabel(textwrap.fill("Not amplified (" + "; ".join(skipped) + ")", 110), fontsize=8)
    fig.suptitle("Amplifying the ordering directions at the LM input (paper Table 2)", fontsize=10)
    plotting.save(fig, os.path.join(out_dir, "fix_rate_by_alpha.png"))


def headline(summary: dict) -> str:
    parts = []
    for key, v in summary.items():
        name = key.replace("|", " ")
        if "Probe" not in v:
            parts.append(f"{name}: {_why_no_probe(v)}")
            continue
        parts.append(f"{name} ({v['failures']} failures): " + ", ".join(f"{c} {v[c]:.2f}" for c in COLUMNS)
                     + f" (Probe at alpha {v['Probe_best_alpha']})")
    return "fix rates " + "; ".join(parts)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
