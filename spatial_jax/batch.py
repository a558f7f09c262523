"""`Batch`: the HF forward inputs, same names, shapes and meaning; unused fields are None."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs (numpy or jax arrays).

    input_ids:      [B, T] int
    attention_mask: [B, T] int, 1 = real token, 0 = padding (None: all real)
    pixel_values:   Qwen2-VL [N_patches, C*tp*p*p] (all images concatenated); Gemma 3 [n_img, 3, H, W];
                    Pixtral [n_img, 3, H_max, W_max] (zero-padded at the bottom and right)
    image_grid_thw: Qwen2-VL [n_img, 3] int (t, h, w in patches)
    token_type_ids: Gemma 3 [B, T] int, 1 at image soft tokens
    image_sizes:    Pixtral [n_img, 2] int (height, width in pixels of each image inside the padded
                    pixel_values)

    image_grid_thw and image_sizes fix every vision shape (like an array shape does), so they are
    static pytree metadata, held as tuples of int tuples: a jitted forward specializes on them.
    """

    input_ids: jax.Array | np.ndarray
    attention_mask: Optional[jax.Array | np.ndarray] = None
    pixel_values: Optional[jax.Array | np.ndarray] = None
    image_grid_thw: Optional[tuple[tuple[int, int, int], ...]] = dataclasses.field(
        default=None, metadata=dict(static=True))
    token_type_ids: Optional[jax.Array | np.ndarray] = None
    image_sizes: Optional[tuple[tuple[int, int], ...]] = dataclasses.field(
        default=None, metadata=dict(static=True))

    def __post_init__(self):
        for name, width in (("image_grid_thw", 3), ("image_sizes", 2)):
            value = getattr(self, name)
            if value is not None:
                rows = tuple(tuple(int(v) for v in row) for row in np.asarray(value).reshape(-1, width))
                object.__setattr__(self, name, rows)

    def with_defaults(self) -> "Batch":
        """Fills attention_mask with ones when absent, so jitted code sees one structure."""
        if self.attention_mask is not None:
            return self
        return dataclasses.replace(self, attention_mask=np.ones(np.shape(self.input_ids), np.int32))


def last_positions(attention_mask) -> np.ndarray:
    """[B, T] mask -> [B] int32 index of each row's last real token (left or right padding)."""
    mask = np.asarray(attention_mask).astype(bool)
    return (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)
