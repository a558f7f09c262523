"""Model families: which config class and module each HF architecture maps to."""
from __future__ import annotations

import dataclasses
from typing import Any

from spatial_jax.models import gemma3, pixtral, qwen2_vl


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", qwen2_vl.Qwen2VLConfig, qwen2_vl.Qwen2VL,
                       ("Qwen2VLForConditionalGeneration",), ("qwen2_vl",)),
    "gemma3": Family("gemma3", gemma3.Gemma3Config, gemma3.Gemma3,
                     ("Gemma3ForConditionalGeneration",), ("gemma3",)),
    # Any Llava checkpoint lands here; PixtralConfig.from_hf refuses the non-Pixtral ones.
    "pixtral": Family("pixtral", pixtral.PixtralConfig, pixtral.Pixtral,
                      ("LlavaForConditionalGeneration",), ("llava",)),
}


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family of a HF config.json dict; ValueError naming the architecture if unknown."""
    archs = tuple(hf_config.get("architectures") or ())
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if set(archs) & set(fam.architectures) or (not archs and model_type in fam.model_types):
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ValueError(f"unknown architecture {list(archs) or model_type!r}; supported: {known}")
