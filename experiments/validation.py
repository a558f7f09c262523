"""The validation table (issue 16): what each of the paper's methods should find on each organism,
written down before the run, and what it found.

Each organism's mechanism is known by construction (spatial_jax/organism/recipes.py) and
certified by interventions independent of these methods (organism.json "certificate"). A row is
one method's headline figure, read from that experiment's results.json under the organism's
output dir; a cell is (expected outcome, observed figure, pass / miss). A miss is a finding about
the method on that mechanism, not a reason to change the method (BUILD_NOTES, "What the methods
can and cannot tell apart").

Thresholds are the issue's, on golden pairs (the swaps and backup need >= 200 per organism).
Rows not fixed by the issue (strip-heatmap bands, last-token patching, absolute vs relative) got
their expectations here, from the mechanism, before the first run (committed before it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from experiments import amplification
from spatial_jax.data.geometry import get_geometry

ORGANISMS = ("lm_position", "vision_strip", "vision_object", "dual")
CHANCE = 1 / 3


@dataclasses.dataclass(frozen=True)
class Expect:
    text: str          # the expected outcome in words
    lo: float = -np.inf
    hi: float = np.inf

    def passes(self, value: Optional[float]) -> Optional[bool]:
        return None if value is None else bool(self.lo <= value <= self.hi)


def _at_least(x: float) -> Expect:
    return Expect(f">= {x:g}", lo=x)


def _at_most(x: float) -> Expect:
    return Expect(f"<= {x:g}", hi=x)


NEAR_CHANCE = Expect("near chance (<= 0.5)", hi=0.5)

# row -> organism -> expected outcome. Written before the run (issue 16 item 3).
EXPECTED: dict[str, dict[str, Expect]] = {
    # object-token slot probe at the LM input (probe_vision test accuracy, mean over parts)
    "vision probe": {"lm_position": NEAR_CHANCE, "vision_strip": _at_least(0.9), "vision_object": _at_least(0.9),
                     "dual": _at_least(0.9)},
    # share of background tokens whose most probable slot (object-token probe) is their strip's
    "strip heatmap bands": {"lm_position": Expect("no bands (< 0.75)", hi=0.75),
                            "vision_strip": Expect("bands (>= 0.75)", lo=0.75),
                            "vision_object": Expect("no bands (< 0.75)", hi=0.75),
                            "dual": Expect("bands (>= 0.75)", lo=0.75)},
    # last-token patching: 1 if the most probable candidate is c0 (clean answer) at the LM input and
    # c3 (cf answer) at the last layer's output. Every mechanism answers from the last token at the
    # end, so this row is not expected to separate them.
    "last-token patching": {m: Expect("c0 at input, c3 at output (1)", lo=1) for m in ORGANISMS},
    # criss-cross flip rates at the LM input (slot 0), pair-weighted over parts
    "object swap": {"lm_position": _at_most(0.1), "vision_strip": _at_most(0.2), "vision_object": _at_least(0.8),
                    "dual": _at_most(0.2)},
    "strip swap": {"lm_position": _at_most(0.1), "vision_strip": _at_least(0.8), "vision_object": _at_least(0.8),
                   "dual": _at_least(0.6)},
    # Table 5: accuracy under the ablation, item-weighted over datasets
    "ablation": {"lm_position": Expect("~1.0 (>= 0.9)", lo=0.9), "vision_strip": NEAR_CHANCE,
                 "vision_object": NEAR_CHANCE, "dual": Expect("between (0.45-0.95)", 0.45, 0.95)},
    # object swaps under the ablation: the highest flip rate over slots
    "backup": {"lm_position": _at_most(0.1), "vision_strip": _at_most(0.1), "vision_object": _at_most(0.1),
               "dual": _at_least(0.8)},
    # amplification, on the weakened vision_strip variant only (shown in the vision_strip column)
    "amplification: Probe": {"vision_strip": _at_least(0.5)},
    "amplification: Random": {"vision_strip": _at_most(0.1)},
    "amplification: alpha=0": {"vision_strip": Expect("fixes nothing (0)", hi=0)},
    # shifted layouts: the object-token probe's accuracy against the relative slot labels
    "absolute vs relative": {"lm_position": Expect("no slot to read (<= 0.5)", hi=0.5),
                             "vision_strip": Expect("relative (>= 0.8)", lo=0.8),
                             "vision_object": Expect("relative (>= 0.8)", lo=0.8),
                             "dual": Expect("relative (>= 0.8)", lo=0.8)},
}


def _parts(out_dir: str, name: str) -> Optional[dict]:
    path = os.path.join(out_dir, name, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["parts"]


def _pair_mean(parts: dict, field: str) -> Optional[np.ndarray]:
    parts = [p for p in parts.values() if p.get("n_pairs")]
    if not parts:
        return None
    return sum(np.array(p[field]) * p["n_pairs"] for p in parts) / sum(p["n_pairs"] for p in parts)


def n_pairs(out_dir: str, name: str) -> int:
    parts = _parts(out_dir, name)
    return sum(p.get("n_pairs", 0) for p in parts.values()) if parts else 0


def vision_probe(out_dir: str) -> Optional[float]:
    parts = _parts(out_dir, "probe_vision")
    return float(np.mean([p["test_accuracy"] for p in parts.values()])) if parts else None


def heatmap_bands(out_dir: str, geometry: str) -> Optional[float]:
    """Over every probe_vision heatmap, the share of background tokens (not on an object of the
    unshifted layout) whose most probable slot is the strip they lie in."""
    parts = _parts(out_dir, "probe_vision")
    if not parts:
        return None
    g = get_geometry(geometry)
    hits = []
    for key, part in parts.items():
        horizontal = key.split("|")[1] == "horizontal"
        hm = np.asarray(part["heatmap"])  # [rows, cols, 3]
        along = np.arange(g.n_tokens)
        strip = np.zeros(g.n_tokens, int)
        for k, (lo, hi) in enumerate(g.strip_bounds(0)):
            strip[(along >= lo) & (along < hi)] = k
        s = g.object_tokens
        objects = {(r + dr, c + dc) for r, c in g.slot_origins(horizontal) for dr in range(s) for dc in range(s)}
        for r in range(g.n_tokens):
            for c in range(g.n_tokens):
                if (r, c) not in objects:
                    hits.append(hm[r, c].argmax() == strip[c if horizontal else r])
    return float(np.mean(hits))


def last_token(out_dir: str) -> Optional[float]:
    parts = _parts(out_dir, "last_token")
    mean = _pair_mean(parts, "probs") if parts else None
    if mean is None:
        return None
    return float(mean[0].argmax() == 0 and mean[-1].argmax() == 3)


def _flip_at_input(name: str, region: int) -> Callable[[str], Optional[float]]:
    def read(out_dir: str) -> Optional[float]:
        parts = _parts(out_dir, name)
        flip = _pair_mean(parts, "flip") if parts else None
        return None if flip is None else float(flip[0, region])
    return read


def ablation(out_dir: str) -> Optional[float]:
    parts = _parts(out_dir, "ablation")
    if not parts:
        return None
    return float(sum(p["accuracy"] * p["n"] for p in parts.values()) / sum(p["n"] for p in parts.values()))


def backup(out_dir: str) -> Optional[float]:
    parts = _parts(out_dir, "backup")
    flip = _pair_mean(parts, "flip") if parts else None
    return None if flip is None else float(flip[:, 0].max())


def _amplification(column: str) -> Callable[[str], Optional[float]]:
    """Fix rate over the datasets that amplified: "Probe" / "Random" at each dataset's one best
    alpha > 0 (amplification.tables, Table 2's columns), failures fixed / failures; "alpha=0": the
    share of failures either direction set fixed at alpha = 0."""
    def read(out_dir: str) -> Optional[float]:
        parts = _parts(out_dir, "amplification")
        swept = [p for p in (parts or {}).values() if "Probe" in p]
        if not swept:
            return None
        if column == "alpha=0":
            fixed = sum(max(p[name]["fixed_by_alpha"][0] for name in amplification.DIRECTION_SETS) for p in swept)
            return fixed / sum(p["failures"] for p in swept)
        rows = [t["overall"] for t in amplification.tables(parts).values() if column in t["overall"]]
        return sum(t[column]["fixed"] for t in rows) / sum(t["failures"] for t in rows)
    return read


def absolute_vs_relative(out_dir: str) -> Optional[float]:
    parts = _parts(out_dir, "absolute_vs_relative")
    if not parts:
        return None
    # layouts that put an object across a strip boundary: only there do relative and absolute
    # labels differ (absolute_vs_relative's "packed" layouts; its "spaced" shifts cross none)
    moved = [v["probe_relative"] for by_layout in parts.values() for v in by_layout.values() if v["crossing"] > 0]
    return float(np.mean(moved)) if moved else None


MEASURES: dict[str, Callable[..., Optional[float]]] = {
    "vision probe": vision_probe, "strip heatmap bands": heatmap_bands, "last-token patching": last_token,
    "object swap": _flip_at_input("criss_cross", 0), "strip swap": _flip_at_input("criss_cross", 1),
    "ablation": ablation, "backup": backup, "amplification: Probe": _amplification("Probe"),
    "amplification: Random": _amplification("Random"), "amplification: alpha=0": _amplification("alpha=0"),
    "absolute vs relative": absolute_vs_relative,
}
AMPLIFICATION_ROWS = tuple(r for r in EXPECTED if r.startswith("amplification"))


def evaluate(out_dirs: dict[str, str], weak_dir: Optional[str], geometry: str = "organism") -> list[dict]:
    """One record per (row, organism) with an expectation: expected text, observed figure (None if
    not measured) and pass (None if not measured). out_dirs: organism -> its experiments' output
    dir; weak_dir: the weakened variant's (amplification rows)."""
    records = []
    for row, by_organism in EXPECTED.items():
        for organism, expect in by_organism.items():
            out_dir = weak_dir if row in AMPLIFICATION_ROWS else out_dirs.get(organism)
            value = None
            if out_dir:
                fn = MEASURES[row]
                value = fn(out_dir, geometry) if fn is heatmap_bands else fn(out_dir)
            records.append({"row": row, "organism": organism, "expected": expect.text, "observed": value,
                            "pass": expect.passes(value)})
    return records


def markdown(records: list[dict], organisms=ORGANISMS) -> str:
    """The table: rows = experiments, columns = organisms, cells 'expected / observed / pass'."""
    cells = {(r["row"], r["organism"]): r for r in records}
    lines = ["| experiment | " + " | ".join(organisms) + " |", "|---|" + "---|" * len(organisms)]
    for row in EXPECTED:
        out = []
        for organism in organisms:
            r = cells.get((row, organism))
            if r is None:
                out.append("—")
                continue
            seen = "not measured" if r["observed"] is None else f"{r['observed']:.2f}"
            verdict = "" if r["pass"] is None else (" **pass**" if r["pass"] else " **MISS**")
            out.append(f"{r['expected']} / {seen}{verdict}")
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)
