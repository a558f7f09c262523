"""--method attribution|both for the patching experiments: attribution patching's first-order
estimate of every slot's patch (`sj.attribution_sweep`) beside, or instead of, the exact sweep.

The quantity compared is the change, from the clean run, of a log-odds between two candidate
words, log p(a) - log p(b), each word's probability summed over its spellings
(`Candidates.word_logits`): it needs only the read tokens' logits, which is what the estimate
gives (probabilities and the arg-max over the whole vocabulary it does not), and the estimate is
taken of it directly (`Candidates.log_odds_metric`: one backward through the log-odds rather
than one per read token). --qk_fix and --grad_drop turn on AtP*'s fixes (GradDrop's score is
stored beside the estimate, with its correlation with |exact|). Changes, not
levels: the levels differ from pair to pair far more than a patch moves them, so their
correlation would say little about the estimate. A part of results.json then holds, per slot (and region set), the
estimate and (with both) the exact value per pair and their Pearson correlation over pairs and
slots; `plot` draws the mean curves and a scatter of estimate against exact.
"""
from __future__ import annotations

import os

import numpy as np

from experiments import common, plotting
from experiments.plotting import plt

FLAGS = common.FLAGS


def estimating() -> bool:
    return FLAGS.method in ("attribution", "both")


def exact_wanted() -> bool:
    return FLAGS.method in ("exact", "both")


def run_config() -> dict:
    """The run setting a stored result must match (none for the official exact method)."""
    if FLAGS.method == "exact":
        return {}
    return {"method": FLAGS.method, **{k: v for k, v in options().items() if v}}


def options() -> dict:
    """attribution_sweep's AtP* flags as the binary's flags set them."""
    return {"qk_fix": FLAGS.qk_fix, "grad_drop": FLAGS.grad_drop}


def estimate(sweep, args: tuple, cands, towards: int, against: int, n: int, exact_logits=None, **kwargs) -> dict:
    """sweep(*args, method="attribution", metric=the log-odds of word `towards` against `against`)
    with the binary's AtP* flags -> estimate_odds [..., n] (the estimated change of the log-odds:
    one backward through the metric), score [..., n] (--grad_drop: the GradDrop score) and, given
    the exact sweep's logits, exact_odds [..., n], the exact change from the same clean run."""
    est = sweep(*args, method="attribution", metric=cands.log_odds_metric(towards, against), **options(), **kwargs)
    out = {"estimate_odds": est.metric_change[..., :n]}
    if FLAGS.grad_drop:
        out["score"] = est.effect[..., :n]
    if exact_logits is not None:
        clean = log_odds(cands, est.clean, towards, against)
        out["exact_odds"] = (log_odds(cands, exact_logits, towards, against) - clean)[..., :n]
    return out


def log_odds(cands, token_logits, towards: int, against: int) -> np.ndarray:
    """token_logits [..., B, K * M] -> [..., B]: log p(word `towards`) - log p(word `against`)."""
    words = cands.word_logits(token_logits)
    return words[..., towards] - words[..., against]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.ravel(a), np.ravel(b)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def summarise(estimate: np.ndarray, exact: np.ndarray | None, label: str, score: np.ndarray | None = None) -> dict:
    """estimate, exact [S, ..., n] per slot and pair -> the results.json entry: both per pair, their
    means per slot [S, ...], and the correlation over every (slot, ..., pair) point and per slot;
    score (GradDrop's, a magnitude) per pair and its correlation with |exact| beside |estimate|'s."""
    out = {"metric": label, "estimate": estimate, "estimate_mean": estimate.mean(-1)}
    if score is not None:
        out["grad_drop_score"] = score
    if exact is not None:
        flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
        out.update(exact=exact, exact_mean=exact.mean(-1), r=pearson(estimate, exact),
                   r_per_slot=[pearson(e, x) for e, x in zip(flat(estimate), flat(exact))])
        if score is not None:
            out.update(r_abs=pearson(np.abs(estimate), np.abs(exact)), r_grad_drop_abs=pearson(score, np.abs(exact)))
    return out


def _pooled(summary: dict, field: str) -> np.ndarray | None:
    """Every part's per-pair `field` [S, ..., n] joined over pairs (None if a part lacks it, or
    no part has an estimate: the exact method)."""
    parts = [v["attribution"] for v in summary.values() if v.get("n_pairs") and "attribution" in v]
    if not parts or any(field not in p for p in parts):
        return None
    return np.concatenate([np.asarray(p[field]) for p in parts], -1)


def headline(summary: dict) -> str:
    est, exact = _pooled(summary, "estimate"), _pooled(summary, "exact")
    if est is None:
        return ""
    label = next(v["attribution"]["metric"] for v in summary.values() if "attribution" in v)
    if exact is None:
        return f"attribution estimate of {label} (no exact run to compare)"
    r = pearson(est, exact)
    return f"attribution vs exact {label}: r = {'-' if r is None else f'{r:.3f}'} over {est.size} (slot, pair) points"


def plot(out_dir: str, summary: dict, title: str, groups: tuple[str, ...] = ("",)) -> None:
    """attribution.png (mean estimate and exact per slot, per group; a scatter of estimate against
    exact over every slot and pair, coloured by slot) and attribution.csv."""
    est, exact = _pooled(summary, "estimate"), _pooled(summary, "exact")
    if est is None:
        return
    est = est.reshape(est.shape[0], len(groups), -1)
    exact = None if exact is None else exact.reshape(est.shape)
    label = next(v["attribution"]["metric"] for v in summary.values() if "attribution" in v)
    S = est.shape[0]
    fig, axes = plt.subplots(1, len(groups) + (exact is not None), figsize=(4.4 * (len(groups) + 1), 3.4),
                             squeeze=False)
    rows = []
    for g, name in enumerate(groups):
        ax = axes[0, g]
        ax.plot(est[:, g].mean(-1), marker="o", ms=3, label="attribution estimate")
        if exact is not None:
            ax.plot(exact[:, g].mean(-1), marker="s", ms=3, label="exact patch")
        plotting.slot_axis(ax, S)
        ax.set_ylabel(label)
        ax.set_title(f"{name + ': ' if name else ''}mean over {est.shape[-1]} pairs", fontsize=9)
        ax.legend(fontsize=7)
        for s in range(S):
            r = None if exact is None else pearson(est[s, g], exact[s, g])
            rows.append([name or "-", s, f"{est[s, g].mean():.4f}",
                         "" if exact is None else f"{exact[s, g].mean():.4f}", "" if r is None else f"{r:.3f}"])
    if exact is not None:
        ax = axes[0, -1]
        points = ax.scatter(exact.ravel(), est.ravel(), s=6, c=np.repeat(np.arange(S), est[0].size), cmap="viridis")
        lo, hi = min(exact.min(), est.min()), max(exact.max(), est.max())
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"exact {label}")
        ax.set_ylabel(f"estimated {label}")
        ax.set_title(f"r = {pearson(est, exact):.3f}", fontsize=9)
        fig.colorbar(points, ax=ax, label="slot")
    fig.suptitle(f"{title}: attribution patching" + (" against exact patching" if exact is not None else ""))
    plotting.save(fig, os.path.join(out_dir, "attribution.png"))
    common.write_csv(os.path.join(out_dir, "attribution.csv"),
                     ["regions", "slot", f"estimate ({label})", "exact", "r over pairs"], rows)
