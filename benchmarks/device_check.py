"""One prepared accelerator check (issue 17.5): run it whenever a GPU is lent, in <= 8 minutes.

    python benchmarks/device_check.py --out device_check.json            # on the GPU machine
    python benchmarks/device_check.py --out /tmp/smoke.json --smoke      # same code paths, CPU, tiny

Writes one JSON, rewritten after every step (a crash in a later step leaves the earlier ones):
  env        backend, device kind, jax version, the device's dense bf16 peak (table below)
  parity     float32 and bfloat16 logits of the three families' tiny test configs
             (tests/fixtures_*.py, random weights) on the default backend against the same
             computed in a JAX_PLATFORMS=cpu subprocess on this machine
  attention  the existing attention against jax.nn.dot_product_attention (implementation
             "cudnn" on GPU) at Qwen2-VL-7B shapes in bf16: time and max difference; which one
             the library uses (today: always the existing path)
  real_size  random-weight Qwen2-VL-7B and Gemma-3-4b in bfloat16 (created on the device): compile
             and run time of one forward, its XLA FLOP count and achieved TFLOP/s; a criss-cross
             (region swap) sweep over every layer: patched forwards/s and TFLOP/s (upper bound:
             each variant counted as the layers it recomputes over the whole sequence) and the
             fraction of the bf16 peak; Qwen2-VL: the same sweep by attribution patching
             (`attribution_sweep`'s one-backward metric path, issue 19): time against the exact
             sweep's, the device's peak memory before and after it, estimate-vs-exact r; the
             largest chunk that fits (doubling until out of memory or out of time)
Every step has its own time box (--budget_s split between them); a step out of time records
what it finished. --smoke swaps the real-size models for tiny ones so the whole run takes < 2 min
on this CPU (tests/test_device_check.py runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# Dense bf16 peak TFLOP/s by device kind (vendor datasheets, no sparsity).
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.0, "A100-SXM4-80GB": 312.0, "A100-SXM4-40GB": 312.0, "A100 80GB PCIe": 312.0,
                    "L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}
FAMILIES = ("qwen2_vl", "gemma3", "pixtral", "qwen2_5_vl", "llava")
DTYPES = ("float32", "bfloat16")


def peak_tflops(kind: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


class Report:
    """The JSON file, rewritten after every change."""

    def __init__(self, path: str):
        self.path, self.data = path, {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}

    def put(self, step: str, value) -> None:
        self.data["steps"][step] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------
# tiny test configs (parity)

def tiny_case(family: str, dtype: str, seed: int = 0):
    """(model, batch) of `family`'s tiny test config with random weights, one image prompt."""
    import importlib

    from flax import nnx

    import spatial_jax as sj
    from spatial_jax.convert.convert import DTYPES as JDT
    from spatial_jax.families import FAMILIES as REG

    config_fx = importlib.import_module(f"fixtures_{family}")
    # Qwen2.5-VL's inputs are Qwen2-VL's
    fx = importlib.import_module("fixtures_qwen2_vl") if family == "qwen2_5_vl" else config_fx
    prompt = {"qwen2_vl": lambda: [[5, 6, 7], fx.image(4, 6), [8, 9, 10, 11]],
              "qwen2_5_vl": lambda: [[5, 6, 7], fx.image(4, 6), [8, 9, 10, 11]],
              "gemma3": lambda: [list(range(12, 15)), fx.IMAGE, list(range(15, 20))],
              "pixtral": lambda: [list(range(16, 19)), (32, 48), list(range(19, 24))],
              "llava": lambda: [list(range(16, 19)), "image", list(range(19, 24))]}[family]()
    inputs = fx.make_inputs([prompt], seed=seed)
    fam = REG[family]
    cfg = fam.config_cls.from_hf(config_fx.tiny_hf_config().to_dict())
    graphdef, params = nnx.split(fam.model_cls(cfg, dtype=JDT[dtype], rngs=nnx.Rngs(seed)))
    return sj.Model(family, cfg, graphdef, params, dtype, ""), fx.to_batch(inputs)


def tiny_logits() -> dict[str, np.ndarray]:
    import spatial_jax as sj

    out = {}
    for family in FAMILIES:
        for dtype in DTYPES:
            model, batch = tiny_case(family, dtype)
            out[f"{family}/{dtype}"] = np.asarray(sj.forward(model, batch).logits, np.float32)
    return out


def step_parity(deadline: float) -> dict:
    import jax

    got = tiny_logits()
    if jax.default_backend() == "cpu":  # --smoke: the reference is this very process's backend
        ref = got
    else:
        ref_file = os.path.join(os.path.dirname(os.path.abspath(ARGS.out)), ".device_check_cpu_ref.npz")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu_reference", ref_file], env=env,
                       check=True, timeout=max(10, deadline - time.time()), capture_output=True)
        ref = dict(np.load(ref_file))
    res = {}
    for key, want in ref.items():
        diff = float(np.abs(got[key] - want).max())
        res[key] = dict(max_abs_diff=diff, max_abs_logit=float(np.abs(want).max()),
                        argmax_agree=float((got[key].argmax(-1) == want.argmax(-1)).mean()),
                        within=bool(diff <= (1e-4 if key.endswith("float32") else 0.05 * np.abs(want).max())))
    return res


# ---------------------------------------------------------------------------------------------
# attention implementations

def step_attention(deadline: float) -> dict:
    import jax
    import jax.numpy as jnp

    from spatial_jax.nn import layers

    B, T, Hq, Hkv, hd = (1, 64, 4, 2, 16) if ARGS.smoke else (8, 700, 28, 4, 128)  # Qwen2-VL-7B heads
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, hd), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, T, Hkv, hd), jnp.bfloat16) for kk in ks[1:])
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    scale = hd ** -0.5
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    fns = {"existing": jax.jit(lambda q, k, v, m: layers.attention(q, k, v, m, scale)),
           f"dot_product_attention({impl})": jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
               q, k, v, mask=m[:, None], scale=scale, implementation=impl))}
    res, outs = {}, {}
    for name, fn in fns.items():
        if time.time() > deadline:
            break
        try:
            t0 = time.time()
            outs[name] = fn(q, k, v, allowed).block_until_ready()
            compile_s = time.time() - t0
            t0 = time.time()
            for _ in range(5):
                fn(q, k, v, allowed).block_until_ready()
            res[name] = dict(ms=1e3 * (time.time() - t0) / 5, first_call_s=compile_s)
        except Exception as e:  # cuDNN may refuse a shape or be absent
            res[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    if len(outs) == 2:
        a, b = (np.asarray(o, np.float32) for o in outs.values())
        res["max_abs_diff"] = float(np.abs(a - b).max())
    res["library_uses"] = "existing"
    return res


# ---------------------------------------------------------------------------------------------
# real-size models

def real_config(family: str):
    from spatial_jax.families.gemma3 import model as gemma3
    from spatial_jax.families.qwen2_vl import model as qwen2_vl

    if ARGS.smoke:
        return tiny_case(family, "bfloat16")[0].config
    if family == "qwen2_vl":  # Qwen2-VL-7B-Instruct (architectures.md A.0)
        vocab = 152064
        return qwen2_vl.Qwen2VLConfig(
            vision_depth=32, vision_dim=1280, vision_heads=16, vision_mlp_dim=5120, patch_size=14,
            temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4, vocab_size=vocab,
            hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
            rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=False,
            image_token_id=151655, vision_start_token_id=151652, vision_end_token_id=151653)
    # google/gemma-3-4b-it's hub config.json
    return gemma3.Gemma3Config.from_hf({
        "mm_tokens_per_image": 256, "image_token_index": 262144, "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "text_config": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                            rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6,
                            rope_local_base_freq=1e4, sliding_window_pattern=6),
        "vision_config": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=896, patch_size=14, vision_use_head=False)})


def real_inputs(family: str, cfg, seed: int):
    """One image and ~40 words of prompt; the image tokens' positions."""
    import spatial_jax as sj

    rng = np.random.default_rng(seed)
    text = list(range(1000, 1040)) if not ARGS.smoke else list(range(12, 20))
    if family == "qwen2_vl":
        g = 8 if ARGS.smoke else 24  # 24 x 24 patches: a 336-px image, 144 visual tokens
        img = [cfg.image_token_id] * (g * g // 4)
        ids = np.array([text[:4] + [cfg.vision_start_token_id] + img + [cfg.vision_end_token_id] + text[4:]])
        return sj.Batch(input_ids=ids, pixel_values=rng.standard_normal((g * g, cfg.patch_dim)).astype(np.float32),
                        image_grid_thw=np.array([[1, g, g]])), ids[0] == cfg.image_token_id
    if family == "gemma3":
        img = [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [cfg.eoi_token_id]
        ids = np.array([[2] + text[:4] + img + text[4:]])
        pv = rng.standard_normal((1, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        return (sj.Batch(input_ids=ids, pixel_values=pv, token_type_ids=(ids == cfg.image_token_id).astype(np.int32)),
                ids[0] == cfg.image_token_id)
    raise ValueError(family)


def random_model(family: str, cfg, dtype: str):
    """Random weights created on the device in their shardings (the tiny test model in --smoke)."""
    from flax import nnx

    import spatial_jax as sj
    from spatial_jax import parallel
    from spatial_jax.convert.convert import DTYPES as JDT, abstract_model
    from spatial_jax.families import FAMILIES as REG

    if ARGS.smoke:
        return tiny_case(family, dtype)[0]
    graphdef, state = nnx.split(abstract_model(REG[family], cfg, JDT[dtype]))
    target = nnx.to_pure_dict(state)
    mesh = parallel.single_device_mesh()
    params = parallel.init_params(target, parallel.param_shardings(target, REG[family].sharding_rules, mesh))
    nnx.replace_by_pure_dict(state, params)
    return sj.Model(family, cfg, graphdef, state, dtype, "")


def step_real_size(family: str, deadline: float) -> dict:
    import jax

    import spatial_jax as sj
    from spatial_jax.forward import _apply_jit

    peak = peak_tflops(jax.devices()[0].device_kind) if jax.default_backend() != "cpu" else None
    cfg = real_config(family)
    res = {}
    t0 = time.time()
    model = random_model(family, cfg, "bfloat16")
    jax.block_until_ready(model.params)
    res["param_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(model.params)))
    res["init_s"] = time.time() - t0
    clean, img = real_inputs(family, cfg, 0)
    cf, _ = real_inputs(family, cfg, 1)
    t0 = time.time()
    compiled = _apply_jit.lower(model.graphdef, model.params, clean.with_defaults(), (), (), True).compile()
    res["forward_compile_s"] = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    sj.forward(model, clean).logits.block_until_ready()
    t0 = time.time()
    reps = 3
    for _ in range(reps):
        sj.forward(model, clean).logits.block_until_ready()
    fwd_s = (time.time() - t0) / reps
    res.update(tokens=int(clean.input_ids.shape[1]), forward_s=fwd_s, forward_flops=flops,
               forward_tflops=flops / fwd_s / 1e12, bf16_peak_tflops=peak)
    if time.time() > deadline:
        return res

    # criss-cross: left and right halves of the image tokens swap with the cf run's, at every layer
    L = cfg.num_layers
    pos = np.flatnonzero(img)
    half = len(pos) // 2
    T = clean.input_ids.shape[1]
    index = np.broadcast_to(sj.swap_index(T, [(pos[:half], pos[half:2 * half])])[None], (L, 1, T))
    src = sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"]  # on device
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.arange(L), index=index,
                         source=jax.numpy.moveaxis(src, 1, 0))
    iv = jax.tree.map(lambda a: np.asarray(a) if not isinstance(a, jax.Array) else a, iv)
    readout = sj.Readout(sj.last_positions(np.ones((1, T))), np.array([1, 2, 3]))

    def sweep(chunk):
        t0 = time.time()
        sj.patch_sweep(model, clean, [iv], readout, chunk_size=chunk)
        return time.time() - t0

    chunk = 8 if ARGS.smoke else 32
    res["sweep_first_call_s"] = sweep(chunk)  # compiles
    s = sweep(chunk)
    # upper bound on the work: variant l recomputes layers l..L-1 over every position
    layer_flops = flops / max(1, L)  # vision and head folded in: an upper bound
    work = sum((L - l) * layer_flops for l in range(L))
    res.update(sweep_variants=L, sweep_chunk=chunk, sweep_s=s, patched_forwards_per_s=L / s,
               sweep_tflops_upper_bound=work / s / 1e12)
    if peak:
        res["forward_fraction_of_peak"] = res["forward_tflops"] / peak
        res["sweep_fraction_of_peak_upper_bound"] = res["sweep_tflops_upper_bound"] / peak
    if family == "qwen2_vl" and time.time() < deadline:
        res["attribution"] = attribution_vs_exact(model, clean, iv, readout, s)
    largest = None
    c = chunk
    while time.time() < deadline and c <= 4 * L:
        try:
            # one call of c variants: the sweep's variants repeated c / L times
            n = max(c, L)
            big = jax.tree.map(lambda a: a[np.arange(n) % L] if np.ndim(a) else a, iv)
            t0 = time.time()
            sj.patch_sweep(model, clean, [big], readout, chunk_size=c)
            largest = dict(chunk=c, s=time.time() - t0)
            c *= 2
        except Exception as e:  # out of device memory ends the search
            res["chunk_stopped_by"] = f"{type(e).__name__}: {str(e)[:200]}"
            break
    res["largest_chunk_that_ran"] = largest
    return res


def logit_difference(y):
    """The attribution step's metric: read logit 0 minus read logit 1, [B, K] -> [B]."""
    return y[:, 0] - y[:, 1]


def attribution_vs_exact(model, clean, iv, readout, exact_s: float) -> dict:
    """The criss-cross sweep of step_real_size estimated by attribution patching (one backward of
    a logit difference) after the exact sweep took exact_s: times, peak device memory, and how
    well the estimate tracks the exact change."""
    import jax

    import spatial_jax as sj

    def peak():
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

    metric = jax.tree_util.Partial(logit_difference)
    res = dict(peak_bytes_before=peak())
    t0 = time.time()
    sj.attribution_sweep(model, clean, [iv], readout, metric=metric)
    res["first_call_s"] = time.time() - t0
    t0 = time.time()
    est = sj.attribution_sweep(model, clean, [iv], readout, metric=metric)
    res.update(s=time.time() - t0, peak_bytes_after=peak())
    res["exact_s_over_attribution_s"] = exact_s / res["s"]
    exact = sj.patch_sweep(model, clean, [iv], readout).logits  # [L, 1, K]
    d_exact = (exact[..., 0] - exact[..., 1] - est.metric_clean).ravel()
    d_est = est.metric_change.ravel()
    res.update(r=float(np.corrcoef(d_est, d_exact)[0, 1]) if d_exact.std() > 0 and d_est.std() > 0 else None,
               mean_abs_exact_change=float(np.abs(d_exact).mean()),
               mean_abs_error=float(np.abs(d_est - d_exact).mean()))
    return res


# ---------------------------------------------------------------------------------------------

def run_step(report: Report, name: str, fn, budget_s: float) -> None:
    t0 = time.time()
    try:
        value = fn(t0 + budget_s)
    except Exception as e:
        value = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    if isinstance(value, dict):
        value["step_s"] = time.time() - t0
    report.put(name, value)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="device_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny models, CPU: the same code paths in < 2 min")
    ap.add_argument("--budget_s", type=float, default=450, help="total time box (steps get fixed shares)")
    ap.add_argument("--cpu_reference", help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    if ARGS.cpu_reference:
        np.savez(ARGS.cpu_reference, **tiny_logits())
        return
    import jax

    report = Report(ARGS.out)
    dev = jax.devices()[0]
    report.put("env", dict(backend=jax.default_backend(), device_kind=dev.device_kind, devices=jax.device_count(),
                           jax=jax.__version__, smoke=ARGS.smoke, bf16_peak_tflops=peak_tflops(dev.device_kind)))
    b = ARGS.budget_s
    run_step(report, "parity", step_parity, 0.2 * b)
    run_step(report, "attention", step_attention, 0.1 * b)
    run_step(report, "real_size/qwen2_vl", lambda d: step_real_size("qwen2_vl", d), 0.4 * b)
    run_step(report, "real_size/gemma3", lambda d: step_real_size("gemma3", d), 0.3 * b)
    print(f"wrote {ARGS.out}")


ARGS = None

if __name__ == "__main__":
    main()
