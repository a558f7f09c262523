"""Sharding rules: one declarative table per family of (path regex -> PartitionSpec).

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
lm_head, *norm*), so a new family (Gemma 3: layers/q/kernel, layers/q_norm/scale, tied embed)
is sharded sensibly before it gets a table of its own.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

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

QWEN2_VL_RULES: tuple[Rule, ...] = (
    # language model: [L, ...] stacked decoder layers
    (r"^layers/(input_norm|post_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]: attention heads over model
    (r"^layers/(q|k|v)/bias$", COLUMN_BIAS),   # [L, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]: MLP width over model
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D]
    (r"^lm_head/kernel$", P(None, MODEL)),     # [D, V]
    (r"^norm/scale$", REPLICATED),
    # vision tower: [Lv, ...] stacked blocks. The fused qkv's columns are laid out [3, H, hd], so
    # no split of them is head-aligned; attention stays replicated (it is run once per image and
    # is ~5% of a 7B model), the MLP is split over model.
    (r"^vision/blocks/(norm1|norm2)/(scale|bias)$", REPLICATED),
    (r"^vision/blocks/(qkv|proj)/(kernel|bias)$", REPLICATED),
    (r"^vision/blocks/fc1/kernel$", COLUMN),   # [Lv, Dv, Dmlp]
    (r"^vision/blocks/fc1/bias$", COLUMN_BIAS),
    (r"^vision/blocks/fc2/kernel$", ROW),      # [Lv, Dmlp, Dv]
    (r"^vision/blocks/fc2/bias$", REPLICATED),
    (r"^vision/patch_embed/kernel$", REPLICATED),  # [C*t*p*p, Dv], small
    (r"^vision/merger_norm/(scale|bias)$", REPLICATED),
    (r"^vision/merger_fc1/kernel$", COLUMN),   # [4Dv, 4Dv]
    (r"^vision/merger_fc1/bias$", COLUMN_BIAS),
    (r"^vision/merger_fc2/kernel$", ROW),      # [4Dv, D]
    (r"^vision/merger_fc2/bias$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)

GEMMA3_RULES: tuple[Rule, ...] = (
    # language model: [L, ...] stacked decoder layers; q_norm / k_norm act on head_dim (replicated)
    (r"^layers/(input_norm|post_attn_norm|pre_ff_norm|post_ff_norm|q_norm|k_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D], tied: also the unembedding
    (r"^lm_head/kernel$", P(None, MODEL)),
    (r"^norm/scale$", REPLICATED),
    # SigLIP: [Lv, ...] stacked layers with separate q/k/v (head-aligned column splits)
    (r"^vision/layers/(norm1|norm2)/(scale|bias)$", REPLICATED),
    (r"^vision/layers/(q|k|v|fc1)/kernel$", COLUMN),
    (r"^vision/layers/(q|k|v|fc1)/bias$", COLUMN_BIAS),
    (r"^vision/layers/(o|fc2)/kernel$", ROW),
    (r"^vision/layers/(o|fc2)/bias$", REPLICATED),
    (r"^vision/(patch_embed/(kernel|bias)|pos_embed)$", REPLICATED),  # [C*p*p, Dv], [N, Dv]: small
    (r"^vision/(post_norm|projector_norm)/(scale|bias)$", REPLICATED),
    (r"^vision/projector/kernel$", REPLICATED),  # [Dv, D], 3M params: not worth a collective
    (CATCH_ALL, REPLICATED),
)

PIXTRAL_RULES: tuple[Rule, ...] = (
    # language model (Mistral): [L, ...] stacked decoder layers, no biases
    (r"^layers/(input_norm|post_norm)/scale$", REPLICATED),
    (r"^layers/(q|k|v)/kernel$", COLUMN),      # [L, D, H*hd]
    (r"^layers/o/kernel$", ROW),               # [L, H*hd, D]
    (r"^layers/(gate|up)/kernel$", COLUMN),    # [L, D, I]
    (r"^layers/down/kernel$", ROW),            # [L, I, D]
    (r"^embed$", P(MODEL, None)),              # [V, D]
    (r"^lm_head/kernel$", P(None, MODEL)),     # [D, V]
    (r"^norm/scale$", REPLICATED),
    # vision tower: [Lv, ...] stacked blocks with separate q/k/v (head-aligned column splits)
    (r"^vision/blocks/(norm1|norm2)/scale$", REPLICATED),
    (r"^vision/blocks/(q|k|v|gate|up)/kernel$", COLUMN),
    (r"^vision/blocks/(o|down)/kernel$", ROW),
    (r"^vision/(patch_embed/kernel|ln_pre/scale)$", REPLICATED),  # [C*p*p, Dv], [Dv]: small
    # projector: linear -> GELU -> linear, split like an MLP
    (r"^vision/projector_fc1/kernel$", COLUMN),   # [Dv, D]
    (r"^vision/projector_fc1/bias$", COLUMN_BIAS),
    (r"^vision/projector_fc2/kernel$", ROW),      # [D, D]
    (r"^vision/projector_fc2/bias$", REPLICATED),
    (CATCH_ALL, REPLICATED),
)

# Families without a table of their own use GENERIC_RULES (see `rules_for`).
RULES: dict[str, tuple[Rule, ...]] = {
    "qwen2_vl": QWEN2_VL_RULES,
    "gemma3": GEMMA3_RULES,
    "pixtral": PIXTRAL_RULES,
}


def rules_for(family: str) -> tuple[Rule, ...]:
    return RULES.get(family, GENERIC_RULES)


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


def param_specs(params: Mapping, family: str, mesh: Mesh,
                rules: Optional[Sequence[Rule]] = None) -> dict:
    """A pytree of PartitionSpecs shaped like `params` (a pure dict of arrays or ShapeDtypeStructs)."""
    rules = rules_for(family) if rules is None else rules
    flat = flatten_paths(params)
    return unflatten_paths({p: spec_for(p, tuple(x.shape), rules, mesh) for p, x in flat.items()})


def param_shardings(params: Mapping, family: str, mesh: Mesh,
                    rules: Optional[Sequence[Rule]] = None) -> dict:
    """`param_specs` as NamedShardings on `mesh`: the target of a sharded restore or device_put."""
    specs = param_specs(params, family, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def unmatched(params: Mapping, family: str, rules: Optional[Sequence[Rule]] = None) -> list[str]:
    """Parameter paths that only the catch-all rule matches (a new layer nobody wrote a rule for)."""
    rules = rules_for(family) if rules is None else rules
    return [p for p in flatten_paths(params) if rules[match(p, rules)[0]][0] == CATCH_ALL]


def table(params: Mapping, family: str, mesh: Mesh) -> str:
    """A readable 'path shape -> spec (per-device shape)' listing, for logs and reports."""
    rules = rules_for(family)
    lines = []
    for p, x in flatten_paths(params).items():
        spec = spec_for(p, x.shape, rules, mesh)
        local = NamedSharding(mesh, spec).shard_shape(tuple(x.shape))
        lines.append(f"{p:40s} {str(tuple(x.shape)):24s} {str(spec):28s} {tuple(local)}")
    return "\n".join(lines)


__all__ = ["DATA", "MODEL", "COLUMN", "COLUMN_BIAS", "ROW", "REPLICATED", "CATCH_ALL", "GENERIC_RULES",
           "QWEN2_VL_RULES", "GEMMA3_RULES", "PIXTRAL_RULES", "RULES", "rules_for", "match", "spec_for", "param_specs", "param_shardings",
           "unmatched", "table"]
