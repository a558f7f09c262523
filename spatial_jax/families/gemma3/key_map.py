"""Gemma 3: our parameter paths <- HF tensor names (format: spatial_jax/nn/key_maps.py)."""
from __future__ import annotations

from spatial_jax.nn.key_maps import VIT_LAYER, KeyMap

# Gemma RMSNorm weights are stored zero-centred and kept so: the module applies (1 + w).
_GEMMA3_DECODER_LAYER = (
    ("input_norm/scale", "input_layernorm.weight", None),
    ("q/kernel", "self_attn.q_proj.weight", "T"),
    ("k/kernel", "self_attn.k_proj.weight", "T"),
    ("v/kernel", "self_attn.v_proj.weight", "T"),
    ("o/kernel", "self_attn.o_proj.weight", "T"),
    ("q_norm/scale", "self_attn.q_norm.weight", None),
    ("k_norm/scale", "self_attn.k_norm.weight", None),
    ("post_attn_norm/scale", "post_attention_layernorm.weight", None),
    ("pre_ff_norm/scale", "pre_feedforward_layernorm.weight", None),
    ("gate/kernel", "mlp.gate_proj.weight", "T"),
    ("up/kernel", "mlp.up_proj.weight", "T"),
    ("down/kernel", "mlp.down_proj.weight", "T"),
    ("post_ff_norm/scale", "post_feedforward_layernorm.weight", None),
)

_SIGLIP = "vision_tower.vision_model."

# Hub names (google/gemma-3-4b-it shards). Embeddings are tied: lm_head is only read when the
# config unties them.
KEY_MAP: KeyMap = (
    ("vision/patch_embed/kernel", _SIGLIP + "embeddings.patch_embedding.weight", "flat_T"),
    ("vision/patch_embed/bias", _SIGLIP + "embeddings.patch_embedding.bias", None),
    ("vision/pos_embed", _SIGLIP + "embeddings.position_embedding.weight", None),
    *((f"vision/layers/{ours}", f"{_SIGLIP}encoder.layers.{{i}}.{hf}", t) for ours, hf, t in VIT_LAYER),
    ("vision/post_norm/scale", _SIGLIP + "post_layernorm.weight", None),
    ("vision/post_norm/bias", _SIGLIP + "post_layernorm.bias", None),
    ("vision/projector_norm/scale", "multi_modal_projector.mm_soft_emb_norm.weight", None),
    ("vision/projector/kernel", "multi_modal_projector.mm_input_projection_weight", None),  # already [in, out]
    ("embed", "language_model.model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"language_model.model.layers.{{i}}.{hf}", t) for ours, hf, t in _GEMMA3_DECODER_LAYER),
    ("norm/scale", "language_model.model.norm.weight", None),
    ("lm_head/kernel", "lm_head.weight", "T"),
)

# transformers 5.x save_pretrained drops SigLIP's `vision_model.` level; a 5.x state_dict (the
# runtime module names) has `model.vision_tower.`, `model.language_model.` and
# `model.multi_modal_projector.`; some older exports keep the head as `language_model.lm_head.`.
KEY_ALIASES = (
    ("vision_tower.embeddings.", _SIGLIP + "embeddings."),
    ("vision_tower.encoder.", _SIGLIP + "encoder."),
    ("vision_tower.post_layernorm.", _SIGLIP + "post_layernorm."),
    ("model.vision_tower.", _SIGLIP),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.lm_head.", "lm_head."),
)
