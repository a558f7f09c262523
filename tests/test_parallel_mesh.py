"""Meshes from --mesh strings, the default mesh, and the sharding-rule tables (no model runs)."""
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
from absl.testing import flagsaver  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from spatial_jax import families
from spatial_jax.families import Family
from spatial_jax.tree_paths import flatten_paths  # noqa: E402
from experiments import mesh_flags  # noqa: E402
from spatial_jax import parallel  # noqa: E402
from spatial_jax.parallel import rules  # noqa: E402

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: "
                            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")


@pytest.mark.parametrize("spec,n,want", [
    ("data:4,model:2", 8, (4, 2)),
    ("model:2,data:4", 8, (4, 2)),
    ("data:-1,model:2", 8, (4, 2)),
    ("model:-1", 8, (1, 8)),
    ("data:8", 8, (8, 1)),
    (" data : 2 , model : 1 ", 2, (2, 1)),
    ("data:3", 3, (3, 1)),
])
def test_parse_mesh_spec(spec, n, want):
    sizes = parallel.parse_mesh_spec(spec, n)
    assert (sizes["data"], sizes["model"]) == want


@pytest.mark.parametrize("spec,n,msg", [
    ("data:4,model:4", 8, "16 devices"),
    ("data:3,model:-1", 8, "do not divide"),
    ("data:-1,model:-1", 8, "only one axis"),
    ("batch:8", 8, "AXIS:SIZE"),
    ("data:x", 8, "not an integer"),
    ("data:0", 8, ">= 1"),
    ("data:2,data:4", 8, "twice"),
    ("data8", 8, "AXIS:SIZE"),
])
def test_parse_mesh_spec_errors(spec, n, msg):
    with pytest.raises(ValueError, match=msg):
        parallel.parse_mesh_spec(spec, n)


def test_default_mesh_all_data_unless_the_model_does_not_fit():
    assert parallel.default_mesh_sizes(8) == {"data": 8, "model": 1}  # nothing known: all data
    assert parallel.default_mesh_sizes(8, 16 * 2**30, None) == {"data": 8, "model": 1}  # CPU: no limit known
    gib = 2**30
    # Qwen2-VL-7B in bf16 (16.6 GB) on 80 GB devices: fits one device -> all data
    assert parallel.default_mesh_sizes(8, int(16.6e9), 80 * gib) == {"data": 8, "model": 1}
    # in float32 (33 GB) on 40 GB devices: half of 40 GB is the budget -> model 2
    assert parallel.default_mesh_sizes(8, int(33.2e9), 40 * gib) == {"data": 4, "model": 2}
    # on 16 GiB devices (budget 8.6 GB): 33.2 / 4 = 8.3 GB fits -> model 4
    assert parallel.default_mesh_sizes(8, int(33.2e9), 16 * gib) == {"data": 2, "model": 4}
    # on 12 GiB devices (budget 6.4 GB): 8.3 GB does not, 33.2 / 8 = 4.2 GB does -> model 8
    assert parallel.default_mesh_sizes(8, int(33.2e9), 12 * gib) == {"data": 1, "model": 8}
    # never fits: everything on model
    assert parallel.default_mesh_sizes(4, 10**12, 16 * gib) == {"data": 1, "model": 4}
    # 6 devices: divisors 1, 2, 3, 6
    assert parallel.default_mesh_sizes(6, 20 * gib, 16 * gib) == {"data": 2, "model": 3}


@needs8
def test_make_mesh_axes_and_types():
    mesh = parallel.make_mesh("data:4,model:2")
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh("").shape) == {"data": 8, "model": 1}  # CPU: all on data
    assert dict(parallel.single_device_mesh().shape) == {"data": 1, "model": 1}
    assert parallel.describe(mesh).startswith("data:4,model:2 over 8 cpu devices")


@needs8
def test_setup_from_flags_without_parsed_argv():
    with flagsaver.flagsaver(mesh="data:2,model:4"):
        mesh = mesh_flags.setup_from_flags()
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    with flagsaver.flagsaver(mesh=""):
        assert dict(mesh_flags.setup_from_flags(param_bytes=10**6).shape) == {"data": 8, "model": 1}


class _Mesh:
    """Stands in for a mesh in spec_for (it only reads .shape)."""

    def __init__(self, data, model):
        self.shape = {"data": data, "model": model}


def test_specs_are_right_aligned_and_fall_back_when_not_divisible():
    mesh = _Mesh(2, 4)
    r = families.get("qwen2_vl").sharding_rules
    assert rules.spec_for("layers/q/kernel", (28, 3584, 3584), r, mesh) == P(None, None, "model")
    assert rules.spec_for("layers/o/kernel", (28, 3584, 3584), r, mesh) == P(None, "model")
    assert rules.spec_for("layers/q/bias", (28, 3584), r, mesh) == P(None, "model")
    assert rules.spec_for("embed", (152064, 3584), r, mesh) == P("model")
    assert rules.spec_for("lm_head/kernel", (3584, 152064), r, mesh) == P(None, "model")
    assert rules.spec_for("layers/input_norm/scale", (28, 3584), r, mesh) == P()
    # 6 columns do not divide by model 4: left unsharded instead of failing
    assert rules.spec_for("layers/k/kernel", (2, 8, 6), r, mesh) == P()
    # data never shards weights
    assert all("data" not in str(spec) for _, spec in r)


def test_qwen2_vl_7b_rules_cover_every_param_and_split_heads_and_mlp():
    """Qwen2-VL-7B's real widths (2 of its 28 LM layers and 2 of its 32 vision blocks, scaled up)."""
    import jax.numpy as jnp
    from flax import nnx

    from spatial_jax.convert.convert import abstract_model
    from spatial_jax.families.qwen2_vl import model as qwen2_vl
    from spatial_jax.families import FAMILIES

    cfg = qwen2_vl.Qwen2VLConfig(
        vision_depth=2, vision_dim=1280, vision_heads=16, vision_mlp_dim=5120, patch_size=14,
        temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=10000.0, vocab_size=152064,
        hidden_size=3584, num_layers=2, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
        rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=False,
        image_token_id=151655, vision_start_token_id=151652, vision_end_token_id=151653)
    params = nnx.to_pure_dict(nnx.state(abstract_model(FAMILIES["qwen2_vl"], cfg, jnp.bfloat16)))
    assert rules.unmatched(params, families.get("qwen2_vl").sharding_rules) == []
    specs = flatten_paths(rules.param_specs(params, families.get("qwen2_vl").sharding_rules, _Mesh(2, 4)))
    depth = lambda p: 14 if p.startswith("layers/") else 16 if p.startswith("vision/blocks/") else 1  # noqa: E731
    count = {p: int(np.prod(x.shape)) * depth(p) for p, x in flatten_paths(params).items()}
    total = sum(count.values())
    sharded = sum(n for p, n in count.items() if "model" in str(specs[p]))
    assert 8.2e9 < total < 8.4e9  # the 8.3B model
    assert sharded / total > 0.9  # >90% of it is split over `model`


def test_generic_rules_follow_shared_layer_names():
    mesh = _Mesh(1, 2)
    g = rules.GENERIC_RULES
    want = {
        "layers/q/kernel": ((4, 64, 96), P(None, None, "model")),
        "layers/q_norm/scale": ((4, 24), P()),
        "layers/post_ff_norm/scale": ((4, 64), P()),
        "layers/down/kernel": ((4, 128, 64), P(None, "model")),
        "vision/layers/fc1/bias": ((2, 48), P(None, "model")),
        "vision/layers/o/bias": ((2, 32), P()),
        "embed": ((128, 64), P("model")),
        "vision/pos_embed": ((36, 32), P()),  # catch-all
    }
    for path, (shape, spec) in want.items():
        assert rules.spec_for(path, shape, g, mesh) == spec, path
    assert Family.__dataclass_fields__["sharding_rules"].default is rules.GENERIC_RULES


def test_gemma3_rules_cover_every_param():
    pytest.importorskip("spatial_jax.families.gemma3.model")
    from spatial_jax.families import FAMILIES
    if "gemma3" not in FAMILIES:
        pytest.skip("gemma3 is not registered yet")
    from flax import nnx
    import jax.numpy as jnp

    from spatial_jax.convert.convert import abstract_model
    import fixtures_gemma3 as fg

    fam = FAMILIES["gemma3"]
    cfg = fam.config_cls.from_hf(fg.tiny_hf_config().to_dict())
    params = nnx.to_pure_dict(nnx.state(abstract_model(fam, cfg, jnp.float32)))
    assert rules.unmatched(params, families.get("gemma3").sharding_rules) == []
