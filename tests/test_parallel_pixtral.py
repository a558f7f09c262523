"""Sharded Pixtral on 8 simulated CPU devices: its rule table covers every parameter, and a sharded
forward (images of three sizes, every site family) equals the single-device one. Sharded sweeps run
the same family-agnostic code as Qwen2-VL's and Gemma 3's (tests/test_parallel_*.py)."""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # tests/conftest.py normally sets this for the whole suite
    _flag = "--xla_force_host_platform_device_count"
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import fixtures_pixtral as fp  # noqa: E402
from fixtures_pixtral import pixtral_ckpts  # noqa: E402,F401  (session fixture)
import spatial_jax as sj  # noqa: E402
from spatial_jax import families
from spatial_jax import parallel  # noqa: E402
from spatial_jax.parallel import rules  # noqa: E402
from spatial_jax.tree_paths import flatten_paths  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def assert_close(got, want, what=""):
    """max |got - want| <= max(1e-5, 1e-6 * max |want|): splitting the row-parallel matmuls' sums
    over `model` reorders float32 additions (a data-only mesh gives exactly 0)."""
    got, want = np.asarray(got), np.asarray(want)
    err, bound = np.abs(got - want).max(), max(1e-5, 1e-6 * np.abs(want).max())
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


def _inputs(seed: int):
    prompts = [[[20, 21], (32, 48), [22, 23]], [[24], (48, 32), [25, 26, 27]],
               [[28, 29, 30], (32, 48), [31]], [[32], (16, 32), [33, 34]]]
    return fp.to_batch(fp.make_inputs(prompts, seed=seed))


def test_sharded_pixtral_forward_equals_single_device(pixtral_ckpts):
    single = pixtral_ckpts.model()
    mesh = parallel.make_mesh("data:4,model:2")
    model = sj.load(pixtral_ckpts.hf_dir(), mesh=mesh)
    pure = nnx.to_pure_dict(model.params)
    flat = flatten_paths(pure)
    assert rules.unmatched(pure, families.get("pixtral").sharding_rules) == []
    for path, x in flat.items():
        want = NamedSharding(mesh, rules.spec_for(path, x.shape, families.get("pixtral").sharding_rules, mesh))
        assert x.sharding.is_equivalent_to(want, x.ndim), path
    local = {p: x.addressable_shards[0].data.shape for p, x in flat.items()}
    for path, axis in (("layers/q/kernel", -1), ("vision/blocks/q/kernel", -1), ("layers/down/kernel", -2),
                       ("lm_head/kernel", -1), ("vision/projector_fc1/kernel", -1)):
        assert local[path][axis] * 2 == flat[path].shape[axis], path

    clean = _inputs(0)
    cache = ("lm.resid_post", "vision.tokens", "vision.block_out")
    ref, got = sj.forward(single, clean, cache=cache), sj.forward(model, clean, cache=cache)
    assert_close(parallel.to_host(got.logits), ref.logits, "logits")
    for site in cache:
        assert_close(parallel.to_host(got.cache[site]), ref.cache[site], site)

