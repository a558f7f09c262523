"""Pixtral (mistral-community/pixtral-12b): `LlavaForConditionalGeneration` with a Pixtral vision
tower and a Mistral decoder."""
from spatial_jax.data.geometry import Geometry
from spatial_jax.data.synthetic import OBJECTS
from spatial_jax.families.contract import Family, architectures_of
from spatial_jax.families.pixtral.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.families.pixtral.model import Pixtral, PixtralConfig
from spatial_jax.families.pixtral.processor import PixtralPrep
from spatial_jax.families.pixtral.rules import SHARDING_RULES

ARCHITECTURES = ("LlavaForConditionalGeneration",)

# The official Pixtral palette has Orange for Brown, and its object set no bomb.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "orange": (255, 165, 0), "gray": (128, 128, 128)}
OBJECTS_OFFICIAL = tuple(o for o in OBJECTS if o != "bomb")

# Table 4 says 16x16 tokens of 15 px; Pixtral's patch is 16 px, so the official code (and we) use
# 15x15 tokens of 16 px = 240 px. Pixtral also inserts [IMG_BREAK] tokens between rows: the
# indices here are over the grid, without them.
GEOMETRY = Geometry("pixtral", n_tokens=15, token_px=16, object_tokens=2, spacing=2, whatsup_px=512,
                    grid_rounding="ceil", colours=COLOURS, objects=OBJECTS_OFFICIAL)


def _claims(hf) -> bool:
    """A Llava checkpoint whose vision tower is Pixtral's (LLaVA-1.5's is CLIP)."""
    vision = (hf.get("vision_config") or {}).get("model_type", "pixtral")
    llava = "LlavaForConditionalGeneration" in architectures_of(hf) or (
        not architectures_of(hf) and hf.get("model_type") == "llava")
    return llava and vision == "pixtral"


FAMILY = Family(
    name="pixtral", config_cls=PixtralConfig, model_cls=Pixtral, processor_cls=PixtralPrep, claims=_claims,
    architectures=ARCHITECTURES, key_map=KEY_MAP, key_aliases=KEY_ALIASES, geometry=GEOMETRY, prompt_style="anchor",
    sharding_rules=SHARDING_RULES,
    paper={"coco": {"model": "Pixtral-12B", "bundled baseline": "395/440 (fp32)"}},
)
