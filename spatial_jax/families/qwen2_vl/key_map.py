"""Qwen2-VL: our parameter paths <- HF tensor names (format: spatial_jax/nn/key_maps.py)."""
from __future__ import annotations

from spatial_jax.nn.key_maps import DECODER_LAYER, KeyMap

_QWEN_VISION_BLOCK = (
    ("norm1/scale", "norm1.weight", None),
    ("norm1/bias", "norm1.bias", None),
    ("qkv/kernel", "attn.qkv.weight", "T"),
    ("qkv/bias", "attn.qkv.bias", None),
    ("proj/kernel", "attn.proj.weight", "T"),
    ("proj/bias", "attn.proj.bias", None),
    ("norm2/scale", "norm2.weight", None),
    ("norm2/bias", "norm2.bias", None),
    ("fc1/kernel", "mlp.fc1.weight", "T"),
    ("fc1/bias", "mlp.fc1.bias", None),
    ("fc2/kernel", "mlp.fc2.weight", "T"),
    ("fc2/bias", "mlp.fc2.bias", None),
)

KEY_MAP: KeyMap = (
    ("vision/patch_embed/kernel", "visual.patch_embed.proj.weight", "flat_T"),
    *((f"vision/blocks/{ours}", f"visual.blocks.{{i}}.{hf}", t) for ours, hf, t in _QWEN_VISION_BLOCK),
    ("vision/merger_norm/scale", "visual.merger.ln_q.weight", None),
    ("vision/merger_norm/bias", "visual.merger.ln_q.bias", None),
    ("vision/merger_fc1/kernel", "visual.merger.mlp.0.weight", "T"),
    ("vision/merger_fc1/bias", "visual.merger.mlp.0.bias", None),
    ("vision/merger_fc2/kernel", "visual.merger.mlp.2.weight", "T"),
    ("vision/merger_fc2/bias", "visual.merger.mlp.2.bias", None),
    ("embed", "model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"model.layers.{{i}}.{hf}", t) for ours, hf, t in DECODER_LAYER),
    ("norm/scale", "model.norm.weight", None),
    ("lm_head/kernel", "lm_head.weight", "T"),
)

# transformers' runtime module names (what a 5.x state_dict holds) -> the hub names above.
KEY_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))
