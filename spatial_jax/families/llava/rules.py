"""LLaVA-1.5: how each parameter is sharded (format: spatial_jax/parallel/rules.py).

The Llama decoder and the Llava projector have Pixtral's paths and shapes (its rules), the CLIP
encoder layers are `layers.ViTLayer` (`VIT_LAYER_RULES`); the CLIP embeddings and norms are small
and replicated.
"""
from __future__ import annotations

from spatial_jax.families.pixtral.rules import SHARDING_RULES as _PIXTRAL
from spatial_jax.parallel.rules import CATCH_ALL, REPLICATED, VIT_LAYER_RULES, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    *(rule for rule in _PIXTRAL if rule[0].startswith(("^layers/", "^embed$", "^lm_head/", "^norm/", "^vision/projector"))),
    *VIT_LAYER_RULES,
    # [C*p*p, Dv], [Dv], [N + 1, Dv] and the LayerNorms: small
    (r"^vision/(patch_embed/kernel|class_embed|pos_embed|(pre_norm|post_norm)/(scale|bias))$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)
