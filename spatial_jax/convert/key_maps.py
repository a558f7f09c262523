"""One declarative key-map table per family: our parameter path <- HF tensor name, transform.

A path is the '/'-joined path in the model's pure-dict state. A HF name containing "{i}" is a
per-layer tensor; those are stacked along a new leading axis (the axis the layer scan runs over).
Transforms: "T" transposes a torch Linear [out, in] to our [in, out]; "flat_T" flattens a conv
kernel [out, ...] to a matmul over flattened patches; None keeps the tensor as it is.

`ALIASES` rewrites the other on-disk spellings of a family's names to the one the table uses.
"""
from __future__ import annotations

KeyMap = tuple[tuple[str, str, str | None], ...]

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

_QWEN_DECODER_LAYER = (
    ("input_norm/scale", "input_layernorm.weight", None),
    ("q/kernel", "self_attn.q_proj.weight", "T"),
    ("q/bias", "self_attn.q_proj.bias", None),
    ("k/kernel", "self_attn.k_proj.weight", "T"),
    ("k/bias", "self_attn.k_proj.bias", None),
    ("v/kernel", "self_attn.v_proj.weight", "T"),
    ("v/bias", "self_attn.v_proj.bias", None),
    ("o/kernel", "self_attn.o_proj.weight", "T"),
    ("post_norm/scale", "post_attention_layernorm.weight", None),
    ("gate/kernel", "mlp.gate_proj.weight", "T"),
    ("up/kernel", "mlp.up_proj.weight", "T"),
    ("down/kernel", "mlp.down_proj.weight", "T"),
)

QWEN2_VL: KeyMap = (
    ("vision/patch_embed/kernel", "visual.patch_embed.proj.weight", "flat_T"),
    *((f"vision/blocks/{ours}", f"visual.blocks.{{i}}.{hf}", t) for ours, hf, t in _QWEN_VISION_BLOCK),
    ("vision/merger_norm/scale", "visual.merger.ln_q.weight", None),
    ("vision/merger_norm/bias", "visual.merger.ln_q.bias", None),
    ("vision/merger_fc1/kernel", "visual.merger.mlp.0.weight", "T"),
    ("vision/merger_fc1/bias", "visual.merger.mlp.0.bias", None),
    ("vision/merger_fc2/kernel", "visual.merger.mlp.2.weight", "T"),
    ("vision/merger_fc2/bias", "visual.merger.mlp.2.bias", None),
    ("embed", "model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"model.layers.{{i}}.{hf}", t) for ours, hf, t in _QWEN_DECODER_LAYER),
    ("norm/scale", "model.norm.weight", None),
    ("lm_head/kernel", "lm_head.weight", "T"),
)

# transformers' runtime module names (what a 5.x state_dict holds) -> the hub names above.
QWEN2_VL_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))

TABLES: dict[str, tuple[KeyMap, tuple[tuple[str, str], ...]]] = {
    "qwen2_vl": (QWEN2_VL, QWEN2_VL_ALIASES),
}
