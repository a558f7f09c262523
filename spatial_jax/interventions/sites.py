"""The site vocabulary shared by every model family (docs/design.md, "Sites").

A site is a named point in the forward pass where activations can be cached or intervened on.
Per-layer sites carry a layer axis in the cache; the others are read once per forward.
"""

VISION_BLOCK_OUT = "vision.block_out"
VISION_TOKENS = "vision.tokens"
LM_RESID_PRE = "lm.resid_pre"
LM_ATTN_OUT = "lm.attn_out"
LM_MLP_OUT = "lm.mlp_out"
LM_RESID_POST = "lm.resid_post"
LM_FINAL = "lm.final"

PER_LAYER_SITES = frozenset({VISION_BLOCK_OUT, LM_RESID_PRE, LM_ATTN_OUT, LM_MLP_OUT, LM_RESID_POST})
ONCE_SITES = frozenset({VISION_TOKENS, LM_FINAL})
ALL_SITES = PER_LAYER_SITES | ONCE_SITES


def check_site(site: str) -> str:
    if site not in ALL_SITES:
        raise ValueError(f"unknown site {site!r}; known sites: {sorted(ALL_SITES)}")
    return site
