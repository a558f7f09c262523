"""LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): `LlavaForConditionalGeneration` with a CLIP ViT-L/14-336
vision tower and a Llama-2 (Vicuna-7B) decoder."""
from spatial_jax.data.geometry import Geometry
from spatial_jax.families.contract import Family, architectures_of
from spatial_jax.families.llava.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.families.llava.model import Llava, LlavaConfig
from spatial_jax.families.llava.processor import LlavaPrep
from spatial_jax.families.llava.rules import SHARDING_RULES

ARCHITECTURES = ("LlavaForConditionalGeneration",)

# The processor resizes and centre-crops every image to 336 px: 24 x 24 CLIP patches of 14 px,
# one visual token each (no merge). Objects of 3 x 3 tokens (42 px) 3 tokens apart, as Gemma 3's
# 3 / 3: the row of three spans 15 of 24 tokens (the other geometries' objects are 2-3 tokens and
# span 10-15 of 12-16), leaving room for shifted layouts; strips 9 / 6 / 9, mirror images.
GEOMETRY = Geometry("llava", n_tokens=24, token_px=14, object_tokens=3, spacing=3, whatsup_px=336,
                    grid_rounding="fixed")


def _claims(hf) -> bool:
    """A Llava checkpoint whose vision tower is CLIP's (Pixtral's is "pixtral")."""
    vision = (hf.get("vision_config") or {}).get("model_type")
    llava = "LlavaForConditionalGeneration" in architectures_of(hf) or (
        not architectures_of(hf) and hf.get("model_type") == "llava")
    return llava and vision == "clip_vision_model"


FAMILY = Family(
    name="llava", config_cls=LlavaConfig, model_cls=Llava, processor_cls=LlavaPrep, claims=_claims,
    architectures=ARCHITECTURES, key_map=KEY_MAP, key_aliases=KEY_ALIASES, geometry=GEOMETRY, prompt_style="anchor",
    sharding_rules=SHARDING_RULES,
)
