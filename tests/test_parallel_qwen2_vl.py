"""Sharded Qwen2-VL on 8 simulated CPU devices: every parameter has its rule's sharding, a
restore into a mesh never builds a full weight on one device, and sharded forwards and sweeps
equal the single-device results (1e-5)."""
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

import fixtures_qwen2_vl as fq  # noqa: E402
import sharded_restore  # noqa: E402
from spatial_jax import families
from spatial_jax.tree_paths import flatten_paths  # noqa: E402
import spatial_jax as sj  # noqa: E402
from spatial_jax import parallel  # noqa: E402
from spatial_jax.convert.checkpoint import write_converted  # noqa: E402
from spatial_jax.convert.convert import convert_hf  # noqa: E402
from spatial_jax.parallel import rules  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")
TOL = 1e-5


@pytest.fixture(scope="module")
def converted(tiny_qwen2_vl_dir, tmp_path_factory) -> str:
    """The tiny HF checkpoint converted to an Orbax dir, as `spatial-jax-convert` writes it."""
    out = str(tmp_path_factory.mktemp("parallel") / "qwen2_vl_converted")
    family, _, _, params = convert_hf(tiny_qwen2_vl_dir, "float32")
    write_converted(out, tiny_qwen2_vl_dir, family.name, "float32", params)
    return out


@pytest.fixture(scope="module")
def single(converted) -> sj.Model:
    return sj.load(converted)  # one device, no mesh


def _inputs(seed: int = 0):
    """Four left-padded prompts with images of different shapes (B = 4)."""
    prompts = [[[5, 6], fq.image(4, 4), [7, 8, 9]],
               [[10], fq.image(4, 6), [11, 12]],
               [[13, 14, 15], fq.image(6, 4), [16]],
               [[17], fq.image(2, 4), [18, 19, 20, 21]]]
    return fq.to_batch(fq.make_inputs(prompts, seed=seed))


def _flat_params(model):
    return flatten_paths(nnx.to_pure_dict(model.params))


# ----------------------------------------------------------------------------------------------
# Placement


def test_every_param_has_its_rule_sharding(converted):
    mesh = parallel.make_mesh("data:2,model:4")
    model = sj.load(converted, mesh=mesh)
    flat = _flat_params(model)
    assert rules.unmatched(nnx.to_pure_dict(model.params), families.get("qwen2_vl").sharding_rules) == []
    for path, x in flat.items():
        want = NamedSharding(mesh, rules.spec_for(path, x.shape, families.get("qwen2_vl").sharding_rules, mesh))
        assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)
        for shard in x.addressable_shards:
            assert shard.data.shape == want.shard_shape(x.shape), path
    # The rules, spelled out for the tiny config (D 64, 4 heads x 16, 2 KV heads, I 112, V 128;
    # vision Dv 48, MLP 96, merger 192): per-device shapes with model = 4.
    local = {p: tuple(x.addressable_shards[0].data.shape) for p, x in flat.items()}
    assert local["embed"] == (32, 64)                        # vocabulary over model
    assert local["lm_head/kernel"] == (64, 32)
    assert local["layers/q/kernel"] == (3, 64, 16)           # heads over model
    assert local["layers/k/kernel"] == (3, 64, 8)
    assert local["layers/q/bias"] == (3, 16)
    assert local["layers/o/kernel"] == (3, 16, 64)
    assert local["layers/gate/kernel"] == local["layers/up/kernel"] == (3, 64, 28)  # MLP width
    assert local["layers/down/kernel"] == (3, 28, 64)
    assert local["layers/input_norm/scale"] == (3, 64)       # norms replicated
    assert local["norm/scale"] == (64,)
    assert local["vision/blocks/fc1/kernel"] == (2, 48, 24)
    assert local["vision/blocks/fc2/kernel"] == (2, 24, 48)
    assert local["vision/blocks/fc2/bias"] == (2, 48)        # row-parallel bias replicated
    assert local["vision/blocks/qkv/kernel"] == (2, 48, 144)  # fused qkv replicated
    assert local["vision/merger_fc1/kernel"] == (192, 48)
    assert local["vision/merger_fc2/kernel"] == (48, 64)


def test_restore_reads_shard_by_shard(converted, monkeypatch):
    """Orbax puts only shard-sized host buffers on devices, nothing is gathered to the host,
    and no new live array holds a full copy of a model-sharded weight."""
    mesh = parallel.make_mesh("data:2,model:4")
    sharded_restore.load_shard_by_shard(converted, mesh, monkeypatch)


def test_dtype_cast_and_hf_dir_keep_the_rule_shardings(converted, tiny_qwen2_vl_dir):
    mesh = parallel.make_mesh("data:4,model:2")
    for model in (sj.load(converted, dtype="bfloat16", mesh=mesh), sj.load(tiny_qwen2_vl_dir, mesh=mesh)):
        assert model.mesh is mesh
        for path, x in _flat_params(model).items():
            want = NamedSharding(mesh, rules.spec_for(path, x.shape, families.get("qwen2_vl").sharding_rules, mesh))
            assert x.sharding.is_equivalent_to(want, x.ndim), path
    assert str(_flat_params(sj.load(converted, dtype="bfloat16", mesh=mesh))["embed"].dtype) == "bfloat16"


# ----------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("spec", ["data:4,model:2", "data:1,model:8"])
def test_sharded_forward_equals_single_device(converted, single, spec):
    mesh = parallel.make_mesh(spec)
    model = sj.load(converted, mesh=mesh)
    batch = _inputs()
    cache = ("lm.resid_post", "lm.final", "vision.tokens")
    ref = sj.forward(single, batch, cache=cache)
    got = sj.forward(model, batch, cache=cache)
    assert got.logits.sharding.mesh == mesh
    if spec == "data:4,model:2":  # rows over data, vocabulary over model
        assert got.logits.sharding.spec[0] == "data"
    np.testing.assert_allclose(parallel.to_host(got.logits), np.asarray(ref.logits), atol=TOL, rtol=0)
    for site in cache:
        np.testing.assert_allclose(parallel.to_host(got.cache[site]), np.asarray(ref.cache[site]),
                                   atol=TOL, rtol=0, err_msg=site)
    if spec != "data:4,model:2":
        return
    # text only, with an intervention (placed as global arrays by forward)
    ids = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    iv = sj.Intervention(site="lm.resid_pre", op="add", layer=np.int32(1), source=np.ones(64, np.float32),
                         alpha=0.5, index=np.tile(np.arange(6), (2, 1)))
    np.testing.assert_allclose(parallel.to_host(sj.forward(model, sj.Batch(input_ids=ids), interventions=[iv]).logits),
                               np.asarray(sj.forward(single, sj.Batch(input_ids=ids), interventions=[iv]).logits),
                               atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Sweeps


def _swap_maps(batch):
    """[R=2, B, T] source-index maps: the first two and last two image tokens swapped (criss-cross),
    and every image token read from the counterfactual."""
    ids = np.asarray(batch.input_ids)
    B, T = ids.shape
    out = np.full((2, B, T), -1, np.int32)
    for b in range(B):
        pos = np.flatnonzero(ids[b] == fq.IMAGE_PAD)
        out[0, b] = sj.swap_index(T, [(pos[:2], pos[-2:])])
        out[1, b, pos] = pos
    return out


def test_sharded_sweep_equals_single_device(converted, single):
    clean, cf = _inputs(seed=0), _inputs(seed=1)
    index = _swap_maps(clean)
    tokens = np.array([3, 4, 5])
    ref = sj.region_swap_sweep(single, clean, cf, index, tokens, chunk_size=3)
    mesh = parallel.make_mesh("data:4,model:2")
    sharded = sj.load(converted, mesh=mesh)
    got = sj.region_swap_sweep(sharded, clean, cf, index, tokens, chunk_size=3)  # unchanged call
    assert got.logits.shape == ref.logits.shape == (single.config.num_layers + 1, 2, 4, 3)
    np.testing.assert_allclose(got.logits, ref.logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.probs, ref.probs, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got.argmax, ref.argmax)


def test_data_parallel_vision_site_sweep_equals_single_device(single):
    """A vision-site sweep runs every variant's full forward (vision tower included)."""
    clean, cf = _inputs(seed=0), _inputs(seed=1)
    src = np.asarray(sj.forward(single, cf, cache=("vision.block_out",), logits=False).cache["vision.block_out"])
    Lv, N = src.shape[1], src.shape[2]
    n = 6  # variants: block 0/1 x three patch masks
    layer = np.repeat(np.arange(Lv), 3)
    index = np.full((n, 1, N), -1, np.int32)
    for i in range(n):
        sel = np.arange(i % 3, N, 3)
        index[i, 0, sel] = sel
    iv = sj.Intervention(site="vision.block_out", op="replace", layer=layer, index=index,
                         source=np.broadcast_to(src[:, layer].transpose(1, 0, 2, 3), (n, 1, N, src.shape[-1])))
    readout = sj.Readout(sj.last_positions(clean.attention_mask), np.array([1, 2]))
    ref = sj.patch_sweep(single, clean, [iv], readout, chunk_size=4)
    # A mesh given to the sweep of an unsharded model: the params are placed by the rules (all
    # replicated on a data-only mesh) and each chunk's variants go over the 8 devices.
    got = sj.patch_sweep(single, clean, [iv], readout, chunk_size=4, mesh=parallel.make_mesh("data:8"))
    np.testing.assert_allclose(got.logits, ref.logits, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got.argmax, ref.argmax)
