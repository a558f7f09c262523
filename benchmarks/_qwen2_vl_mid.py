"""The mid-size random Qwen2-VL used by the benchmarks (shared by bench_qwen2_vl_forward.py and
bench_convert_memory.py). bench_sweep.py's large config is the same except mrope_section
[16, 24, 24], which only fits head_dim 128: with head_dim 64 both transformers and our port
reject it.

vision: depth 12, embed_dim 768, 12 heads, mlp_ratio 4, patch 14, merge 2 (merger 3072 -> 1024);
LM: 12 layers, hidden 1024, 16 heads / 4 KV heads (head_dim 64), intermediate 4096, vocab 32000,
M-RoPE sections [8, 12, 12] (head_dim 64: 32 rotary frequencies), rope_theta 1e6, rms_norm_eps 1e-6, untied lm_head.
That is 346,578,432 parameters: vision 98,546,176, LM 215,264,256 (embedding 32,768,000),
lm_head 32,768,000.
"""
from __future__ import annotations

IMG, VSTART, VEND, VPAD = 1000, 1001, 1002, 1003


def hf_config(intermediate_size: int = 4096):
    from transformers import Qwen2VLConfig

    vis = dict(depth=12, embed_dim=768, num_heads=12, mlp_ratio=4, hidden_size=1024, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2)
    txt = dict(vocab_size=32000, hidden_size=1024, intermediate_size=intermediate_size, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=4096,
               rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12], rope_theta=1e6),
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Qwen2VLConfig(vision_config=vis, text_config=txt, image_token_id=IMG, video_token_id=VPAD,
                         vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=False)


def flop_parts(cfg, T: int, n_patches: int) -> dict:
    """Matmul FLOPs (2 per multiply-add, attention score/value products over the full square
    included) of the pieces of a Qwen2-VL forward: `vision` (patch embed, every block, merger) for
    `n_patches` patches of one image, one LM `layer` over T tokens, and `head_row` (the
    unembedding at one position). A layer that computes only r of the T positions (its keys and
    values still at all T) costs `kv` + r * `row`; `last_row` is that at r = 1. A full forward is
    vision + L * layer + T * head_row."""
    v, t = cfg.vision_config, cfg.text_config
    Dv, mlp = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    N = n_patches
    patch = 2 * N * (3 * v.temporal_patch_size * v.patch_size**2) * Dv
    block = 2 * N * Dv * 3 * Dv + 2 * N * Dv * Dv + 2 * 2 * N * Dv * mlp + 2 * 2 * N * N * Dv
    m = v.spatial_merge_size**2
    merger = 2 * (N // m) * (m * Dv) ** 2 + 2 * (N // m) * m * Dv * t.hidden_size
    D, hd = t.hidden_size, t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    kv_proj = 2 * T * D * kv * 2
    row = 2 * D * D * 2 + 3 * 2 * D * t.intermediate_size + 2 * 2 * T * t.num_attention_heads * hd
    return dict(vision=patch + v.depth * block + merger, layer=kv_proj + T * row, kv=kv_proj, row=row,
                last_row=kv_proj + row,
                head_row=2 * D * t.vocab_size)


def save_random(out_dir: str, seed: int = 0, max_shard_size: str | None = None) -> int:
    """Random-init (HF's own init) fp32 model saved with save_pretrained; returns its param count."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(hf_config()).eval()
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    n = sum(p.numel() for p in model.parameters())
    del model
    return n
