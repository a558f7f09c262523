"""spatial_jax: Flax ports of vision-language models with explicit intervention points.

    import spatial_jax as sj
    model = sj.load(path)
    batch = model.prepare(images=[img], prompts=["The color of ..."])
    out = sj.forward(model, batch, cache=("lm.resid_post",), interventions=[...])
"""
from spatial_jax.batch import Batch, last_positions
from spatial_jax.forward import Model, Output, apply, forward, load, next_token_logits
from spatial_jax.interventions.ops import Intervention, mask_index
from spatial_jax.interventions.sites import ALL_SITES
from spatial_jax.sweeps.attribution import AttributionResult, attribution_sweep
from spatial_jax.sweeps.paper_sweeps import last_token_sweep, region_swap_sweep, swap_index
from spatial_jax.sweeps.sweep import Readout, SweepResult, patch_sweep

__all__ = ["Batch", "Model", "Output", "apply", "forward", "load", "Intervention", "mask_index",
           "ALL_SITES", "next_token_logits", "Readout", "SweepResult", "last_positions", "patch_sweep", "last_token_sweep",
           "region_swap_sweep", "swap_index", "AttributionResult", "attribution_sweep"]
