"""Paper Table 2 and section 5.4: amplifying the vision-derived ordering directions fixes errors.

The official protocol (coco_amplification/src/common.py), on the synthetic tasks. Per axis
(horizontal, vertical): a 2-class probe (slot 0 vs slot 2: left vs right, above vs below) is
trained on the mean-pooled object tokens, as the LM receives them, of the items the model answers
correctly ("golden"), W and b ~ randn / sqrt(D), AdamW 200 epochs, 95/5 split by item; its train
and held-out accuracy are reported. On the items it gets wrong, every visual token at the LM input
gets h += alpha * sum_k (h.w_k / |w_k|^2) w_k for alpha in 0..15, with the probe's class
directions or, as the control, fresh random unit directions (drawn per axis). A failure is fixed
when the decoded, normalised top-1 token is the answer. Per dataset, Probe and Random use ONE best
alpha > 0 (the one fixing the most failures over both axes), Probe* / Random* each item's best
(any alpha > 0); each is reported as accuracy = (golden + fixed) / items beside the fix rate =
fixed / failures, per axis and overall; None is the unintervened accuracy.

Control: alpha = 0 must reproduce the unintervened answers exactly (the arg-max token ids of the
failures are compared; results.json "alpha0_replay"); the run raises after writing its results if
any part breaks it, as the official run asserts.

    python -m experiments.amplification --checkpoint checkpoints/organism --dataset squares
"""
from __future__ import annotations

import os
import random
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
from spatial_jax.data import scoring

FLAGS = common.FLAGS
NAME = "amplification"
AXES = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
flags.DEFINE_integer("max_alpha", 15, "Amplification strengths 0..max_alpha.")
COLUMNS = ("None", "Random", "Random*", "Probe", "Probe*")
DIRECTION_SETS = ("Random", "Probe")
MIN_PROBE_ITEMS = 4  # fewer golden items than this leave no probe to train (the part is reported without one)
TRAIN_FRACTION = 0.95


def item_split(n: int, seed: int) -> np.ndarray:
    """[n] bool train mask: items shuffled with random.Random(seed), the first
    max(1, int(0.95 n)) (at most n - 1) train, as the official 95/5 split counts them."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = min(max(1, int(TRAIN_FRACTION * n)), n - 1)
    train = np.zeros(n, bool)
    train[order[:n_train]] = True
    return train


def axis_probe(acts: np.ndarray, items, seed: int) -> tuple[np.ndarray, dict]:
    """acts [n, 1, Ni, D] of golden items -> (class directions [D, 2], {train_acc, test_acc, ...})."""
    slot0 = np.stack([acts[i, 0, it.regions.objects[0]].mean(0) for i, it in enumerate(items)])
    slot2 = np.stack([acts[i, 0, it.regions.objects[2]].mean(0) for i, it in enumerate(items)])
    x = np.concatenate([slot0, slot2])
    y = np.repeat([0, 1], len(items))
    train = np.tile(item_split(len(items), seed), 2)  # both rows of an item on one side
    p = probes.train_probes(x, y, train, 2, seed=seed)
    stats = {"train_acc": float(probes.accuracy(p, x, y, train)), "test_acc": float(probes.accuracy(p, x, y, ~train)),
             "n_train_items": int(train.sum() // 2), "n_test_items": int((~train).sum() // 2)}
    return np.asarray(probes.class_directions(p)), stats


def sweep_alphas(model, failures, directions: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (fixed [n_dirs, n_alpha, n_failures] bool: the decoded top-1 is the answer under each
    (directions, alpha); argmax [n_dirs, n_alpha, n_failures] token ids)."""
    fixed, argmax = [], []
    tok = model.processor.tokenizer
    for chunk, batch in common.batches(model, failures, FLAGS.batch_size):
        at_image = np.asarray(batch.input_ids) == model.config.image_token_id
        shape = (len(directions), len(alphas))
        iv = sj.Intervention(site="lm.resid_pre", op="amplify",
                             layer=np.zeros(shape, np.int32),
                             index=np.broadcast_to(sj.mask_index(at_image), shape + at_image.shape),
                             directions=np.broadcast_to(directions[:, None], shape + directions.shape[1:]),
                             alpha=np.broadcast_to(alphas[None].astype(np.float32), shape))
        cands = scoring.Candidates.of(tok, [[it.answer] for it in chunk])
        res = sj.patch_sweep(model, batch, [iv], sj.Readout(sj.last_positions(batch.attention_mask), cands.readout))
        fixed.append(scoring.answers_match(res.argmax, [it.answer for it in chunk], tok))
        argmax.append(np.asarray(res.argmax))
    return np.concatenate(fixed, axis=-1), np.concatenate(argmax, axis=-1)


def baseline(model, items) -> tuple[np.ndarray, np.ndarray]:
    """-> (correct [n] bool, arg-max token ids [n]) of the unintervened model."""
    ids = []
    for _, batch in common.batches(model, items, FLAGS.batch_size):
        ids.append(np.asarray(sj.next_token_logits(model, batch)).argmax(-1))
    ids = np.concatenate(ids)
    return scoring.answers_match(ids, [it.answer for it in items], model.processor.tokenizer), ids


def oracle_curve(fixed: np.ndarray) -> np.ndarray:
    """fixed [n_alpha, n] -> [n_alpha]: failures fixed at some alpha in 1..a (0 at a = 0), counts."""
    return np.concatenate([[0], np.logical_or.accumulate(fixed[1:], axis=0).sum(-1)])


def run() -> dict:
    alphas = np.arange(FLAGS.max_alpha + 1)

    def measure(model, task, axis):
        items = [it for it in common.task_items(task.name, task.geometry, FLAGS.max_items, FLAGS.seed)
                 if it.direction in AXES[axis]]
        correct, ids = baseline(model, items)
        # --nogolden (smoke runs on untrained models): the probe trains on every item
        golden = [it for it, c in zip(items, correct) if c or not FLAGS.golden]
        failures = [it for it, c in zip(items, correct) if not c]
        value = {"n": len(items), "golden": int(correct.sum()), "failures": len(failures)}
        if len(golden) >= MIN_PROBE_ITEMS and failures:
            w_probe, value["probe"] = axis_probe(visual_residuals(model, golden), golden, FLAGS.seed)
            key = jax.random.fold_in(jax.random.key(FLAGS.seed), list(AXES).index(axis))  # fresh per axis
            rand = np.asarray(probes.random_directions(key, w_probe.shape[0], 2))
            fixed, argmax = sweep_alphas(model, failures, np.stack([rand, w_probe]), alphas)
            value["alpha0_replay"] = {"n": len(failures), "mismatches": int((argmax[:, 0] != ids[~correct]).sum())}
            for name, f in zip(DIRECTION_SETS, fixed):
                value[name] = {"fixed_by_alpha": f.sum(-1).tolist(), "oracle_by_alpha": oracle_curve(f).tolist()}
        logging.info("%s|%s: %d failures of %d; probe %s; alpha=0 replay %s", task.name, axis, len(failures),
                     len(items), common.brief(value.get("probe", {})), common.brief(value.get("alpha0_replay", {})))
        return value

    out_dir, summary = common.run_parts(NAME, list(AXES), measure, max_alpha=FLAGS.max_alpha)
    table = tables(summary)
    rows = [[dataset, axis, t["n"], t["failures"], *(f"{t[c]['accuracy']:.3f} ({t[c]['fix_rate']:.2f})"
                                                      if c in t else "" for c in COLUMNS),
             t.get("best_alpha", {}).get("Probe", ""), t.get("probe_test_acc", ""), t.get("alpha0_replay", "")]
            for dataset, by_axis in table.items() for axis, t in by_axis.items()]
    common.write_csv(os.path.join(out_dir, "accuracy_and_fix_rates.csv"),
                     ["dataset", "axis", "items", "failures", *(f"{c}: acc (fix rate)" for c in COLUMNS),
                      "probe_best_alpha", "probe_test_acc", "alpha0_replay_mismatches"], rows)
    plot(out_dir, summary)
    broken = [k for k, v in summary.items() if v.get("alpha0_replay", {}).get("mismatches")]
    if broken:
        raise RuntimeError(f"alpha = 0 changed the unintervened answers in {broken}: the amplification path "
                           f"does not replay the model (see {out_dir}/results.json alpha0_replay)")
    return summary


def tables(summary: dict) -> dict[str, dict[str, dict]]:
    """dataset -> {horizontal, vertical, overall} -> the Table 2 columns as accuracy and fix rate,
    with Probe / Random at the dataset's one best alpha > 0 (most failures fixed over both axes)."""
    out: dict[str, dict[str, dict]] = {}
    for dataset in dict.fromkeys(k.split("|")[0] for k in summary):
        parts = {axis: summary[f"{dataset}|{axis}"] for axis in AXES if f"{dataset}|{axis}" in summary}
        swept = {a: v for a, v in parts.items() if "Probe" in v}
        best = {name: int(np.argmax(np.sum([v[name]["fixed_by_alpha"] for v in swept.values()], axis=0)[1:])) + 1
                for name in DIRECTION_SETS} if swept else {}
        rows = {}
        for axis, group in [*((a, [a]) for a in parts), ("overall", list(parts))]:
            vs = [parts[a] for a in group]
            n, golden, failures = (sum(v[k] for v in vs) for k in ("n", "golden", "failures"))
            row = {"n": n, "failures": failures, "None": _rate(golden, 0, n, failures)}
            if swept and all("Probe" in v or not v["failures"] for v in vs):
                for name in DIRECTION_SETS:
                    at_best = sum(v[name]["fixed_by_alpha"][best[name]] for v in vs if name in v)
                    any_alpha = sum(v[name]["oracle_by_alpha"][-1] for v in vs if name in v)
                    row[name], row[name + "*"] = (_rate(golden, f, n, failures) for f in (at_best, any_alpha))
                row["best_alpha"] = best
                row["alpha0_replay"] = sum(v["alpha0_replay"]["mismatches"] for v in vs if "alpha0_replay" in v)
                if axis != "overall" and "probe" in vs[0]:
                    row["probe_test_acc"] = f"{vs[0]['probe']['test_acc']:.2f}"
            rows[axis] = row
        out[dataset] = rows
    return out


def _rate(golden: int, fixed: int, n: int, failures: int) -> dict:
    return {"accuracy": (golden + fixed) / max(n, 1), "fix_rate": fixed / max(failures, 1), "fixed": fixed}


# (colour, line style, marker) per column: a direction set and its oracle share a colour, the
# oracle is dotted; markers keep lines that coincide (e.g. all at 0) distinguishable
STYLES = {"Random": ("tab:blue", "--", "s"), "Random*": ("tab:blue", ":", "v"),
          "Probe": ("tab:red", "-", "o"), "Probe*": ("tab:red", ":", "^")}


def _why_no_probe(v: dict) -> str:
    if not v["failures"]:
        return "no failures"
    return f"{v['failures']} failures, but fewer than {MIN_PROBE_ITEMS} items to train a probe on"


def plot(out_dir: str, summary: dict) -> None:
    """Accuracy against alpha: a panel per (dataset, axis) part with a probe, a line per direction
    set (Random / Probe at that alpha, Random* / Probe* over the alphas 1..alpha), None flat, the
    dataset's best alpha marked; the parts without a probe are listed under the panels."""
    table = tables(summary)
    drawn = {k: v for k, v in summary.items() if "Probe" in v}
    cols = min(max(len(drawn), 1), len(AXES))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(max(rows, 1), cols, figsize=(6.6 * cols, 3.0 * rows + (0.9 if rows else 1.6)), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_axis_off()
    for ax, (key, v) in zip(axes.flat, drawn.items()):
        dataset, axis = key.split("|")
        t = table[dataset][axis]
        alphas = np.arange(len(v["Probe"]["fixed_by_alpha"]))
        ax.plot(alphas, np.full(len(alphas), t["None"]["accuracy"]), color="gray", label=f"None: {t['None']['accuracy']:.2f}")
        for column, (colour, style, marker) in STYLES.items():
            name = column.rstrip("*")
            counts = np.array(v[name]["oracle_by_alpha" if column.endswith("*") else "fixed_by_alpha"])
            label = f"{column}: {t[column]['accuracy']:.2f} (fixes {t[column]['fix_rate']:.2f})"
            if not column.endswith("*"):
                label += f" at alpha {t['best_alpha'][name]}"
            ax.plot(alphas, (v["golden"] + counts) / v["n"], color=colour, ls=style, marker=marker, ms=4, mfc="none",
                    label=label)
        ax.axvline(t["best_alpha"]["Probe"], color="tab:red", lw=0.6, alpha=0.5)
        probe = v["probe"]
        ax.set_title(f"{dataset}, {axis}: {v['failures']} failures of {v['n']}; probe acc train {probe['train_acc']:.2f}, "
                     f"held-out {probe['test_acc']:.2f}", fontsize=8)
        ax.set_xticks(alphas)
        ax.set_xlabel("alpha")
        ax.set_ylabel("accuracy ((golden + fixed) / items)")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    skipped = [f"{k.replace('|', ' ')}: {_why_no_probe(v)}" for k, v in summary.items() if "Probe" not in v]
    if skipped:
        fig.supxlabel(textwrap.fill("Not amplified (" + "; ".join(skipped) + ")", 110), fontsize=8)
    fig.suptitle("Amplifying the ordering directions at the LM input (paper Table 2; one best alpha per dataset)",
                 fontsize=10)
    plotting.save(fig, os.path.join(out_dir, "accuracy_by_alpha.png"))


def _cells(t: dict) -> str:
    return ", ".join(f"{c} {t[c]['accuracy']:.2f}" + ("" if c == "None" else f" ({t[c]['fix_rate']:.2f})")
                     for c in COLUMNS)


def headline(summary: dict) -> str:
    """Per dataset, Table 2's columns over both axes at the dataset's best alpha; where an axis has
    no probe, each axis on its own."""
    out = []
    for dataset, rows in tables(summary).items():
        t = rows["overall"]
        if "Probe" in t:
            held_out = "/".join(rows[a].get("probe_test_acc", "-") for a in AXES if a in rows)
            replay = "alpha=0 replays" if not t["alpha0_replay"] else f"alpha=0 CHANGED {t['alpha0_replay']} answers"
            out.append(f"{dataset} ({t['failures']} failures of {t['n']}): {_cells(t)} at alpha "
                       f"{t['best_alpha']['Probe']}; probe held-out acc h/v {held_out}; {replay}")
            continue
        axes = [f"{a}: {_cells(rows[a])}" if "Probe" in rows[a] else f"{a}: {_why_no_probe(summary[f'{dataset}|{a}'])}"
                for a in AXES if a in rows]
        out.append(f"{dataset}: accuracy {t['None']['accuracy']:.2f} ({'; '.join(axes)})")
    return "accuracy (fix rate) " + "; ".join(out)


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
