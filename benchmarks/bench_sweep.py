"""Criss-cross sweep throughput: ours (patch_sweep) vs the official approach (a PyTorch
forward-hook loop, one full forward per patched site) on the same random ~250M Qwen2-VL.

    python benchmarks/bench_sweep.py --pairs 50 --torch_pairs 2

Every slot (LM input + each layer output) x 2 region sets (object-only, strip) x `pairs` pairs.
The PyTorch loop is timed on `torch_pairs` pairs and reported per patched forward; both sides
are checked to agree on the patched logits of those pairs. Prints a table; peak RSS is read
from the process (ours first, then torch, so the torch figure includes ours as a floor).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import spatial_jax as sj

GRID = 24  # 336 px / 14: 12 x 12 merged tokens, the paper's Qwen geometry
IMG, VSTART, VEND = 1000, 1001, 1002


def build_hf(out_dir: str, small: bool):
    if small:
        vis = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=128)
        txt = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, rope_parameters=dict(rope_type="default", mrope_section=[4, 6, 6],
                                                               rope_theta=1e4))
    else:
        vis = dict(depth=12, embed_dim=768, num_heads=12, mlp_ratio=4, hidden_size=1024)
        txt = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12],
                                                               rope_theta=1e6))
    cfg = Qwen2VLConfig(vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vis),
                        text_config=dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=4096, **txt),
                        image_token_id=IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir)
    return Qwen2VLForConditionalGeneration.from_pretrained(out_dir, attn_implementation="sdpa").eval()


def prompt_ids(n_img_tokens: int) -> np.ndarray:
    text = list(range(10, 40))
    return np.array([text[:14] + [VSTART] + [IMG] * n_img_tokens + [VEND] + text[14:]], np.int64)


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--torch_pairs", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a tiny config, to check the script quickly")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    hf = build_hf(tmp, args.small)
    model = sj.load(tmp)
    L = model.config.num_layers
    n_params = sum(p.numel() for p in hf.parameters())
    ids = prompt_ids(144)
    index_maps = regions(ids)[:, None]  # [R, 1, T]
    grid = np.array([[1, GRID, GRID]])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.pairs, 2, GRID * GRID, 1176)).astype(np.float32)
    tokens = np.array([5, 6, 7, 8, 9])

    def ours(i):
        clean = sj.Batch(input_ids=ids, pixel_values=images[i, 0], image_grid_thw=grid)
        cf = sj.Batch(input_ids=ids, pixel_values=images[i, 1], image_grid_thw=grid)
        return sj.region_swap_sweep(model, clean, cf, index_maps, tokens, chunk_size=2 * (L + 1))

    t0 = time.perf_counter()
    first = ours(0)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.pairs):
        ours(i)
    ours_s = time.perf_counter() - t0
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_fwd = args.pairs * (L + 1) * 2

    t0 = time.perf_counter()
    ref = [torch_loop(hf, ids, images[i, 0], images[i, 1], grid, index_maps, L) for i in range(args.torch_pairs)]
    torch_s = time.perf_counter() - t0
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    torch_fwd = args.torch_pairs * (L + 1) * 2
    err = max(np.abs(ref[i] - ours(i).logits[:, :, 0, 0]).max() for i in range(args.torch_pairs))

    print(f"config: {n_params / 1e6:.1f}M params, L={L}, T={ids.shape[1]}, 336x336 image (144 visual tokens)")
    print(f"sweep: {args.pairs} pairs x {L + 1} slots x 2 region sets = {n_fwd} patched forwards")
    print(f"| method | patched fwd/s | s per pair | peak RSS GiB |")
    print(f"| ours (patch_sweep) | {n_fwd / ours_s:.2f} | {ours_s / args.pairs:.2f} | {ours_rss:.2f} |")
    print(f"| torch hook loop ({args.torch_pairs} pairs) | {torch_fwd / torch_s:.2f} | "
          f"{torch_s / args.torch_pairs:.2f} | {torch_rss:.2f} |")
    print(f"speed-up: {(n_fwd / ours_s) / (torch_fwd / torch_s):.1f}x; first call incl. compile {compile_s:.1f} s; "
          f"max |logit diff| ours vs torch on {args.torch_pairs} pairs: {err:.2e}")


if __name__ == "__main__":
    main()
