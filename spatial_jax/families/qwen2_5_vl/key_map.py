"""Qwen2.5-VL: our parameter paths <- HF tensor names (format: spatial_jax/nn/key_maps.py).

Hub names (Qwen/Qwen2.5-VL-7B-Instruct shards): `visual.*`, `model.*`, `lm_head.weight`; the
decoder layers are Qwen2-VL's.
"""
from __future__ import annotations

from spatial_jax.nn.key_maps import DECODER_LAYER, KeyMap

_VISION_BLOCK = (
    ("norm1/scale", "norm1.weight", None),
    ("qkv/kernel", "attn.qkv.weight", "T"),
    ("qkv/bias", "attn.qkv.bias", None),
    ("proj/kernel", "attn.proj.weight", "T"),
    ("proj/bias", "attn.proj.bias", None),
    ("norm2/scale", "norm2.weight", None),
    *((f"{ours}/{kind}", f"mlp.{ours}_proj.{hf}", t)
      for ours in ("gate", "up", "down") for kind, hf, t in (("kernel", "weight", "T"), ("bias", "bias", None))),
)

KEY_MAP: KeyMap = (
    ("vision/patch_embed/kernel", "visual.patch_embed.proj.weight", "flat_T"),
    *((f"vision/blocks/{ours}", f"visual.blocks.{{i}}.{hf}", t) for ours, hf, t in _VISION_BLOCK),
    ("vision/merger_norm/scale", "visual.merger.ln_q.weight", None),
    *((f"vision/merger_fc{n}/{kind}", f"visual.merger.mlp.{i}.{hf}", t) for n, i in ((1, 0), (2, 2))
      for kind, hf, t in (("kernel", "weight", "T"), ("bias", "bias", None))),
    ("embed", "model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"model.layers.{{i}}.{hf}", t) for ours, hf, t in DECODER_LAYER),
    ("norm/scale", "model.norm.weight", None),
    ("lm_head/kernel", "lm_head.weight", "T"),
)

# transformers 5.x's save_pretrained / state_dict names (its runtime modules) -> the hub names above.
KEY_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))
