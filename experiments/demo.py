"""`make demo`: every experiment on every shipped model organism, and a report that opens with the
validation table (issue 16): per paper method and organism, the outcome expected from the
organism's known mechanism (experiments/validation.py, written before the run), the observed
figure, and pass / miss; then each organism's certificate and its own report.

The organisms (checkpoints/organism*, small Qwen2-VLs trained here; spatial_jax/organism/recipes.py):
lm_position (layout from the visual tokens' LM positions), vision_strip (from the vision tower's
strip tokens), vision_object (from its object tokens only), dual (vision first, positions as the
backup). Amplification also runs on organism_vision_strip_weak, vision_strip with the layout
component of its visual tokens scaled by 0.3 in the exported weights (experiments/weaken_organism.py),
since a trained organism has no failures to fix. Each organism runs with fewer items than a full
run (SETTINGS) so that all four fit in ~15 minutes on a 2-core CPU; the swap and backup
experiments keep >= 200 golden pairs each.

Where no organism is shipped, a random-weight stand-in of the same architecture is written first
and the run says so: the pipeline is real, the numbers are chance-level.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags, logging

from experiments import run_all, validation
from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax import program
from spatial_jax.organism import checkpoint

FLAGS = flags.FLAGS
ORGANISMS = {"lm_position": "checkpoints/organism", "vision_strip": "checkpoints/organism_vision_strip",
             "vision_object": "checkpoints/organism_vision_object", "dual": "checkpoints/organism_dual"}
WEAK = "checkpoints/organism_vision_strip_weak"
# Per experiment, the flags of the demo run (4 directions x 3 datasets = 12 parts: n_pairs 17 gives
# <= 204 golden pairs per swap experiment; last-token patching is only read for its shape).
SETTINGS = {
    "behaviour": {"max_items": 120},
    "probe_vision": {"max_items": 64},
    "probe_lm": {"max_items": 48},
    "last_token": {"n_pairs": 2},
    "criss_cross": {"n_pairs": 17},
    "ablation": {"max_items": 120},
    "backup": {"n_pairs": 17},
    "amplification": {"max_items": 120},
    "absolute_vs_relative": {"max_items": 24},
}


def _certificate_table(metas: dict[str, dict]) -> str:
    """Per organism, its certificate (organism.json, test split) averaged over tasks."""
    conds = checkpoint.CERTIFICATE
    lines = ["| organism | " + " | ".join(conds) + " | trained |", "|---|" + "---|" * (len(conds) + 1)]
    for name, meta in metas.items():
        cert = meta.get("certificate", {})
        figs = [sum(c[k] for c in cert.values()) / len(cert) if cert else float("nan") for k in conds]
        run = next((r for r in meta.get("runs", []) if r.get("seed") == meta.get("seed")), {})
        lines.append(f"| {name} | " + " | ".join(f"{f:.2f}" for f in figs)
                     + f" | seed {meta.get('seed')}, {run.get('steps', '?')} steps, {run.get('train_seconds', '?')} s |")
    return "\n".join(lines)


def main(argv):
    del argv
    start, cpu_start = time.perf_counter(), time.process_time()
    base = FLAGS.output_dir
    shipped = {m: p for m, p in ORGANISMS.items() if os.path.isfile(os.path.join(p, "config.json"))}
    if not shipped:
        FLAGS.checkpoint = os.path.join(base, "random_stand_in")
        if not os.path.isfile(os.path.join(FLAGS.checkpoint, "config.json")):
            write_random_checkpoint(FLAGS.checkpoint)
        FLAGS.golden = False
        FLAGS.max_items = FLAGS.max_items or 24
        FLAGS.n_pairs = min(FLAGS.n_pairs, 4)
        logging.warning("no organism in checkpoints/: running on a RANDOM-weight stand-in (%s); results are "
                        "chance-level", FLAGS.checkpoint)
        path, headlines = run_all.run_all()
        print(f"\n{run_all.headline_text(headlines)}\n\nreport: {os.path.abspath(path)}")
        return
    out_dirs, metas, headlines = {}, {}, {}
    for mechanism, path in shipped.items():
        FLAGS.checkpoint, FLAGS.output_dir = path, os.path.join(base, mechanism)
        logging.info("##### %s (%s)", mechanism, path)
        _, headlines[mechanism] = run_all.run_all(settings=SETTINGS)
        print(f"\n## {mechanism}\n{run_all.headline_text(headlines[mechanism])}")
        out_dirs[mechanism] = FLAGS.output_dir
        metas[mechanism] = checkpoint.read_meta(path) if os.path.isfile(os.path.join(path, checkpoint.META_FILE)) else {}
    weak_dir = None
    if os.path.isfile(os.path.join(WEAK, "config.json")):
        FLAGS.checkpoint, FLAGS.output_dir = WEAK, os.path.join(base, "vision_strip_weak")
        run_all.run_all(names=["behaviour", "amplification"], settings=SETTINGS)
        weak_dir = FLAGS.output_dir
    FLAGS.output_dir = base
    records = validation.evaluate(out_dirs, weak_dir)
    with open(os.path.join(base, "validation.json"), "w") as f:
        json.dump(records, f, indent=1)
    table = validation.markdown(records)
    pairs = {m: {e: validation.n_pairs(d, e) for e in ("criss_cross", "backup")} for m, d in out_dirs.items()}
    parts = [
        "# spatial_jax report: the paper's methods on organisms of known mechanism",
        f"`make demo`, {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU (this "
        f"process), load average {os.getloadavg()[0]:.1f} at the end. Datasets {', '.join(FLAGS.dataset)}, seed {FLAGS.seed}.",
        "## Validation table",
        "Each cell: outcome expected from the organism's mechanism (experiments/validation.py, written "
        "before the run) / observed figure / pass or MISS. A miss is a finding about the method on that "
        "mechanism. Amplification rows: the weakened vision_strip variant "
        f"(`{WEAK}`{'' if weak_dir else ', not shipped: not measured'}).",
        table,
        f"Golden pairs per organism (criss-cross, backup): {pairs}",
        "## Certificates (interventions at the LM input, independent of the methods; organism.json, test split)",
        "Accuracy, mean over Squares, Shapes and Objects; chance 1/3.",
        _certificate_table(metas),
        "## Per organism",
        "\n".join(f"- {m}: [{m}/report.md]({m}/report.md): " + "; ".join(f"{k}: {v}" for k, v in h.items())
                  for m, h in headlines.items()),
    ]
    path = os.path.join(base, "report.md")
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    print(f"\n{table}\n\nreport: {os.path.abspath(path)}\nfigures: {os.path.abspath(base)}/*/*/*.png")


if __name__ == "__main__":
    program.run(main, wrote=lambda: os.path.join(FLAGS.output_dir, "report.md"), example="python -m experiments.demo --output_dir outputs/demo --dataset squares,shapes,objects")
