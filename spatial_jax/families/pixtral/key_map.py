"""Pixtral: our parameter paths <- HF tensor names (format: spatial_jax/nn/key_maps.py)."""
from __future__ import annotations

from spatial_jax.nn.key_maps import DECODER_LAYER_NO_QKV_BIAS, KeyMap

_PIXTRAL_VISION_BLOCK = (
    ("norm1/scale", "attention_norm.weight", None),
    ("q/kernel", "attention.q_proj.weight", "T"),
    ("k/kernel", "attention.k_proj.weight", "T"),
    ("v/kernel", "attention.v_proj.weight", "T"),
    ("o/kernel", "attention.o_proj.weight", "T"),
    ("norm2/scale", "ffn_norm.weight", None),
    ("gate/kernel", "feed_forward.gate_proj.weight", "T"),
    ("up/kernel", "feed_forward.up_proj.weight", "T"),
    ("down/kernel", "feed_forward.down_proj.weight", "T"),
)

# Hub names (mistral-community/pixtral-12b), which transformers 5.23's save_pretrained writes too.
# Projector biases are read only when the config has multimodal_projector_bias (the default).
KEY_MAP: KeyMap = (
    ("vision/patch_embed/kernel", "vision_tower.patch_conv.weight", "flat_T"),
    ("vision/ln_pre/scale", "vision_tower.ln_pre.weight", None),
    *((f"vision/blocks/{ours}", f"vision_tower.transformer.layers.{{i}}.{hf}", t) for ours, hf, t in _PIXTRAL_VISION_BLOCK),
    ("vision/projector_fc1/kernel", "multi_modal_projector.linear_1.weight", "T"),
    ("vision/projector_fc1/bias", "multi_modal_projector.linear_1.bias", None),
    ("vision/projector_fc2/kernel", "multi_modal_projector.linear_2.weight", "T"),
    ("vision/projector_fc2/bias", "multi_modal_projector.linear_2.bias", None),
    ("embed", "language_model.model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"language_model.model.layers.{{i}}.{hf}", t) for ours, hf, t in DECODER_LAYER_NO_QKV_BIAS),
    ("norm/scale", "language_model.model.norm.weight", None),
    ("lm_head/kernel", "language_model.lm_head.weight", "T"),
)

# transformers' runtime module names (a 5.x state_dict) -> the hub names above.
KEY_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
