"""Layers shared by the model families, written to match transformers' numerics in float32.

Weights use the [in, out] layout. Norms, softmax, RoPE and matmul accumulation run in
`compute_dtype` (float32 for float32 and bfloat16 models, as HF does) and cast back; a float64
model (jax_enable_x64) runs them in float64, so that the port itself can be checked exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn.context import LMContext

LM_LAYER_SITES = (frozenset({sites.LM_RESID_PRE, sites.LM_ATTN_OUT, sites.LM_MLP_OUT, sites.LM_RESID_POST})
                  | sites.HEAD_SITES | sites.CACHE_ONLY_SITES)

# float32 matmuls stay float32 on GPU/TPU too (no TF32 / bf16 passes), so parity holds everywhere.
PRECISION = jax.lax.Precision.HIGHEST
NEG_INF = -1e30


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype a model of parameter dtype `dtype` accumulates, normalises and rotates in:
    float32 for float32, bfloat16 and float16, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def dot(a: jax.Array, b: jax.Array, subscripts: str | None = None, out_dtype=None) -> jax.Array:
    """a @ b (or einsum(subscripts, a, b)) in the operands' own dtype with `compute_dtype`
    accumulation, cast to `out_dtype` (default: a's dtype).

    bfloat16 operands go into the dot as bfloat16 with a float32 result (the cuBLAS / XLA:CPU
    bf16 GEMMs accumulate in float32), instead of a bfloat16 result that XLA:CPU computes by
    converting both operands to float32. HIGHEST is asked of float32 operands only (it keeps
    TF32/bf16 passes out on GPU/TPU); float32 models compile exactly as before.
    """
    kw = dict(precision=PRECISION if a.dtype == jnp.float32 else None, preferred_element_type=compute_dtype(a.dtype))
    out = jnp.matmul(a, b, **kw) if subscripts is None else jnp.einsum(subscripts, a, b, **kw)
    return out.astype(a.dtype if out_dtype is None else out_dtype)


def init_normal(rngs: nnx.Rngs, shape: Sequence[int], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [d_in, d_out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dot(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        ct = compute_dtype(x.dtype)
        xf = x.astype(ct)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(ct) + self.bias[...].astype(ct)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in two flavours.

    Qwen/Llama (`offset=0`): w * cast(x * rsqrt(mean x^2 + eps)), the weight after the cast.
    Gemma (`offset=1`): cast(x * rsqrt(...) * (1 + w)), weights stored zero-centred.
    """

    def __init__(self, dim: int, *, eps: float, dtype, offset: float = 0.0):
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        ct = compute_dtype(x.dtype)
        xf = x.astype(ct)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(ct))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


# HF activation names (ACT2FN) of the MLPs and projectors the families use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # Qwen2-VL's and CLIP's vision MLPs
}


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """[n, C, H, W] -> [n, (H/p)*(W/p), C*p*p]: patches row-major over the grid, each flattened as
    (C, p, p), the order of the flattened Conv2d kernel."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, H, hd]; cos/sin broadcastable to [..., T, 1, hd]."""
    return x * cos + rotate_half(x) * sin


CPU_SCORE_CHUNK_BYTES = 16 << 20


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, scale: float,
            with_probs: bool = False):
    """`attention` over all of q's rows at once, head-major: [B, Hkv, G * T, hd] against
    [B, Hkv, S, hd], one batched matmul per kv head (twice as fast on XLA:CPU as contracting in
    the [B, T, H, hd] layout)."""
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qh = q.reshape(B, T, Hkv, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, hd)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = dot(qh, kh, "bkqd,bksd->bkqs", compute_dtype(qh.dtype)) * scale
    if allowed is not None:
        scores = jnp.where(jnp.tile(allowed, (1, G, 1))[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = dot(probs, vh, "bkqs,bksd->bkqd")
    out = out.reshape(B, Hkv, G, T, -1).transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, -1)
    # Query head j = kv head j // G, group member j % G: [B, Hkv, G * T, S] is [B, Hq, T, S].
    return (out, probs.reshape(B, Hq, T, -1)) if with_probs else out


def cpu_attention_steps(B: int, heads: int, T: int, S: int) -> int:
    """Steps `attention` takes a batch of B rows in on CPU: the fewest (a divisor of B) whose
    float32 scores [B / steps, heads, T, S] fit CPU_SCORE_CHUNK_BYTES (one row a step at least)."""
    per_step = max(1, CPU_SCORE_CHUNK_BYTES // (4 * heads * T * S))
    return next(n for n in range(1, B + 1) if B % n == 0 and B // n <= per_step)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, scale: float,
              with_probs: bool = False):
    """Grouped-query attention with a boolean mask, softmax in `compute_dtype` (float32 or float64).

    q [B, T, Hq, hd], k/v [B, S, Hkv, hd], allowed [B, T, S] (True = may attend) or None (all).
    Query head j reads kv head j // (Hq // Hkv), as HF's repeat_kv does. Returns [B, T, Hq, hd],
    and with_probs also the post-softmax weights [B, Hq, T, S] in v's dtype (HF's eager
    attention weights).

    On CPU, XLA materialises the [B, Hq, T, S] scores and passes over them three times
    (softmax, then PV); batch rows are taken a few at a time so that a step's scores stay near
    CPU_SCORE_CHUNK_BYTES (in cache): ten 576-patch images one a step take ~0.55x the time of
    one call (benchmarks/bench_attention.py). Step j takes rows j, j + steps, ..., so where
    `steps` divides each device's block of a batch sharded over `data`, no row leaves its
    device. Other backends: one batched call.
    """
    B, T, Hq, _ = q.shape
    steps = cpu_attention_steps(B, Hq, T, k.shape[1])
    if steps == 1 or jax.default_backend() != "cpu":
        return _attend(q, k, v, allowed, scale, with_probs)

    def strided(x):  # [B, ...] -> [steps, B // steps, ...]: step j holds rows j, j + steps, ...
        return x.reshape((B // steps, steps) + x.shape[1:]).swapaxes(0, 1)

    operands = tuple(map(strided, (q, k, v) if allowed is None else (q, k, v, allowed)))
    out = jax.lax.map(lambda t: _attend(*t[:3], None if allowed is None else t[3], scale, with_probs), operands)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((B,) + x.shape[2:]), out)


def split_heads(taps: Taps, site: str, y: jax.Array, layer, heads: int, head_dim: int,
                rows: jax.Array | None = None) -> jax.Array:
    """A q/k/v projection's output y [B, T, heads * hd] -> [B, T, heads, hd] after the taps at
    `site` (lm.attn_q/k/v): what a forward hook on HF's q_proj/k_proj/v_proj sees, before any
    q/k norm and RoPE. rows [B, Q]: y holds these positions only (see `Taps.at`)."""
    return taps.at(site, y.reshape(y.shape[:2] + (heads, head_dim)), layer, rows)


def tapped_attention(taps: Taps, layer, rows: jax.Array | None, q: jax.Array, k: jax.Array, v: jax.Array,
                     allowed: jax.Array | None, scale: float) -> jax.Array:
    """`attention` with the taps at its heads' outputs: q [B, Q, Hq, hd] (the rows [B, Q] of the
    layer, or every position with rows None), k/v [B, S, Hkv, hd] -> the o-projection's input
    [B, Q, Hq * hd], each head's output after the taps at lm.attn_z (what a forward pre-hook on
    HF's o_proj sees). The weights are computed as an output only where lm.attn_pattern is
    cached (a forward that does not ask for them compiles as before)."""
    if sites.LM_ATTN_PATTERN in taps.cache_sites:
        z, probs = attention(q, k, v, allowed, scale, with_probs=True)
        taps.at(sites.LM_ATTN_PATTERN, probs, layer)  # cache only: Intervention refuses the site
    else:
        z = attention(q, k, v, allowed, scale)
    z = taps.at(sites.LM_ATTN_Z, z, layer, rows)
    return z.reshape(z.shape[:2] + (-1,))


def equal_size_runs(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive equal sizes as (first element, n items, size), items laid end to end.

    The images of a vision batch are concatenated and attend only within themselves; batching
    each run of equal-size images as [n, size] avoids an [N, N] mask over all patches of the
    batch (quadratic in the number of images).
    """
    runs, start = [], 0
    for size in sizes:
        if runs and runs[-1][2] == size:
            first, n, _ = runs[-1]
            runs[-1] = (first, n + 1, size)
        else:
            runs.append((start, 1, size))
        start += size
    return runs


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, runs, scale: float) -> jax.Array:
    """Attention of concatenated images, each attending only to itself (block-diagonal).

    q/k/v [N, H, hd] with the images laid end to end; runs: `equal_size_runs` of their sizes.
    Returns [N, H * hd].
    """
    N, H, hd = q.shape
    parts = []
    for first, n, size in runs:
        q_g, k_g, v_g = (t[first:first + n * size].reshape(n, size, H, hd) for t in (q, k, v))
        parts.append(attention(q_g, k_g, v_g, None, scale).reshape(n * size, H * hd))
    return jnp.concatenate(parts)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] -> position ids [B, T]: cumsum(mask) - 1 on real tokens, 0 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=1) - 1, 0)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, factor: float = 1.0, dtype=jnp.float32):
    """positions [B, T] -> cos, sin [B, T, head_dim] in dtype (HF default / linear RoPE; HF: float32)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    freqs = positions[..., None].astype(dtype) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def causal_mask(attention_mask: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """[B, T] padding mask -> allowed [B, T, T]: keys at or before the query (and, with a window
    W, after q - W, as HF's sliding_window_overlay), never padding keys."""
    T = attention_mask.shape[1]
    q, kv = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    allowed = kv <= q
    if sliding_window is not None:
        allowed = allowed & (kv > q - sliding_window)
    return allowed[None] & attention_mask.astype(bool)[:, None, :]


def select_rows(a: jax.Array, rows: jax.Array | None) -> jax.Array:
    """a [B, T, ...] -> [B, Q, ...] at positions rows [B, Q]; rows None: a unchanged."""
    if rows is None:
        return a
    return jnp.take_along_axis(a, rows.reshape(rows.shape + (1,) * (a.ndim - 2)), axis=1)


class ViTLayer(nnx.Module):
    """The pre-LayerNorm encoder layer of SigLIP (Gemma 3) and CLIP (LLaVA): unmasked attention
    with biases over one image's patches, then a two-layer MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, act: str, *, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.q = Dense(dim, dim, bias=True, dtype=dtype, rngs=rngs)
        self.k = Dense(dim, dim, bias=True, dtype=dtype, rngs=rngs)
        self.v = Dense(dim, dim, bias=True, dtype=dtype, rngs=rngs)
        self.o = Dense(dim, dim, bias=True, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.fc1 = Dense(dim, mlp_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, dim, bias=True, dtype=dtype, rngs=rngs)
        self.heads = heads
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [n, N, Dv] -> [n, N, Dv]."""
        n, N, D = x.shape
        hd = D // self.heads
        h = self.norm1(x)
        q = self.q(h).reshape(n, N, self.heads, hd)
        k = self.k(h).reshape(n, N, self.heads, hd)
        v = self.v(h).reshape(n, N, self.heads, hd)
        x = x + self.o(attention(q, k, v, None, hd**-0.5).reshape(n, N, D))
        return x + self.fc2(ACTIVATIONS[self.act](self.fc1(self.norm2(x))))


class DecoderLayer(nnx.Module):
    """The pre-norm decoder layer of the Llama lineage (Qwen2, Mistral): RMSNorm, GQA attention
    with RoPE, residual, RMSNorm, gated MLP, residual; taps at every per-layer LM site
    (`LM_LAYER_SITES`: the residual sites and the head sites)."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, *, eps: float,
                 qkv_bias: bool, act: str = "silu", dtype, rngs: nnx.Rngs):
        hd = head_dim
        self.input_norm = RMSNorm(d, eps=eps, dtype=dtype)
        self.q = Dense(d, heads * hd, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k = Dense(d, kv_heads * hd, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v = Dense(d, kv_heads * hd, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.o = Dense(heads * hd, d, bias=False, dtype=dtype, rngs=rngs)
        self.post_norm = RMSNorm(d, eps=eps, dtype=dtype)
        self.gate = Dense(d, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.up = Dense(d, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.down = Dense(intermediate, d, bias=False, dtype=dtype, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hd
        self.act = act

    def __call__(self, x, ctx: LMContext, taps: Taps, layer, rows=None):
        """x [B, T, D] (resid_pre) -> resid_post [B, T, D], or [B, Q, D] at `rows` [B, Q] only
        (keys and values still from every position). ctx: cos/sin [B, T, hd], allowed [B, T, T]."""
        x = taps.at(sites.LM_RESID_PRE, x, layer)
        h = self.input_norm(x)
        cos, sin = ctx.cos[:, :, None].astype(x.dtype), ctx.sin[:, :, None].astype(x.dtype)
        k = apply_rope(split_heads(taps, sites.LM_ATTN_K, self.k(h), layer, self.kv_heads, self.head_dim), cos, sin)
        v = split_heads(taps, sites.LM_ATTN_V, self.v(h), layer, self.kv_heads, self.head_dim)
        x, h, cos, sin, allowed = (select_rows(a, rows) for a in (x, h, cos, sin, ctx.allowed))
        q = apply_rope(split_heads(taps, sites.LM_ATTN_Q, self.q(h), layer, self.heads, self.head_dim, rows), cos, sin)
        a = self.o(tapped_attention(taps, layer, rows, q, k, v, allowed, self.head_dim**-0.5))
        x = x + taps.at(sites.LM_ATTN_OUT, a, layer, rows)
        h = self.post_norm(x)
        m = self.down(ACTIVATIONS[self.act](self.gate(h)) * self.up(h))
        x = x + taps.at(sites.LM_MLP_OUT, m, layer, rows)
        return taps.at(sites.LM_RESID_POST, x, layer, rows)


def scatter_rows(x: jax.Array, at: jax.Array, rows: jax.Array) -> jax.Array:
    """x [B, T, D] with rows [N, D] written in order over the positions where `at` [B, T] is True,
    counted row-major over the batch (torch's masked_scatter of the visual tokens)."""
    slot = jnp.clip(jnp.cumsum(at.reshape(-1)).reshape(at.shape) - 1, 0, rows.shape[0] - 1)
    return jnp.where(at[..., None], rows[slot].astype(x.dtype), x)


def unembed(h: jax.Array, embed: jax.Array, lm_head: Dense | None) -> jax.Array:
    """h [..., D] -> logits [..., V] in `compute_dtype` (float32; float64 for a float64 model),
    against the embedding table [V, D] when tied (lm_head None)."""
    w = embed.T if lm_head is None else lm_head.kernel[...]
    return dot(h, w).astype(compute_dtype(h.dtype))


class LanguageModel(nnx.Module):
    """The decoder ends every family shares, under the attribute names the key maps and sharding
    rules address: `embed` [V, D], stacked `layers`, the final `norm`, `lm_head` (None when tied)."""

    def init_language_model(self, cfg, make_layer: Callable[[], nnx.Module], *, dtype, rngs: nnx.Rngs,
                            norm_offset: float = 0.0) -> None:
        # Built in this order so that a model initialised from a seed draws the same weights as before.
        self.embed = nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = stack_modules([make_layer() for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, offset=norm_offset)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def init_llama_decoder(self, cfg, *, qkv_bias: bool, act: str = "silu", dtype, rngs: nnx.Rngs) -> None:
        """`init_language_model` with the shared `DecoderLayer` (the Llama lineage: Qwen2 with q/k/v
        biases, Llama and Mistral without)."""
        self.init_language_model(cfg, lambda: DecoderLayer(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            eps=cfg.rms_norm_eps, qkv_bias=qkv_bias, act=act, dtype=dtype, rngs=rngs), dtype=dtype, rngs=rngs)

    def embed_with_visual_tokens(self, batch, visual_tokens: Callable[[], jax.Array]) -> jax.Array:
        """Token embeddings [B, T, D] with visual_tokens() [N, D] (run only when the batch has
        pixel_values) written over the image-token slots in order."""
        x = jnp.take(self.embed[...], batch.input_ids, axis=0)
        if batch.pixel_values is None:
            return x
        return scatter_rows(x, batch.input_ids == self.cfg.image_token_id, visual_tokens())

    def final(self, x: jax.Array, taps: Taps, rows: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] (or [B, Q, D] at positions rows [B, Q]) -> the final norm's output (site lm.final)."""
        return taps.at(sites.LM_FINAL, self.norm(x), rows=rows)

    def unembed(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> logits [..., V] float32 (float64 for a float64 model)."""
        return unembed(h, self.embed[...], self.lm_head)


def host_input_ids(batch) -> np.ndarray | None:
    """The batch's input_ids on the host, or None under tracing (where values cannot be checked)."""
    return None if isinstance(batch.input_ids, jax.core.Tracer) else np.asarray(batch.input_ids)


def check_no_image_slots(ids: np.ndarray | None, image_token_id: int, slot_name: str) -> None:
    """For a batch without pixel_values: no prompt may hold an image slot."""
    if ids is not None and (ids == image_token_id).any():
        raise ValueError(f"the prompts have {int((ids == image_token_id).sum())} {slot_name} slots but no "
                         "pixel_values were given")


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """N modules of one structure -> one module whose params have a leading axis of size N."""
    graphdef, first = nnx.split(modules[0])
    rest = [nnx.state(m) for m in modules[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *rest)
    return nnx.merge(graphdef, stacked)


def scan_layers(stacked: nnx.Module, step: Callable, carry, xs=None):
    """lax.scan over a stacked module: step(layer_module, carry, layer_index, x) -> (carry, y)."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]

    def body(c, inputs):
        layer_state, idx, x = inputs
        return step(nnx.merge(graphdef, layer_state), c, idx, x)

    return jax.lax.scan(body, carry, (state, jnp.arange(n), xs))


VISION_STEP_SITES = frozenset({sites.VISION_BLOCK_OUT})


def run_vision_blocks(blocks: nnx.Module, x: jax.Array, taps: Taps, block_fn: Callable,
                      keep_outputs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """The one loop over a vision tower's stacked blocks: x -> block_fn(block, x) block after block
    (a scan), tapped at `vision.block_out` after each (cached as [n, Lv, ...], the block axis second).

    Returns the last block's output and, with keep_outputs, every block's output [Lv, *x.shape]
    (towers that read an earlier block's features)."""
    def step(block, h, idx, _):
        t = taps.for_step(VISION_STEP_SITES)
        h = t.at(sites.VISION_BLOCK_OUT, block_fn(block, h), idx)
        return h, (t.collected, h if keep_outputs else None)

    x, (collected, outputs) = scan_layers(blocks, step, x)
    if sites.VISION_BLOCK_OUT in collected:
        taps.collected[sites.VISION_BLOCK_OUT] = jnp.moveaxis(collected[sites.VISION_BLOCK_OUT], 0, 1)
    return x, outputs
