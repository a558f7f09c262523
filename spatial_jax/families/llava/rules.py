"""LLaVA-1.5: how each parameter is sharded (format: spatial_jax/parallel/rules.py).

The Llama decoder and the Llava projector have Pixtral's paths and shapes, the CLIP encoder
layers Gemma 3's SigLIP ones (q/k/v/fc1 column-split, o/fc2 row-split, biases with them): those
rules are taken from the two families; the CLIP embeddings and norms are small and replicated.
"""
from __future__ import annotations

from spatial_jax.families.gemma3.rules import SHARDING_RULES as _GEMMA3
from spatial_jax.families.pixtral.rules import SHARDING_RULES as _PIXTRAL
from spatial_jax.parallel.rules import CATCH_ALL, REPLICATED, Rule

SHARDING_RULES: tuple[Rule, ...] = (
    *(rule for rule in _PIXTRAL if rule[0].startswith(("^layers/", "^embed$", "^lm_head/", "^norm/", "^vision/projector"))),
    *(rule for rule in _GEMMA3 if rule[0].startswith("^vision/layers/")),
    # [C*p*p, Dv], [Dv], [N + 1, Dv] and the LayerNorms: small
    (r"^vision/(patch_embed/kernel|class_embed|pos_embed|(pre_norm|post_norm)/(scale|bias))$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)
