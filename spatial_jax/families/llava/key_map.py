"""LLaVA-1.5 key map: our parameter path <- HF hub name (llava-hf/llava-1.5-7b-hf), transform.

The CLIP tower's last encoder layer and post_layernorm are kept although vision_feature_layer -2
never reads them: the parameter count stays HF's, `vision.block_out` covers every layer, and an
export loads back into transformers without missing keys.
"""
from __future__ import annotations

from spatial_jax.families.pixtral.key_map import KEY_ALIASES as PIXTRAL_ALIASES
from spatial_jax.families.pixtral.key_map import KEY_MAP as PIXTRAL
from spatial_jax.nn.key_maps import VIT_LAYER, KeyMap

_CLIP = "vision_tower.vision_model."

KEY_MAP: KeyMap = (
    ("vision/patch_embed/kernel", _CLIP + "embeddings.patch_embedding.weight", "flat_T"),
    ("vision/class_embed", _CLIP + "embeddings.class_embedding", None),
    ("vision/pos_embed", _CLIP + "embeddings.position_embedding.weight", None),
    ("vision/pre_norm/scale", _CLIP + "pre_layrnorm.weight", None),
    ("vision/pre_norm/bias", _CLIP + "pre_layrnorm.bias", None),
    *((f"vision/layers/{ours}", f"{_CLIP}encoder.layers.{{i}}.{hf}", t) for ours, hf, t in VIT_LAYER),
    ("vision/post_norm/scale", _CLIP + "post_layernorm.weight", None),
    ("vision/post_norm/bias", _CLIP + "post_layernorm.bias", None),
    # The projector and the decoder are Pixtral's entries: the same Llava names, and Llama's decoder
    # layer is Mistral's (layers.DecoderLayer without q/k/v biases).
    *(entry for entry in PIXTRAL if entry[0].startswith("vision/projector") or not entry[0].startswith("vision/")),
)

# transformers 5.23's save_pretrained drops CLIP's `vision_model.` level (it writes
# `vision_tower.embeddings.*`, the rest as the hub); a 5.x state_dict (the runtime module names)
# has `model.vision_tower.`, `model.language_model.`, `model.multi_modal_projector.` and
# `lm_head.`, renamed as Pixtral's (the first matching alias applies: the CLIP tower's come first).
KEY_ALIASES = (
    *((f"vision_tower.{part}", f"{_CLIP}{part}") for part in ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")),
    ("model.vision_tower.", _CLIP),
    *PIXTRAL_ALIASES,
)
