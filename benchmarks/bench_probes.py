"""Probe-sweep wall time: one vmapped compiled call vs a Python loop of per-probe jitted calls.

    python benchmarks/bench_probes.py                       # 29 layers x 3 groups, N 1000, D 512
    python benchmarks/bench_probes.py --layers 4 --epochs 50  # quick

The sweep is `layers x groups` probes (the paper's recipe: C classes, full-batch AdamW, `epochs`
steps). Two layouts of the same probes:
  distinct  x [L*G, N, D]: every probe has its own activation array (the general case);
  shared    x [L, 1, N, D] with token-group masks [G, N]: the groups of one layer share that
            layer's activations (what a layers x token-groups sweep really is), G x less memory.
Methods, all but the loop one compiled call to train_probes: `chunk=None` (every probe vmapped:
batched matmuls, the accelerator path), `chunk=1` (a lax.scan over the probe axes along which x
varies, the axes where x is shared still vmapped: the CPU default, chunk="auto"), `chunk=K`
(lax.map of K-probe vmaps), and `loop` (one jitted single-probe train_probes, compiled once,
called once per probe from Python). Compile time is measured separately (first
call minus the best later call); run time is the best of --repeats calls. All methods are checked
to give the same probes (max |dw|). Work: 4 N D C flops per probe-epoch (forward x @ w, backward
x^T g; no gradient with respect to x), and the activations are read twice per epoch.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spatial_jax import probes as pr


def _timed(fn, repeats: int):
    """(first-call seconds, best of `repeats` later calls, result)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return first, best, out


def matmul_rate(n: int = 2048) -> float:
    """This machine's float32 matmul rate, GFLOP/s (best of 3 n x n x n products)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = min(_timed(lambda: f(a), 0)[0] for _ in range(3))
    return 2.0 * n**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=29)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="examples per probe (before masking)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--chunks", default="none,1,4", help="chunk settings of train_probes to time")
    ap.add_argument("--repeats", type=int, default=2)
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
    rows = []
    for layout in args.layouts.split(","):
        if layout == "distinct":
            x = jnp.asarray(np.broadcast_to(xl, (L, G, N, D)).reshape(P, N, D))
            yy, m = jnp.asarray(np.broadcast_to(y, (P, N))), jnp.asarray(np.tile(train, (L, 1)))
            x_of = lambda p: x[p]  # noqa: E731
            m_of = lambda p: m[p]  # noqa: E731
            y_of = lambda p: yy[p]  # noqa: E731
            read = 2.0 * E * P * N * D * 4
        else:
            x, yy, m = jnp.asarray(xl), jnp.asarray(y), jnp.asarray(train)
            x_of = lambda p: x[p // G, 0]  # noqa: E731
            m_of = lambda p: m[p % G]  # noqa: E731
            y_of = lambda p: yy  # noqa: E731
            read = 2.0 * E * L * N * D * 4
        x_mb = x.size * 4 / 2**20
        ref = None
        chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
        for method in chunks + ["loop"]:
            if method != "loop":
                fn = lambda c=method: pr.train_probes(x, yy, m, C, chunk=c, **kw).w  # noqa: E731
                name = f"chunk={method}"
            else:
                one = jax.jit(lambda x1, y1, m1: pr.train_probes(x1, y1, m1, C, **kw))  # x1 [N, D]
                xs = [x_of(p) for p in range(P)]  # slices made outside the timed loop
                ms, ys = [m_of(p) for p in range(P)], [y_of(p) for p in range(P)]
                fn = lambda: jnp.stack([one(xs[p], ys[p], ms[p]).w for p in range(P)])  # noqa: E731
                name = "loop"
            first, best, w = _timed(fn, args.repeats)
            w = np.asarray(w).reshape(P, D, C)
            ref = w if ref is None else ref
            rows.append((layout, name, x_mb, first - best, best, flops / best / 1e9, read / best / 1e9,
                         float(np.abs(w - ref).max())))
            print(f"  done {layout}/{name}: {best:.2f} s", flush=True)

    print()
    print("| layout | method | x MiB | compile s | run s | GFLOP/s | x read GB/s | max abs dw vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.1e} |")
    for layout in args.layouts.split(","):
        t = {r[1]: r[4] for r in rows if r[0] == layout}
        print(f"{layout}: loop / " + ", loop / ".join(f"{k} = {t['loop'] / v:.2f}x" for k, v in t.items() if k != "loop"))


if __name__ == "__main__":
    main()
