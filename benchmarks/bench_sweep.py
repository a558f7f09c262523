"""Criss-cross sweep throughput: ours (region_swap_sweep) vs the official approach (a PyTorch
forward-hook loop, one full forward per patched site) on the same random Qwen2-VL.

    python benchmarks/bench_sweep.py --pairs 50 --torch_pairs 2
    python benchmarks/bench_sweep.py --small --pairs 3 --torch_pairs 1   # quick check
    python benchmarks/bench_sweep.py --sweep last_token --pairs 50 --torch_pairs 2

Every slot (LM input + each layer output) x 2 region sets (object-only, strip) x `pairs` pairs;
with --sweep last_token, the cf run's last position patched in at every slot instead (one "region
set": what `sj.last_token_sweep` does, run here through the same `region_swap_sweep`).
Config: the mid-size Qwen2-VL of benchmarks/_qwen2_vl_mid.py (346.6M params, untied head), one
336x336 image (144 visual tokens), T = 176. The PyTorch loop is timed on `torch_pairs` pairs
and reported per patched forward; both sides must agree on the patched logits of those pairs.

Ours runs region_swap_sweep as the criss_cross binary does: --batch pairs per call (default 10;
1 runs one pair at a time, as the hook loop does), the library's automatic chunking. Times are
per pair (a batch's time over its size).

Timing is interleaved on a shared machine: a batch of ours, then each of its pairs that is among
the first --torch_pairs run by torch at each of --torch_threads (default 1 and 2: under
contention torch's OpenMP threads can lose by far at 2; the fastest setting is the comparison),
so load swings hit every method; per-pair min and median are reported, and the speed-up from
both, and from process CPU seconds per pair (under contention a 2-thread process gets a larger
share of the cores than a 1-thread one; CPU time does not depend on that share).
--single_thread pins the process to one CPU (both sides). The machine's float32 matmul rate
(jax, 2048^3, best of 3) is measured between batches and the highest is kept; the sweep's
matmul work (counted per piece with _qwen2_vl_mid.flop_parts) over its time gives the fraction
of that rate each side reaches. Peak RSS is measured per side in a fresh process (`--side
ours|torch`: one batch of ours, from a converted checkpoint as experiments load it, or one pair
of torch), next to a process that only imports and loads (`--side load_ours|load_torch`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import spatial_jax as sj
from spatial_jax.sweeps.sweep import _row_bucket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _qwen2_vl_mid as mid  # noqa: E402
from _cpu import pin_to_one_core  # noqa: E402

GRID = 24  # 336 px / 14: 12 x 12 merged tokens, the paper's Qwen geometry
IMG, VSTART, VEND = 1000, 1001, 1002


def hf_config(small: bool):
    if not small:
        return mid.hf_config()
    vis = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=128)
    txt = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rope_parameters=dict(rope_type="default", mrope_section=[4, 6, 6],
                                                           rope_theta=1e4))
    return Qwen2VLConfig(vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vis),
                         text_config=dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=4096, **txt),
                         image_token_id=IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def build_hf(out_dir: str, small: bool) -> None:
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(hf_config(small)).eval().save_pretrained(out_dir)


def load_hf(hf_dir: str):
    return Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()


def rss_now() -> float:
    """Current resident set size, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def peak_rss() -> float:
    """Peak resident set size of this process image, bytes. VmHWM, not getrusage's ru_maxrss: a
    child's ru_maxrss starts at its parent's RSS at fork time and survives exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """This machine's float32 matmul rate with jax (XLA CPU), GFLOP/s, best of `reps`."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def sweep_flops(cfg, T: int, n_patches: int, rows: np.ndarray, computed: np.ndarray) -> dict:
    """Matmul work of one pair (L + 1 slots x R region sets). rows [R]: the positions each region
    set's patch changes (from its first patched one on); computed [R]: how many ours computes
    (`rows` bucketed). `needed`: vision + LM once for the clean and once for the cf image; each
    variant patched at slot s < L runs layers s..L-2 at its `rows` (keys and values at every
    position) and then the last layer at the read position only; slot L runs no layer; the head
    at the read position. `ours`: the same at `computed` rows, and slot L restarts at the last
    layer. `torch`: the hook loop, two cf forwards and one full forward (head on every position)
    per variant."""
    f = mid.flop_parts(cfg, T, n_patches)
    L = cfg.text_config.num_hidden_layers
    R = len(rows)
    full_lm = f["vision"] + L * f["layer"]

    def variants(rows):
        return sum((L - 1 - s) * (f["kv"] + r * f["row"]) + f["last_row"] for r in rows for s in range(L))

    reads = R * (L + 1) * f["head_row"]
    return dict(needed=2 * full_lm + variants(rows) + reads,
                ours=2 * full_lm + variants(computed) + R * f["last_row"] + reads,
                torch=(2 + R * (L + 1)) * (full_lm + T * f["head_row"]))


def prompt_ids(n_img_tokens: int) -> np.ndarray:
    text = list(range(10, 40))
    return np.array([text[:14] + [VSTART] + [IMG] * n_img_tokens + [VEND] + text[14:]], np.int64)


def index_maps_for(sweep: str, ids: np.ndarray) -> np.ndarray:
    """[R, 1, T] source-index maps: the criss-cross swaps of `regions`, or (last_token, paper
    Fig. 3) the cf run's last position into the clean run's."""
    if sweep == "criss_cross":
        return regions(ids)[:, None]
    T = ids.shape[1]
    return np.where(np.arange(T) == T - 1, T - 1, -1)[None, None].astype(np.int32)


def regions(ids: np.ndarray):
    """Token positions of the left/right object (2x2) and strip (4 columns) of a 12x12 grid."""
    start = int(np.argmax(ids[0] == IMG))
    grid = np.arange(144).reshape(12, 12) + start
    obj = [grid[5:7, 1:3].ravel(), grid[5:7, 9:11].ravel()]
    strip = [grid[:, 0:4].ravel(), grid[:, 8:12].ravel()]
    T = ids.shape[1]
    return np.stack([sj.swap_index(T, [(obj[0], obj[1])]), sj.swap_index(T, [(strip[0], strip[1])])])


def torch_loop(hf, ids, pv, pv_cf, grid, index_maps, L):
    """The official approach: for each slot and region, one full forward with a hook."""
    mm = torch.tensor((ids == IMG).astype(np.int64))
    kw = dict(input_ids=torch.tensor(ids), image_grid_thw=torch.tensor(grid), mm_token_type_ids=mm)
    layers = hf.model.language_model.layers
    with torch.no_grad():
        cf = hf(pixel_values=torch.tensor(pv_cf), output_hidden_states=True, **kw)
        # slot s < L: input of layer s (hidden_states[s]); slot L: raw output of the last layer
        cf_slots = list(cf.hidden_states[:L])
        last = {}
        h = layers[L - 1].register_forward_hook(lambda m, a, o: last.setdefault("x", o[0] if isinstance(o, tuple) else o))
        hf(pixel_values=torch.tensor(pv_cf), **kw)
        h.remove()
        cf_slots.append(last["x"])
        out = np.zeros((L + 1, len(index_maps)), np.float32)
        for s in range(L + 1):
            for r, index in enumerate(index_maps):
                sel = torch.tensor(index[0] >= 0)
                src = torch.tensor(np.maximum(index[0], 0))

                def patch(x):
                    x = x.clone()
                    x[0, sel] = cf_slots[s][0, src[sel]]
                    return x

                if s < L:
                    hook = layers[s].register_forward_pre_hook(lambda m, a, kwargs: ((patch(a[0]),) + a[1:], kwargs)
                                                               if a else (a, {**kwargs, "hidden_states": patch(kwargs["hidden_states"])}),
                                                               with_kwargs=True)
                else:
                    hook = layers[L - 1].register_forward_hook(lambda m, a, o: patch(o[0] if isinstance(o, tuple) else o))
                logits = hf(pixel_values=torch.tensor(pv), **kw).logits
                hook.remove()
                out[s, r] = logits[0, -1, 5].item()
    return out


def child(args) -> None:
    """--side: one process, one side (ours: one batch of --batch pairs, torch: one pair); prints a
    JSON line with its RSS figures."""
    ids = prompt_ids(144)
    grid = np.array([[1, GRID, GRID]])
    index_maps = index_maps_for(args.sweep, ids)
    b = args.batch
    pair = np.random.default_rng(0).standard_normal((2, b * GRID * GRID, 1176)).astype(np.float32)
    if args.side.endswith("ours"):
        model = sj.load(args.converted)
        loaded = rss_now()
        if args.side == "ours":
            clean, cf = (sj.Batch(input_ids=np.repeat(ids, b, 0), pixel_values=pv, image_grid_thw=np.repeat(grid, b, 0))
                         for pv in pair)
            sj.region_swap_sweep(model, clean, cf, np.repeat(index_maps, b, 1), np.array([5, 6, 7, 8, 9]),
                                 chunk_size=args.chunk_size or None)
    else:
        torch.set_num_threads(1)
        hf = load_hf(args.hf_dir)
        loaded = rss_now()
        if args.side == "torch":
            torch_loop(hf, ids, pair[0, :GRID * GRID], pair[1, :GRID * GRID], grid, index_maps, hf.config.text_config.num_hidden_layers)
    print(json.dumps(dict(side=args.side, after_load=loaded, peak=peak_rss())))


def side_rss(args, work: str, converted: str) -> dict:
    out = {}
    for side in ("load_ours", "ours", "load_torch", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--hf_dir", work, "--converted", converted,
               "--chunk_size", str(args.chunk_size), "--batch", str(args.batch), "--sweep", args.sweep] + (["--small"] if args.small else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{side} child failed:\n{r.stderr[-3000:]}")
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--torch_pairs", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a tiny config, to check the script quickly")
    ap.add_argument("--sweep", default="criss_cross", choices=["criss_cross", "last_token"],
                    help="criss_cross: object and strip swaps (Figs. 6, 7); last_token: the cf run's last "
                         "position patched in (Fig. 3), where only that row changes")
    ap.add_argument("--chunk_size", type=int, default=0, help="variants per compiled call (0: automatic)")
    ap.add_argument("--batch", type=int, default=10,
                    help="pairs per region_swap_sweep call, as the criss_cross binary batches them (its "
                         "--batch_size, default 16); 1: one pair at a time, as the hook loop runs")
    ap.add_argument("--torch_threads", default="1,2",
                    help="torch thread counts to time, interleaved; the fastest is the comparison (on a busy "
                         "machine 1 thread can beat 2 by far: OpenMP barriers)")
    ap.add_argument("--single_thread", action="store_true",
                    help="the process pinned to one CPU and torch at 1 thread: both sides on one core, "
                         "comparable when other processes share the machine")
    ap.add_argument("--no_rss", action="store_true", help="skip the per-side peak-RSS processes")
    ap.add_argument("--side", default=None, choices=["ours", "torch", "load_ours", "load_torch"],
                    help="internal: one side's peak RSS in this process")
    ap.add_argument("--hf_dir", default=None, help="an existing save of the config (else one is made)")
    ap.add_argument("--converted", default=None, help="internal: the converted checkpoint for --side ours")
    args = ap.parse_args()
    if args.side:
        return child(args)
    if args.single_thread:  # before jax starts its CPU backend (nothing has run on it yet)
        pin_to_one_core()
        args.torch_threads = "1"
    threads = [int(t) for t in args.torch_threads.split(",")]
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp()
    if args.hf_dir is None:
        args.hf_dir = os.path.join(tmp, "hf")
        build_hf(args.hf_dir, args.small)
    hf = load_hf(args.hf_dir)
    model = sj.load(args.hf_dir)
    L = model.config.num_layers
    n_params = sum(p.numel() for p in hf.parameters())
    ids = prompt_ids(144)
    T = ids.shape[1]
    index_maps = index_maps_for(args.sweep, ids)  # [R, 1, T]
    R = len(index_maps)
    grid = np.array([[1, GRID, GRID]])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.pairs, 2, GRID * GRID, 1176)).astype(np.float32)
    tokens = np.array([5, 6, 7, 8, 9])

    def ours(pairs):
        """One region_swap_sweep over these pairs as one batch -> [L+1, R, len(pairs)] logits of token 5."""
        b = len(pairs)
        clean, cf = (sj.Batch(input_ids=np.repeat(ids, b, 0), image_grid_thw=np.repeat(grid, b, 0),
                              pixel_values=images[pairs, side].reshape(-1, images.shape[-1])) for side in (0, 1))
        res = sj.region_swap_sweep(model, clean, cf, np.repeat(index_maps, b, 1), tokens,
                                   chunk_size=args.chunk_size or None)
        return res.logits[..., 0]

    batches = [np.arange(i, min(i + args.batch, args.pairs)) for i in range(0, args.pairs, args.batch)]
    t0 = time.perf_counter()
    for size in sorted({len(b) for b in batches}):  # every batch shape compiles here, untimed
        ours(batches[0][:size])
    compile_s = time.perf_counter() - t0
    rates = [matmul_gflops()]
    ours_t, ours_cpu, ours_out, loads = [], [], [], []
    torch_t, torch_cpu, ref = ({t: [] for t in threads} for _ in range(3))
    for j, pairs in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        got = ours(pairs)
        ours_out += [got[:, :, k] for k in range(len(pairs))]
        ours_t.append((time.perf_counter() - t0) / len(pairs))  # per pair
        ours_cpu.append((time.process_time() - c0) / len(pairs))
        for i in (i for i in pairs if i < args.torch_pairs):
            for th in threads:
                torch.set_num_threads(th)
                t0, c0 = time.perf_counter(), time.process_time()
                ref[th].append(torch_loop(hf, ids, images[i, 0], images[i, 1], grid, index_maps, L))
                torch_t[th].append(time.perf_counter() - t0)
                torch_cpu[th].append(time.process_time() - c0)
        rates.append(matmul_gflops())
        loads.append(os.getloadavg()[0])
        print(f"  pairs {pairs[0] + 1}-{pairs[-1] + 1}/{args.pairs}: ours {ours_t[-1]:.2f} s per pair" +
              "".join(f", torch {th} thr {torch_t[th][-1]:.1f} s" for th in threads if pairs[0] < args.torch_pairs)
              + f", load {loads[-1]:.1f}",
              flush=True)
    # --torch_pairs 0 times ours alone (no torch rows, speed-up or parity line)
    timed = [th for th in threads if torch_t[th]]
    err = max((np.abs(ref[th][i] - ours_out[i]).max() for th in timed for i in range(len(ref[th]))), default=None)
    load1 = os.getloadavg()
    del hf
    rss = None
    if not args.no_rss:
        converted = os.path.join(tmp, "converted")
        subprocess.run([sys.executable, "-m", "spatial_jax.convert.cli", "--hf_dir", args.hf_dir,
                        "--output_dir", converted], check=True, capture_output=True)
        rss = side_rss(args, args.hf_dir, converted)

    per_pair = (L + 1) * R
    rows = T - np.array([np.argmax(m[0] >= 0) for m in index_maps])  # causal: a patch changes what follows it
    fl = sweep_flops(hf_config(args.small), T, GRID * GRID, rows, _row_bucket(rows, T))
    rate = max(rates)
    o_min, o_med = min(ours_t), statistics.median(ours_t)
    print(f"\nconfig: {n_params / 1e6:.1f}M params, L={L}, T={T}, 336x336 image (576 patches, 144 visual tokens); "
          f"chunk_size {args.chunk_size or 'auto'}, {args.batch} pairs per sweep call"
          + ("; single thread each side" if args.single_thread else ""))
    print(f"sweep: {args.pairs} pairs x {L + 1} slots x {R} region sets = {args.pairs * per_pair} patched forwards "
          f"(torch: {args.torch_pairs} pairs = {args.torch_pairs * per_pair})")
    print(f"load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; per-batch 1-min range {min(loads):.1f}-{max(loads):.1f}")
    print(f"jax float32 matmul rate (2048^3, best of 3, measured {len(rates)} times): "
          f"{rate:.1f} GFLOP/s (lowest {min(rates):.1f})")
    print(f"matmul work per pair: needed {fl['needed'] / 1e9:.1f} GFLOP, ours does {fl['ours'] / 1e9:.1f}, "
          f"torch loop {fl['torch'] / 1e9:.1f} (ratio torch/needed {fl['torch'] / fl['needed']:.2f})")
    print("| method | s per pair (min / median) | patched fwd/s (min / median time) | CPU s per pair (median) "
          "| GFLOP/s (min time) | of matmul rate | peak RSS GiB (after load) |")
    print("|---|---|---|---|---|---|---|")
    rows = [("ours (region_swap_sweep)", o_min, o_med, statistics.median(ours_cpu), fl["ours"], "ours")]
    rows += [(f"torch hook loop, {th} thread{'s' * (th > 1)}", min(torch_t[th]), statistics.median(torch_t[th]),
              statistics.median(torch_cpu[th]), fl["torch"], "torch") for th in timed]
    for name, lo, med, cpu, work, side in rows:
        mem = "-" if rss is None else f"{rss[side]['peak'] / 2**30:.2f} ({rss[side]['after_load'] / 2**30:.2f})"
        print(f"| {name} | {lo:.2f} / {med:.2f} | {per_pair / lo:.2f} / {per_pair / med:.2f} | {cpu:.1f} | "
              f"{work / lo / 1e9:.1f} | {work / lo / 1e9 / rate:.0%} | {mem} |")
    if rss is not None:
        print(f"load-only processes: ours peak {rss['load_ours']['peak'] / 2**30:.2f} GiB, "
              f"torch peak {rss['load_torch']['peak'] / 2**30:.2f} GiB")
    print(f"needed work / ours' time: {fl['needed'] / o_min / 1e9:.1f} GFLOP/s = "
          f"{fl['needed'] / o_min / 1e9 / rate:.0%} of the matmul rate")
    if timed:
        best = min(timed, key=lambda th: statistics.median(torch_t[th]))
        t_min, t_med = min(torch_t[best]), statistics.median(torch_t[best])
        print(f"speed-up (patched fwd/s ours / torch at its fastest, {best} thread{'s' * (best > 1)}): "
              f"{t_min / o_min:.2f}x from minima, {t_med / o_med:.2f}x from medians (target 5x), "
              f"{statistics.median(torch_cpu[best]) / statistics.median(ours_cpu):.2f}x in CPU seconds per pair "
              f"(medians)")
    print(f"first call incl. compile {compile_s:.1f} s; max |logit diff| ours vs torch on "
          f"{min(args.torch_pairs, args.pairs)} pairs: {'-' if err is None else f'{err:.2e}'}")


if __name__ == "__main__":
    main()
