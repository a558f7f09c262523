"""`jit`: jax.jit with the XLA:CPU option that keeps bfloat16 weights bfloat16 in the layer loop.

XLA:CPU has no bfloat16 dynamic-slice: its float normalization rewrites the slice of a layer out
of the stacked [L, ...] weights as convert-to-float32-then-slice, and while-loop-invariant code
motion then hoists that convert out of the layer scan, so every compiled forward of a bf16 model
first builds a float32 copy of all its stacked weights (twice the bf16 parameter bytes, then bf16
slices converted back from it). Without that hoisting the convert stays fused into each layer's
slice and reads only that layer. Only CPU computations with bfloat16 arguments get the option;
float32 and other backends compile exactly as jax.jit does. See BUILD_NOTES.md, "Real size,
bf16, device-resident sweeps, device check (issue 17)".
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

CPU_BF16_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _has_bf16(tree) -> bool:
    return any(getattr(x, "dtype", None) == jnp.bfloat16 for x in jax.tree.leaves(tree))


class jit:  # noqa: N801 (used like jax.jit)
    """jax.jit(fn, **kwargs) whose calls (and `.lower`) on CPU with a bfloat16 argument compile
    with CPU_BF16_OPTIONS; the choice is made per call from the arguments' dtypes."""

    def __init__(self, fn: Callable, **kwargs):
        self._plain = jax.jit(fn, **kwargs)
        self._bf16_cpu = jax.jit(fn, compiler_options=CPU_BF16_OPTIONS, **kwargs)
        functools.update_wrapper(self, fn)

    def _pick(self, args, kwargs):
        if jax.default_backend() == "cpu" and _has_bf16((args, kwargs)):
            return self._bf16_cpu
        return self._plain

    def __call__(self, *args, **kwargs):
        return self._pick(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick(args, kwargs).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled executables held by both variants (what jax.jit's `_cache_size` counts)."""
        return self._plain._cache_size() + self._bf16_cpu._cache_size()
