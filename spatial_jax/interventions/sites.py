"""The site vocabulary shared by every model family (docs/design.md, "Sites").

A site is a named point in the forward pass where activations can be cached or intervened on.
Per-layer sites carry a layer axis in the cache; the others are read once per forward.

Head sites hold one vector per token and head, [B, T, H, hd] at a layer (the cache adds the
layer axis: [B, L, T, H, hd]); H is the query heads for q and z, the key/value heads for k and v.
`lm.attn_pattern` ([B, L, H, T, T] in the cache) can be cached but not intervened on.
"""

VISION_BLOCK_OUT = "vision.block_out"
VISION_TOKENS = "vision.tokens"
LM_RESID_PRE = "lm.resid_pre"
LM_ATTN_OUT = "lm.attn_out"
LM_MLP_OUT = "lm.mlp_out"
LM_RESID_POST = "lm.resid_post"
LM_FINAL = "lm.final"
LM_ATTN_Q = "lm.attn_q"
LM_ATTN_K = "lm.attn_k"
LM_ATTN_V = "lm.attn_v"
LM_ATTN_Z = "lm.attn_z"
LM_ATTN_PATTERN = "lm.attn_pattern"

# Per token: one vector per query head (q, z) or per key/value head (k, v).
QUERY_HEAD_SITES = frozenset({LM_ATTN_Q, LM_ATTN_Z})
KV_HEAD_SITES = frozenset({LM_ATTN_K, LM_ATTN_V})
HEAD_SITES = QUERY_HEAD_SITES | KV_HEAD_SITES
CACHE_ONLY_SITES = frozenset({LM_ATTN_PATTERN})

PER_LAYER_SITES = frozenset({VISION_BLOCK_OUT, LM_RESID_PRE, LM_ATTN_OUT, LM_MLP_OUT, LM_RESID_POST}
                            | HEAD_SITES | CACHE_ONLY_SITES)
ONCE_SITES = frozenset({VISION_TOKENS, LM_FINAL})
ALL_SITES = PER_LAYER_SITES | ONCE_SITES


def check_site(site: str) -> str:
    if site not in ALL_SITES:
        raise ValueError(f"unknown site {site!r}; known sites: {sorted(ALL_SITES)}")
    return site
