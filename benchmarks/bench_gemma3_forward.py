"""Gemma 3 forward time: our jitted Flax port vs transformers (eager and sdpa attention) on the same
random ~250M-parameter Gemma3ForConditionalGeneration and the same inputs, on this machine's CPU.

    python benchmarks/bench_gemma3_forward.py [--image_size 448] [--batch 1] [--repeats 5] [--single_thread]

--single_thread runs both sides on one core (the process pinned to one CPU; torch.set_num_threads(1)),
which gives comparable figures when other processes share the machine. (Before the pinning it set
XLA flags that jax 0.10 ignores, so our side still ran on two cores.)

Config (structure of gemma-3-4b-it at ~1/17 the size): SigLIP 768 wide, 8 layers, 12 heads, MLP
3072, 14-px patches; LM 1024 wide, 10 layers (sliding x5, full, sliding x4), 8 query / 4 KV
heads of 128 (q width 1024), query_pre_attn_scalar 128, MLP 4096, vocabulary 32768 (tied),
sliding window 1024, RoPE 1e4 local / 1e6 x linear 8 global; mm_tokens_per_image 256 at 448 px
(1024 patches pooled 2 x 2), 64 at 224 px. The prompt: <bos>, 20 words, one image block, 10 words.

Ours: compile time (lower + compile of the jitted forward) and the median of `repeats` runs after
it. HF: the median of `repeats` runs after one warm-up, under torch.no_grad, with token_type_ids.
Both return full [B, T, V] logits, checked to agree (max abs diff printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

BOS, BOI, EOI, IMG, NLNL = 2, 255, 256, 257, 108


def hf_config(image_size: int, mm_tokens: int):
    from transformers import Gemma3Config

    text = dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                sliding_window=1024, rms_norm_eps=1e-6, max_position_embeddings=8192,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMG)


def inputs(batch: int, image_size: int, mm_tokens: int) -> dict[str, np.ndarray]:
    ids = [BOS] + list(range(300, 320)) + [NLNL, BOI] + [IMG] * mm_tokens + [EOI, NLNL] + list(range(400, 410))
    input_ids = np.array([ids] * batch, np.int64)
    rng = np.random.default_rng(0)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "token_type_ids": (input_ids == IMG).astype(np.int64),
            "pixel_values": rng.uniform(-1, 1, (batch, 3, image_size, image_size)).astype(np.float32)}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image_size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--single_thread", action="store_true")
    args = ap.parse_args()
    if args.single_thread:  # before jax starts its CPU backend
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _cpu import pin_to_one_core

        pin_to_one_core()
    global jax, torch, sj
    import jax
    import torch

    import spatial_jax as sj
    from spatial_jax.forward import _apply_jit  # the jitted pure forward sj.forward runs

    if args.single_thread:
        torch.set_num_threads(1)
    mm_tokens = (args.image_size // 14 // 2) ** 2
    from transformers import Gemma3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        hf = Gemma3ForConditionalGeneration(hf_config(args.image_size, mm_tokens)).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        hf.save_pretrained(d)
        del hf
        t = time.perf_counter()
        model = sj.load(d)
        load_s = time.perf_counter() - t
        x = inputs(args.batch, args.image_size, mm_tokens)
        batch = sj.Batch(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                         pixel_values=x["pixel_values"], token_type_ids=x["token_type_ids"])

        t = time.perf_counter()
        compiled = _apply_jit.lower(model.graphdef, model.params, batch.with_defaults(), (), ()).compile()
        compile_s = time.perf_counter() - t

        def ours():
            return jax.block_until_ready(compiled(model.params, batch.with_defaults(), ()).logits)

        ours_logits = np.asarray(ours())
        ours_s = median_time(ours, args.repeats)

        kw = {k: torch.from_numpy(v) for k, v in x.items()}
        hf_s, diffs = {}, {}
        for impl in ("eager", "sdpa"):
            hf = Gemma3ForConditionalGeneration.from_pretrained(d, attn_implementation=impl).eval()
            with torch.no_grad():
                ref = hf(**kw, use_cache=False).logits.numpy()  # warm-up
                hf_s[impl] = median_time(lambda: hf(**kw, use_cache=False), args.repeats)
            diffs[impl] = float(np.abs(ref - ours_logits).max())
            del hf

    T = x["input_ids"].shape[1]
    print(f"Gemma 3, {n_params / 1e6:.1f}M params (tied embeddings), image {args.image_size}px "
          f"({(args.image_size // 14) ** 2} patches -> {mm_tokens} tokens), batch {args.batch} x T={T}, float32, "
          f"CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"  ours (jax {jax.__version__}): forward {ours_s * 1e3:8.1f} ms   compile {compile_s:6.2f} s   "
          f"load+convert {load_s:.2f} s")
    for impl in ("eager", "sdpa"):
        print(f"  HF {impl:5s} (torch {torch.__version__}): forward {hf_s[impl] * 1e3:8.1f} ms   "
              f"ours/HF {ours_s / hf_s[impl]:.2f}   max |logit diff| {diffs[impl]:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
