"""Sharding rules: the vocabulary of the declarative (path regex -> PartitionSpec) tables that each
family keeps in its folder (`families/<name>/rules.py`, `Family.sharding_rules`).

Paths are those of `nnx.to_pure_dict(nnx.state(model))` joined with '/', e.g. `layers/q/kernel`.
The first rule whose regex matches (re.search) gives the spec. Specs are right-aligned: a spec
of k entries names the LAST k dimensions, and leading dimensions (the layer axis of stacked
layers, [L, ...]) are never sharded, so one rule covers a Dense kernel [in, out] whether or not
it is stacked. Kernels use the [in, out] layout:

  column-parallel  P(None, MODEL)  kernel split on `out` (attention heads, MLP width), bias P(MODEL)
  row-parallel     P(MODEL, None)  kernel split on `in`, bias replicated (added after the reduce)
  vocabulary       embed [V, D] -> P(MODEL, None); lm_head kernel [D, V] -> P(None, MODEL)
  replicated       P()             norms, row-parallel biases, small weights

A dimension that the mesh axis does not divide is left unsharded (logged once), so every rule
works on every mesh. Data never goes on weights: `data` shards activations and variants only.

The GENERIC rules key on the layer names the families share (q/k/v/o, gate/up/down, embed,
lm_head, *norm*): a family registered without a table of its own gets them (the `Family`
default), so it is sharded sensibly before it gets one.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spatial_jax.parallel.mesh import DATA, MODEL, axis_size
from spatial_jax.tree_paths import flatten_paths, unflatten_paths

Rule = tuple[str, P]

COLUMN = P(None, MODEL)
COLUMN_BIAS = P(MODEL)
ROW = P(MODEL, None)
REPLICATED = P()

# Matches any parameter: the last rule of every table, so nothing is left without a spec.
CATCH_ALL = r".*"

# Layer names shared across families (LM and vision towers alike).
_COL = r"(q|k|v|q_proj|k_proj|v_proj|query|key|value|gate|up|gate_proj|up_proj|fc1|mlp_fc1|in_proj)"
_ROW = r"(o|o_proj|out|out_proj|down|down_proj|fc2|mlp_fc2)"

# `layers.ViTLayer` stacked at vision/layers ([Lv, ...]; separate q/k/v: head-aligned column splits)
VIT_LAYER_RULES: tuple[Rule, ...] = (
    (r"^vision/layers/(norm1|norm2)/(scale|bias)$", REPLICATED),
    (r"^vision/layers/(q|k|v|fc1)/kernel$", COLUMN),
    (r"^vision/layers/(q|k|v|fc1)/bias$", COLUMN_BIAS),
    (r"^vision/layers/(o|fc2)/kernel$", ROW),
    (r"^vision/layers/(o|fc2)/bias$", REPLICATED),
)

GENERIC_RULES: tuple[Rule, ...] = (
    (r"(^|/)[^/]*norm[^/]*/(scale|bias)$", REPLICATED),     # every norm, incl. q_norm / k_norm
    (r"^embed(/embedding)?$", P(MODEL, None)),               # [V, D]: vocabulary over model
    (r"^lm_head/kernel$", P(None, MODEL)),                   # [D, V]
    (rf"(^|/){_COL}/kernel$", COLUMN),                       # heads / MLP width over model
    (rf"(^|/){_COL}/bias$", COLUMN_BIAS),
    (rf"(^|/){_ROW}/kernel$", ROW),
    (rf"(^|/){_ROW}/bias$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)

def match(path: str, rules: Sequence[Rule]) -> tuple[int, P]:
    """(index of the first rule matching `path`, its spec). Every table ends with CATCH_ALL."""
    for i, (pattern, spec) in enumerate(rules):
        if re.search(pattern, path):
            return i, spec
    raise ValueError(f"no sharding rule matches {path!r} (tables end with a catch-all rule)")


_warned: set[tuple[str, int, str]] = set()


def spec_for(path: str, shape: Sequence[int], rules: Sequence[Rule], mesh: Mesh) -> P:
    """The full-rank PartitionSpec of a parameter: its rule's spec right-aligned on `shape`,
    with any dimension its mesh axis does not divide left unsharded."""
    _, spec = match(path, rules)
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(f"rule spec {P(*spec)} for {path!r} has more entries than its shape {tuple(shape)}")
    full = [None] * (len(shape) - len(spec)) + list(spec)
    for dim, axis in enumerate(full):
        if axis is None:
            continue
        names = (axis,) if isinstance(axis, str) else tuple(axis)
        size = math.prod(axis_size(mesh, a) for a in names)
        if shape[dim] % size:
            key = (path, dim, str(axis))
            if key not in _warned:
                _warned.add(key)
                logging.warning("sharding: %s dim %d (%d) does not divide by mesh axis %s (%d); "
                                "left unsharded", path, dim, shape[dim], axis, size)
            full[dim] = None
    while full and full[-1] is None:
        full.pop()
    return P(*full)


def param_specs(params: Mapping, rules: Sequence[Rule], mesh: Mesh) -> dict:
    """A pytree of PartitionSpecs shaped like `params` (a pure dict of arrays or ShapeDtypeStructs)."""
    flat = flatten_paths(params)
    return unflatten_paths({p: spec_for(p, tuple(x.shape), rules, mesh) for p, x in flat.items()})


def param_shardings(params: Mapping, rules: Sequence[Rule], mesh: Mesh) -> dict:
    """`param_specs` as NamedShardings on `mesh`: the target of a sharded restore or device_put.
    rules: the family's table (`Family.sharding_rules`)."""
    specs = param_specs(params, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def unmatched(params: Mapping, rules: Sequence[Rule]) -> list[str]:
    """Parameter paths that only the catch-all rule matches (a new layer nobody wrote a rule for)."""
    return [p for p in flatten_paths(params) if rules[match(p, rules)[0]][0] == CATCH_ALL]


def table(params: Mapping, rules: Sequence[Rule], mesh: Mesh) -> str:
    """A readable 'path shape -> spec (per-device shape)' listing, for logs and reports."""
    lines = []
    for p, x in flatten_paths(params).items():
        spec = spec_for(p, x.shape, rules, mesh)
        local = NamedSharding(mesh, spec).shard_shape(tuple(x.shape))
        lines.append(f"{p:40s} {str(tuple(x.shape)):24s} {str(spec):28s} {tuple(local)}")
    return "\n".join(lines)


__all__ = ["DATA", "MODEL", "COLUMN", "COLUMN_BIAS", "ROW", "REPLICATED", "CATCH_ALL", "GENERIC_RULES", "Rule",
           "match", "spec_for", "param_specs", "param_shardings", "unmatched", "table"]
