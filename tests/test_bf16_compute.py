"""bfloat16 models compute in bfloat16: read from the program handed to XLA (StableHLO: every dot
takes bf16 operands) and from what XLA:CPU compiled of a tiny model's forward and sweep (every dot
with a weight operand takes bf16 operands; no float32 copy of a weight exists). XLA:CPU itself
runs the batched activation x activation dots of attention (q.k, p.v) in float32; they hold no
weight, and on GPU they stay bf16."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spatial_jax as sj
from spatial_jax.forward import _apply_jit
from spatial_jax.sweeps.sweep import _variants_jit
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig

IMG, VS, VE = 60, 61, 62
GRID = np.array([[1, 4, 6]])  # 24 patches, 6 merged tokens
# Widths chosen so that no activation of the batch below has a weight's shape.
CFG = Qwen2VLConfig(vision_depth=2, vision_dim=48, vision_heads=4, vision_mlp_dim=72, patch_size=14,
                    temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4, vocab_size=97,
                    hidden_size=56, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=14, intermediate_size=88,
                    rms_norm_eps=1e-6, rope_theta=1e4, mrope_section=(1, 3, 3), tie_word_embeddings=False,
                    image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE)

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"%([\w.\-]+) = \w+\[[\d,]*\]\{?[\d,]*\}? (?:dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)(.*)")
_STABLEHLO_DOT = re.compile(r"stablehlo.dot_general .*: \(tensor<[\dx]*x?(\w+)>, tensor<[\dx]*x?(\w+)>\)")


def _model(dtype):
    graphdef, params = nnx.split(Qwen2VL(CFG, dtype=dtype, rngs=nnx.Rngs(0)))
    return graphdef, params


def _batch():
    rng = np.random.default_rng(0)
    ids = np.array([[3, 4, VS] + [IMG] * 6 + [VE, 5, 6, 7]])
    pv = rng.standard_normal((int(GRID.prod()), 1176)).astype(np.float32)
    return sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=GRID).with_defaults()


def _dots(hlo: str) -> list[tuple[str, str, str]]:
    """(dot name, lhs dtype, rhs dtype) of every dot without batch dimensions (the ones a weight
    feeds) in compiled HLO text (names are unique across an HLO module's computations, so one
    table of instruction types serves)."""
    types = {m.group(1): m.group(2) for m in map(_INSTR.match, hlo.splitlines()) if m}
    return [(name, types[a], types[b]) for name, a, b, rest in _DOT.findall(hlo) if "batch_dims" not in rest]


def _stablehlo_dots(lowered) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot_general in the lowered program."""
    return _STABLEHLO_DOT.findall(lowered.as_text())


def _f32_weight_buffers(hlo: str, params) -> list[str]:
    """Buffers of the compiled program (instructions outside fusion bodies: what XLA allocates)
    that hold a float32 array shaped like a weight (stacked [L, ...] or one layer's slice): an
    upcast weight kept in memory. A convert fused into a layer's slice reads that layer only
    and allocates nothing, so fusion bodies are left out."""
    shapes = set()
    for x in jax.tree.leaves(params):
        if x.ndim >= 2:
            shapes.add(tuple(x.shape))
            if x.ndim == 3:
                shapes.add(tuple(x.shape[1:]))
    fused = set(re.findall(r"fusion\(.*calls=%([\w.\-]+)", hlo))
    out, computation = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            computation = head.group(1)
            continue
        m = _INSTR.match(line)
        if (m and computation not in fused and m.group(2) == "f32"
                and tuple(int(d) for d in m.group(3).split(",") if d) in shapes):
            out.append(line.strip()[:160])
    return out


def _forward_hlo(dtype) -> tuple[str, object, list]:
    graphdef, params = _model(dtype)
    lowered = _apply_jit.lower(graphdef, params, _batch(), (), (), True)
    return lowered.compile().as_text(), params, _stablehlo_dots(lowered)


def test_bf16_forward_dots_take_bf16_operands_and_no_weight_is_upcast():
    hlo, params, program_dots = _forward_hlo(jnp.bfloat16)
    assert len(program_dots) >= 15 and set(program_dots) == {("bf16", "bf16")}, program_dots
    dots = _dots(hlo)
    assert len(dots) >= 10, f"found only {len(dots)} dots: the HLO parser no longer matches"
    assert all(lhs == rhs == "bf16" for _, lhs, rhs in dots), [d for d in dots if d[1:] != ("bf16", "bf16")]
    assert not _f32_weight_buffers(hlo, params)


def test_float32_forward_still_dots_in_float32():
    """The control: the same parse finds float32 operands (and float32 weights, legitimately)
    in the float32 model, so the bf16 test above cannot pass on an empty parse."""
    hlo, params, program_dots = _forward_hlo(jnp.float32)
    assert set(program_dots) == {("f32", "f32")}
    dots = _dots(hlo)
    assert dots and all(lhs == rhs == "f32" for _, lhs, rhs in dots)
    assert _f32_weight_buffers(hlo, params)


def test_bf16_sweep_dots_take_bf16_operands_and_no_weight_is_upcast():
    """The sweep's restart path (a fori_loop slicing the stacked weights) as well."""
    graphdef, params = _model(jnp.bfloat16)
    batch = _batch()
    B, T = batch.input_ids.shape
    D = CFG.hidden_size
    n = 2
    ivs = (sj.Intervention(site="lm.resid_post", op="replace", layer=np.arange(n, dtype=np.int32),
                           source=jnp.zeros((n, B, T, D), jnp.bfloat16), index=np.full((n, B, T), -1, np.int32)),)
    ivs = jax.tree.map(lambda a: a if np.ndim(a) else np.broadcast_to(a, (n,)), ivs)  # as patch_sweep does
    readout = sj.Readout(np.array([T - 1], np.int32), np.array([1, 2], np.int32))
    x_start = jnp.zeros((B, T, D), jnp.bfloat16)
    lowered = _variants_jit.lower(graphdef, params, batch, x_start, np.int32(1), ivs, readout, (), None)
    assert set(_stablehlo_dots(lowered)) == {("bf16", "bf16")}
    hlo = lowered.compile().as_text()
    dots = _dots(hlo)
    assert dots and all(lhs == rhs == "bf16" for _, lhs, rhs in dots), dots
    assert not _f32_weight_buffers(hlo, params)
