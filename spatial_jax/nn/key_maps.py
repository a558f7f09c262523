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


def linear(ours: str, hf: str, bias: bool = True) -> KeyMap:
    """Our `Dense` at `ours` <- a torch Linear at `hf`: the kernel transposed, and the bias."""
    return ((f"{ours}/kernel", f"{hf}.weight", "T"),) + (((f"{ours}/bias", f"{hf}.bias", None),) if bias else ())


def layer_norm(ours: str, hf: str) -> KeyMap:
    """Our `LayerNorm` at `ours` <- a torch LayerNorm at `hf`."""
    return (f"{ours}/scale", f"{hf}.weight", None), (f"{ours}/bias", f"{hf}.bias", None)


# `layers.DecoderLayer` <- HF's Qwen2 / Llama / Mistral decoder layer (q/k/v with biases: Qwen2).
DECODER_LAYER = (
    ("input_norm/scale", "input_layernorm.weight", None),
    *(entry for name in "qkv" for entry in linear(name, f"self_attn.{name}_proj")),
    *linear("o", "self_attn.o_proj", bias=False),
    ("post_norm/scale", "post_attention_layernorm.weight", None),
    *(entry for name in ("gate", "up", "down") for entry in linear(name, f"mlp.{name}_proj", bias=False)),
)

# The Llama/Mistral layer: the same without the q/k/v biases.
DECODER_LAYER_NO_QKV_BIAS = tuple(entry for entry in DECODER_LAYER if not entry[0].endswith("/bias"))

# `layers.ViTLayer` <- the encoder layer of HF's SigLIP and CLIP vision models (the same names).
VIT_LAYER = (
    *layer_norm("norm1", "layer_norm1"),
    *(entry for name in "qkv" for entry in linear(name, f"self_attn.{name}_proj")),
    *linear("o", "self_attn.out_proj"),
    *layer_norm("norm2", "layer_norm2"),
    *linear("fc1", "mlp.fc1"),
    *linear("fc2", "mlp.fc2"),
)
