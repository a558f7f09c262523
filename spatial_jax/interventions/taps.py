"""Taps: what the model layers call at every site, to intervene and to cache.

A model calls `taps.at(site, h, layer)` at each site of its forward pass. Interventions for that
site run in list order, then the (possibly modified) activation is recorded if the site was
asked for. Inside a layer `scan`, each step records into its own `Taps` (made by `for_step`) and
returns `collected` as the scan output, so the cache leaves the scan as stacked arrays.
"""
from __future__ import annotations

from typing import Sequence

import jax

from spatial_jax.interventions import ops, sites


class Taps:
    def __init__(self, interventions: Sequence[ops.Intervention] = (), cache: Sequence[str] = ()):
        self.interventions = tuple(interventions)
        self.cache_sites = frozenset(sites.check_site(s) for s in cache)
        self.collected: dict[str, jax.Array] = {}

    def at(self, site: str, h: jax.Array, layer: jax.Array | int = 0, rows: jax.Array | None = None) -> jax.Array:
        """h [B, T, D] at `site` (and `layer`) -> h after the interventions that target it.
        rows [B, Q]: h is [B, Q, D], the activations at these positions only."""
        for iv in self.interventions:
            if iv.site == site:
                h = ops.apply(h, iv, layer, rows)
        if site in self.cache_sites:
            self.collected[site] = h
        return h

    def for_step(self, step_sites: frozenset[str]) -> "Taps":
        """A fresh Taps for one scan step that only sees the sites that step runs."""
        return Taps([iv for iv in self.interventions if iv.site in step_sites],
                    [s for s in self.cache_sites if s in step_sites])
