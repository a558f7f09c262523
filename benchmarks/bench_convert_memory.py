"""Peak host memory (RSS) of `spatial-jax-convert` on a checkpoint of a few hundred MB.

    python benchmarks/bench_convert_memory.py [--keep DIR]

Saves the random mid-size Qwen2-VL (benchmarks/_qwen2_vl_mid.py, 346.6M params, fp32, 1.39 GB)
with save_pretrained, once as one file and once in 400MB shards, then runs the CLI in a fresh
subprocess per case and reads that subprocess's peak RSS (getrusage(RUSAGE_CHILDREN).ru_maxrss
of a wrapper that runs only it). The baseline is the same CLI failing at once on a missing dir:
what importing jax/flax/orbax costs, before any tensor is read. Prints a table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _qwen2_vl_mid as mid  # noqa: E402

_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(args: list[str]) -> tuple[int, float, float]:
    """(return code, peak RSS in bytes, seconds) of one subprocess."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, check=True)
    rc, kb = out.stdout.split()
    if int(rc):
        print(out.stderr, file=sys.stderr)
    return int(rc), int(kb) * 1024, time.time() - t0


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", default=None, help="work dir to use and keep (default: a temp dir, removed)")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    cli = [sys.executable, "-m", "spatial_jax.convert.cli"]
    try:
        single, sharded = os.path.join(work, "hf_single"), os.path.join(work, "hf_sharded")
        if not os.path.isdir(single):
            n = mid.save_random(single)
            print(f"saved {n:,} params")
        if not os.path.isdir(sharded):
            mid.save_random(sharded, max_shard_size="400MB")
        size = dir_bytes(single)
        rc, base, secs = peak_rss(cli + ["--hf_dir", os.path.join(work, "missing"), "--output_dir", os.path.join(work, "x")])
        assert rc == 1
        rows = [("baseline (imports, fails at once)", base, secs, None)]
        for name, src, dtype in (("one file -> float32", single, "float32"),
                                 ("one file -> bfloat16", single, "bfloat16"),
                                 ("400MB shards -> float32", sharded, "float32")):
            out = os.path.join(work, f"out_{len(rows)}")
            shutil.rmtree(out, ignore_errors=True)
            rc, peak, secs = peak_rss(cli + ["--hf_dir", src, "--output_dir", out, "--dtype", dtype])
            assert rc == 0, name
            rows.append((name, peak, secs, dtype))
            shutil.rmtree(out)
        print(f"\ncheckpoint: {size / 1e9:.3f} GB of fp32 safetensors "
              f"({len([f for f in os.listdir(sharded) if f.endswith('.safetensors')])} shards in the sharded copy)")
        print(f"{'case':36s} {'peak RSS GB':>11s} {'/ ckpt':>7s} {'above baseline / ckpt':>22s} {'time s':>7s}")
        for name, peak, secs, dtype in rows:
            extra = "" if dtype is None else f"{(peak - base) / size:22.2f}"
            print(f"{name:36s} {peak / 1e9:11.3f} {peak / size:7.2f} {extra:>22s} {secs:7.1f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
