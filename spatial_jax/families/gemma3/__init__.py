"""Gemma 3 (google/gemma-3-4b-it): `Gemma3ForConditionalGeneration`."""
from spatial_jax.data.geometry import Geometry
from spatial_jax.families.contract import Family, architectures_of
from spatial_jax.families.gemma3.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.families.gemma3.model import Gemma3, Gemma3Config
from spatial_jax.families.gemma3.processor import Gemma3Prep
from spatial_jax.families.gemma3.rules import SHARDING_RULES

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)

# Paper Table 4: every image becomes 16 x 16 tokens of 56 px (896 px, 4 x 4 pooled 14-px patches).
# The official What'sUp criss-cross regions, hand-labelled on this grid (data/whatsup_regions.py).
GEOMETRY = Geometry("gemma3", n_tokens=16, token_px=56, object_tokens=3, spacing=3, whatsup_px=896,
                    grid_rounding="fixed", whatsup_hand_labelled={
        "objects": {
            "chair": {"left": (range(12, 15), range(3, 6)), "right": (range(12, 15), range(10, 13))},
            "table": {"left": (range(10, 15), range(2, 4)), "right": (range(10, 15), range(12, 14))},
            "armchair": {"left": (range(13, 15), range(2, 5)), "right": (range(13, 15), range(11, 14))},
        },
        "strips": {
            "chair": {"left": (range(0, 16), range(0, 6)), "right": (range(0, 16), range(10, 16))},
            "table": {"left": (range(0, 16), range(0, 6)), "right": (range(0, 16), range(12, 16))},
            "armchair": {"left": (range(0, 16), range(0, 5)), "right": (range(0, 16), range(11, 16))},
        },
    })

FAMILY = Family(
    name="gemma3", config_cls=Gemma3Config, model_cls=Gemma3, processor_cls=Gemma3Prep,
    claims=lambda hf: bool(set(architectures_of(hf)) & set(ARCHITECTURES))
    or (not architectures_of(hf) and hf.get("model_type") == "gemma3"),
    architectures=ARCHITECTURES, key_map=KEY_MAP, key_aliases=KEY_ALIASES, geometry=GEOMETRY, prompt_style="direct",
    sharding_rules=SHARDING_RULES,
    # Official COCO protocol: the vertical items are asked first; a box tie does not count as agreeing.
    coco_vertical_first=True, coco_ties_agree_second=False,
    # Table 2 as third-party notes quote it (medium trust), and the official repo's bundled baseline.
    paper={"coco": {"model": "Gemma-3-4b-it", "None": 0.53, "Random": 0.57, "Probe": 0.72,
                     "Random fixes": 0.096, "Probe fixes": 0.402, "bundled baseline": "231/440 (fp32)"}},
)
