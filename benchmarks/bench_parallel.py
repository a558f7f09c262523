"""Sharded sweeps: (1) sharded vs unsharded on simulated CPU devices, (2) the largest intervention
batch a real-size model fits on an accelerator mesh.

  # CPU, 8 simulated devices (they share the machine's cores: no speed-up is expected)
  python benchmarks/bench_parallel.py --mode=compare --cpu_devices=8

  # GPU / TPU: Qwen2-VL-7B-sized random weights in bfloat16, weights over `model`, variants
  # over `data`; doubles the chunk (variants per compiled call) until it no longer fits, then
  # bisects. Add --distributed on a multi-host slice.
  python benchmarks/bench_parallel.py --mode=max_batch --config=7b --dtype=bfloat16 --mesh=data:-1,model:1
  python benchmarks/bench_parallel.py --mode=max_batch --config=7b --dtype=bfloat16 --mesh=data:-1,model:2

The sweep is the paper's: one 336 x 336 image (144 visual tokens) in a ~180-token prompt, each
variant replacing the image tokens' residual from a counterfactual run at some layer and
reading 5 answer logits at the last token. In max_batch mode every variant patches layer 0, the
worst case (all layers run).
"""
from __future__ import annotations

import os
import sys


def _peek(name: str, default: str) -> str:
    for a in sys.argv[1:]:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


# Simulated CPU devices must be asked for before jax starts; harmless on GPU/TPU.
_n_cpu = int(_peek("cpu_devices", "8"))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n_cpu}").strip()

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import spatial_jax as sj  # noqa: E402
from experiments import mesh_flags  # noqa: E402
from spatial_jax import parallel  # noqa: E402
from spatial_jax.convert.convert import DTYPES, abstract_model  # noqa: E402
from spatial_jax.forward import Model  # noqa: E402
from spatial_jax.families.qwen2_vl import model as qwen2_vl  # noqa: E402
from spatial_jax.families import FAMILIES  # noqa: E402

flags.DEFINE_enum("mode", "compare", ["compare", "max_batch"], "What to measure.")
flags.DEFINE_enum("config", "small", ["small", "7b"], "small: ~10M params; 7b: Qwen2-VL-7B's shapes (8.3B).")
flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Parameter dtype.")
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices (read before jax starts).")
flags.DEFINE_integer("variants", 64, "compare: variants per sweep.")
flags.DEFINE_integer("chunk", 16, "compare: variants per compiled call.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
flags.DEFINE_integer("max_chunk", 4096, "max_batch: stop doubling here.")
flags.DEFINE_string("json_out", "", "Also write the figures here as JSON.")
FLAGS = flags.FLAGS

GRID = 24  # 336 px / 14 -> 24 x 24 patches -> 12 x 12 = 144 merged tokens


def make_config(name: str) -> qwen2_vl.Qwen2VLConfig:
    vocab = 152064 if name == "7b" else 32000
    common = dict(patch_size=14, temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, image_token_id=vocab - 3,
                  vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    if name == "7b":  # Qwen2-VL-7B-Instruct's shapes (its special token ids differ: irrelevant here)
        return qwen2_vl.Qwen2VLConfig(vision_depth=32, vision_dim=1280, vision_heads=16, vision_mlp_dim=5120,
                                      vocab_size=vocab, hidden_size=3584, num_layers=28, num_heads=28,
                                      num_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6,
                                      mrope_section=(16, 24, 24), **common)
    return qwen2_vl.Qwen2VLConfig(vision_depth=2, vision_dim=64, vision_heads=4, vision_mlp_dim=128,
                                  vocab_size=vocab, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                  head_dim=32, intermediate_size=256, rope_theta=1e6, mrope_section=(4, 6, 6),
                                  **common)


def random_model(cfg, dtype: str, mesh) -> Model:
    """Random weights created directly in their shardings (no checkpoint, nothing gathered)."""
    family = FAMILIES["qwen2_vl"]
    graphdef, state = nnx.split(abstract_model(family, cfg, DTYPES[dtype]))
    target = nnx.to_pure_dict(state)
    params = parallel.init_params(target, parallel.param_shardings(target, family.sharding_rules, mesh))
    nnx.replace_by_pure_dict(state, params)
    return Model(family.name, cfg, graphdef, state, dtype, path="", mesh=mesh)


def inputs(cfg, seed: int):
    rng = np.random.default_rng(seed)
    text = list(range(1000, 1034))
    ids = np.array([text[:14] + [cfg.vision_start_token_id] + [cfg.image_token_id] * (GRID * GRID // 4)
                    + [cfg.vision_end_token_id] + text[14:]], np.int64)
    pv = rng.standard_normal((GRID * GRID, 1176)).astype(np.float32)
    return sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=np.array([[1, GRID, GRID]]))


def sweep_args(model: Model, clean, cf, n: int, layers: np.ndarray):
    """n variants: variant i replaces a random half of the image tokens at layer layers[i]."""
    L = model.config.num_layers
    src = parallel.to_host(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    ids = np.asarray(clean.input_ids)
    T = ids.shape[1]
    img = np.flatnonzero(ids[0] == model.config.image_token_id)
    rng = np.random.default_rng(0)
    index = np.full((n, 1, T), -1, np.int32)
    for i in range(n):
        sel = rng.choice(img, len(img) // 2, replace=False)
        index[i, 0, sel] = sel
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layers.astype(np.int32), index=index,
                         source=np.moveaxis(src, 1, 0)[layers % L])
    readout = sj.Readout(sj.last_positions(clean.with_defaults().attention_mask), np.arange(5))
    return [iv], readout


def timed(fn, repeats: int):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times))


def variant_flops(cfg, T: int) -> float:
    """Matmul FLOPs of one variant patched at layer 0: every LM layer on T tokens + the readout."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = 2 * T * (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
                         + 3 * d * cfg.intermediate_size) + 4 * T * T * cfg.num_heads * hd
    return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size


def compare(_):
    cfg = make_config(FLAGS.config)
    n_dev = jax.device_count()
    clean, cf = inputs(cfg, 0), inputs(cfg, 1)
    L = cfg.num_layers
    layers = np.arange(FLAGS.variants) % L
    rows = []
    results = {}
    for spec in ["data:1,model:1", f"data:{n_dev}", f"data:{n_dev // 2},model:2"]:
        devices = jax.devices()[:1] if spec == "data:1,model:1" else None
        mesh = parallel.make_mesh(spec, devices=devices)
        model = random_model(cfg, FLAGS.dtype, mesh)
        ivs, readout = sweep_args(model, clean, cf, FLAGS.variants, layers)
        mesh_arg = None if spec == "data:1,model:1" else mesh
        # the unsharded baseline: the plain call on a model whose params sit on one device
        base = model if mesh_arg else Model(model.family, cfg, model.graphdef, model.params, model.dtype, "")
        res, first, t = timed(lambda: sj.patch_sweep(base, clean, ivs, readout, chunk_size=FLAGS.chunk),
                              FLAGS.repeats)
        results[spec] = res.logits
        rows.append((spec, first, t, FLAGS.variants / t))
    ref = results["data:1,model:1"]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.params))
    print(f"config {FLAGS.config}: {n_params / 1e6:.1f}M params, L={L}, T={clean.input_ids.shape[1]}, "
          f"{FLAGS.variants} variants in chunks of {FLAGS.chunk}; {n_dev} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores")
    print("| mesh | first call incl. compile (s) | sweep (s, median) | variants/s | max abs diff vs 1 device |")
    print("|---|---|---|---|---|")
    for spec, first, t, rate in rows:
        print(f"| {spec} | {first:.2f} | {t:.3f} | {rate:.1f} | {np.abs(results[spec] - ref).max():.1e} |")
    _dump({"mode": "compare", "rows": rows})


def max_batch(_):
    mesh = mesh_flags.setup_from_flags()
    cfg = make_config(FLAGS.config)
    model = random_model(cfg, FLAGS.dtype, mesh)
    clean, cf = inputs(cfg, 0), inputs(cfg, 1)
    T = clean.input_ids.shape[1]
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    shard_bytes = {d: 0 for d in jax.local_devices()}
    for x in jax.tree.leaves(model.params):
        for s in x.addressable_shards:
            shard_bytes[s.device] += s.data.nbytes
    print(f"mesh {parallel.describe(mesh)}; params {param_bytes / 1e9:.2f} GB in {FLAGS.dtype}, "
          f"{max(shard_bytes.values()) / 1e9:.2f} GB per device; T={T}")
    flops = variant_flops(cfg, T)

    def attempt(c: int):
        ivs, readout = sweep_args(model, clean, cf, c, np.zeros(c, np.int64))
        try:
            _, first, t = timed(lambda: sj.patch_sweep(model, clean, ivs, readout, chunk_size=c), 1)
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED / out of memory
            msg = str(e)
            if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "Out of memory" in msg:
                print(f"  chunk {c}: out of memory")
                return None
            raise
        tflops = flops * c / t / 1e12
        print(f"  chunk {c}: {t:.3f} s per call ({c / t:.1f} variants/s, {tflops:.1f} TFLOP/s "
              f"over {mesh.devices.size} devices), first call {first:.1f} s", flush=True)
        return t

    n_data = parallel.axis_size(mesh, parallel.DATA)
    c, best, rows = n_data, None, []
    while c <= FLAGS.max_chunk:
        t = attempt(c)
        if t is None:
            break
        best = c
        rows.append((c, t))
        c *= 2
    if best is not None and best < FLAGS.max_chunk and c <= FLAGS.max_chunk:  # bisect (multiples of n_data)
        lo, hi = best, c
        while hi - lo > n_data:
            mid = (lo + hi) // 2 // n_data * n_data
            t = attempt(mid)
            if t is None:
                hi = mid
            else:
                lo = mid
                rows.append((mid, t))
        best = lo
    print(f"largest chunk that fits: {best} variants per call "
          f"({'hit --max_chunk' if best == FLAGS.max_chunk else 'next size ran out of memory'})")
    _dump({"mode": "max_batch", "mesh": parallel.describe(mesh), "best_chunk": best, "rows": rows,
           "variant_gflops": flops / 1e9})


def _dump(obj):
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def main(argv):
    (compare if FLAGS.mode == "compare" else max_batch)(argv)


if __name__ == "__main__":
    app.run(main)
