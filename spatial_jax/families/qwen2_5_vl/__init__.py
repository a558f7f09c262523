"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct): `Qwen2_5_VLForConditionalGeneration`.

Its processor is Qwen2-VL's (transformers 5.23's Qwen2_5_VLProcessor uses the same image processor
and differs only for video), and so is its canvas: 28-px merged tokens of 14-px patches, the same
12 x 12-token grid on which the official What'sUp regions are hand-labelled."""
import dataclasses

from spatial_jax.families.contract import Family, architectures_of
from spatial_jax.families.qwen2_5_vl.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.families.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
from spatial_jax.families.qwen2_5_vl.rules import SHARDING_RULES
from spatial_jax.families.qwen2_vl import GEOMETRY as QWEN2_VL_GEOMETRY
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep

ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)

# Qwen2-VL's: 12 x 12 merged tokens of 28 px, objects of 2 tokens 2 apart, sides rounded (smart_resize).
GEOMETRY = dataclasses.replace(QWEN2_VL_GEOMETRY, name="qwen2_5_vl")


def _claims(hf) -> bool:
    """Its architecture, or (a config without architectures) its model_type."""
    archs = architectures_of(hf)
    return ARCHITECTURES[0] in archs if archs else hf.get("model_type") == "qwen2_5_vl"


FAMILY = Family(name="qwen2_5_vl", config_cls=Qwen2_5_VLConfig, model_cls=Qwen2_5_VL, processor_cls=Qwen2VLPrep,
                claims=_claims, architectures=ARCHITECTURES, key_map=KEY_MAP, key_aliases=KEY_ALIASES,
                geometry=GEOMETRY, prompt_style="anchor", sharding_rules=SHARDING_RULES)
