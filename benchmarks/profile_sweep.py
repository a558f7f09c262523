"""Where a criss-cross sweep's time goes on this CPU: one region_swap_sweep of bench_sweep.py's
mid config under the JAX profiler, its XLA:CPU kernels summed by kind.

    python benchmarks/profile_sweep.py --batch 1 --batch 4 [--hf_dir DIR]

Kinds: `ynn` kernels (XLA:CPU's YNNPACK fusions: the matmuls, and some reductions), the
dynamic-slice fusions that copy one layer's weights out of the stacked params in each step of a
layer loop, the while/cond bookkeeping, and every other fusion (elementwise ops, transposes,
gathers, softmax passes). Kernel times are summed over the threads that ran them, so their total
exceeds the wall time on 2 cores. The wall time is of an unprofiled call just before.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

import spatial_jax as sj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sweep as bs  # noqa: E402


def kind(name: str) -> str | None:
    if name.startswith(("$", "ThunkExecutor", "Pjit")) or "Await" in name:
        return None  # Python frames and executor spans enclose the kernels
    if "dynamic-slice" in name:
        return "weight dynamic-slice copies"
    if name.startswith("ynn_fusion"):
        return "ynn (matmuls, reductions)"
    if name.startswith(("while", "cond")):
        return "loop / cond bookkeeping"
    return "other fusions (elementwise, transposes, gathers)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, action="append", help="pairs per sweep call (repeatable)")
    ap.add_argument("--hf_dir", default=None, help="an existing save of the mid config (else one is made)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    if args.hf_dir is None:
        args.hf_dir = os.path.join(tmp, "hf")
        bs.build_hf(args.hf_dir, small=False)
    model = sj.load(args.hf_dir)
    ids1 = bs.prompt_ids(144)
    rng = np.random.default_rng(0)
    for b in args.batch or [1]:
        images = rng.standard_normal((2, b * bs.GRID**2, 1176)).astype(np.float32)
        ids, grid = np.repeat(ids1, b, 0), np.repeat(np.array([[1, bs.GRID, bs.GRID]]), b, 0)
        clean, cf = (sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=grid) for pv in images)

        def sweep():
            return sj.region_swap_sweep(model, clean, cf, np.repeat(bs.regions(ids1)[:, None], b, 1),
                                        np.array([5, 6, 7, 8, 9]))

        sweep()  # compile
        t0 = time.perf_counter()
        sweep()
        wall = time.perf_counter() - t0
        trace_dir = os.path.join(tmp, f"trace{b}")
        jax.profiler.start_trace(trace_dir)
        sweep()
        jax.profiler.stop_trace()
        events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]))["traceEvents"]
        total = collections.Counter()
        for e in events:
            k = kind(e["name"]) if e.get("ph") == "X" else None
            if k:
                total[k] += e["dur"] / 1e6 / b
        busy = sum(total.values())
        print(f"batch {b}: wall {wall / b:.2f} s per pair; kernels {busy:.2f} s per pair (summed over threads)")
        for k, s in total.most_common():
            print(f"  {k}: {s:.2f} s per pair ({s / busy:.0%})")


if __name__ == "__main__":
    main()
