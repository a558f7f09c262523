"""Loading a model and running it: `load`, `apply` (pure, jittable) and `forward` (jitted).

`apply(graphdef, params, batch, interventions, cache)` is a pure function of arrays, so it can
be jitted, vmapped over interventions, differentiated and sharded; `forward` is its jitted form
bound to a loaded `Model`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax import families, parallel, validation
from spatial_jax.batch import Batch, last_positions
from spatial_jax.convert import checkpoint, hub
from spatial_jax.convert.convert import DTYPES, abstract_model, convert_hf, resolve_config
from spatial_jax.interventions.ops import Intervention
from spatial_jax.interventions.taps import Taps
from spatial_jax.jitting import jit
from spatial_jax.runner import run
from spatial_jax.tree_paths import flatten_paths


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """logits [B, T, V] float32 (None when not asked for); cache: site -> array (see sites)."""

    logits: Optional[jax.Array]
    cache: dict[str, jax.Array]


@dataclasses.dataclass
class Model:
    """A loaded model: the module's graph definition, its parameters and where it came from."""

    family: str
    config: Any
    graphdef: nnx.GraphDef
    params: nnx.State
    dtype: str
    path: str
    _processor: Any = dataclasses.field(default=None, repr=False)
    # The device mesh the params are sharded on (`load(..., mesh=)`); None: one device.
    mesh: Optional[jax.sharding.Mesh] = None

    @property
    def processor(self):
        """The family's processor (image preprocessing + chat template) from the checkpoint dir."""
        if self._processor is None:
            self._processor = families.get(self.family).processor_cls.from_dir(self.path)
        return self._processor

    def prepare(self, images: Sequence[Any], prompts: Sequence[str], system: Optional[str] = None) -> Batch:
        """PIL images (one entry per prompt: an image, a list of them, or None) and user prompts ->
        a padded `Batch`."""
        return Batch(**self.processor(images=images, prompts=prompts, system=system))


def load(path: str, dtype: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None) -> Model:
    """A converted checkpoint dir, a HF model dir (converted in memory, `dtype` default float32),
    or a hub id `org/name[@revision]` (fetched into the HF cache; `convert.hub.resolve`).

    dtype: "float32", "bfloat16" or "float64" (or an alias such as "bf16", or the dtype itself);
    float64 (norms, softmax, RoPE and logits too) needs jax_enable_x64, for exact parity checks.

    mesh: place every parameter with its family's sharding rule (spatial_jax.parallel.rules). A
    converted checkpoint is restored by Orbax straight into those shardings: each device reads
    only its own shard, and no full weight is ever assembled on one device.
    """
    path = hub.resolve(path)
    dtype = None if dtype is None else validation.dtype_name(dtype)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax.config.update('jax_enable_x64', True) before anything runs")
    shardings = None
    if mesh is not None:
        family, cfg, _ = resolve_config(path)
        target = nnx.to_pure_dict(nnx.state(abstract_model(family, cfg, jnp.float32)))
        shardings = parallel.param_shardings(target, family.sharding_rules, mesh)
    if checkpoint.is_converted(path):
        # Restored straight into jax arrays on the device(s), never a numpy tree that every
        # jitted call would copy to the device again.
        family, cfg, _, stored_dtype, params = checkpoint.read_converted(path, shardings)
        if dtype is not None and dtype != stored_dtype:
            _cast_in_place(params, DTYPES[dtype])  # keeps each sharding
        dtype = dtype or stored_dtype
    else:
        dtype = dtype or "float32"
        # Each tensor goes to its device(s) as soon as it is read, so the host never holds a
        # second full copy of the params; on CPU, device_put adopts convert_hf's aligned
        # buffer without a copy (the host array is dropped at once, never written again).
        flat_shardings = None if shardings is None else flatten_paths(shardings)
        place = ((lambda p, x: jax.device_put(x)) if shardings is None
                 else (lambda p, x: parallel.place_param(x, flat_shardings[p])))
        family, cfg, _, params = convert_hf(path, dtype, place=place)
    graphdef, state = nnx.split(abstract_model(family, cfg, DTYPES[dtype]))
    nnx.replace_by_pure_dict(state, params)
    return Model(family.name, cfg, graphdef, state, dtype, path, mesh=mesh)


def _cast_in_place(tree: dict, dtype) -> None:
    """Casts every leaf of a nested dict to dtype, each old leaf dropped as soon as its cast
    exists (a tree-wide astype would hold the whole tree in both dtypes at once)."""
    for key in list(tree):
        if isinstance(tree[key], dict):
            _cast_in_place(tree[key], dtype)
        else:
            tree[key] = tree[key].astype(dtype)


def apply(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
          interventions: Sequence[Intervention] = (), cache: Sequence[str] = (),
          logits: bool = True) -> Output:
    """Pure forward pass: runs the interventions in list order and returns the asked-for sites."""
    module = nnx.merge(graphdef, params)
    taps = Taps(interventions, cache)
    final = run(module, batch.with_defaults(), taps)
    return Output(module.unembed(final) if logits else None, taps.collected)


_apply_jit = jit(apply, static_argnames=("graphdef", "cache", "logits"))


def _checked(model: Model, batch: Batch, interventions, *rows) -> tuple:
    """The inputs checked on the host, then (on a mesh) placed: the batch's rows over `data`, the
    interventions and the extra arrays `rows` replicated, all as global arrays (multi-host safe).
    Returns (batch, interventions, *rows)."""
    batch = batch.with_defaults()
    validation.check_batch(model, batch)
    interventions = validation.intervention_list(interventions)
    validation.check_interventions(model.config, np.shape(batch.input_ids), interventions)
    if model.mesh is not None:
        batch = parallel.shard_batch(batch, model.mesh)
        rows = tuple(parallel.put_tree(r, model.mesh) for r in rows)
        interventions = parallel.put_tree(interventions, model.mesh)
    return (batch, interventions, *rows)


def forward(model: Model, batch: Batch, cache: str | Sequence[str] = (),
            interventions: Optional[Sequence[Intervention]] = None, logits: bool = True) -> Output:
    """Jitted `apply` on a loaded model. cache: site names (one name is one site); see
    docs/design.md, "Sites", for shapes. Inputs are checked on the host first (validation)."""
    cache = validation.site_names(cache)
    batch, interventions = _checked(model, batch, interventions)
    return _apply_jit(model.graphdef, model.params, batch, interventions, tuple(cache), logits)


def _next_token_logits(graphdef, params, batch: Batch, interventions, position) -> jax.Array:
    module = nnx.merge(graphdef, params)
    return module.unembed(run(module, batch, Taps(interventions), rows=position[:, None])[:, 0])


_next_token_jit = jit(_next_token_logits, static_argnames=("graphdef",))


def next_token_logits(model: Model, batch: Batch, interventions: Optional[Sequence[Intervention]] = None) -> jax.Array:
    """Logits [B, V] float32 of the token after each row's last real token: the last layer's
    queries and MLP, the final norm and the unembedding run at that position only (a tenth of a
    forward on a 150k vocabulary is not spent on the rest)."""
    position = last_positions(batch.with_defaults().attention_mask)
    batch, interventions, position = _checked(model, batch, interventions, position)
    return _next_token_jit(model.graphdef, model.params, batch, interventions, position)
