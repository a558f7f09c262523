"""Real-size rehearsal on this CPU: a random-weight Qwen2-VL-2B-Instruct through every user step.

    python benchmarks/rehearsal_real_size.py --work /tmp/rehearsal [--steps convert,load,forward,...]

Writes (once, kept in --work) a HF dir with the real Qwen2-VL-2B-Instruct architecture (2.209B
params: vision depth 32 x 1280, LM 28 layers x 1536, 12 / 2 heads of 128, MLP 8960, vocabulary
151936, tied embeddings, M-RoPE [16, 24, 24], rope_theta 1e6) as the hub ships it: bfloat16
tensors under the hub's names in two safetensors shards with a model.safetensors.index.json, a
hub-layout config.json, and a word-level tokenizer with the Qwen2-VL chat template and image
processor (the organism's; its special token ids are written into the config). The processor
takes 336 x 336 images (the qwen2_vl canvas: 576 patches, 144 visual tokens).

Then runs each step in a fresh subprocess and reads its wall time and peak RSS (ru_maxrss of the
child, i.e. its VmHWM): the converter to float32 and to bfloat16; `sj.load` of the HF dir in
each dtype; one forward per dtype on the converted dirs (load, first call = compile + run,
second call; wall and process CPU seconds); `experiments.behaviour` on a few items and `experiments.criss_cross` on one pair
per direction, each dtype. Prints a table (markdown) with the load average beside each row.
Needs ~15 GB of free memory: it waits (up to 30 min) for MemAvailable >= --min_free_gb before
each step, and skips the step otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Qwen2-VL-2B-Instruct's hub config.json (flat layout), special token ids replaced by the
# word-level tokenizer's.
TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
            max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
            max_window_layers=28, tie_word_embeddings=True, torch_dtype="bfloat16",
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=1536, patch_size=14,
              spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
SHARD_BYTES = 4_000_000_000  # the hub's 2B ships as 2 shards (3.99 GB + 0.43 GB)


def _write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """Streams random bfloat16 tensors (norm weights 1, biases 0, others N(0, 0.02)) into one
    safetensors file without holding more than one tensor."""
    import ml_dtypes

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors:
            if "norm" in name or "ln_q" in name:
                x = (np.ones if name.endswith("weight") else np.zeros)(shape, ml_dtypes.bfloat16)
            elif name.endswith("bias"):
                x = np.zeros(shape, ml_dtypes.bfloat16)
            else:
                x = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            f.write(x.tobytes())


def write_checkpoint(hf_dir: str, seed: int = 0) -> int:
    """The random real-size checkpoint (see the module docstring); returns its parameter count."""
    from flax import nnx

    from spatial_jax.convert.convert import abstract_model, resolve_config
    from spatial_jax.data.geometry import GEOMETRY_KEY, get_geometry
    from spatial_jax.data.vocabulary import synthetic_words
    from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor
    from spatial_jax.tree_paths import flatten_paths

    tmp = hf_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    canvas = get_geometry("qwen2_vl").canvas_px
    ids = write_word_level_qwen2vl_processor(tmp, synthetic_words(()), min_pixels=canvas * canvas,
                                             max_pixels=canvas * canvas).special_ids
    config = dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", **TEXT,
                  vision_config=VISION, bos_token_id=ids.endoftext,
                  eos_token_id=ids.im_end, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                  vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
                  transformers_version="4.41.2", **{GEOMETRY_KEY: "qwen2_vl"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    family, cfg, _ = resolve_config(tmp)
    shapes = flatten_paths(nnx.to_pure_dict(nnx.state(abstract_model(family, cfg, np.float32))))
    table = family.key_map
    tensors = []  # (hub name, hub shape) in the table's order
    for path, hf_name, how in table:
        if path not in shapes:  # lm_head of the tied 2B
            continue
        shape = shapes[path].shape
        per_layer = shape[1:] if "{i}" in hf_name else shape
        if how == "T":  # torch Linear [out, in]
            hub = per_layer[::-1]
        elif how == "flat_T":  # the Conv3d patch embedding [out, C, T, p, p]
            hub = (per_layer[1], VISION["in_chans"], VISION["temporal_patch_size"], VISION["patch_size"],
                   VISION["patch_size"])
        else:
            hub = per_layer
        names = [hf_name.format(i=i) for i in range(shape[0])] if "{i}" in hf_name else [hf_name]
        tensors += [(n, tuple(hub)) for n in names]
    shards, size = [[]], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(tmp, fname), shard, rng)
        weight_map.update({name: fname for name, _ in shard})
    total = sum(int(np.prod(s)) for _, s in tensors)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, f, indent=1)
    os.rename(tmp, hf_dir)
    return total


_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); sys.stdout.write(r.stdout); "
            "print('PEAK', r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run_step(args: list[str], timeout: float) -> dict:
    """Wall seconds, peak RSS (bytes) and the JSON lines printed by one fresh subprocess."""
    t0, load0 = time.time(), os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, cwd=REPO,
                         timeout=timeout)
    wall = time.time() - t0
    lines = out.stdout.splitlines()
    _, rc, kb = lines[-1].split()
    info = {}
    for line in lines[:-1]:
        if line.startswith("{"):
            info.update(json.loads(line))
    if int(rc):
        print(out.stderr, file=sys.stderr)
    return dict(rc=int(rc), wall_s=wall, peak_bytes=int(kb) * 1024, load=(load0, os.getloadavg()[0]), **info)


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))


def forward_step(ckpt: str, dtype: str | None) -> None:
    """In a subprocess: load `ckpt` (a converted dir, or a HF dir in `dtype`), run one 336-px image
    + prompt forward twice; prints a JSON line of its timings, param bytes and RSS after load."""
    import jax
    import PIL.Image

    import spatial_jax as sj

    t0 = time.time()
    model = sj.load(ckpt, dtype=dtype)
    jax.block_until_ready(model.params)
    info = dict(load_s=time.time() - t0, rss_after_load=_rss_now(),
                param_bytes=sum(x.nbytes for x in jax.tree.leaves(model.params)))
    rng = np.random.default_rng(0)
    img = PIL.Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    batch = model.prepare(images=[img], prompts=["Is the red square to the left of the blue circle ?"])
    info["tokens"] = int(np.shape(batch.input_ids)[1])
    for key in ("first_forward", "second_forward"):
        t0, c0 = time.time(), time.process_time()
        logits = np.asarray(sj.forward(model, batch).logits)
        info[key + "_s"], info[key + "_cpu_s"] = time.time() - t0, time.process_time() - c0
    info["finite"] = bool(np.isfinite(logits).all())
    print(json.dumps(info))


def wait_for_memory(min_free_gb: float, patience_s: float = 1800) -> float:
    """Blocks until MemAvailable >= min_free_gb (the machine is shared); returns it in GB."""
    t0 = time.time()
    while True:
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) / 1e6
        if avail >= min_free_gb or time.time() - t0 > patience_s:
            return avail
        time.sleep(20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rehearsal_2b", help="kept between runs: the HF dir and converted dirs")
    ap.add_argument("--steps", default="convert,load,forward,behaviour,criss_cross",
                    help="comma-separated subset of convert,load,forward,behaviour,criss_cross")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--min_free_gb", type=float, default=15.0)
    ap.add_argument("--timeout_s", type=float, default=3600)
    ap.add_argument("--forward_step", nargs=2, metavar=("CKPT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward_step:
        ckpt, dtype = args.forward_step
        return forward_step(ckpt, None if dtype == "stored" else dtype)

    os.makedirs(args.work, exist_ok=True)
    hf = os.path.join(args.work, "hf")
    if not os.path.isdir(hf):
        t0 = time.time()
        n = write_checkpoint(hf)
        print(f"wrote {hf}: {n:,} params in {time.time() - t0:.0f} s")
    py, steps, dtypes = sys.executable, args.steps.split(","), args.dtypes.split(",")
    conv = {d: os.path.join(args.work, f"converted_{d}") for d in dtypes}
    plan = []
    for d in dtypes:
        if "convert" in steps:
            plan.append((f"convert -> {d}", [py, "-m", "spatial_jax.convert.cli", "--hf_dir", hf, "--output_dir",
                                             conv[d], "--dtype", d], conv[d]))
        if "load" in steps:
            plan.append((f"sj.load(HF dir, {d}) + forward", [py, __file__, "--forward_step", hf, d], None))
        if "forward" in steps:
            plan.append((f"sj.load(converted {d}) + forward", [py, __file__, "--forward_step", conv[d], "stored"], None))
        for exp, extra in (("behaviour", ["--max_items", "4", "--batch_size", "4"]),
                           ("criss_cross", ["--n_pairs", "1", "--nogolden", "--max_items", "8", "--batch_size", "4"])):
            if exp in steps:
                plan.append((f"{exp} ({d})", [py, "-m", f"experiments.{exp}", "--checkpoint", conv[d], "--output_dir",
                                              os.path.join(args.work, f"out_{exp}_{d}"), *extra], None))
    rows = []
    for name, cmd, out_dir in plan:
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        avail = wait_for_memory(args.min_free_gb)
        if avail < args.min_free_gb:  # the machine is shared: never push others out of memory
            print(f"skipped {name}: {avail:.1f} GB available", flush=True)
            continue
        r = run_step(cmd, args.timeout_s)
        r.update(name=name, avail_gb=avail)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| step | wall s | peak RSS GB | load s | 1st fwd s | 2nd fwd s | 2nd fwd CPU s | params GB "
          "| RSS after load GB | load avg | rc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def cell(r, key, scale=1.0):
        return f"{r[key] / scale:.1f}" if key in r else ""

    for r in rows:
        print(f"| {r['name']} | {r['wall_s']:.0f} | {r['peak_bytes'] / 1e9:.2f} | {cell(r, 'load_s')} | "
              f"{cell(r, 'first_forward_s')} | {cell(r, 'second_forward_s')} | {cell(r, 'second_forward_cpu_s')} | "
              f"{cell(r, 'param_bytes', 1e9)} | "
              f"{cell(r, 'rss_after_load', 1e9)} | {r['load'][0]:.1f}-{r['load'][1]:.1f} | {r['rc']} |")


if __name__ == "__main__":
    main()
