"""What the head sites (issue 19) cost: a forward that asks for none compiles to the same program
as before they existed, and caching them costs what it stores.

    PYTHONPATH=<checkout> python benchmarks/head_sites_cost.py [--family qwen2_vl|gemma3] [--T 256] [--repeats 5]

Run it at two checkouts (this one and one before the head sites; the script uses nothing the old
code lacks) and compare: for each compiled function that runs the LM layers without head sites
(`forward.apply` with logits, `next_token_logits`' row-limited forward, the sweep's variant
function with a lm.resid_post patch, restarted at layer 1), it prints the sha256 of the optimised
XLA:CPU program up to the names of its values, with its metadata (source lines, op names)
stripped, XLA's flops and bytes accessed, and the median wall time of `repeats` calls; where the
checkout has head sites, also a forward that caches each of them (and all five).

Random weights (nnx init), text-only batch [2, T]; LM: 8 layers, hidden 512, 8 query / 2 KV
heads of 64, MLP 1408, vocabulary 8192.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.batch import Batch, last_positions
from spatial_jax.interventions import sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.sweeps import sweep

fwd = importlib.import_module("spatial_jax.forward")  # the module (the package's `forward` is the function)
HEAD_SITES = ("lm.attn_q", "lm.attn_k", "lm.attn_v", "lm.attn_z", "lm.attn_pattern")
LM = dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
          intermediate_size=1408)


def build(family: str):
    if family == "qwen2_vl":
        from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig

        cfg = Qwen2VLConfig(vision_depth=1, vision_dim=32, vision_heads=4, vision_mlp_dim=64, patch_size=14,
                            temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4,
                            rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(8, 12, 12), tie_word_embeddings=False,
                            image_token_id=8000, vision_start_token_id=8001, vision_end_token_id=8002, **LM)
        return Qwen2VL(cfg, rngs=nnx.Rngs(0))
    from spatial_jax.families.gemma3.model import Gemma3, Gemma3Config

    text = dict(vocab_size=LM["vocab_size"], hidden_size=LM["hidden_size"], num_hidden_layers=LM["num_layers"],
                num_attention_heads=LM["num_heads"], num_key_value_heads=LM["num_kv_heads"], head_dim=LM["head_dim"],
                intermediate_size=LM["intermediate_size"], query_pre_attn_scalar=64, sliding_window=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=28, patch_size=14, vision_use_head=False)
    cfg = Gemma3Config.from_hf(dict(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                    image_token_index=8000, boi_token_index=8001, eoi_token_index=8002))
    return Gemma3(cfg, rngs=nnx.Rngs(0))


def program(lowered, dump: str | None = None) -> tuple[str, float, float, object]:
    """(sha256 of the optimised program up to the names of its values, without metadata; flops;
    bytes accessed; the compiled); dump: a file to write that program to."""
    compiled = lowered.compile()
    # Without metadata and the debug tables of source files, functions and stack frames.
    text = re.sub(r",? metadata=\{[^}]*\}", "", compiled.as_text())
    text = re.sub(r"\nFileNames\n.*?\n(?=%|ENTRY)", "\n", text, flags=re.S)
    # Values renamed in order of first appearance (XLA numbers them in the order it traced them).
    names: dict[str, str] = {}
    text = re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)
    if dump:
        with open(dump, "w") as f:
            f.write(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return digest, cost.get("flops", -1), cost.get("bytes accessed", -1), compiled


def timed(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "gemma3"))
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dump", default=None, help="a folder to write each case's program to (for a diff)")
    args = parser.parse_args()

    graphdef, params = nnx.split(build(args.family))
    B, T, D = 2, args.T, LM["hidden_size"]
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 7000, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :T // 4] = 0  # a left-padded row
    batch = Batch(input_ids=ids, attention_mask=mask).with_defaults()
    position = last_positions(batch.attention_mask)
    patch = Intervention(site="lm.resid_post", op="replace", layer=np.array([2, 5], np.int32),
                         source=rng.standard_normal((2, B, T, D)).astype(np.float32), alpha=np.ones(2, np.float32))
    readout = sweep.Readout(np.asarray(position, np.int32), np.array([1, 2, 3], np.int32))
    x_start = jnp.asarray(rng.standard_normal((B, T, D)).astype(np.float32))

    forward = jax.jit(fwd.apply, static_argnums=(0, 4))  # (graphdef, params, batch, interventions, cache)
    cases = {  # name: (jitted function, positional args, the static ones' positions)
        "forward": (forward, (graphdef, params, batch, (), ()), (0, 4)),
        "next_token_logits": (jax.jit(fwd._next_token_logits, static_argnums=0),
                              (graphdef, params, batch, (), position), (0,)),
        "sweep_variants": (jax.jit(sweep._variants_from, static_argnums=0),
                           (graphdef, params, batch, x_start, np.int32(1), (patch,), readout, ()), (0,)),
    }
    if hasattr(sites, "HEAD_SITES"):
        for site in HEAD_SITES + ("all",):
            cache = HEAD_SITES if site == "all" else (site,)
            cases[f"forward+cache {site}"] = forward, (graphdef, params, batch, (), cache), (0, 4)
    for name, (fn, fn_args, static) in cases.items():
        dump = args.dump and os.path.join(args.dump, re.sub(r"\W+", "_", name) + ".hlo")
        digest, flops, nbytes, compiled = program(fn.lower(*fn_args), dump)
        seconds = timed(compiled, [a for i, a in enumerate(fn_args) if i not in static], args.repeats)
        print(json.dumps(dict(family=args.family, T=T, case=name, hlo=digest, gflops=round(flops / 1e9, 3),
                              mbytes=round(nbytes / 1e6, 1), median_s=round(seconds, 4))), flush=True)


if __name__ == "__main__":
    main()
