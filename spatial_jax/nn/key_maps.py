"""Key maps: our parameter path <- HF tensor name, transform. The format of every family's
`key_map.py` (one declarative table a family), and the map of the decoder layer the families
share (`layers.DecoderLayer`).

A path is the '/'-joined path in the model's pure-dict state. A HF name containing "{i}" is a
per-layer tensor; those are stacked along a new leading axis (the axis the layer scan runs over).
Transforms: "T" transposes a torch Linear [out, in] to our [in, out]; "flat_T" flattens a conv
kernel [out, ...] to a matmul over flattened patches; None keeps the tensor as it is.

A family's `KEY_ALIASES` rewrites the other on-disk spellings of its names to the ones its table uses.
"""
from __future__ import annotations

KeyMap = tuple[tuple[str, str, str | None], ...]

# `layers.DecoderLayer` <- HF's Qwen2 / Llama / Mistral decoder layer (q/k/v with biases: Qwen2).
DECODER_LAYER = (
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

# The Llama/Mistral layer: the same without the q/k/v biases.
DECODER_LAYER_NO_QKV_BIAS = tuple(entry for entry in DECODER_LAYER if not entry[0].endswith("/bias"))

# `layers.ViTLayer` <- the encoder layer of HF's SigLIP and CLIP vision models (the same names).
VIT_LAYER = (
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
