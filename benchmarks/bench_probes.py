"""Probe-sweep wall time: one compiled train_probes call vs a Python loop of per-probe jitted calls.

    python benchmarks/bench_probes.py                          # 29 layers x 3 groups, N 1000, D 512
    python benchmarks/bench_probes.py --layers 4 --epochs 50   # quick

The sweep is `layers x groups` probes (the paper's recipe: C classes, full-batch AdamW, `epochs`
steps). Two layouts of the same probes:
  distinct  x [L*G, N, D]: every probe has its own activation array (the general case);
  shared    x [L, 1, N, D] with token-group masks [G, N]: the groups of one layer share that
            layer's activations (what a layers x token-groups sweep really is), G x less memory.
Methods, all but the loop one compiled call to train_probes: `chunk=None` (every probe vmapped:
batched matmuls, the accelerator path), `chunk=1` (a lax.scan over the probe axes along which x
varies, the axes where x is shared still vmapped: the CPU default, chunk="auto"), `chunk=K`
(lax.map of K-probe vmaps), and `loop` (one jitted single-probe train_probes, compiled once,
called once per probe from Python, slices prepared outside the timed region).

Compile time: trace + lower + XLA compile through the AOT API, timed alone. Run time: --repeats rounds, each round
calling every method once in turn (so load swings on a shared machine hit all methods alike);
min and median reported. All methods are checked to give the same probes (max |dw|). Work:
4 N D C flops per probe-epoch (forward x @ w^T, backward g^T x; no gradient with respect to x);
the activations are read twice per epoch.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spatial_jax import probes as pr


def _once(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def matmul_rate(n: int = 2048) -> float:
    """This machine's float32 matmul rate, GFLOP/s (best of 5 n x n x n products)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    return 2.0 * n**3 / min(_once(lambda: f(a))[0] for _ in range(5)) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=29)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="examples per probe (before masking)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--chunks", default="none,1,4", help="chunk settings of train_probes to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", default="distinct,shared")
    args = ap.parse_args()
    L, G, N, D, C, E = args.layers, args.groups, args.n, args.d, args.classes, args.epochs
    P = L * G

    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N).astype(np.int32)
    xl = rng.standard_normal((L, 1, N, D), dtype=np.float32)
    xl[..., :C] += 2.0 * np.eye(C, dtype=np.float32)[y]
    groups = rng.random((G, N)) < 0.7  # token group g uses these examples
    train = groups & pr.split_by_group(np.arange(N) // 4)
    kw = dict(epochs=E)

    print(f"# {P} probes ({L} layers x {G} token groups), N={N}, D={D}, C={C}, {E} epochs; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
          f"float32 matmul rate {matmul_rate():.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
    flops = 4.0 * N * D * C * P * E
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]

    methods = []  # (layout, name, fn, x MiB, bytes read)
    for layout in args.layouts.split(","):
        if layout == "distinct":
            x = jnp.asarray(np.broadcast_to(xl, (L, G, N, D)).reshape(P, N, D))
            yy, m = jnp.asarray(np.broadcast_to(y, (P, N))), jnp.asarray(np.tile(train, (L, 1)))
            xs, ys, ms = [x[p] for p in range(P)], [yy[p] for p in range(P)], [m[p] for p in range(P)]
            read = 2.0 * E * P * N * D * 4
        else:
            x, yy, m = jnp.asarray(xl), jnp.asarray(y), jnp.asarray(train)
            xs, ys, ms = [x[p // G, 0] for p in range(P)], [yy] * P, [m[p % G] for p in range(P)]
            read = 2.0 * E * L * N * D * 4
        for c in chunks:
            fn = (lambda x=x, yy=yy, m=m, c=c: pr.train_probes(x, yy, m, C, chunk=c, **kw).w)
            aot = (lambda x=x, yy=yy, m=m, c=c: pr.train_probes.lower(x, yy, m, C, chunk=c, **kw).compile())
            methods.append((layout, f"chunk={c}", fn, aot, x.size * 4 / 2**20, read))
        one = jax.jit(lambda x1, y1, m1: pr.train_probes(x1, y1, m1, C, **kw))  # x1 [N, D]
        fn = (lambda one=one, xs=xs, ys=ys, ms=ms: jnp.stack([one(xs[p], ys[p], ms[p]).w for p in range(P)]))
        aot = (lambda one=one, xs=xs, ys=ys, ms=ms: one.lower(xs[0], ys[0], ms[0]).compile())
        methods.append((layout, "loop", fn, aot, x.size * 4 / 2**20, read))

    compile_s, times, ws = [], [[] for _ in methods], []
    for layout, name, fn, aot, _, _ in methods:
        t = time.perf_counter()
        aot()  # trace + lower + XLA compile, timed alone (the loop's: its one single-probe function)
        compile_s.append(time.perf_counter() - t)
        ws.append(np.asarray(_once(fn)[1]).reshape(P, D, C))  # warm the jit cache
        print(f"  compiled {layout}/{name}: {compile_s[-1]:.2f} s", flush=True)
    for r in range(args.repeats):
        for i, (_, _, fn, _, _, _) in enumerate(methods):
            times[i].append(_once(fn)[0])
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    print()
    print("| layout | method | x MiB | compile s | run s (min) | run s (median) | GFLOP/s (min) | x read GB/s "
          "(min) | max abs dw vs chunk=None |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for i, (layout, name, _, _, mib, read) in enumerate(methods):
        ref = next(ws[j] for j, mm in enumerate(methods) if mm[0] == layout)
        lo, med = min(times[i]), float(np.median(times[i]))
        best[layout, name] = (lo, med)
        print(f"| {layout} | {name} | {mib:.0f} | {compile_s[i]:.2f} | {lo:.3f} | {med:.3f} | "
              f"{flops / lo / 1e9:.1f} | {read / lo / 1e9:.1f} | {np.abs(ws[i] - ref).max():.1e} |")
    for layout in args.layouts.split(","):
        lp = best[layout, "loop"]
        print(f"{layout}: loop time / method time (min, median): " + ", ".join(
            f"{name} {lp[0] / v[0]:.2f}x {lp[1] / v[1]:.2f}x" for (lay, name), v in best.items()
            if lay == layout and name != "loop"))
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
