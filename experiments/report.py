"""One Markdown report over the experiments' output dirs: their tables and figures."""
from __future__ import annotations

import csv
import glob
import os

TITLES = {
    "behaviour": "Behaviour: top-1 accuracy (paper Table 1)",
    "probe_vision": "Vision-side slot probes (paper Fig. 4)",
    "probe_lm": "LM-side ordering probes",
    "last_token": "Last-token patching (paper Fig. 3)",
    "criss_cross": "Criss-cross object and strip swaps (paper Figs. 6, 7)",
    "ablation": "Vision ordering ablated at the LM input (paper Table 5)",
    "backup": "Object swaps under ablation: the backup mechanism (paper Fig. 9)",
    "amplification": "Amplifying the ordering directions (paper Table 2, section 5.4)",
    "absolute_vs_relative": "Shifted squares: absolute vs relative position",
}
MAX_TABLE_ROWS = 40


def markdown_table(path: str) -> str:
    """A CSV as a Markdown table (at most MAX_TABLE_ROWS rows, then a pointer to the file)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    header, body = rows[0], rows[1:]
    more = len(body) - MAX_TABLE_ROWS
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body[:MAX_TABLE_ROWS]]
    if more > 0:
        lines.append(f"\n({more} more rows in `{os.path.basename(path)}`)")
    return "\n".join(lines)


def write_report(output_dir: str, experiments: list[str], header: str = "",
                 headlines: dict[str, str] | None = None) -> str:
    """Writes <output_dir>/report.md: per experiment its headline (if given), tables and figures.
    Returns its path."""
    headlines = headlines or {}
    parts = ["# spatial_jax report", header]
    for name in experiments:
        d = os.path.join(output_dir, name)
        if not os.path.isdir(d):
            continue
        parts.append(f"## {TITLES.get(name, name)}")
        if name in headlines:
            parts.append(f"**In one line:** {headlines[name]}")
        for table in sorted(glob.glob(os.path.join(d, "*.csv"))):
            parts.append(markdown_table(table))
        for fig in sorted(glob.glob(os.path.join(d, "*.png"))):
            parts.append(f"![{name}]({os.path.relpath(fig, output_dir)})")
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n\n".join(p for p in parts if p) + "\n")
    return path
