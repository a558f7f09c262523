"""One full Qwen2-VL forward (float32, CPU): our jitted `sj.forward` vs transformers eager and sdpa.

    python benchmarks/bench_qwen2_vl_forward.py [--runs 5] [--hf_dir DIR] [--single_thread]

Model: the random mid-size Qwen2-VL of benchmarks/_qwen2_vl_mid.py (346.6M params; HF's own
init), saved with save_pretrained (or an existing save of that config, --hf_dir). Input: one
448x448 image (32x32 patches = 1024 vision tokens, merged to 256 LM tokens) in a short chat
prompt, 291 LM tokens in all. Timings are wall-clock medians (and minima) of --runs rounds after
one warm-up round, each round calling every method once in turn (so load swings on a shared
machine hit all alike), with process CPU seconds next to them; our compile time is the first call
minus the median. transformers runs with 2 and with 1 torch threads (--torch_threads);
--single_thread pins the process to one CPU (torch at 1 thread). Also printed: the matmul
FLOPs of one forward and the rate each implementation reaches, next to this machine's fp32
matmul rate (a 2048^3 matmul in jax and in torch), and the load average while it ran (the
timings mean little on a busy machine).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _qwen2_vl_mid as mid  # noqa: E402
from _cpu import pin_to_one_core  # noqa: E402

GRID = 32  # 448 px / 14


def prompt_ids() -> np.ndarray:
    """system + user turn with the image, then a question and the assistant header: 291 tokens."""
    head = list(range(10, 24))  # "<|im_start|>system ... <|im_start|>user\n"
    question = list(range(30, 45))
    tail = list(range(50, 54))  # "<|im_end|>\n<|im_start|>assistant\n"
    n_img = GRID * GRID // 4
    return np.array([head + [mid.VSTART] + [mid.IMG] * n_img + [mid.VEND] + question + tail], np.int64)


def forward_flops(cfg, T: int, n_patches: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward, attention score/value products included."""
    f = mid.flop_parts(cfg, T, n_patches)
    return f["vision"] + cfg.text_config.num_hidden_layers * f["layer"] + T * f["head_row"]


def timed(fn, runs: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def matmul_rate() -> tuple[float, float]:
    """fp32 GFLOP/s of a 2048^3 matmul: (jax, torch), best of 5."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    tj = min(timed(lambda: f(a).block_until_ready(), 5)[1])
    b = torch.ones(n, n)
    tt = min(timed(lambda: b @ b, 5)[1])
    return 2 * n**3 / tj / 1e9, 2 * n**3 / tt / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hf_dir", default=None, help="an existing save of the mid config (else one is made)")
    ap.add_argument("--torch_threads", default="2,1",
                    help="torch thread counts to time (on a busy machine 1 thread can beat 2: OpenMP barriers)")
    ap.add_argument("--single_thread", action="store_true",
                    help="the process pinned to one CPU, torch at 1 thread: comparable on a shared machine")
    args = ap.parse_args()
    if args.single_thread:  # before jax starts its CPU backend
        pin_to_one_core()
        args.torch_threads = "1"
    args.torch_threads = [int(t) for t in args.torch_threads.split(",")]

    import jax
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    import spatial_jax as sj

    tmp = None
    if args.hf_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.hf_dir = tmp.name
        mid.save_random(args.hf_dir)
    load0 = os.getloadavg()
    ids = prompt_ids()
    grid = np.array([[1, GRID, GRID]])
    rng = np.random.default_rng(0)
    pv = rng.standard_normal((GRID * GRID, 1176)).astype(np.float32)
    T = ids.shape[1]

    t0 = time.perf_counter()
    model = sj.load(args.hf_dir)
    load_s = time.perf_counter() - t0
    batch = sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=grid)
    t0 = time.perf_counter()
    ours_logits = np.asarray(sj.forward(model, batch).logits)
    ours_first = time.perf_counter() - t0

    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
              pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
              mm_token_type_ids=torch.tensor((ids == mid.IMG).astype(np.int64)), use_cache=False)
    # Every method is called once per round, in turn, so load swings on a shared machine hit all alike.
    methods = {"ours: sj.forward (jit)": (lambda: jax.block_until_ready(sj.forward(model, batch).logits), None)}
    diffs = {}
    default_threads = 1 if args.single_thread else torch.get_num_threads()
    for impl in ("eager", "sdpa"):
        hf = Qwen2VLForConditionalGeneration.from_pretrained(args.hf_dir, attn_implementation=impl).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        with torch.no_grad():
            diffs[impl] = float(np.abs(hf(**kw).logits.numpy() - ours_logits).max())
        for threads in args.torch_threads:
            methods[f"transformers {impl}, {threads} thread{'s' * (threads > 1)}"] = (
                lambda hf=hf: hf(**kw), threads)
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    loads = []
    with torch.no_grad():
        for r in range(args.runs + 1):  # round 0 warms up every method and is not counted
            for name, (fn, threads) in methods.items():
                if threads:
                    torch.set_num_threads(threads)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if r:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            loads.append(os.getloadavg()[0])
            print(f"  round {r}/{args.runs} done, load {loads[-1]:.1f}", flush=True)
    load1 = os.getloadavg()
    torch.set_num_threads(default_threads)
    jax_rate, torch_rate = matmul_rate()
    flops = forward_flops(mid.hf_config(), T, GRID * GRID)
    ours = wall["ours: sj.forward (jit)"]

    print(f"\nQwen2-VL mid config, {n_params:,} params, float32; 448x448 image (1024 patches -> 256 tokens), "
          f"T = {T} LM tokens; {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}" + ("; single thread each side" if args.single_thread else ""))
    print(f"matmul FLOPs per forward: {flops / 1e9:.1f} GFLOP; machine fp32 matmul (2048^3, after the runs): "
          f"jax {jax_rate:.1f} GFLOP/s, torch ({default_threads} thread{'s' * (default_threads > 1)}) "
          f"{torch_rate:.1f} GFLOP/s")
    print(f"load average (1, 5, 15 min) {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} -> "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; 1-min after each round {min(loads):.1f}-{max(loads):.1f}")
    print(f"sj.load (HF dir, converted in memory): {load_s:.1f} s; our first call "
          f"(trace + compile + run): {ours_first:.2f} s, so compile ~ {ours_first - statistics.median(ours):.2f} s\n")
    print(f"{'implementation':32s} {'median s':>9s} {'min s':>7s} {'CPU s med':>9s} {'GFLOP/s':>8s} "
          f"{'vs ours (med/min)':>17s} {'max|dlogit| vs ours':>20s}")
    for name, times in wall.items():
        med, lo = statistics.median(times), min(times)
        impl = name.split()[1].rstrip(",") if name.startswith("transformers") else None
        ratio = f"{med / statistics.median(ours):.2f} / {lo / min(ours):.2f}"
        print(f"{name:32s} {med:9.3f} {lo:7.3f} {statistics.median(cpu[name]):9.2f} {flops / med / 1e9:8.1f} "
              f"{ratio:>17s} {('-' if impl is None else f'{diffs[impl]:.2e}'):>20s}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
