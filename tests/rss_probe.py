"""Run as a script by test_memory_bound.py: peak host RSS of `sj.load(HF dir, dtype)` + one forward.

    python tests/rss_probe.py HF_DIR DTYPE   -> prints one JSON line

The baseline is taken after a forward of the same architecture at toy widths (so jax's backend,
XLA's compiler pools and the imports are already paid for), then the model is loaded and run
once; `peak` is VmHWM at the end, its high-water mark reset at the baseline (`/proc/self/clear_refs`),
so a peak of the set-up (imports, the toy compile) cannot count as the load's."""
import dataclasses
import json
import sys

import numpy as np


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))


def main(path: str, dtype: str) -> None:
    import jax
    from flax import nnx

    import spatial_jax as sj
    from spatial_jax.convert.convert import DTYPES, resolve_config
    from spatial_jax.families.qwen2_vl.model import Qwen2VL

    _, cfg, _ = resolve_config(path)
    grid = np.array([[1, 16, 16]])
    n_img = int(grid.prod()) // cfg.merge_size**2
    ids = np.array([[1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
                    + list(range(3, 40))])
    pv = np.random.default_rng(0).standard_normal((int(grid.prod()), cfg.patch_dim)).astype(np.float32)
    batch = sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=grid)
    toy = dataclasses.replace(cfg, vision_dim=32, vision_mlp_dim=64, hidden_size=64, num_heads=4, num_kv_heads=2,
                              head_dim=16, mrope_section=(2, 3, 3), intermediate_size=64)
    graphdef, params = nnx.split(Qwen2VL(toy, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
    sj.forward(sj.Model("qwen2_vl", toy, graphdef, params, dtype, path), batch).logits.block_until_ready()
    del params
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    model = sj.load(path, dtype=dtype)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    sj.forward(model, batch).logits.block_until_ready()
    T, D, I, V = ids.shape[1], cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, Dv = int(grid.prod()), cfg.vision_dim
    # float32 working set of a forward: a few [T, max(4D, 2I)] and [N, 4 Dv] arrays and the logits
    activations = 4 * (3 * T * max(4 * D, 2 * I) + 3 * N * 4 * Dv + T * V)
    print(json.dumps(dict(base=base, peak=_status("VmHWM"), params=param_bytes, activations=activations)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
