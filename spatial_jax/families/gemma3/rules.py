"""Gemma 3: how each parameter is sharded (format: spatial_jax/parallel/rules.py)."""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

from spatial_jax.parallel.mesh import MODEL
from spatial_jax.parallel.rules import CATCH_ALL, COLUMN, REPLICATED, ROW, VIT_LAYER_RULES, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    # language model: [L, ...] stacked decoder layers; q_norm / k_norm act on head_dim (replicated)
    (r"^layers/(input_norm|post_attn_norm|pre_ff_norm|post_ff_norm|q_norm|k_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D], tied: also the unembedding
    (r"^lm_head/kernel$", P(None, MODEL)),
    (r"^norm/scale$", REPLICATED),
    *VIT_LAYER_RULES,  # SigLIP
    (r"^vision/(patch_embed/(kernel|bias)|pos_embed)$", REPLICATED),  # [C*p*p, Dv], [N, Dv]: small
    (r"^vision/(post_norm|projector_norm)/(scale|bias)$", REPLICATED),
    (r"^vision/projector/kernel$", REPLICATED),  # [Dv, D], 3M params: not worth a collective
    (CATCH_ALL, REPLICATED),
)
