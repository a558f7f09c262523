"""Paper Table 5: accuracy with the vision encoder's ordering signal ablated at the LM input.

At `lm.resid_pre` of layer 0 (the visual tokens as the LM receives them), each entity's tokens
are replaced by the middle-slot tokens of an "isolated" image (that entity alone at the canvas
centre: identity kept, position erased), and every other visual token by the same token of an
empty white canvas (ordering stored in the background erased). All visual tokens are ablated,
whatever the grid size (the official Gemma run ablated only 144 of 256, paper.md section 5).

    python -m experiments.ablation --checkpoint checkpoints/organism --dataset squares,shapes,objects
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image
from tqdm.auto import tqdm

import spatial_jax as sj
from experiments import common, plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data import scoring
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import SYSTEM_TEXT
from spatial_jax.data.synthetic import SyntheticTask, make_task, render_layout

FLAGS = common.FLAGS
NAME = "ablation"


def _blank(side: int) -> Image.Image:
    return Image.new("RGBA", (side, side), (0, 0, 0, 0))


def _lm_input(model: sj.Model, items: Sequence[Item], images) -> np.ndarray:
    """[B, T, D] LM input of the items' prompts shown `images` instead of their own."""
    batch = model.prepare(images=list(images), prompts=[it.prompt for it in items], system=SYSTEM_TEXT)
    return np.asarray(sj.forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0])


def ablation_intervention(model: sj.Model, task: SyntheticTask, items: Sequence[Item], batch: sj.Batch) -> sj.Intervention:
    """The Table 5 ablation of `batch` (the items' own prompts and images) as one replace."""
    geometry = task.geometry
    empty = _lm_input(model, items, [render_layout(geometry, (), it.horizontal) for it in items])
    source = empty.copy()
    pos = common.image_positions(model, batch)
    for slot in range(3):
        isolated = [render_layout(geometry, (_blank, task.entities[it.entities[slot]].sprite, _blank), it.horizontal)
                    for it in items]
        acts = _lm_input(model, items, isolated)
        for b, it in enumerate(items):
            # isolated entity sits in the middle slot; its tokens go where the entity stood
            source[b, pos[b, it.regions.objects[slot]]] = acts[b, pos[b, it.regions.objects[1]]]
    at_image = np.asarray(batch.input_ids) == model.config.image_token_id
    return sj.Intervention(site="lm.resid_pre", op="replace", layer=0, source=source, index=sj.mask_index(at_image))


def run() -> dict:
    model, geometry = common.load_model()
    results = common.Results(common.experiment_dir(NAME), common.run_config())
    for dataset in FLAGS.dataset:
        if results.done(dataset):
            continue
        task = make_task(dataset, geometry)
        items = common.task_items(dataset, geometry, FLAGS.max_items, FLAGS.seed)
        correct, base_correct = [], []
        for chunk, batch in tqdm(common.batches(model, items, FLAGS.batch_size), desc=f"{NAME} {dataset}",
                                 total=-(-len(items) // FLAGS.batch_size)):
            iv = ablation_intervention(model, task, chunk, batch)
            tok = model.processor.tokenizer
            answers = [it.answer for it in chunk]
            base_correct += list(scoring.top1_correct(np.asarray(sj.next_token_logits(model, batch)), answers, tok))
            correct += list(scoring.top1_correct(np.asarray(sj.next_token_logits(model, batch, [iv])), answers, tok))
        results.put(dataset, {"n": len(items), "accuracy": float(np.mean(correct)),
                              "baseline": float(np.mean(base_correct))})
        logging.info("%s: ablated accuracy %.3f (baseline %.3f)", dataset, np.mean(correct), np.mean(base_correct))
    summary = {d: results.get(d) for d in FLAGS.dataset}
    common.write_csv(os.path.join(results.dir, "accuracy.csv"), ["dataset", "n", "baseline", "ablated"],
                     [[d, s["n"], f"{s['baseline']:.3f}", f"{s['accuracy']:.3f}"] for d, s in summary.items()])
    plot(results.dir, summary)
    return summary


def plot(out_dir: str, summary: dict) -> None:
    """Table 5 as bars: per dataset, accuracy without and with the ablation, values printed on top."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(summary), 3.4))
    x = np.arange(len(summary))
    for i, (field, label) in enumerate((("baseline", "no ablation"), ("accuracy", "vision ordering ablated"))):
        bars = ax.bar(x + (i - 0.5) * 0.38, [s[field] for s in summary.values()], 0.38, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    plotting.chance_line(ax, "chance (1/3)")
    ax.set_xticks(x, [f"{d}\n(n={s['n']})" for d, s in summary.items()])
    ax.set_ylim(0, 1.3)  # room above a bar at 1.0 for its value and the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Ablated at the LM input (paper Table 5)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    plotting.save(fig, os.path.join(out_dir, "accuracy.png"))


def headline(summary: dict) -> str:
    return "top-1 accuracy without -> with the ablation: " + ", ".join(
        f"{d} {s['baseline']:.2f} -> {s['accuracy']:.2f} (n={s['n']})" for d, s in summary.items())


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
