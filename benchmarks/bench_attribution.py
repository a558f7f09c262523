"""Attribution patching (sj.attribution_sweep) against the exact sweep (and the official hook loop)
on the criss-cross sweep of bench_sweep.py: every slot x 2 region sets (object, strip) x `pairs`
pairs, the ~350M Qwen2-VL of benchmarks/_qwen2_vl_mid.py, 336x336 images, T = 176, 5 read tokens.

    python benchmarks/bench_attribution.py --pairs 50 --torch_pairs 1
    python benchmarks/bench_attribution.py --small --pairs 4 --torch_pairs 1 --no_rss   # quick check
    python benchmarks/bench_attribution.py --pairs 5 --batch 5 --torch_pairs 0 --no_rss --qk_fix --methods exact,metric
    python benchmarks/bench_attribution.py --organisms [--qk_fix] [--grad_drop]   # estimate vs exact on checkpoints/organism*

Interleaved per batch of --batch pairs (the order rotating): region_swap_sweep exact,
method="attribution" (one clean forward and one backward per read token, the rest contractions)
and "metric", the same with metric= the logit difference of tokens 5 and 6 (one backward),
and "forwards": the two runs every method needs (the cf run cached at the slots, the clean run),
whose time bounds how much faster than the exact sweep any method that needs them can be; with
--qk_fix also "metric_qk", the metric path with AtP*'s QK-fix (qk_fix=True: each variant's first
patched layer and the next run exactly); --methods picks a subset (exact always runs, it is what
the others are compared with). The first --torch_pairs pairs also through bench_sweep.torch_loop
(one full forward per patch).
Wall and process CPU seconds per pair, `uptime` load. Accuracy: Pearson r between estimated
and exact change of the read logits (token 5 and the 5-6 logit difference) over every slot,
region set and pair (the metric paths: their estimated change of that difference, also per slot
and of the magnitudes, the ranking verify_top uses). Peak RSS per
side in a fresh process (load only; one batch of exact, attribution, metric: the backward's
memory is an attribution side's peak over load's).

--heads P: first the head-level criss-cross (lm.attn_z at every layer x head x region set, 384
variants per pair on the mid config) on P pairs, exact against the metric path: the regime where
the number of variants, not the two forwards, sets the exact sweep's cost.

--organisms: the organisms' estimate-vs-exact correlation on their own criss-cross and
last-token sweeps (the binaries with --method both, --n_pairs 8, squares, and --qk_fix /
--grad_drop if given), read from results.json: r of the signed changes, per slot, and r of
their magnitudes (the ranking verify_top uses), GradDrop's score's beside it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sweep as bs  # noqa: E402

import spatial_jax as sj  # noqa: E402
from spatial_jax.interventions import sites  # noqa: E402

TOKENS = np.array([5, 6, 7, 8, 9])
METHODS = ("exact", "attribution", "metric", "forwards")
METRIC_METHODS = ("metric", "metric_qk")  # estimates of the change of logit_difference
SLOT_SITES = (sites.LM_RESID_PRE, sites.LM_RESID_POST)


def logit_difference(y):
    """The metric path's metric: read logit of token 5 minus that of token 6, [B, 5] -> [B]."""
    return y[:, 0] - y[:, 1]


def inputs(pairs: np.ndarray, images: np.ndarray, ids: np.ndarray, index_maps: np.ndarray):
    b = len(pairs)
    grid = np.array([[1, bs.GRID, bs.GRID]])
    clean, cf = (sj.Batch(input_ids=np.repeat(ids, b, 0), image_grid_thw=np.repeat(grid, b, 0),
                          pixel_values=images[pairs, side].reshape(-1, images.shape[-1])) for side in (0, 1))
    return clean, cf, np.repeat(index_maps, b, 1)


def sweep(model, method, clean, cf, index):
    """-> logits [L+1, R, b, 5] and the clean run's [b, 5] (attribution) or None; metric: the
    estimated change of logit_difference [L+1, R, b] and its clean value [b] (metric_qk: with
    qk_fix). "forwards": the
    floor every method pays, the cf run cached at the slots (where the sources come from) and
    one clean run (where the patches are applied / linearised), nothing else: (None, None)."""
    if method == "forwards":
        for batch in (cf, clean):
            jax.block_until_ready(sj.forward(model, batch, cache=SLOT_SITES, logits=False).cache)
        return None, None
    if method in METRIC_METHODS:
        res = sj.region_swap_sweep(model, clean, cf, index, TOKENS, method="attribution",
                                   metric=jax.tree_util.Partial(logit_difference), qk_fix=method == "metric_qk")
        return res.metric_change, res.metric_clean
    res = sj.region_swap_sweep(model, clean, cf, index, TOKENS, method=method)
    return res.logits, getattr(res, "clean", None)


def head_sweep(model, method, clean, cf, index):
    """The criss-cross swap at every head: variant (l, h, r) replaces head h of lm.attn_z (its
    output before o_proj) at layer l in region set r's swapped tokens by the cf run's.
    -> exact: logits [L, H, R, b, 5]; metric: the estimated change of logit_difference [L, H, R, b]
    and its clean value [b]."""
    L, H = model.config.num_layers, model.config.num_heads
    z = sj.forward(model, cf, cache=sites.LM_ATTN_Z, logits=False).cache[sites.LM_ATTN_Z]
    z = np.moveaxis(np.asarray(z), 1, 0)  # [L, b, T, H, hd]
    R = index.shape[0]
    iv = sj.Intervention(
        site=sites.LM_ATTN_Z, op="replace", layer=np.broadcast_to(np.arange(L)[:, None, None], (L, H, R)),
        index=np.broadcast_to(index[None, None], (L, H) + index.shape),
        source=np.broadcast_to(z[:, None, None], (L, H, R) + z.shape[1:]),
        head_mask=np.broadcast_to(np.eye(H, dtype=bool)[None, :, None], (L, H, R, H)))
    readout = sj.Readout(sj.last_positions(clean.with_defaults().attention_mask), TOKENS)
    if method == "metric":
        res = sj.attribution_sweep(model, clean, [iv], readout, metric=jax.tree_util.Partial(logit_difference))
        return res.metric_change, res.metric_clean
    return sj.patch_sweep(model, clean, [iv], readout).logits, None


def heads(model, args, ids, index_maps, images) -> None:
    """--heads: exact against the metric path on the head-level criss-cross, one batch of
    --heads pairs after an untimed first call of each."""
    pairs = np.arange(args.heads)
    batch = inputs(pairs, images, ids, index_maps)
    cfg = model.config
    print(f"head-level criss-cross: {cfg.num_layers} layers x {cfg.num_heads} heads x {len(index_maps)} region sets "
          f"= {cfg.num_layers * cfg.num_heads * len(index_maps)} variants per pair, {args.heads} pairs in one call")
    got, cpu = {}, {}
    for method in ("exact", "metric"):
        t0 = time.perf_counter()
        head_sweep(model, method, *batch)
        print(f"  first call {method} (incl. compile): {time.perf_counter() - t0:.1f} s", flush=True)
    for method in ("exact", "metric", "exact", "metric"):
        t0, c0 = time.perf_counter(), time.process_time()
        got[method] = head_sweep(model, method, *batch)
        wall = (time.perf_counter() - t0) / args.heads
        cpu.setdefault(method, []).append((time.process_time() - c0) / args.heads)
        print(f"  {method}: {wall:.2f} s/pair wall, {cpu[method][-1]:.2f} CPU s/pair, load {os.getloadavg()[0]:.1f}",
              flush=True)
    exact = got["exact"][0]
    d_exact = exact[..., 0] - exact[..., 1] - got["metric"][1]
    print(f"head-level: exact {min(cpu['exact']):.2f}, metric {min(cpu['metric']):.2f} CPU s per pair (best of 2): "
          f"{min(cpu['exact']) / min(cpu['metric']):.1f}x; estimate vs exact change of logit 5 - 6: r = "
          f"{pearson(got['metric'][0], d_exact):.4f}, mean |exact| {np.abs(d_exact).mean():.4f}")


def child(args) -> None:
    """One side's peak RSS in this process: load, then one batch of that method."""
    model = sj.load(args.converted)
    ids = bs.prompt_ids(144)
    images = np.random.default_rng(0).standard_normal((args.batch, 2, bs.GRID * bs.GRID, 1176)).astype(np.float32)
    loaded = bs.rss_now()
    clean, cf, index = inputs(np.arange(args.batch), images, ids, bs.index_maps_for("criss_cross", ids))
    if args.side == "forward":
        jax.block_until_ready(sj.forward(model, clean).logits)
    elif args.side != "load":
        sweep(model, args.side, clean, cf, index)
    print(json.dumps(dict(side=args.side, after_load=loaded, peak=bs.peak_rss())))


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def organisms(extra: list[str], sweeps: list[str], names: list[str]) -> None:
    """extra: more flags for the binaries (--qk_fix, --grad_drop); sweeps: which binaries; names:
    which checkpoints/organism* (all if empty)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
    print(f"flags: {' '.join(extra) or '-'}")
    print("| organism | sweep | pairs | r (all slots) | r per slot | max abs exact change | r of abs (estimate; GradDrop) |"
          "\n|---|---|---|---|---|---|---|")
    for ckpt in sorted(glob.glob(os.path.join(root, "organism*"))):
        if names and os.path.basename(ckpt) not in names:
            continue
        out = tempfile.mkdtemp()
        for name in sweeps:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"experiments.{name}", f"--checkpoint={ckpt}", "--dataset=squares",
                            "--n_pairs=8", "--method=both", f"--output_dir={out}", *extra], check=True, capture_output=True,
                           cwd=os.path.dirname(root))
            with open(os.path.join(out, name, "results.json")) as f:
                parts = [v["attribution"] for v in json.load(f)["parts"].values() if v["n_pairs"]]
            est = np.concatenate([np.asarray(p["estimate"]) for p in parts], -1)
            exact = np.concatenate([np.asarray(p["exact"]) for p in parts], -1)
            per_slot = [pearson(e, x) if np.std(x) > 0 and np.std(e) > 0 else float("nan")
                        for e, x in zip(est.reshape(len(est), -1), exact.reshape(len(exact), -1))]
            gd = ("; " + f"{pearson(np.concatenate([np.asarray(p['grad_drop_score']) for p in parts], -1), np.abs(exact)):.4f}"
                  if "grad_drop_score" in parts[0] else "")
            print(f"| {os.path.basename(ckpt)} | {name} ({parts[0]['metric']}) | {est.shape[-1]} | "
                  f"{pearson(est, exact):.4f} | {' '.join(f'{r:.3f}' for r in per_slot)} | {np.abs(exact).max():.3g} | "
                  f"{pearson(np.abs(est), np.abs(exact)):.4f}{gd} | ({time.perf_counter() - t0:.0f} s)", flush=True)


def peak_rss(args, tmp: str) -> dict:
    """side -> the child's {after_load, peak} bytes (load only, a plain forward of one batch, one
    batch of each method), each in a fresh process on the converted checkpoint."""
    converted = os.path.join(tmp, "converted")
    subprocess.run([sys.executable, "-m", "spatial_jax.convert.cli", "--hf_dir", args.hf_dir, "--output_dir",
                    converted], check=True, capture_output=True)
    rss = {}
    for side in ("load", "forward", "exact", "attribution", "metric"):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--converted", converted,
                            "--batch", str(args.batch)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{side} child failed:\n{r.stderr[-3000:]}")
        rss[side] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {side}: peak RSS {rss[side]['peak'] / 2**30:.2f} GiB (after load {rss[side]['after_load'] / 2**30:.2f})",
              flush=True)
    return rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=10, help="pairs per sweep call (the binaries' --batch_size)")
    ap.add_argument("--torch_pairs", type=int, default=1)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--no_rss", action="store_true")
    ap.add_argument("--organisms", action="store_true")
    ap.add_argument("--qk_fix", action="store_true",
                    help="--organisms: the binaries with --qk_fix; else also time the metric path with qk_fix (metric_qk)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="the timed methods besides exact (comma-separated, of " + ", ".join(METHODS) + ")")
    ap.add_argument("--grad_drop", action="store_true", help="--organisms: the binaries with --grad_drop")
    ap.add_argument("--sweeps", default="criss_cross,last_token", help="--organisms: the binaries to run")
    ap.add_argument("--names", default="", help="--organisms: these checkpoints only (comma-separated; all if empty)")
    ap.add_argument("--heads", type=int, default=0,
                    help="also time the head-level criss-cross (lm.attn_z, every layer x head) on this many pairs")
    ap.add_argument("--hf_dir", default=None)
    ap.add_argument("--side", default=None, choices=["load", "forward", *METHODS])
    ap.add_argument("--rss_only", action="store_true", help="only the peak-RSS children (no timing)")
    ap.add_argument("--converted", default=None)
    args = ap.parse_args()
    if args.organisms:
        return organisms([f"--{f}" for f in ("qk_fix", "grad_drop") if getattr(args, f)], args.sweeps.split(","),
                         [n for n in args.names.split(",") if n])
    if args.side:
        return child(args)
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp()
    if args.hf_dir is None:
        args.hf_dir = os.path.join(tmp, "hf")
        bs.build_hf(args.hf_dir, args.small)
    if args.rss_only:
        peak_rss(args, tmp)
        return
    model = sj.load(args.hf_dir)
    L = model.config.num_layers
    ids = bs.prompt_ids(144)
    index_maps = bs.index_maps_for("criss_cross", ids)
    images = np.random.default_rng(0).standard_normal((args.pairs, 2, bs.GRID * bs.GRID, 1176)).astype(np.float32)
    if args.heads:
        heads(model, args, ids, index_maps, images)
        if not args.pairs:
            return
    methods = tuple(dict.fromkeys(["exact", *(m for m in args.methods.split(",") if m)] + ["metric_qk"] * args.qk_fix))
    if not set(methods) <= set(METHODS) | {"metric_qk"}:
        raise SystemExit(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; known: {', '.join(METHODS)}")
    batches = [np.arange(i, min(i + args.batch, args.pairs)) for i in range(0, args.pairs, args.batch)]
    compile_s = {}
    print(f"loaded: process peak RSS {bs.peak_rss() / 2**30:.2f} GiB", flush=True)
    for method in methods:  # every batch shape compiles here, untimed
        t0 = time.perf_counter()
        for size in sorted({len(b) for b in batches}):
            sweep(model, method, *inputs(batches[0][:size], images, ids, index_maps))
        compile_s[method] = time.perf_counter() - t0
        print(f"  first call of {method}: {compile_s[method]:.1f} s, process peak RSS so far {bs.peak_rss() / 2**30:.2f} GiB",
              flush=True)
    wall, cpu, out, cleans = ({m: [] for m in methods} for _ in range(4))
    loads, torch_t, torch_cpu, torch_out = [], [], [], []
    hf = bs.load_hf(args.hf_dir) if args.torch_pairs else None
    for j, pairs in enumerate(batches):
        args_b = inputs(pairs, images, ids, index_maps)
        for method in methods[j % len(methods):] + methods[:j % len(methods)]:
            t0, c0 = time.perf_counter(), time.process_time()
            logits, clean = sweep(model, method, *args_b)
            wall[method].append((time.perf_counter() - t0) / len(pairs))
            cpu[method].append((time.process_time() - c0) / len(pairs))
            out[method].append(logits)
            if clean is not None:
                cleans[method].append(clean)
        for i in (i for i in pairs if i < args.torch_pairs):
            import torch
            torch.set_num_threads(1)
            t0, c0 = time.perf_counter(), time.process_time()
            torch_out.append(bs.torch_loop(hf, ids, images[i, 0], images[i, 1], np.array([[1, bs.GRID, bs.GRID]]),
                                           index_maps, L))
            torch_t.append(time.perf_counter() - t0)
            torch_cpu.append(time.process_time() - c0)
        loads.append(os.getloadavg()[0])
        print(f"  pairs {pairs[0] + 1}-{pairs[-1] + 1}: " + ", ".join(
            f"{m} {wall[m][-1]:.2f} s/pair ({cpu[m][-1]:.1f} CPU s)" for m in methods) + f", load {loads[-1]:.1f}",
            flush=True)
    load1 = os.getloadavg()
    rss = None if args.no_rss else peak_rss(args, tmp)
    exact = np.concatenate(out["exact"], 2)  # [L+1, R, n, 5]
    diff = lambda x: x[..., 0] - x[..., 1]  # noqa: E731
    # the clean logit difference: from the per-logit path's clean logits or a metric path's value
    clean_diff = next(diff(np.concatenate(cleans[m], 0)) if m == "attribution" else np.concatenate(cleans[m], 0)
                      for m in methods if cleans[m])
    d_exact = diff(exact) - clean_diff  # [L+1, R, n] the exact change of logit 5 - 6
    R = len(index_maps)
    print(f"\nconfig: L={L}, T={ids.shape[1]}, {args.pairs} pairs x {L + 1} slots x {R} region sets = "
          f"{args.pairs * (L + 1) * R} patches, {args.batch} pairs per call, {len(TOKENS)} read tokens")
    print(f"load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; per-batch 1-min {min(loads):.1f}-{max(loads):.1f}")
    print("first calls incl. compile: " + ", ".join(f"{m} {compile_s[m]:.1f} s" for m in methods))
    print("| method | wall s per pair (min / median / total over pairs) | CPU s per pair (median / total) |\n|---|---|---|")
    for m in methods:
        print(f"| {m} | {min(wall[m]):.2f} / {statistics.median(wall[m]):.2f} / {sum(wall[m]) * args.batch:.1f} "
              f"| {statistics.median(cpu[m]):.2f} / {sum(cpu[m]) * args.batch:.1f} |")
    if torch_t:
        print(f"| torch hook loop, 1 thread ({len(torch_t)} pairs) | {min(torch_t):.2f} / {statistics.median(torch_t):.2f} | "
              f"{statistics.median(torch_cpu):.2f} |")
    for m in (m for m in methods if m not in ("exact", "forwards")):
        speed = statistics.median(wall["exact"]) / statistics.median(wall[m])
        speed_cpu = statistics.median(cpu["exact"]) / statistics.median(cpu[m])
        print(f"speed-up of {m} over exact: {speed:.2f}x wall (medians), "
              f"{min(wall['exact']) / min(wall[m]):.2f}x (minima), {speed_cpu:.2f}x CPU s (medians)"
              + (f"; over the hook loop {statistics.median(torch_t) / statistics.median(wall[m]):.1f}x wall, "
                 f"{statistics.median(torch_cpu) / statistics.median(cpu[m]):.1f}x CPU s" if torch_t else ""))
    if "forwards" in methods:
        floor = statistics.median(cpu["forwards"])
        print(f"the floor, two forwards (cf cached at the slots, clean): {floor:.2f} CPU s per pair; exact / floor "
              f"{statistics.median(cpu['exact']) / floor:.2f}x: no method that needs those two runs can be faster "
              f"than the exact sweep by more" + "".join(f"; {m} / floor {statistics.median(cpu[m]) / floor:.2f}x"
                                                        for m in methods if m in METRIC_METHODS))
    print(f"mean |exact change| of logit 5 - 6: {np.abs(d_exact).mean():.4f}; per slot "
          + " ".join(f"{np.abs(d_exact[s]).mean():.2g}" for s in range(L + 1)))
    if "attribution" in methods:
        d_est = np.concatenate(out["attribution"], 2) - np.concatenate(cleans["attribution"], 0)
        d_exact5 = exact[..., 0] - np.concatenate(cleans["attribution"], 0)[:, 0]
        print(f"per-logit estimate vs exact change, every slot/region/pair: r = {pearson(d_est[..., 0], d_exact5):.4f} "
              f"(logit of token 5), r = {pearson(diff(d_est), d_exact):.4f} (logit 5 - logit 6); per slot "
              f"(logit 5 - 6): " + " ".join(f"{pearson(diff(d_est[s]), d_exact[s]):.2f}" for s in range(L + 1))
              + f"; mean |estimate - exact| {np.abs(diff(d_est) - d_exact).mean():.4f}")
        if "metric" in methods:
            print(f"metric path vs per-logit chain: max |diff| {np.abs(np.concatenate(out['metric'], 2) - diff(d_est)).max():.2e}"
                  f", clean values max |diff| {np.abs(np.concatenate(cleans['metric']) - clean_diff).max():.2e}")
    for m in (m for m in methods if m in METRIC_METHODS):
        est = np.concatenate(out[m], 2)  # [L+1, R, n]
        print(f"{m} (logit 5 - 6, one backward) vs exact change: r = {pearson(est, d_exact):.4f} (every slot/region/"
              f"pair), per region set " + " ".join(f"{pearson(est[:, r], d_exact[:, r]):.4f}" for r in range(R))
              + ", per slot " + " ".join(f"{pearson(est[s], d_exact[s]):.2f}" for s in range(L + 1))
              + f"; r of |.| {pearson(np.abs(est), np.abs(d_exact)):.4f}; mean |estimate - exact| "
              f"{np.abs(est - d_exact).mean():.4f}, per slot " + " ".join(f"{np.abs(est[s] - d_exact[s]).mean():.2g}"
                                                                          for s in range(L + 1)))
    if torch_out:
        err = max(np.abs(torch_out[i] - exact[:, :, i, 0]).max() for i in range(len(torch_out)))
        print(f"max |logit 5 diff| exact sweep vs hook loop on {len(torch_out)} pairs: {err:.2e}")
    if rss:
        print("peak RSS GiB (after load): " + ", ".join(
            f"{s} {rss[s]['peak'] / 2**30:.2f} ({rss[s]['after_load'] / 2**30:.2f})" for s in rss))


if __name__ == "__main__":
    main()
