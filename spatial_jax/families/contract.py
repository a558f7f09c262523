"""What a model family is: one `Family` record, and the `VLM` contract its model keeps.

A family lives in one folder, `spatial_jax/families/<name>/`, whose `__init__.py` defines
`FAMILY = Family(...)`; `spatial_jax/families/__init__.py` lists the folders and checks each record
with `check_family` as it registers it, so a family that misses a piece fails at import with a
message, not deep inside a sweep.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import jax

from spatial_jax.data.geometry import Geometry
from spatial_jax.nn.context import LMContext
from spatial_jax.nn.key_maps import KeyMap
from spatial_jax.parallel.rules import GENERIC_RULES, Rule


@runtime_checkable
class VLM(Protocol):
    """The pieces of a model that the runner (spatial_jax/runner.py) calls, in this order:

        x = model.embed_inputs(batch, taps)        # [B, T, D]: token embeddings, visual tokens written in
        ctx = model.lm_context(batch)              # an LMContext (registered dataclass)
        x = layer(x, ctx, taps, l, rows)           # each of the stacked `model.layers`, l = 0 .. L-1
        h = model.final(x, taps, rows)             # final norm (site lm.final)
        logits = model.unembed(h)                  # float32 [..., V]

    plus two staticmethods, `check_batch(cfg, batch)` (host-side input checks, ValueError saying
    what is wrong) and `token_grids(cfg, batch)` ((rows, cols) of visual tokens of each image of
    the batch, in order), and `cfg`, whose num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
    head_dim, vocab_size and image_token_id the runners and checks read.
    """

    cfg: Any
    layers: Any

    def embed_inputs(self, batch, taps) -> jax.Array: ...

    def lm_context(self, batch) -> LMContext: ...

    def final(self, x: jax.Array, taps, rows: jax.Array | None = None) -> jax.Array: ...

    def unembed(self, h: jax.Array) -> jax.Array: ...

    @staticmethod
    def check_batch(cfg, batch) -> None: ...

    @staticmethod
    def token_grids(cfg, batch) -> list[tuple[int, int]]: ...


# The config fields the runners and input checks read.
CONFIG_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "image_token_id")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family, everything the rest of the code looks up about it.

    name: registry key (also `Model.family`).
    config_cls: frozen dataclass with `from_hf(config_json_dict)` and `to_hf() -> dict`.
    model_cls: nnx.Module class built as model_cls(cfg, dtype=, rngs=), keeping the VLM contract.
    processor_cls: class with `from_dir(path)` returning a callable(images=, prompts=, system=) ->
      dict of `Batch` fields, equal to the HF processor.
    claims: config.json dict -> whether it belongs to this family.
    architectures: the HF architecture names it loads (for messages).
    key_map, key_aliases: our parameter paths <- HF tensor names (nn/key_maps.py), and the other
      on-disk spellings of those names.
    geometry: the synthetic datasets' canvas for this model (data/geometry.py).
    prompt_style: the COCO prompt style of the official code ("anchor" or "direct").
    sharding_rules: (path regex -> PartitionSpec) table (parallel/rules.py); GENERIC_RULES if the
      family has none of its own.
    ignored_keys: regexes of HF tensor names the family knowingly does not read (e.g. a vision
      tower's layers above the one whose features it takes); any other unread tensor is an error.
    coco_vertical_first, coco_ties_agree_second: the official COCO-spatial protocol's per-model
      choices (experiments/coco_amplification.py): ask the vertical items first; count a tie of
      the two boxes' positions as agreeing with the second option.
    paper: the paper's reported figures for this family's model, where the experiments compare
      against them ({experiment: {...}}; empty if the paper has none).
    """

    name: str
    config_cls: type
    model_cls: type
    processor_cls: type
    claims: Callable[[Mapping[str, Any]], bool]
    architectures: tuple[str, ...]
    key_map: KeyMap
    key_aliases: tuple[tuple[str, str], ...]
    geometry: Geometry
    prompt_style: str
    sharding_rules: tuple[Rule, ...] = GENERIC_RULES
    ignored_keys: tuple[str, ...] = ()
    coco_vertical_first: bool = False
    coco_ties_agree_second: bool = True
    paper: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


_MODEL_METHODS = ("embed_inputs", "lm_context", "final", "unembed", "check_batch", "token_grids")
_STATIC_METHODS = ("check_batch", "token_grids")


def check_family(family: Family) -> Family:
    """`family` if it has every piece the rest of the code calls; TypeError naming what is missing."""
    where = f"model family {family.name!r}"
    missing = [m for m in _MODEL_METHODS if not callable(getattr(family.model_cls, m, None))]
    if missing:
        raise TypeError(f"{where}: {family.model_cls.__name__} lacks {', '.join(missing)} (the VLM contract, "
                        "spatial_jax/families/contract.py)")
    for name in _STATIC_METHODS:
        if not isinstance(inspect.getattr_static(family.model_cls, name), staticmethod):
            raise TypeError(f"{where}: {family.model_cls.__name__}.{name} must be a staticmethod (cfg, batch)")
    for cls, methods in ((family.config_cls, ("from_hf", "to_hf")), (family.processor_cls, ("from_dir",))):
        missing = [m for m in methods if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"{where}: {cls.__name__} lacks {', '.join(missing)}")
    if dataclasses.is_dataclass(family.config_cls):
        names = {f.name for f in dataclasses.fields(family.config_cls)} | set(dir(family.config_cls))
        missing = [f for f in CONFIG_FIELDS if f not in names]
        if missing:
            raise TypeError(f"{where}: config {family.config_cls.__name__} lacks {', '.join(missing)}")
    else:
        raise TypeError(f"{where}: config_cls {family.config_cls.__name__} must be a dataclass")
    if not callable(family.claims):
        raise TypeError(f"{where}: claims must be a callable(config.json dict) -> bool")
    if not family.key_map or not all(len(entry) == 3 for entry in family.key_map):
        raise TypeError(f"{where}: key_map must be a non-empty table of (our path, HF name, transform)")
    if family.prompt_style not in ("anchor", "direct"):
        raise TypeError(f"{where}: prompt_style must be 'anchor' or 'direct', got {family.prompt_style!r}")
    if not isinstance(family.geometry, Geometry) or family.geometry.name != family.name:
        raise TypeError(f"{where}: geometry must be a data.geometry.Geometry named {family.name!r}")
    if not family.sharding_rules or family.sharding_rules[-1][0] != r".*":
        raise TypeError(f"{where}: sharding_rules must end with the catch-all rule (parallel.rules.CATCH_ALL)")
    return family


def architectures_of(hf_config: Mapping[str, Any]) -> Sequence[str]:
    return tuple(hf_config.get("architectures") or ())
