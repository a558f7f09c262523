"""Attention on this CPU: `layers.attention` (the batch a few rows per step, CPU_SCORE_CHUNK_BYTES)
against the same function in one batched call, and torch's scaled_dot_product_attention (the
fused kernel HF's sdpa path uses), at the shapes the criss-cross benchmark runs.

    python benchmarks/bench_attention.py [--repeats 7]

Shapes (float32): the mid config's vision blocks, one and ten 576-patch images (12 heads of
64); its LM layers, 10 and 20 prompts of T = 176 (16 query heads on 4 kv heads), and a sweep
variant that computes 104 of the 176 positions (causal mask). Every method is called once per
round, in turn; min / median ms over the rounds. Outputs are checked against each other.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch

from spatial_jax.nn import layers as L

SHAPES = {  # name: (B, T queries, S keys, query heads, kv heads, causal)
    "vision, 1 image": (1, 576, 576, 12, 12, False),
    "vision, 10 images": (10, 576, 576, 12, 12, False),
    "LM, 10 prompts": (10, 176, 176, 16, 4, True),
    "LM, 20 prompts": (20, 176, 176, 16, 4, True),
    "LM, 10 prompts, 104 rows": (10, 104, 176, 16, 4, True),
}
HD = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    scale = HD**-0.5
    chunked = jax.jit(lambda q, k, v, a: L.attention(q, k, v, a, scale))
    one_call = jax.jit(lambda q, k, v, a: L._attend(q, k, v, a, scale))
    print("| shape | rows per step | chunked ms (min / median) | one call ms | torch sdpa ms | max diff |")
    print("|---|---|---|---|---|---|")
    for name, (B, T, S, H, Hkv, causal) in SHAPES.items():
        q = rng.standard_normal((B, T, H, HD)).astype(np.float32)
        k, v = (rng.standard_normal((B, S, Hkv, HD)).astype(np.float32) for _ in range(2))
        allowed = None
        if causal:
            allowed = np.broadcast_to(np.arange(S)[None] <= np.arange(S - T, S)[:, None], (B, T, S))
        tq, tk, tv = (torch.tensor(x).transpose(1, 2) for x in (q, k, v))
        tmask = None if allowed is None else torch.tensor(allowed[:, None])

        def sdpa():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask,
                                                                        enable_gqa=H != Hkv).transpose(1, 2)

        methods = {"chunked": lambda: chunked(q, k, v, allowed).block_until_ready(),
                   "one call": lambda: one_call(q, k, v, allowed).block_until_ready(), "torch": sdpa}
        outs = {m: np.asarray(f()) for m, f in methods.items()}
        diff = max(np.abs(outs[m] - outs["chunked"]).max() for m in outs)
        times = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m, f in methods.items():
                t0 = time.perf_counter()
                f()
                times[m].append(1e3 * (time.perf_counter() - t0))
        steps = L.cpu_attention_steps(B, H, T, S)
        cells = [f"{min(t):.1f} / {statistics.median(t):.1f}" for t in times.values()]
        print(f"| {name} | {B // steps} | " + " | ".join(cells) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
