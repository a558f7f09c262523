"""Loading a model and running it: `load`, `apply` (pure, jittable) and `forward` (jitted).

`apply(graphdef, params, batch, interventions, cache)` is a pure function of arrays, so it can
be jitted, vmapped over interventions, differentiated and sharded; `forward` is its jitted form
bound to a loaded `Model`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.batch import Batch
from spatial_jax.convert import checkpoint
from spatial_jax.convert.convert import DTYPES, abstract_model, convert_hf
from spatial_jax.interventions import sites
from spatial_jax.interventions.ops import Intervention
from spatial_jax.interventions.taps import Taps
from spatial_jax.models.layers import run_layers
from spatial_jax.models.registry import FAMILIES


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

    @property
    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    @property
    def processor(self):
        """The family's processor (image preprocessing + chat template) from the checkpoint dir."""
        if self._processor is None:
            from spatial_jax.processing import for_family
            self._processor = for_family(self.family).from_dir(self.path)
        return self._processor

    def prepare(self, images: Sequence[Any], prompts: Sequence[str], system: Optional[str] = None) -> Batch:
        """PIL images (one, a list, or None per prompt) and user prompts -> a padded `Batch`."""
        return Batch(**self.processor(images=images, prompts=prompts, system=system))


def load(path: str, dtype: Optional[str] = None) -> Model:
    """A converted checkpoint dir, or a HF model dir (converted in memory, `dtype` default float32)."""
    if checkpoint.is_converted(path):
        family, cfg, _, stored_dtype, params = checkpoint.read_converted(path)
        if dtype is not None and dtype != stored_dtype:
            params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
        dtype = dtype or stored_dtype
    else:
        dtype = dtype or "float32"
        family, cfg, _, params = convert_hf(path, dtype)
    graphdef, state = nnx.split(abstract_model(family, cfg, DTYPES[dtype]))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return Model(family.name, cfg, graphdef, state, dtype, path)


def apply(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
          interventions: Sequence[Intervention] = (), cache: Sequence[str] = (),
          logits: bool = True) -> Output:
    """Pure forward pass: runs the interventions in list order and returns the asked-for sites."""
    module = nnx.merge(graphdef, params)
    taps = Taps(interventions, cache)
    batch = batch.with_defaults()
    x = module.embed_inputs(batch, taps)
    x = run_layers(module.layers, x, module.lm_context(batch), taps)
    final = module.final(x, taps)
    return Output(module.unembed(final) if logits else None, taps.collected)


_apply_jit = jax.jit(apply, static_argnames=("graphdef", "cache", "logits"))


def check_batch(model: Model, batch: Batch) -> None:
    """Host-side checks with messages a person can act on (shapes only; no tracers needed)."""
    ids = batch.input_ids
    if np.ndim(ids) != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {np.shape(ids)}")
    if batch.attention_mask is not None and np.shape(batch.attention_mask) != np.shape(ids):
        raise ValueError(f"attention_mask shape {np.shape(batch.attention_mask)} != input_ids {np.shape(ids)}")
    FAMILIES[model.family].model_cls.check_batch(model.config, batch)


def forward(model: Model, batch: Batch, cache: Sequence[str] = (),
            interventions: Optional[Sequence[Intervention]] = None, logits: bool = True) -> Output:
    """Jitted `apply` on a loaded model. cache: site names; see DESIGN.md for shapes."""
    for s in cache:
        sites.check_site(s)
    check_batch(model, batch)
    return _apply_jit(model.graphdef, model.params, batch, tuple(interventions or ()), tuple(cache), logits)
