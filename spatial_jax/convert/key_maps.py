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

_GEMMA3_VISION_LAYER = (
    ("norm1/scale", "layer_norm1.weight", None),
    ("norm1/bias", "layer_norm1.bias", None),
    ("q/kernel", "self_attn.q_proj.weight", "T"),
    ("q/bias", "self_attn.q_proj.bias", None),
    ("k/kernel", "self_attn.k_proj.weight", "T"),
    ("k/bias", "self_attn.k_proj.bias", None),
    ("v/kernel", "self_attn.v_proj.weight", "T"),
    ("v/bias", "self_attn.v_proj.bias", None),
    ("o/kernel", "self_attn.out_proj.weight", "T"),
    ("o/bias", "self_attn.out_proj.bias", None),
    ("norm2/scale", "layer_norm2.weight", None),
    ("norm2/bias", "layer_norm2.bias", None),
    ("fc1/kernel", "mlp.fc1.weight", "T"),
    ("fc1/bias", "mlp.fc1.bias", None),
    ("fc2/kernel", "mlp.fc2.weight", "T"),
    ("fc2/bias", "mlp.fc2.bias", None),
)

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
GEMMA3: KeyMap = (
    ("vision/patch_embed/kernel", _SIGLIP + "embeddings.patch_embedding.weight", "flat_T"),
    ("vision/patch_embed/bias", _SIGLIP + "embeddings.patch_embedding.bias", None),
    ("vision/pos_embed", _SIGLIP + "embeddings.position_embedding.weight", None),
    *((f"vision/layers/{ours}", f"{_SIGLIP}encoder.layers.{{i}}.{hf}", t) for ours, hf, t in _GEMMA3_VISION_LAYER),
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
GEMMA3_ALIASES = (
    ("vision_tower.embeddings.", _SIGLIP + "embeddings."),
    ("vision_tower.encoder.", _SIGLIP + "encoder."),
    ("vision_tower.post_layernorm.", _SIGLIP + "post_layernorm."),
    ("model.vision_tower.", _SIGLIP),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.lm_head.", "lm_head."),
)

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

# Mistral's decoder layer is Qwen2's without the q/k/v biases (the same module, layers.DecoderLayer).
_MISTRAL_DECODER_LAYER = tuple(entry for entry in _QWEN_DECODER_LAYER if not entry[0].endswith("/bias"))

# Hub names (mistral-community/pixtral-12b), which transformers 5.23's save_pretrained writes too.
# Projector biases are read only when the config has multimodal_projector_bias (the default).
PIXTRAL: KeyMap = (
    ("vision/patch_embed/kernel", "vision_tower.patch_conv.weight", "flat_T"),
    ("vision/ln_pre/scale", "vision_tower.ln_pre.weight", None),
    *((f"vision/blocks/{ours}", f"vision_tower.transformer.layers.{{i}}.{hf}", t) for ours, hf, t in _PIXTRAL_VISION_BLOCK),
    ("vision/projector_fc1/kernel", "multi_modal_projector.linear_1.weight", "T"),
    ("vision/projector_fc1/bias", "multi_modal_projector.linear_1.bias", None),
    ("vision/projector_fc2/kernel", "multi_modal_projector.linear_2.weight", "T"),
    ("vision/projector_fc2/bias", "multi_modal_projector.linear_2.bias", None),
    ("embed", "language_model.model.embed_tokens.weight", None),
    *((f"layers/{ours}", f"language_model.model.layers.{{i}}.{hf}", t) for ours, hf, t in _MISTRAL_DECODER_LAYER),
    ("norm/scale", "language_model.model.norm.weight", None),
    ("lm_head/kernel", "language_model.lm_head.weight", "T"),
)

# transformers' runtime module names (a 5.x state_dict) -> the hub names above.
PIXTRAL_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)

TABLES: dict[str, tuple[KeyMap, tuple[tuple[str, str], ...]]] = {
    "qwen2_vl": (QWEN2_VL, QWEN2_VL_ALIASES),
    "gemma3": (GEMMA3, GEMMA3_ALIASES),
    "pixtral": (PIXTRAL, PIXTRAL_ALIASES),
}
