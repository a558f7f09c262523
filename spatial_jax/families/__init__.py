"""The model families: one folder each (`spatial_jax/families/<name>/`), registered here once.

    from spatial_jax import families
    fam = families.get("qwen2_vl")              # the Family record (contract.py)
    fam = families.family_of(config_json_dict)  # which family a HF checkpoint belongs to

Adding a family is its folder plus one name in FAMILY_MODULES; nothing else names it.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from spatial_jax.data.geometry import register_geometry
from spatial_jax.data.prompts import register_prompt_style
from spatial_jax.families.contract import VLM, Family, check_family

FAMILY_MODULES = ("qwen2_vl", "gemma3", "pixtral")


def _register(module_names) -> dict[str, Family]:
    registry: dict[str, Family] = {}
    for module_name in module_names:
        family = check_family(importlib.import_module(f"{__name__}.{module_name}").FAMILY)
        if family.name in registry:
            raise ValueError(f"two families are called {family.name!r}")
        register_geometry(family.geometry)
        register_prompt_style(family.name, family.prompt_style)
        registry[family.name] = family
    return registry


FAMILIES: dict[str, Family] = _register(FAMILY_MODULES)


def get(name: str) -> Family:
    """The registered family called `name`; ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of(hf_config: Mapping[str, Any]) -> Family:
    """The one family that claims a HF config.json dict; ValueError naming the architecture if
    none (or more than one) does."""
    claimed = [f for f in FAMILIES.values() if f.claims(hf_config)]
    if len(claimed) == 1:
        return claimed[0]
    archs = list(hf_config.get("architectures") or ()) or hf_config.get("model_type")
    if claimed:
        raise ValueError(f"architecture {archs!r} is claimed by several families: {[f.name for f in claimed]}")
    vision = (hf_config.get("vision_config") or {}).get("model_type")
    known = sorted({a for f in FAMILIES.values() for a in f.architectures})
    raise ValueError(f"unknown architecture {archs!r}" + (f" with a {vision!r} vision tower" if vision else "")
                     + f"; supported: {known}")


__all__ = ["FAMILIES", "FAMILY_MODULES", "Family", "VLM", "family_of", "get"]
