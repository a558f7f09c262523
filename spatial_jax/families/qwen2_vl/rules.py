"""Qwen2-VL: how each parameter is sharded (format: spatial_jax/parallel/rules.py)."""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

from spatial_jax.parallel.mesh import MODEL
from spatial_jax.parallel.rules import CATCH_ALL, COLUMN, COLUMN_BIAS, REPLICATED, ROW, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    # language model: [L, ...] stacked decoder layers
    (r"^layers/(input_norm|post_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]: attention heads over model
    (r"^layers/(q|k|v)/bias$", COLUMN_BIAS),   # [L, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]: MLP width over model
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D]
    (r"^lm_head/kernel$", P(None, MODEL)),     # [D, V]
    (r"^norm/scale$", REPLICATED),
    # vision tower: [Lv, ...] stacked blocks. The fused qkv's columns are laid out [3, H, hd], so
    # no split of them is head-aligned; attention stays replicated (it is run once per image and
    # is ~5% of a 7B model), the MLP is split over model.
    (r"^vision/blocks/(norm1|norm2)/(scale|bias)$", REPLICATED),
    (r"^vision/blocks/(qkv|proj)/(kernel|bias)$", REPLICATED),
    (r"^vision/blocks/fc1/kernel$", COLUMN),   # [Lv, Dv, Dmlp]
    (r"^vision/blocks/fc1/bias$", COLUMN_BIAS),
    (r"^vision/blocks/fc2/kernel$", ROW),      # [Lv, Dmlp, Dv]
    (r"^vision/blocks/fc2/bias$", REPLICATED),
    (r"^vision/patch_embed/kernel$", REPLICATED),  # [C*t*p*p, Dv], small
    (r"^vision/merger_norm/(scale|bias)$", REPLICATED),
    (r"^vision/merger_fc1/kernel$", COLUMN),   # [4Dv, 4Dv]
    (r"^vision/merger_fc1/bias$", COLUMN_BIAS),
    (r"^vision/merger_fc2/kernel$", ROW),      # [4Dv, D]
    (r"^vision/merger_fc2/bias$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)
