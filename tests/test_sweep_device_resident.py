"""patch_sweep keeps the clean run's residual stack on the device(s): results equal the loop of
single forwards on one device and on 8 simulated devices (conftest), nothing of the stack's size
reaches the host, and the stack counts in the chunk's memory budget."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spatial_jax as sj
from spatial_jax import parallel
from spatial_jax.sweeps import sweep as sweep_mod
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig

IMG, VS, VE = 60, 61, 62
GRID = np.array([[1, 4, 6]])
N_TOK = 6
CFG = Qwen2VLConfig(vision_depth=2, vision_dim=32, vision_heads=4, vision_mlp_dim=64, patch_size=14,
                    temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4, vocab_size=64,
                    hidden_size=48, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=80,
                    rms_norm_eps=1e-6, rope_theta=1e4, mrope_section=(2, 2, 2), tie_word_embeddings=False,
                    image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE)


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(Qwen2VL(CFG, rngs=nnx.Rngs(3)))
    return sj.Model("qwen2_vl", CFG, graphdef, params, "float32", "")


def _batch(seed, rows=8):
    rng = np.random.default_rng(seed)
    ids = np.stack([[3 + r % 5, 4, VS] + [IMG] * N_TOK + [VE, 5 + r % 7, 6, 7] for r in range(rows)])
    pv = rng.standard_normal((rows * int(GRID.prod()), 1176)).astype(np.float32)
    return sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=np.repeat(GRID, rows, 0))


def _sweep(model, clean, cf):
    """Layers x two masks of image tokens replaced from the counterfactual's resid_pre; each
    mask starts after a few unchanged positions (so prefixes are used)."""
    L = CFG.num_layers
    src = np.asarray(sj.forward(model, cf, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    at_img = np.asarray(clean.input_ids) == IMG
    pos = np.arange(at_img.shape[1])
    masks = np.stack([np.where(at_img & (pos >= 3 + k * 3), pos, -1) for k in range(2)])  # [2, B, T]
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=np.repeat(np.arange(L), 2).reshape(L, 2),
                         index=np.broadcast_to(masks, (L,) + masks.shape),
                         source=np.broadcast_to(np.moveaxis(src, 1, 0)[:, None], (L, 2) + src[:, 0].shape))
    readout = sj.Readout(sj.last_positions(np.ones(at_img.shape)), np.array([1, 2, 3]))
    return iv, readout, src, masks


def _loop(model, clean, iv, readout):
    L = iv.layer.shape[0]
    out = np.zeros((L, 2) + readout.position.shape + (3,), np.float32)
    for layer in range(L):
        for k in range(2):
            one = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=iv.index[layer, k],
                                  source=iv.source[layer, k])
            logits = np.asarray(sj.forward(model, clean, interventions=[one]).logits)
            out[layer, k] = logits[np.arange(len(readout.position)), readout.position][:, readout.tokens]
    return out


class _HostSpy:
    """Records the shape of every jax array the sweep brings to the host (parallel.to_host and
    np.asarray / __array__ on a jax.Array)."""

    def __init__(self, monkeypatch):
        self.shapes = []
        to_host = parallel.to_host
        array_cls = type(jnp.zeros(1))
        to_numpy = array_cls.__array__

        def spy_to_host(x):
            self.shapes += [np.shape(a) for a in jax.tree.leaves(x)]
            return to_host(x)

        def spy_array(a, *args, **kwargs):
            self.shapes.append(a.shape)
            return to_numpy(a, *args, **kwargs)

        monkeypatch.setattr(sweep_mod.parallel, "to_host", spy_to_host)
        monkeypatch.setattr(array_cls, "__array__", spy_array)

    def largest(self) -> int:
        return max((int(np.prod(s)) for s in self.shapes), default=0)


@pytest.mark.parametrize("mesh_spec", [None, "data:8", "data:4,model:2"])
def test_device_resident_sweep_equals_loop_and_leaves_the_stack_on_device(model, monkeypatch, mesh_spec):
    clean, cf = _batch(0), _batch(1)
    iv, readout, src, _ = _sweep(model, clean, cf)
    want = _loop(model, clean, iv, readout)
    mesh = None if mesh_spec is None else parallel.make_mesh(mesh_spec)

    seen = []
    variants_jit = sweep_mod._variants_jit

    def spy_variants(graphdef, params, batch, x_start, start, ivs, readout_, base, prefix):
        seen.append((x_start, prefix))
        return variants_jit(graphdef, params, batch, x_start, start, ivs, readout_, base, prefix)

    monkeypatch.setattr(sweep_mod, "_variants_jit", spy_variants)
    host = _HostSpy(monkeypatch)
    got = sj.patch_sweep(model, clean, [iv], readout, chunk_size=4, mesh=mesh)
    np.testing.assert_allclose(got.logits, want, atol=1e-5, rtol=0)
    B, T = clean.input_ids.shape
    L, D = CFG.num_layers, CFG.hidden_size
    # Nothing as large as one layer's residual for the whole batch came back to the host: the
    # [B, T, T] mask and the [chunk, B, K] results did (a stack slice would be B * T * D).
    assert host.largest() < B * T * D, host.shapes
    assert seen and all(isinstance(x, jax.Array) for x, _ in seen)
    assert any(p is not None for _, p in seen) and all(isinstance(p, jax.Array) for _, p in seen if p is not None)
    if mesh is not None:
        assert all(len(x.sharding.device_set) == 8 for x, _ in seen)  # on the mesh, not gathered on one device


def test_resident_stack_counts_in_the_budget(model, monkeypatch):
    """With a budget of the resident stack plus 2.5 variants' worth, chunks hold 2 variants;
    without counting the stack (4 variants' worth here) they would hold 6."""
    clean, cf = _batch(0, rows=2), _batch(1, rows=2)
    iv, readout, _, _ = _sweep(model, clean, cf)
    B, T = clean.input_ids.shape
    L, D = CFG.num_layers, CFG.hidden_size
    n = L * 2
    variants = [jax.tree.map(lambda a: np.broadcast_to(a, (L, 2) + np.shape(a)[2:]), iv)]
    causal = np.broadcast_to(np.tri(T, dtype=bool), (B, T, T))
    prefixes = sweep_mod._unchanged_prefixes(variants, readout, causal, n, sweep_mod.ROW_QUANTUM)
    # resident: the stack [B, L + 1, T, D] and one prefix [B, L, P, D] per prefix length
    resident = 4 * B * T * D * (L + 1) + sum(4 * B * L * int(P) * D for P in np.unique(prefixes))
    per_variant = resident // 4
    monkeypatch.setattr(sweep_mod, "variant_bytes", lambda *a: per_variant)
    chunks = []
    chunk_size = sweep_mod._chunk_size

    def spy(*args):
        chunks.append(chunk_size(*args))
        return chunks[-1]

    monkeypatch.setattr(sweep_mod, "_chunk_size", spy)
    sj.patch_sweep(model, clean, [iv], readout, memory_budget_bytes=resident + 2.5 * per_variant)
    assert chunks == [2]


def test_default_budget_reads_free_device_memory():
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 80e9, "bytes_in_use": 17e9})
    assert sweep_mod.default_memory_budget(gpu) == pytest.approx(0.8 * 63e9)
    silent = types.SimpleNamespace(platform="tpu", memory_stats=lambda: None)
    assert sweep_mod.default_memory_budget(silent) == sweep_mod.CPU_MEMORY_BUDGET
    assert sweep_mod.default_memory_budget(jax.devices("cpu")[0]) == sweep_mod.CPU_MEMORY_BUDGET
