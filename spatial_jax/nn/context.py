"""What every decoder layer reads besides the residual: the LM context of one batch."""
from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMContext:
    """cos, sin [B, T, head_dim] float32: the RoPE tables at every position; allowed [B, T, T]
    bool: which keys each query may attend (the sweeps read it to know where a change can
    spread). A family whose layers need more subclasses it (and registers the subclass)."""

    cos: jax.Array
    sin: jax.Array
    allowed: jax.Array
