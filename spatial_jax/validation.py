"""The API boundary's checks of user input: one `ValueError` (or `TypeError` for a wrong kind of
object) naming the argument, what it should be and what it got, raised on the host before
anything is traced, so a mistake never becomes a silent no-op, a NaN or a page of JAX
broadcasting traceback, and a jitted call pays nothing for it.

`forward`, `next_token_logits`, `patch_sweep` (with its readout) and `Model.prepare` call these.
Values that are tracers (a user's own `jax.jit` around them) cannot be read on the host: their
shapes are still checked, their contents are not.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np

from spatial_jax.interventions import sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax import families

DTYPE_ALIASES = {"float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "f64": "float64", "fp64": "float64",
                 "double": "float64"}


def dtype_name(dtype: Any) -> str:
    """'float32', 'bfloat16' or 'float64' for a dtype name, an alias ('bf16', 'fp32') or a dtype object."""
    if isinstance(dtype, str):
        key = dtype.lower()
    else:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = None
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    aliases = ", ".join(k for k in DTYPE_ALIASES if k not in DTYPE_ALIASES.values())
    raise ValueError(f"dtype: expected one of {sorted(set(DTYPE_ALIASES.values()))} (or an alias: {aliases}), "
                     f"got {dtype!r}")


def check_batch(model, batch) -> None:
    """The batch's shapes, then the family's own checks (image slots against pixel_values, ...)."""
    ids = batch.input_ids
    if np.ndim(ids) != 2:
        raise ValueError(f"batch.input_ids: expected [B, T] int, got shape {_shape(np.shape(ids))}")
    if batch.attention_mask is not None and np.shape(batch.attention_mask) != np.shape(ids):
        raise ValueError(f"batch.attention_mask: expected the shape of input_ids {_shape(np.shape(ids))}, "
                         f"got {_shape(np.shape(batch.attention_mask))}")
    families.get(model.family).model_cls.check_batch(model.config, batch)


def site_names(cache: str | Sequence[str] | None) -> tuple[str, ...]:
    """The `cache` argument as a tuple of known site names; a single string is one site."""
    if cache is None:
        return ()
    names = (cache,) if isinstance(cache, str) else tuple(cache)
    for name in names:
        if name not in sites.ALL_SITES:
            raise ValueError(f"cache: unknown site {name!r}; expected site names from {sorted(sites.ALL_SITES)}")
    return names


def intervention_list(interventions) -> tuple[Intervention, ...]:
    """The `interventions` argument as a tuple; a single Intervention is a list of one."""
    if interventions is None:
        return ()
    if isinstance(interventions, Intervention):
        return (interventions,)
    interventions = tuple(interventions)
    for i, iv in enumerate(interventions):
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions[{i}]: expected an sj.Intervention, got {type(iv).__name__}")
    return interventions


def _host(x) -> Optional[np.ndarray]:
    """x as a numpy array when its values can be read on the host; None for tracers (and arrays
    spread over other hosts)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _token_features(config: Any, site: str) -> tuple[tuple[int, ...], str, str]:
    """A token's feature shape at `site` (D, or (H, hd) at a head site, H the query heads for
    q/z and the key/value heads for k/v), its names, and the axis amplify's directions span."""
    if site in sites.HEAD_SITES:
        heads = config.num_heads if site in sites.QUERY_HEAD_SITES else config.num_kv_heads
        return (heads, config.head_dim), "H, hd", "hd"
    lm = site.startswith("lm.")
    return (config.hidden_size if lm or site == sites.VISION_TOKENS else config.vision_dim,), "D", "D"


def check_interventions(config: Any, input_shape: tuple[int, int], interventions: Sequence[Intervention],
                        variant_shape: tuple[int, ...] = (), name: str = "interventions") -> None:
    """Each intervention's layer, index, source, directions and head_mask against the model and
    the batch (which sites take a head_mask, and that lm.attn_pattern takes no intervention, the
    `Intervention` itself checks when it is made).

    input_shape: (B, T) of the batch. variant_shape: the leading variant axes S of a sweep's
    arrays (every array then carries S in front; a scalar layer or alpha is shared)."""
    B, T = input_shape
    nv = len(variant_shape)
    lead = "*S, " if nv else ""
    for i, iv in enumerate(interventions):
        where = f"{name}[{i}] ({iv.site}, {iv.op})"
        lm = iv.site.startswith("lm.")
        if iv.site in sites.PER_LAYER_SITES:
            n_layers = config.num_layers if lm else getattr(config, "vision_depth", None) or config.vision_layers
            kind = "LM layers" if lm else "vision blocks"
            layer = _host(iv.layer)
            if layer is not None:
                if not (np.issubdtype(layer.dtype, np.integer) or layer.dtype == bool):
                    if not np.all(np.mod(layer, 1) == 0):
                        raise ValueError(f"{where}.layer: expected an integer, got {layer.tolist()}")
                flat = np.atleast_1d(layer)
                bad = flat[(flat < 0) | (flat > n_layers)]
                if bad.size:
                    raise ValueError(f"{where}.layer: expected an integer in [0, {n_layers}) (the model has {n_layers} "
                                     f"{kind}; {n_layers} itself means 'applies nowhere'), got {bad[0]}")
        feature, names, along = _token_features(config, iv.site)
        gathers = iv.op in ("replace", "add") and iv.source is not None and np.ndim(iv.source) - nv == 2 + len(feature)
        if iv.source is not None:
            src = np.shape(iv.source)
            per_token = tuple(src[len(src) - len(feature):])
            vector = iv.op == "add" and len(src) - nv == len(feature)
            if per_token != feature or not (vector or (gathers and (not lm or src[nv] == B))):
                dims = ", ".join(map(str, feature))
                expect = f"[{lead}B, S, {names}] = [{lead}{B if lm else 'N'}, S, {dims}]" + (
                    f" or [{lead}{names}] = [{lead}{dims}]" if iv.op == "add" else "")
                raise ValueError(f"{where}.source: expected {expect}, got shape {_shape(src)}")
        if iv.directions is not None:
            d = np.shape(iv.directions)
            if len(d) - nv != 2 or d[-2] != feature[-1]:
                raise ValueError(f"{where}.directions: expected [{lead}{along}, K] = [{lead}{feature[-1]}, K], "
                                 f"got shape {_shape(d)}")
        if iv.head_mask is not None:
            m = np.shape(iv.head_mask)
            heads = "query" if iv.site in sites.QUERY_HEAD_SITES else "key/value"
            if len(m) - nv != 1 or m[-1] != feature[0]:
                raise ValueError(f"{where}.head_mask: expected [{lead}H] = [{lead}{feature[0]}] bool (the model's "
                                 f"{heads} heads), got shape {_shape(m)}")
            mask = _host(iv.head_mask)
            if mask is not None and mask.dtype != bool:
                raise ValueError(f"{where}.head_mask: expected bool, got dtype {mask.dtype}")
        if iv.index is not None:
            shape = np.shape(iv.index)
            if len(shape) - nv != 2 or (lm and shape[-2:] != (B, T)):
                expect = f"[{lead}B, T] = [{lead}{B}, {T}]" if lm else f"[{lead}B, N] (N vision tokens)"
                raise ValueError(f"{where}.index: expected {expect} int (source token per position, -1 = keep), "
                                 f"got shape {_shape(shape)}")
            index = _host(iv.index)
            if index is not None:
                if not np.issubdtype(index.dtype, np.integer):
                    raise ValueError(f"{where}.index: expected integers, got dtype {index.dtype}")
                if index.size and index.min() < -1:
                    raise ValueError(f"{where}.index: expected entries >= -1 (-1 = keep the token), got {index.min()}")
                n_source = np.shape(iv.source)[nv + 1] if gathers else None
                if n_source is not None and index.size and index.max() >= n_source:
                    raise ValueError(f"{where}.index: expected entries < {n_source} (the source's length S), "
                                     f"got {index.max()}")


def check_readout(config: Any, input_shape: tuple[int, int], position, tokens) -> None:
    """Readout.position [B] in [0, T) and Readout.tokens [K] or [B, K] in [0, vocab)."""
    B, T = input_shape
    if np.ndim(position) != 1 or np.shape(position)[0] != B:
        raise ValueError(f"Readout.position: expected [B] = [{B}] int (the token read in each row), "
                         f"got {'a scalar' if np.ndim(position) == 0 else 'shape ' + _shape(np.shape(position))}")
    if np.ndim(tokens) not in (1, 2) or (np.ndim(tokens) == 2 and np.shape(tokens)[0] != B):
        raise ValueError(f"Readout.tokens: expected [K] or [B, K] = [{B}, K] int, got shape {_shape(np.shape(tokens))}")
    for field, values, upper, what in (("position", position, T, "T, the sequence length"),
                                       ("tokens", tokens, config.vocab_size, "the vocabulary size")):
        values = _host(values)
        if values is None or not values.size:
            continue
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"Readout.{field}: expected integers, got dtype {values.dtype}")
        if values.min() < 0 or values.max() >= upper:
            got = values.min() if values.min() < 0 else values.max()
            raise ValueError(f"Readout.{field}: expected entries in [0, {upper}) ({what}), got {got}")
