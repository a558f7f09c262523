"""Pixtral: how each parameter is sharded (format: spatial_jax/parallel/rules.py)."""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

from spatial_jax.parallel.mesh import MODEL
from spatial_jax.parallel.rules import CATCH_ALL, COLUMN, COLUMN_BIAS, REPLICATED, ROW, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    # language model (Mistral): [L, ...] stacked decoder layers, no biases
    (r"^layers/(input_norm|post_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D]
    (r"^lm_head/kernel$", P(None, MODEL)),     # [D, V]
    (r"^norm/scale$", REPLICATED),
    # vision tower: [Lv, ...] stacked blocks with separate q/k/v (head-aligned column splits)
    (r"^vision/blocks/(norm1|norm2)/scale$", REPLICATED),
    (r"^vision/blocks/(q|k|v|gate|up)/kernel$", COLUMN),
    (r"^vision/blocks/(o|down)/kernel$", ROW),
    (r"^vision/(patch_embed/kernel|ln_pre/scale)$", REPLICATED),  # [C*p*p, Dv], [Dv]: small
    # projector: linear -> GELU -> linear, split like an MLP
    (r"^vision/projector_fc1/kernel$", COLUMN),   # [Dv, D]
    (r"^vision/projector_fc1/bias$", COLUMN_BIAS),
    (r"^vision/projector_fc2/kernel$", ROW),      # [D, D]
    (r"^vision/projector_fc2/bias$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)
