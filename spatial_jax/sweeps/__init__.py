"""Sweeps over many patched variants of one batch: `patch_sweep` (the engine) and the paper's
last-token and region-swap sweeps built on it."""
