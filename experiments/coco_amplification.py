"""Paper Table 2 (v2's headline): amplifying vision-derived ordering directions fixes COCO-spatial errors.

The protocol of the official `coco_amplification/` (run_experiment.py, src/common.py, gemma.py,
qwen.py, pixtral.py):
1. Every spatial item of the QA file is asked in both option orders ("listings", lr and rl) with the
   family's prompt style (Gemma 3 "direct", Qwen2-VL and Pixtral "anchor"; no system turn; Gemma 3
   asks the vertical items first). Answers are the decoded top-1 token after `scoring.normalize` (the official
   `norm_token`).
2. Items with an answer off the item's axis are dropped; the rest are golden (both listings right)
   or fail_lr_only / fail_rl_only / fail_both. None's accuracy is golden / kept ("strict").
3. Per axis, a 2-class probe (left/above = 0, right/below = 1) is trained on the mean of each box's
   visual tokens at the LM input, from a forward with the prompt "Describe the image.", on golden
   items whose boxes (COCO ground truth, largest box of the category) agree with the truth; the
   subject gets its side's label, the object the other. Items are split 95/5 (int(0.95 n) train).
4. On every failure, all image tokens at the LM input get h += alpha * sum_k (h.w_k / |w_k|^2) w_k
   for alpha in 0..max_alpha, with the probe's columns w_k (Probe) or fresh unit random directions
   per axis (Random). A failure is fixed at alpha when every failed listing answers the truth.
   Probe / Random: fixed at the one best global alpha > 0 (the first best); Probe* / Random*: fixed
   at any alpha > 0. Accuracy = (golden + fixed) / kept; fix rate = fixed / failures; overall and
   per axis (at the global alpha).
Controls, in results.json and the report: alpha = 0 must reproduce every unintervened answer (the
run fails if it does not), each probe's train and test accuracy, and a shuffled-label probe (same
split, labels permuted) whose test accuracy must sit near chance.

    python -m experiments.coco_amplification --checkpoint CKPT --coco_dir DIR

DIR holds coco_qa_two_obj.json (or --coco_qa), val2017/<id:012d>.jpg and
annotations/instances_val2017.json.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from absl import flags, logging
from PIL import Image
from tqdm.auto import tqdm

import spatial_jax as sj
from experiments import amplification, common, plotting
from experiments.plotting import plt
from spatial_jax import families, probes, program
from spatial_jax.data import scoring
from spatial_jax.data.coco import (FAILED_ORDERS, CocoItem, box_in_view, boxes_agree, cap_items,
                                   load_coco_spatial, overlap_tokens, side_labels, strict_outcome)
from spatial_jax.data.geometry import box_to_tokens
from spatial_jax.data.prompts import COCO_ORDERS

FLAGS = common.FLAGS
NAME = "coco_amplification"
flags.DEFINE_string("coco_dir", "", "COCO folder: val2017/ photos, annotations/instances_val2017.json and "
                    "coco_qa_two_obj.json (the official QA file).")
flags.DEFINE_string("coco_qa", "", "QA JSON in the official coco_qa_two_obj.json format (default: in --coco_dir).")
flags.DEFINE_enum("coco_prompt_style", "", ["", "direct", "anchor"],
                  "Prompt style; empty: the family's (Gemma 3 direct, Qwen2-VL and Pixtral anchor).")
flags.DEFINE_enum("box_tokens", "overlap", ["overlap", "centre"],
                  "Box -> visual tokens: every token the box overlaps (official) or the tokens whose centre it holds.")

AXES = ("horizontal", "vertical")
DIRECTION_SETS = amplification.DIRECTION_SETS  # the sweep's direction sets, in this order
COLUMNS = amplification.COLUMNS
NEUTRAL_PROMPT = "Describe the image."
PAPER_TRUST = "paper (third-party quotes, medium trust)"


@dataclass(frozen=True)
class Question:
    """One listing of one item: the prompt asked in option order `order`."""

    item: CocoItem
    order: str


def coco_paths() -> tuple[str, str, str, str]:
    """(coco_dir, QA file, val2017 folder, instances file); FileNotFoundError naming what is missing."""
    if not FLAGS.coco_dir:
        raise ValueError("--coco_dir is required (val2017/, annotations/instances_val2017.json, the QA JSON)")
    qa = FLAGS.coco_qa or os.path.join(FLAGS.coco_dir, "coco_qa_two_obj.json")
    images = os.path.join(FLAGS.coco_dir, "val2017")
    instances = os.path.join(FLAGS.coco_dir, "annotations", "instances_val2017.json")
    for path, isdir in ((FLAGS.coco_dir, True), (qa, False), (images, True), (instances, False)):
        if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
            raise FileNotFoundError(f"COCO-spatial: {path} not found")
    return FLAGS.coco_dir, qa, images, instances


def prompt_style(family: str) -> str:
    return FLAGS.coco_prompt_style or families.get(family).prompt_style


def evaluation_order(items: Sequence[CocoItem], family: str) -> list[CocoItem]:
    """Official eval order: some models (Gemma 3: `Family.coco_vertical_first`) ask the vertical
    items first, the others keep file order (it decides which items the probe's 95/5 split sees)."""
    if not families.get(family).coco_vertical_first:
        return list(items)
    return [it for it in items if it.axis == "vertical"] + [it for it in items if it.axis == "horizontal"]


def _groups(images: Sequence, keys: Sequence, batch_size: int) -> list[list[int]]:
    """Indices in chunks of at most batch_size that share (photo size, key): equal visual-token
    counts per batch, and so few compiled shapes."""
    by = defaultdict(list)
    for i, (path, key) in enumerate(zip(images, keys)):
        by[(_photo_size(path), key)].append(i)
    return [idx[s:s + batch_size] for idx in by.values() for s in range(0, len(idx), batch_size)]


def _photo_size(path) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.size


def _prepare(model: sj.Model, questions: Sequence[Question], style: str) -> sj.Batch:
    return model.prepare(images=[q.item.image for q in questions],
                         prompts=[q.item.prompt(style, q.order) for q in questions], system=None)


def _answers(model: sj.Model, token_ids) -> list[str]:
    tokenizer = model.processor.tokenizer
    return [scoring.normalize(scoring.decode_id(tokenizer, int(i))) for i in np.ravel(token_ids)]


def ask(model: sj.Model, questions: Sequence[Question], style: str, batch_size: int) -> list[str]:
    """The normalised top-1 answer of every question, unintervened."""
    out: list[str | None] = [None] * len(questions)
    for idx in tqdm(_groups([q.item.image_path for q in questions], [0] * len(questions), batch_size),
                    desc="baseline"):
        logits = sj.next_token_logits(model, _prepare(model, [questions[i] for i in idx], style))
        for i, answer in zip(idx, _answers(model, np.asarray(logits).argmax(-1))):
            out[i] = answer
    return out


def token_grid(model: sj.Model, batch: sj.Batch, row: int) -> tuple[int, int]:
    """(rows, cols) of the visual-token grid of row `row`'s image, as the processor made it."""
    return families.get(model.family).model_cls.token_grids(model.config, batch)[row]


def box_features(model: sj.Model, items: Sequence[CocoItem], rule: str, batch_size: int) -> dict:
    """Per axis, the probe data of the golden `items`: x [2n, D] (subject, object rows per item),
    y [2n], the kept items' indices, and counts of the items dropped (no box; a box outside the part of
    the image the tokens show, LLaVA's centre crop; boxes against the truth)."""
    data = {axis: {"x": [], "y": [], "items": [], "no_box": 0, "outside_view": 0, "boxes_disagree": 0} for axis in AXES}
    with_boxes = [i for i, it in enumerate(items) if it.subject_box is not None and it.object_box is not None]
    for it in items:
        data[it.axis]["no_box"] += it.subject_box is None or it.object_box is None
    for idx in tqdm(_groups([items[i].image_path for i in with_boxes], [0] * len(with_boxes), batch_size),
                    desc="probe features"):
        chunk = [items[with_boxes[j]] for j in idx]
        batch = model.prepare(images=[it.image for it in chunk], prompts=[NEUTRAL_PROMPT] * len(chunk), system=None)
        acts = np.asarray(sj.forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0],
                          np.float32)
        positions = common.image_positions(model, batch)
        for row, (j, it) in enumerate(zip(idx, chunk)):
            grid = token_grid(model, batch, row)
            if grid[0] * grid[1] != positions.shape[1]:
                raise ValueError(f"image {it.image_id}: token grid {grid} but {positions.shape[1]} visual tokens")
            size = it.image_size or _photo_size(it.image_path)
            view = model.processor.visible_box(size)
            boxes = [box_in_view(box, view) for box in (it.subject_box, it.object_box)]
            d = data[it.axis]
            if None in boxes:
                d["outside_view"] += 1
                continue
            to_tokens = overlap_tokens if rule == "overlap" else box_to_tokens
            subj, obj = (to_tokens(box, (view[2] - view[0], view[3] - view[1]), grid) for box in boxes)
            if not boxes_agree(it.relation, subj, obj, grid[1], ties_agree_second=families.get(model.family).coco_ties_agree_second):
                d["boxes_disagree"] += 1
                continue
            tokens = acts[row, positions[row]]
            d["x"] += [tokens[subj].mean(0), tokens[obj].mean(0)]
            d["y"] += list(side_labels(it))
            d["items"].append(with_boxes[j])
    return data


def train_axis_probe(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """x [2n, D] (rows in item pairs), y [2n] -> (directions [D, 2], accuracies of the probe and of
    the shuffled-label control)."""
    rows_train = np.repeat(amplification.item_split(len(x) // 2, seed), 2)  # an item's two rows on one side
    p = probes.train_probes(x, y, rows_train, 2, seed=seed)
    shuffled = np.random.default_rng(seed).permutation(y)
    control = probes.train_probes(x, shuffled, rows_train, 2, seed=seed)
    acc = lambda q, labels, mask: float(probes.accuracy(q, x, labels, mask))  # noqa: E731
    stats = {"n_items": len(x) // 2, "n_train_items": int(rows_train.sum() // 2),
             "train_accuracy": acc(p, y, rows_train), "test_accuracy": acc(p, y, ~rows_train),
             "shuffled_train_accuracy": acc(control, shuffled, rows_train),
             "shuffled_test_accuracy": acc(control, y, ~rows_train)}
    return np.asarray(probes.class_directions(p)), stats


def sweep(model: sj.Model, questions: Sequence[Question], directions: dict, alphas: np.ndarray, style: str,
          batch_size: int) -> np.ndarray:
    """[len(DIRECTION_SETS), n_alpha, n_questions] normalised top-1 answers with every image token at
    the LM input amplified along the question's axis' directions; directions[axis]: [S, D, K]."""
    out = np.empty((len(DIRECTION_SETS), len(alphas), len(questions)), object)
    groups = _groups([q.item.image_path for q in questions], [q.item.axis for q in questions], batch_size)
    for idx in tqdm(groups, desc="amplification sweep"):
        chunk = [questions[i] for i in idx]
        batch = _prepare(model, chunk, style)
        at_image = np.asarray(batch.input_ids) == model.config.image_token_id
        w = directions[chunk[0].item.axis]
        shape = (len(w), len(alphas))
        iv = sj.Intervention(site="lm.resid_pre", op="amplify", layer=np.zeros(shape, np.int32),
                             index=np.broadcast_to(sj.mask_index(at_image), shape + at_image.shape),
                             directions=np.broadcast_to(w[:, None], shape + w.shape[1:]),
                             alpha=np.broadcast_to(alphas[None].astype(np.float32), shape))
        res = sj.patch_sweep(model, batch, [iv], sj.Readout(sj.last_positions(batch.attention_mask),
                                                            np.zeros((len(chunk), 1), np.int32)))
        out[:, :, idx] = np.array(_answers(model, res.argmax), object).reshape(res.argmax.shape)
    return out


def fixed_matrix(answers: np.ndarray, failures: Sequence[CocoItem], question_of: dict) -> np.ndarray:
    """answers [S, A, n_questions] -> fixed [S, A, n_failures]: every failed listing answers the truth."""
    out = np.ones(answers.shape[:2] + (len(failures),), bool)
    for f, (it, outcome) in enumerate(failures):
        for order in FAILED_ORDERS[outcome]:
            out[:, :, f] &= answers[:, :, question_of[it.index, order]] == it.relation
    return out


def summarize(n_golden: dict, failure_axes: np.ndarray, fixed: np.ndarray) -> dict:
    """Table 2 from golden counts per axis, the axis of each failure [F] and fixed [S, A, F]."""
    n_fail = {axis: int((failure_axes == axis).sum()) for axis in AXES}
    total = {axis: n_golden[axis] + n_fail[axis] for axis in AXES}
    scopes = {"overall": np.ones(len(failure_axes), bool), **{axis: failure_axes == axis for axis in AXES}}

    def rates(fixed_count: dict) -> dict:
        out = {}
        for scope, mask in scopes.items():
            g = sum(n_golden.values()) if scope == "overall" else n_golden[scope]
            t = sum(total.values()) if scope == "overall" else total[scope]
            f = int(mask.sum())
            out[scope] = {"fixed": fixed_count[scope],  # NaN for a scope without items / failures
                          "accuracy": (g + fixed_count[scope]) / t if t else math.nan,
                          "fix_rate": fixed_count[scope] / f if f else math.nan}
        return out

    table = {"None": rates({s: 0 for s in scopes})}
    for s, name in enumerate(DIRECTION_SETS):
        per_alpha = fixed[s, 1:].sum(-1)
        best = int(np.argmax(per_alpha)) + 1
        oracle = fixed[s, 1:].any(0)
        table[name] = {**rates({scope: int(fixed[s, best][m].sum()) for scope, m in scopes.items()}), "alpha": best}
        table[name + "*"] = rates({scope: int(oracle[m].sum()) for scope, m in scopes.items()})
    return {"n_golden": n_golden, "n_failures": n_fail, "n_items": total, "table": table,
            "fixed_by_alpha": {name: fixed[s].sum(-1).tolist() for s, name in enumerate(DIRECTION_SETS)},
            "oracle_by_alpha": {name: amplification.oracle_curve(fixed[s]).tolist()
                                for s, name in enumerate(DIRECTION_SETS)}}


def run() -> dict:
    if FLAGS.max_alpha < 1:
        raise ValueError(f"--max_alpha must be >= 1 (alpha 0 is the replay check), got {FLAGS.max_alpha}")
    coco_dir, qa, images, instances = coco_paths()
    loaded = cap_items(load_coco_spatial(qa, images, instances), FLAGS.max_items)
    if not loaded:
        raise ValueError(f"{qa}: no left/right/above/below items")
    model, _ = common.load_model()
    style = prompt_style(model.family)
    items = evaluation_order(loaded, model.family)
    alphas = np.arange(FLAGS.max_alpha + 1)
    results = common.Results(common.experiment_dir(NAME), common.run_config(
        coco_dir=os.path.abspath(coco_dir), coco_qa=os.path.abspath(qa), style=style, box_tokens=FLAGS.box_tokens,
        max_alpha=FLAGS.max_alpha))

    questions = [Question(it, order) for it in items for order in COCO_ORDERS]
    question_of = {(q.item.index, q.order): i for i, q in enumerate(questions)}
    if not results.done("baseline"):
        results.put("baseline", {"answers": ask(model, questions, style, FLAGS.batch_size)})
    answers = results.get("baseline")["answers"]
    outcomes = [strict_outcome(it, answers[question_of[it.index, "lr"]], answers[question_of[it.index, "rl"]])
                for it in items]
    golden = [it for it, o in zip(items, outcomes) if o == "golden"]
    failures = [(it, o) for it, o in zip(items, outcomes) if o in FAILED_ORDERS]
    partition = {k: sum(o == k for o in outcomes) for k in ("golden", *FAILED_ORDERS, "invalid")}
    logging.info("COCO-spatial %s prompts: %s", style, partition)

    if not results.done("probes"):
        part = {}
        features = box_features(model, golden, FLAGS.box_tokens, FLAGS.batch_size)
        for axis in AXES:
            d = features[axis]
            stats = {"no_box": d["no_box"], "outside_view": d["outside_view"], "boxes_disagree": d["boxes_disagree"],
                     "n_items": len(d["items"])}
            if len(d["items"]) >= 2:
                w, trained = train_axis_probe(np.stack(d["x"]), np.array(d["y"]), FLAGS.seed)
                stats |= trained | {"directions": w.tolist()}
            part[axis] = stats
        results.put("probes", part)
    probe_part = results.get("probes")
    ready = {axis for axis in AXES if "directions" in probe_part[axis]}
    failures = [(it, o) for it, o in failures if it.axis in ready]
    summary = {"style": style, "partition": partition, "probes": {a: {k: v for k, v in p.items() if k != "directions"}
                                                                  for a, p in probe_part.items()},
               "n_items_asked": len(items)}
    if failures:
        if not results.done("sweep"):
            directions = {}
            for axis in sorted(ready):
                w = np.array(probe_part[axis]["directions"], np.float32)
                key = jax.random.fold_in(jax.random.key(FLAGS.seed), AXES.index(axis))
                directions[axis] = np.stack([np.asarray(probes.random_directions(key, w.shape[0], w.shape[1])), w])
            failed = [Question(it, order) for it, o in failures for order in FAILED_ORDERS[o]]
            swept = sweep(model, failed, directions, alphas, style, FLAGS.batch_size)
            results.put("sweep", {"questions": [[q.item.index, q.order] for q in failed], "answers": swept.tolist()})
        part = results.get("sweep")
        swept = np.array(part["answers"], object)
        failed_of = {(index, order): i for i, (index, order) in enumerate(part["questions"])}
        replayed = swept[:, 0]
        baseline = np.array([answers[question_of[key]] for key in map(tuple, part["questions"])], object)
        mismatches = int((replayed != baseline[None]).sum())
        fixed = fixed_matrix(swept, failures, failed_of)
        # an axis without a probe (fewer than 2 usable golden items) is left out of the table
        golden_axes = {axis: sum(it.axis == axis for it in golden) if axis in ready else 0 for axis in AXES}
        summary |= summarize(golden_axes, np.array([it.axis for it, _ in failures]), fixed)
        summary["alpha0_mismatches"] = mismatches
    summary["paper"] = dict(families.get(model.family).paper.get("coco", {}))
    write_outputs(results.dir, summary)
    if summary.get("alpha0_mismatches"):
        raise RuntimeError(f"alpha = 0 changed {summary['alpha0_mismatches']} answers: the intervention path is "
                           "not the unintervened model (see results.json)")
    logging.info("%s", headline(summary))
    return summary


def write_outputs(out_dir: str, summary: dict) -> None:
    common.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    if "table" not in summary:
        return
    rows = []
    for column in COLUMNS:
        t = summary["table"][column]
        rows.append([column, t.get("alpha", ""), *(f"{t[s][k]:.4f}" for s in ("overall", *AXES)
                                                  for k in ("accuracy", "fix_rate")),
                     *(summary["paper"].get(key, "") for key in (column, column + " fixes"))])
    header = ["column", "alpha", *(f"{s}_{k}" for s in ("overall", *AXES) for k in ("accuracy", "fix_rate")),
              "paper_accuracy", "paper_fix_rate"]
    common.write_csv(os.path.join(out_dir, "table2.csv"), header, rows)
    plot(out_dir, summary)


STYLES = {"Random": ("tab:blue", "--", "s"), "Probe": ("tab:red", "-", "o")}


def plot(out_dir: str, summary: dict) -> None:
    """Left: accuracy against alpha (fixed at that alpha; starred: at any alpha up to it), overall
    and per axis. Right: Table 2's five columns, ours beside the paper's quoted values."""
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    g, n = sum(summary["n_golden"].values()), sum(summary["n_items"].values())
    n_alpha = len(summary["fixed_by_alpha"]["Probe"])
    alphas = np.arange(n_alpha)
    ax.axhline(g / n, color="gray", lw=1, label=f"None: {g / n:.2f}")
    for name, (colour, style, marker) in STYLES.items():
        best = summary["table"][name]
        ax.plot(alphas, (g + np.array(summary["fixed_by_alpha"][name])) / n, color=colour, ls=style, marker=marker,
                ms=4, label=f"{name}: {best['overall']['accuracy']:.2f} at alpha {best['alpha']}")
        n_fail = max(sum(summary["n_failures"].values()), 1)
        oracle = (g + np.array(summary["oracle_by_alpha"][name]) * n_fail) / n
        ax.plot(alphas, oracle, color=colour, ls=":", marker="^", ms=3, mfc="none",
                label=f"{name}*: {summary['table'][name + '*']['overall']['accuracy']:.2f} (any alpha)")
    ax.set_xticks(alphas)
    ax.set_xlabel("alpha (amplification at the LM input, every image token)")
    ax.set_ylabel("strict accuracy ((golden + fixed) / items)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{summary['style']} prompts: {g} golden, {n - g} failures of {n} items", fontsize=9)
    x = np.arange(len(COLUMNS))
    ours = [summary["table"][c]["overall"]["accuracy"] for c in COLUMNS]
    paper = [summary["paper"].get(c, np.nan) for c in COLUMNS]
    bars.bar(x - 0.2, ours, 0.4, label="ours", color="tab:red")
    bars.bar(x + 0.2, np.nan_to_num(paper), 0.4, label=PAPER_TRUST + (" " + summary["paper"]["model"] if summary[
        "paper"] else ": none for this family"), color="tab:gray")
    for xi, v, q in zip(x, ours, paper):
        bars.text(xi - 0.2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
        bars.text(xi + 0.2, (0 if np.isnan(q) else q) + 0.01, "n/a" if np.isnan(q) else f"{q:.2f}", ha="center",
                  fontsize=7, color="dimgray")
    bars.set_xticks(x, COLUMNS)
    bars.set_ylim(0, 1.1)
    bars.set_ylabel("strict accuracy")
    bars.legend(fontsize=7, loc="upper left")
    bars.set_title("Table 2 columns", fontsize=9)
    fig.suptitle("COCO-spatial: amplifying the ordering directions (paper Table 2)", fontsize=10)
    plotting.save(fig, os.path.join(out_dir, "table2.png"))


def headline(summary: dict) -> str:
    if "table" not in summary:
        return f"{summary['partition']}: nothing to amplify"
    t = summary["table"]
    ours = ", ".join(f"{c} {t[c]['overall']['accuracy']:.2f}" + (f" ({t[c]['overall']['fix_rate']:.1%} fixed)"
                                                               if c != "None" else "") for c in COLUMNS)
    paper = summary["paper"]
    quoted = ", ".join(f"{k} {v}" for k, v in paper.items() if k != "model")
    return (f"ours: {ours}; Probe at alpha {t['Probe']['alpha']}; alpha=0 replay mismatches "
            f"{summary['alpha0_mismatches']}" + (f" | {PAPER_TRUST}, {paper['model']}: {quoted}" if paper else ""))


def main(argv):
    del argv
    summary = run()
    print(headline(summary))


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
