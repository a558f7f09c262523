"""Paper Figs. 6 and 7: criss-cross swaps of object-only and strip regions at every LM slot.

The counterfactual is the clean image reversed with the same prompt. At each slot (the LM input,
then each layer's output), the clean run's left (top) region takes the cf run's right (bottom)
region and vice versa; the colour at each place is unchanged, only where its tokens came from.
Recorded per slot and region set, as the official code and the paper's figures have them: the
mean and std over pairs of the probabilities of c0 (clean answer), c1 (reference) and c2 (cf
answer), each summed over its spellings; and the flip rate, the fraction of pairs whose decoded,
normalised top-1 token becomes c2 (keep: stays c0).

Controls, on the first --batch_size pairs of each direction (results.json "controls"):
  identity:    every image token replaced by itself from the clean run (must flip none: a broken
               patching path shows here);
  whole_image: every image token from the reversed image (the cf run): at the LM input this is the
               cf image itself, so it must flip most answers of a model that answers correctly; an
               all-zero curve next to a flat region-swap curve means the index map is broken.

Pairs come from the official stream (spatial_jax.data.pairs) over the model's palette, all four
directions in the official order, golden under the model's own answers.

What'sUp (left/right only) swaps the official hand-labelled object and strip regions of each middle
object (Qwen2-VL and Gemma 3 grids; --whatsup_regions=bbox for other grids, not official).

    python -m experiments.criss_cross --checkpoint checkpoints/organism --dataset squares
    python -m experiments.criss_cross --checkpoint ckpt --dataset whatsup --whatsup_dir DIR
"""
from __future__ import annotations

import os

import numpy as np
from absl import flags, logging

import spatial_jax as sj
from experiments import common, estimates, plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.data import scoring
from spatial_jax.data.prompts import DIRECTIONS

FLAGS = common.FLAGS
NAME = "criss_cross"
REGION_SETS = ("object", "strip")
CONTROLS = ("identity", "whole_image")
CANDIDATES = ("c0 (clean answer)", "c1 (reference)", "c2 (cf answer)")
CANDIDATE_COLOURS = ("tab:red", "tab:green", "tab:blue")
MIN_WHOLE_IMAGE_FLIP = 0.5  # the positive control's bar at the LM input

flags.DEFINE_enum("whatsup_regions", "hand_labelled", ["hand_labelled", "bbox"],
                  "What'sUp swap regions: the official hand-labelled tables (Qwen2-VL and Gemma 3 grids) or "
                  "the probing boxes (any grid; not official).")


def region_index(T: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[T] source map of the official swap: clean[a + b] <- cf[b + a], position by position (a
    symmetric swap when a and b have equal sizes; official Gemma 3 What'sUp "table" strips do not)."""
    index = np.full((T,), -1, np.int32)
    index[np.concatenate([a, b])] = np.concatenate([b, a])
    return index


def region_swaps(model, batch, items) -> np.ndarray:
    """[R, B, T] swap maps (object-only, strip) between slot 0 and slot 2 of each row."""
    pos = common.image_positions(model, batch)
    T = np.shape(batch.input_ids)[1]
    maps = np.empty((len(REGION_SETS), len(items), T), np.int32)
    for b, it in enumerate(items):
        for r, regions in enumerate((it.regions.objects, it.regions.strips)):
            maps[r, b] = region_index(T, pos[b, regions[0]], pos[b, regions[2]])
    return maps


def image_map(model, batch) -> np.ndarray:
    """[1, B, T]: every visual token reads the same position of the source run (the controls)."""
    pos = common.image_positions(model, batch)
    index = np.full(np.shape(batch.input_ids), -1, np.int32)
    np.put_along_axis(index, pos, pos, axis=1)
    return index[None]


ODDS = "change of log p(c2) - log p(c0)"  # the estimate's quantity: towards the cf answer, from the clean run


def _sweep(model, chunk, index_fn, under, batch_size, source_is_clean=False, method="exact") -> dict:
    """One region-swap sweep over a chunk of pairs -> probs [S, R, B, 3], flipped, kept [S, R, B]
    (exact), estimate_odds (attribution; score with --grad_drop) and exact_odds (both) [S, R, B]:
    the change of log p(c2) - log p(c0) from the clean run's (`estimates.estimate`). The chunk is run padded to batch_size
    (common.padded); the copies' results are dropped."""
    tok = model.processor.tokenizer
    n, chunk = len(chunk), common.padded(chunk, batch_size)
    clean_items, cf_items = [p.clean for p in chunk], [p.counterfactual for p in chunk]
    clean = common.prepare(model, clean_items)
    cf = clean if source_is_clean else common.prepare(model, cf_items)
    cands = scoring.Candidates.of(tok, [p.candidates for p in chunk])
    extra = {} if under is None else dict(clean_interventions=under(clean_items, clean),
                                          cf_interventions=under(clean_items if source_is_clean else cf_items, cf))
    index = index_fn(model, clean, clean_items)
    out = {}
    if method in ("exact", "both"):
        res = sj.region_swap_sweep(model, clean, cf, index, cands.readout, **extra)
        out.update(probs=cands.probs(res.probs)[..., :n, :],
                   flipped=scoring.answers_match(res.argmax, cands.column(2), tok)[..., :n],
                   kept=scoring.answers_match(res.argmax, cands.column(0), tok)[..., :n])
    if method in ("attribution", "both"):
        out.update(estimates.estimate(sj.region_swap_sweep, (model, clean, cf, index, cands.readout), cands, 2, 0, n,
                                      res.logits if method == "both" else None, **extra))
    return out


def sweep_pairs(model, pairs, index_fn, batch_size, under=None, method="exact") -> dict:
    """Region-swap sweeps over golden pairs -> per slot and region set: flip / keep rates [S, R]
    and the candidates' probabilities, mean and std over pairs [S, R, 3] (exact); the estimate
    of the change of log p(c2) - log p(c0) beside the exact one (`estimates.summarise`; attribution, both).

    under(items, batch) -> interventions applied to the clean and the cf runs alike (Fig. 9).
    """
    parts = [_sweep(model, pairs[i:i + batch_size], index_fn, under, batch_size, method=method)
             for i in range(0, len(pairs), batch_size)]
    cat = {k: np.concatenate([p[k] for p in parts], axis=-2 if k == "probs" else -1) for k in parts[0]}
    out = {}
    if "probs" in cat:
        out.update(flip=cat["flipped"].mean(-1), keep=cat["kept"].mean(-1), probs_mean=cat["probs"].mean(-2),
                   probs_std=cat["probs"].std(-2))
    if "estimate_odds" in cat:
        out["attribution"] = estimates.summarise(cat["estimate_odds"], cat.get("exact_odds"), ODDS, cat.get("score"))
    return out


def control_sweeps(model, pairs, batch_size, under=None) -> dict:
    """The identity and whole-image controls on the first `batch_size` pairs: flip and keep rates
    per slot [S] of each, and whether each passed."""
    chunk = pairs[:batch_size]
    identity = _sweep(model, chunk, lambda m, batch, items: image_map(m, batch), under, batch_size,
                      source_is_clean=True)
    whole = _sweep(model, chunk, lambda m, batch, items: image_map(m, batch), under, batch_size)
    out = {"n_pairs": len(chunk)}
    for name, res in zip(CONTROLS, (identity, whole)):
        out[name] = {"flip": res["flipped"][:, 0].mean(-1), "keep": res["kept"][:, 0].mean(-1)}
    out["passed"] = control_verdicts(out)
    return out


def control_verdicts(controls: dict) -> dict[str, bool]:
    """identity: no pair flips at any slot; whole_image: at least MIN_WHOLE_IMAGE_FLIP of the pairs
    flip at the LM input."""
    return {"identity": bool(np.max(controls["identity"]["flip"]) == 0),
            "whole_image": bool(controls["whole_image"]["flip"][0] >= MIN_WHOLE_IMAGE_FLIP)}


def golden_pairs(model, task, predict) -> dict:
    """direction -> golden criss-cross pairs, all directions from one official stream."""
    return pairs_lib.criss_cross_pairs(task.item, common.pair_pool(model, task), predict,
                                       directions=common.directions_of(task), n_per_direction=FLAGS.n_pairs,
                                       seed=FLAGS.seed, batch_size=FLAGS.batch_size)


def measure_direction(model, pairs, index_fn, under=None) -> dict:
    """One results.json part: the sweep's metrics and (exact) the controls."""
    if not pairs:
        return {"n_pairs": 0}
    out = {"n_pairs": len(pairs), **sweep_pairs(model, pairs, index_fn, FLAGS.batch_size, under, FLAGS.method)}
    if estimates.exact_wanted():
        out["controls"] = control_sweeps(model, pairs, FLAGS.batch_size, under)
    return out


def run() -> dict:
    golden = {}  # dataset -> direction -> pairs: one stream for all four directions

    def measure(model, task, direction):
        if task.name not in golden:
            golden[task.name] = golden_pairs(model, task, common.pair_filter(model))
        value = measure_direction(model, golden[task.name][direction], region_swaps)
        if value["n_pairs"] and estimates.exact_wanted():
            logging.info("%s|%s: %d pairs; strip flip at slot 0 %.2f, object flip at slot 0 %.2f; controls %s",
                         task.name, direction, value["n_pairs"], value["flip"][0, 1], value["flip"][0, 0],
                         common.brief(value["controls"]["passed"]))
        return value

    out_dir, summary = common.run_parts(NAME, DIRECTIONS, measure, whatsup={"regions": FLAGS.whatsup_regions},
                                        whatsup_regions=FLAGS.whatsup_regions, **estimates.run_config())
    plot_all(out_dir, summary, "Criss-cross swaps (paper Figs. 6, 7)")
    return summary


def plot_all(out_dir: str, summary: dict, title: str, region_sets=REGION_SETS) -> None:
    """The exact sweep's figures (`plot`) and the estimate's (`estimates.plot`), as the run has them."""
    if estimates.exact_wanted():
        plot(out_dir, summary, title, region_sets)
    estimates.plot(out_dir, summary, title, region_sets)


def _by_dataset(summary: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for key, v in summary.items():
        dataset, direction = key.split("|")
        out.setdefault(dataset, {})[direction] = v
    return out


def plot(out_dir: str, summary: dict, title: str, region_sets=REGION_SETS) -> None:
    """Per region set, the paper's figure: a panel per (dataset, direction), the probabilities of
    c0, c1, c2 per slot, mean +- std over pairs; and the flip rates with the controls; CSVs."""
    datasets = _by_dataset(summary)
    for r, name in enumerate(region_sets):
        fig, axes = plt.subplots(len(datasets), len(DIRECTIONS), figsize=(3.3 * len(DIRECTIONS), 2.8 * len(datasets)),
                                 squeeze=False, sharey=True)
        for row, (dataset, parts) in zip(axes, datasets.items()):
            for ax, direction in zip(row, DIRECTIONS):
                v = parts.get(direction, {"n_pairs": 0})
                ax.set_title(f"{dataset}, {direction} ({v['n_pairs']} pairs)", fontsize=8)
                if not v["n_pairs"]:
                    continue
                mean, std = np.array(v["probs_mean"])[:, r], np.array(v["probs_std"])[:, r]  # [S, 3]
                slots = np.arange(len(mean))
                for k, (label, colour) in enumerate(zip(CANDIDATES, CANDIDATE_COLOURS)):
                    ax.plot(slots, mean[:, k], color=colour, lw=1.6, label=label)
                    ax.fill_between(slots, mean[:, k] - std[:, k], mean[:, k] + std[:, k], color=colour, alpha=0.18, lw=0)
                plotting.slot_axis(ax, len(mean), "slot")
                ax.set_ylim(-0.05, 1.05)
            row[0].set_ylabel("probability")
        axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{title}: {name} swap, candidate probabilities (mean ± std over pairs)", fontsize=10)
        plotting.save(fig, os.path.join(out_dir, f"probs_{name}.png"))
    _plot_flips(out_dir, datasets, title, region_sets)
    _write_csvs(out_dir, datasets, region_sets)


def _plot_flips(out_dir: str, datasets: dict, title: str, region_sets) -> None:
    """Flip rate per slot: a panel per dataset, a line per region set (pair-weighted mean over
    directions) and the two controls (dashed)."""
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.3), squeeze=False)
    for ax, (dataset, parts) in zip(axes[0], datasets.items()):
        parts = {d: v for d, v in parts.items() if v["n_pairs"]}
        if not parts:
            ax.set_title(f"{dataset}: no golden pairs")
            continue
        mean = common.pair_weighted_mean(list(parts.values()), "flip")  # [S, R]
        for r, name in enumerate(region_sets):
            ax.plot(mean[:, r], marker="o", ms=3, label=f"{name} swap")
        controls = [v["controls"] for v in parts.values()]
        for name, style in zip(CONTROLS, (":", "--")):
            curve = common.pair_weighted_mean([{"n_pairs": c["n_pairs"], **c[name]} for c in controls], "flip")
            ax.plot(curve, color="gray", ls=style, lw=1.2, label=f"control: {name.replace('_', ' ')}")
        plotting.slot_axis(ax, len(mean))
        ax.set_ylabel("flip rate (top-1 = c2)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dataset} ({sum(v['n_pairs'] for v in parts.values())} pairs)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    plotting.save(fig, os.path.join(out_dir, "flip_rate.png"))


def _write_csvs(out_dir: str, datasets: dict, region_sets) -> None:
    rows, controls = [], []
    for dataset, parts in datasets.items():
        for direction, v in parts.items():
            if not v["n_pairs"]:
                continue
            flip, mean, std = np.array(v["flip"]), np.array(v["probs_mean"]), np.array(v["probs_std"])
            rows += [[dataset, direction, name, s, f"{flip[s, r]:.3f}",
                      *(f"{mean[s, r, k]:.3f} ± {std[s, r, k]:.3f}" for k in range(3)), v["n_pairs"]]
                     for r, name in enumerate(region_sets) for s in range(len(flip))]
            c = v["controls"]
            controls.append([dataset, direction, c["n_pairs"], f"{max(c['identity']['flip']):.3f}",
                             f"{c['whole_image']['flip'][0]:.3f}", "pass" if all(c["passed"].values()) else "FAIL"])
    common.write_csv(os.path.join(out_dir, "flip_rate.csv"),
                     ["dataset", "direction", "regions", "slot", "flip_rate", "p_c0", "p_c1", "p_c2", "n_pairs"], rows)
    common.write_csv(os.path.join(out_dir, "controls.csv"),
                     ["dataset", "direction", "n_pairs", "identity_max_flip (must be 0)",
                      f"whole_image_flip_at_emb (>= {MIN_WHOLE_IMAGE_FLIP})", "verdict"], controls)


def controls_text(summary: dict) -> str:
    """The controls over every part, in words."""
    parts = [v["controls"] for v in summary.values() if v["n_pairs"]]
    if not parts:
        return "no controls (no pairs)"
    identity = max(max(c["identity"]["flip"]) for c in parts)
    whole = common.pair_weighted_mean([{"n_pairs": c["n_pairs"], **c["whole_image"]} for c in parts], "flip")[0]
    failed = sum(not all(c["passed"].values()) for c in parts)
    return (f"controls: identity flips {identity:.2f} (must be 0), whole image from the reversed image flips "
            f"{whole:.2f} at emb" + (f"; {failed} of {len(parts)} parts FAIL a control" if failed else ", all pass"))


def headline(summary: dict, region_sets=REGION_SETS) -> str:
    """Per region set, the flip rate at the LM input and its peak over slots, over all pairs; the controls."""
    parts = list(summary.values())
    n = sum(v["n_pairs"] for v in parts)
    if not n:
        return "no golden pairs"
    estimated = estimates.headline(summary)
    if not any("flip" in v for v in parts):
        return f"{n} pairs; {estimated}"
    flip = common.pair_weighted_mean(parts, "flip")  # [L+1, R]
    return f"{n} pairs; " + "; ".join(
        f"{name} swap flips {flip[0, r]:.2f} at emb, peak {flip[:, r].max():.2f} at {common.slot_text(int(flip[:, r].argmax()))}"
        for r, name in enumerate(region_sets)) + "; " + controls_text(summary) + (f"; {estimated}" if estimated else "")


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.experiment_dir(NAME))
