"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct): `Qwen2VLForConditionalGeneration`."""
from spatial_jax.data.geometry import Geometry
from spatial_jax.families.contract import Family, architectures_of
from spatial_jax.families.qwen2_vl.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep
from spatial_jax.families.qwen2_vl.rules import SHARDING_RULES

ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)

# Paper Table 4: 12 x 12 merged tokens of 28 px (2 x 2 merged 14-px patches), objects 2 tokens apart.
# The official What'sUp criss-cross regions, hand-labelled on this grid (data/whatsup_regions.py).
GEOMETRY = Geometry("qwen2_vl", n_tokens=12, token_px=28, object_tokens=2, spacing=2, whatsup_px=336,
                    grid_rounding="round", whatsup_hand_labelled={
        "objects": {
            "chair": {"left": (range(8, 11), range(1, 4)), "right": (range(8, 11), range(8, 11))},
            "table": {"left": (range(6, 11), range(0, 3)), "right": (range(6, 11), range(9, 12))},
            "armchair": {"left": (range(9, 11), range(1, 4)), "right": (range(9, 11), range(8, 11))},
        },
        "strips": {
            "chair": {"left": (range(0, 12), range(0, 4)), "right": (range(0, 12), range(8, 12))},
            "table": {"left": (range(0, 12), range(0, 3)), "right": (range(0, 12), range(9, 12))},
            "armchair": {"left": (range(0, 12), range(0, 4)), "right": (range(0, 12), range(8, 12))},
        },
    })

FAMILY = Family(
    name="qwen2_vl", config_cls=Qwen2VLConfig, model_cls=Qwen2VL, processor_cls=Qwen2VLPrep,
    claims=lambda hf: bool(set(architectures_of(hf)) & set(ARCHITECTURES))
    or (not architectures_of(hf) and hf.get("model_type") == "qwen2_vl"),
    architectures=ARCHITECTURES, key_map=KEY_MAP, key_aliases=KEY_ALIASES, geometry=GEOMETRY, prompt_style="anchor",
    sharding_rules=SHARDING_RULES,
    # Table 2 as third-party notes quote it (medium trust); accuracy = (golden + fixed) / items.
    paper={"coco": {"model": "Qwen2-VL-2B-Instruct", "None": 0.60, "Random": 0.65, "Probe": 0.82,
                     "Random fixes": 0.131, "Probe fixes": 0.545}},
)
