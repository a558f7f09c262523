"""A weakened organism for the amplification experiment (issue 16): the layout component of the
visual tokens the LM receives, scaled down in the exported weights.

A trained organism answers nearly every item, so amplification has no failures to fix. The
weakened variant is the trained organism with one affine edit of the vision merger's output layer
(`visual.merger.mlp.2`, whose outputs are the visual tokens at the LM input): with P the
orthogonal projector onto the *layout subspace* and mu the visual tokens' mean, every visual token
h becomes h - (1 - scale) P (h - mu), i.e. its layout component is multiplied by `scale` and
everything orthogonal to it is kept. The layout subspace is spanned by the per-strip class means
of the visual tokens (mean over the tokens of strip k minus the mean over the three strips, per
layout axis), estimated on training-split images only; the experiment's own probe is trained
later, on the weakened model's held-out golden items. Because the edit lives in the weights, the
variant is an ordinary checkpoint: transformers and our port load it and answer alike.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spatial_jax.forward import Model, forward
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import SYSTEM_TEXT

MERGER_OUT = "visual.merger.mlp.2"  # HF tensor prefix of the layer whose outputs enter the LM


def visual_tokens(model: Model, items: Sequence[Item], batch_size: int = 64) -> np.ndarray:
    """[n, N, D] the items' visual tokens at the LM input (resid_pre of layer 0), raster order."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = model.prepare(images=[it.image for it in chunk], prompts=[it.prompt for it in chunk], system=SYSTEM_TEXT)
        acts = np.asarray(forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"][:, 0])
        at_image = np.asarray(batch.input_ids) == model.config.image_token_id
        out += [a[m] for a, m in zip(acts, at_image)]
    return np.stack(out)


def layout_subspace(tokens: np.ndarray, items: Sequence[Item], tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """tokens [n, N, D] of `items` -> (basis [D, k] orthonormal, mean [D]).

    Per layout axis (horizontal, vertical), the mean token of each strip minus the mean of the
    three strip means; the basis spans these (k <= 4), the mean is over every visual token."""
    diffs = []
    for horizontal in (True, False):
        sel = [i for i, it in enumerate(items) if it.horizontal == horizontal]
        if not sel:
            continue
        means = np.stack([np.concatenate([tokens[i, items[i].regions.strips[k]] for i in sel]).mean(0)
                          for k in range(3)])
        diffs.append(means - means.mean(0))
    if not diffs:
        raise ValueError("layout_subspace needs at least one item")
    u, s, _ = np.linalg.svd(np.concatenate(diffs).T, full_matrices=False)
    return u[:, s > tol * s.max()], tokens.reshape(-1, tokens.shape[-1]).mean(0)


def scale_layout(weight: np.ndarray, bias: np.ndarray, basis: np.ndarray, mean: np.ndarray | None,
                 scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The edit y -> y - (1 - scale) P (y - mean) folded into y = weight @ x + bias; mean None:
    y -> y - (1 - scale) P y (the tokens' whole projection on the subspace, their mean's included).

    weight [D, F] (HF layout, out x in), bias [D], basis [D, k] orthonormal, mean [D] or None."""
    shrink = np.eye(len(bias)) - (1 - scale) * basis @ basis.T
    new_w = shrink @ weight.astype(np.float64)
    new_b = shrink @ bias.astype(np.float64)
    if mean is not None:
        new_b += (1 - scale) * basis @ (basis.T @ mean.astype(np.float64))
    return new_w.astype(weight.dtype), new_b.astype(bias.dtype)
