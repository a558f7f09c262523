"""Qwen2.5-VL: how each parameter is sharded (format: spatial_jax/parallel/rules.py).

Qwen2-VL's table (the same decoder, vision attention, patch embedding and merger paths) with the
vision blocks' gated MLP in place of their fc1/fc2: split over `model` like the decoder's MLP.
"""
from __future__ import annotations

from spatial_jax.families.qwen2_vl.rules import SHARDING_RULES as QWEN2_VL_RULES
from spatial_jax.parallel.rules import COLUMN, COLUMN_BIAS, REPLICATED, ROW, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    (r"^vision/blocks/(gate|up)/kernel$", COLUMN),   # [Lv, Dv, Dmlp]
    (r"^vision/blocks/(gate|up)/bias$", COLUMN_BIAS),
    (r"^vision/blocks/down/kernel$", ROW),           # [Lv, Dmlp, Dv]
    (r"^vision/blocks/down/bias$", REPLICATED),
    *(rule for rule in QWEN2_VL_RULES if not rule[0].startswith("^vision/blocks/fc")),  # ends with CATCH_ALL
)
