"""Flax NNX port of transformers' Gemma3ForConditionalGeneration (google/gemma-3-4b-it).

Spec: shared/reference/architectures.md, parts B, C.2, D and E. Pieces:

  * SigLIP vision tower: 14-px patch embedding (a matmul over flattened patches), learned
    position table, pre-LN encoder layers (tanh-GELU MLP), post-layernorm. Every image has the
    same size, so the vision sites have one row per image: `vision.block_out`
    [n_img, Lv, n_patches, Dv] and `vision.tokens` [n_img, mm_tokens_per_image, D], images in
    batch order (prompt by prompt, then in prompt order).
  * Projector: average pooling of the patch grid to mm_tokens_per_image tokens, (1 + w) RMSNorm,
    projection whose HF weight is already [in, out].
  * Decoder: token embeddings times sqrt(D) (the scale rounded to the parameter dtype, 50.5 in
    bf16 for D = 2560), the projector output written unscaled over the `<image_soft_token>`
    slots; layers with QK-norm before RoPE, attention scale query_pre_attn_scalar**-0.5, sandwich
    norms, tanh-GELU gated MLP; final (1 + w) RMSNorm; logits against the tied embedding.

Sliding and global layers share one stacked parameter tree and one `scan`. The per-layer pattern
is data: `is_sliding` [L] sits in the layer context and each step reads its entry with the
(traced) layer index, then picks the RoPE table and the mask with `jnp.where`. Both RoPE tables
(local theta; global theta with linear scaling) and the mask are computed once per forward.

Masks, as HF builds them when `token_type_ids` is given (B.4): global layers allow
`(kv <= q) | same_image_block(q, kv)`, sliding layers additionally `kv > q - sliding_window`
(one-sided: a later key in the same image block is always allowed, an earlier one is cut at the
window), both ANDed with the padding mask on the keys. Without `token_type_ids` HF silently falls
back to plain causal (and sliding causal) masks, and so does this port.

Softcapping: transformers 5.23 applies neither attn_logit_softcapping (Gemma3Attention stores it
but never passes it to the attention function) nor final_logit_softcapping (only
Gemma3ForCausalLM does) in Gemma3ForConditionalGeneration; both are null for the real checkpoints.
A config that sets them is read with a warning and run uncapped, as HF runs it.

Positions: `cumsum(attention_mask) - 1`, 0 on padding (HF `generate`'s rule). With no padding
this is `arange(T)`, HF's forward default. With left padding HF's forward, called without
`position_ids`, would use `arange(T)` regardless of padding; pass
`position_ids = where(mask, cumsum(mask) - 1, 0)` to HF to compare.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn import layers as L
from spatial_jax.nn.context import LMContext

# Defaults of transformers 5.23's Gemma3TextConfig / SiglipVisionConfig / Gemma3Config: the hub
# config.json of gemma-3-4b-it leaves many keys out and relies on these.
_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=None,
    use_bidirectional_attention=False, attention_bias=False,
)
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True,
)
SLIDING, FULL = "sliding_attention", "full_attention"


def _rope_factor(params: dict, where: str) -> float:
    """Linear scaling factor of one layer type's RoPE parameters (1.0 for default RoPE)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise ValueError(f"unsupported rope_type {kind!r} for {where} layers (supported: default, linear)")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    # vision tower (SigLIP)
    vision_layers: int
    vision_dim: int
    vision_heads: int
    vision_mlp_dim: int
    vision_eps: float
    vision_act: str
    image_size: int
    patch_size: int
    in_channels: int
    mm_tokens_per_image: int
    # language model
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    rms_norm_eps: float
    query_pre_attn_scalar: float  # int in HF configs; kept as given
    sliding_window: Optional[int]
    layer_types: tuple[str, ...]
    rope_local_theta: float
    rope_local_factor: float
    rope_global_theta: float
    rope_global_factor: float
    tie_word_embeddings: bool
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int


    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return int(self.mm_tokens_per_image**0.5)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types)

    @property
    def patch_embed_shape(self) -> tuple[int, ...]:
        """HF's Conv2d kernel shape, [out, C, p, p]; ours is its flattened transpose."""
        return (self.vision_dim, self.in_channels, self.patch_size, self.patch_size)

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 5.x nested layout) that `from_hf` reads back."""
        def rope(theta, factor):
            return ({"rope_type": "default", "rope_theta": theta} if factor == 1.0
                    else {"rope_type": "linear", "factor": factor, "rope_theta": theta})

        return {
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "mm_tokens_per_image": self.mm_tokens_per_image, "image_token_index": self.image_token_id,
            "boi_token_index": self.boi_token_id, "eoi_token_index": self.eoi_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": self.vision_dim,
                "intermediate_size": self.vision_mlp_dim, "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads, "num_channels": self.in_channels,
                "image_size": self.image_size, "patch_size": self.patch_size, "hidden_act": self.vision_act,
                "layer_norm_eps": self.vision_eps, "vision_use_head": False,
            },
            "text_config": {
                "model_type": "gemma3_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_activation": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
                "query_pre_attn_scalar": self.query_pre_attn_scalar, "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types),
                "rope_parameters": {SLIDING: rope(self.rope_local_theta, self.rope_local_factor),
                                    FULL: rope(self.rope_global_theta, self.rope_global_factor)},
                "tie_word_embeddings": self.tie_word_embeddings,
            },
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Gemma3Config":
        """From a HF config.json dict: the hub layout (sparse text_config, `rope_scaling`,
        `rope_theta`, `rope_local_base_freq`, `sliding_window_pattern`) or what transformers 5.x
        writes (`rope_parameters` per layer type, `layer_types`). Missing keys take the HF
        class defaults."""
        text = {**_TEXT_DEFAULTS, **(d.get("text_config") or {})}
        vis = {**_VISION_DEFAULTS, **(d.get("vision_config") or {})}
        if text.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true (bidirectional text attention) is not supported")
        if text.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported (Gemma 3 has no attention biases)")
        if vis.get("vision_use_head"):
            raise ValueError("vision_config.vision_use_head=true: Gemma 3 uses no SigLIP pooling head")
        for key, act in (("text_config.hidden_activation", text["hidden_activation"]),
                         ("vision_config.hidden_act", vis["hidden_act"])):
            if act not in L.ACTIVATIONS:
                raise ValueError(f"unsupported {key} {act!r}; supported: {sorted(L.ACTIVATIONS)}")

        n_layers = text["num_hidden_layers"]
        layer_types = text.get("layer_types")
        if layer_types is None:
            pattern = text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6))
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        if len(layer_types) != n_layers or set(layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types must list {n_layers} of {SLIDING!r}/{FULL!r}, got {layer_types}")

        rope = text.get("rope_parameters") or {}
        if SLIDING in rope or FULL in rope:  # transformers 5.x: one dict per layer type
            local = rope.get(SLIDING) or {}
            glob = rope.get(FULL) or {}
        else:  # hub / 4.x: rope_scaling applies to the global layers only
            glob = dict(text.get("rope_scaling") or rope or {})
            local = {}
        local_theta = local.get("rope_theta", text.get("rope_local_base_freq", 10_000.0))
        global_theta = glob.get("rope_theta", text.get("rope_theta", 1_000_000.0))

        image_size, patch = vis["image_size"], vis["patch_size"]
        if not isinstance(image_size, int) or not isinstance(patch, int):
            raise ValueError("only square images and patches (int image_size / patch_size) are supported")
        mm = d.get("mm_tokens_per_image", 256)
        per_side, tok_side = image_size // patch, int(mm**0.5)
        if tok_side**2 != mm or per_side % tok_side:
            raise ValueError(f"mm_tokens_per_image {mm} must be a square whose side divides the "
                             f"{per_side} patches per side")
        heads = text["num_attention_heads"]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if text.get(key) is not None:
                # transformers 5.23's Gemma3Attention never passes its softcap to the attention
                # function, and Gemma3ForConditionalGeneration never softcaps its logits.
                logging.warning("Gemma 3 config sets %s=%s; transformers 5.23 ignores it for "
                                "Gemma3ForConditionalGeneration, and so does this port", key, text[key])
        return cls(
            vision_layers=vis["num_hidden_layers"], vision_dim=vis["hidden_size"],
            vision_heads=vis["num_attention_heads"], vision_mlp_dim=vis["intermediate_size"],
            vision_eps=float(vis["layer_norm_eps"]), vision_act=vis["hidden_act"],
            image_size=image_size, patch_size=patch, in_channels=vis["num_channels"], mm_tokens_per_image=mm,
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=n_layers,
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            intermediate_size=text["intermediate_size"], hidden_act=text["hidden_activation"],
            rms_norm_eps=float(text["rms_norm_eps"]), query_pre_attn_scalar=text["query_pre_attn_scalar"],
            sliding_window=text.get("sliding_window"), layer_types=tuple(layer_types),
            rope_local_theta=float(local_theta), rope_local_factor=_rope_factor(local, "sliding"),
            rope_global_theta=float(global_theta), rope_global_factor=_rope_factor(glob, "full"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 262_144)),
            boi_token_id=d.get("boi_token_index", d.get("boi_token_id", 255_999)),
            eoi_token_id=d.get("eoi_token_index", d.get("eoi_token_id", 256_000)),
        )


# ----------------------------------------------------------------------------------------------
# Vision tower (SigLIP) and projector


class VisionTower(nnx.Module):
    """SigLIP encoder plus the Gemma 3 multimodal projector: pixels -> visual tokens."""

    def __init__(self, cfg: Gemma3Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        n_patches = cfg.patches_per_side**2
        self.patch_embed = L.Dense(cfg.patch_dim, cfg.vision_dim, bias=True, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(L.init_normal(rngs, (n_patches, cfg.vision_dim), dtype))
        self.layers = L.stack_modules([L.ViTLayer(cfg.vision_dim, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_eps,
                                                  cfg.vision_act, dtype=dtype, rngs=rngs)
                                       for _ in range(cfg.vision_layers)])
        self.post_norm = L.LayerNorm(cfg.vision_dim, eps=cfg.vision_eps, dtype=dtype)
        self.projector_norm = L.RMSNorm(cfg.vision_dim, eps=cfg.vision_eps, dtype=dtype, offset=1.0)
        self.projector = L.Dense(cfg.vision_dim, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, taps: Taps) -> jax.Array:
        """pixel_values [n, C, S, S] -> visual tokens [n, mm_tokens_per_image, D]."""
        cfg = self.cfg
        dtype = self.patch_embed.kernel.dtype
        x = self.patch_embed(L.patchify(pixel_values.astype(dtype), cfg.patch_size)) + self.pos_embed[...]

        x, _ = L.run_vision_blocks(self.layers, x, taps, lambda layer, h: layer(h))
        x = self.post_norm(x)
        # AvgPool2d(k, k) over the patch grid; token index = row * tokens_per_side + col.
        n, side, ts = x.shape[0], cfg.patches_per_side, cfg.tokens_per_side
        k = side // ts
        pooled = x.astype(jnp.float32).reshape(n, ts, k, ts, k, -1).mean((2, 4)).reshape(n, ts * ts, -1)
        x = self.projector(self.projector_norm(pooled.astype(dtype)))
        return taps.at(sites.VISION_TOKENS, x)


# ----------------------------------------------------------------------------------------------
# Language model


def image_block_ids(token_type_ids: jax.Array) -> jax.Array:
    """[B, T] -> index of the contiguous image run each token is in (counted per row), -1 for text."""
    is_img = token_type_ids == 1
    starts = is_img & ~jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(is_img, jnp.cumsum(starts, axis=1) - 1, -1)


def attention_masks(attention_mask: jax.Array, token_type_ids: Optional[jax.Array],
                    sliding_window: Optional[int]):
    """(allowed [B, T, T] for global layers, window [T, T] that sliding layers AND on top).

    Global: (kv <= q) | same image block, AND the keys' padding mask. Sliding: also kv > q - W.
    token_type_ids None: plain causal, as HF without token_type_ids.
    """
    T = attention_mask.shape[1]
    q, kv = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    allowed = jnp.broadcast_to(kv <= q, (attention_mask.shape[0], T, T))
    if token_type_ids is not None:
        block = image_block_ids(token_type_ids)
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        allowed = allowed | same
    allowed = allowed & attention_mask.astype(bool)[:, None, :]
    window = jnp.ones((T, T), bool) if sliding_window is None else kv > q - sliding_window
    return allowed, window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gemma3Context(LMContext):
    """LMContext (cos/sin: the global layers' RoPE; allowed: the causal mask, both ways within an
    image) plus the sliding layers' RoPE cos_local/sin_local [B, T, hd], their window [B, T, T]
    bool, and is_sliding [L] bool (which layers are sliding)."""

    cos_local: jax.Array
    sin_local: jax.Array
    window: jax.Array
    is_sliding: jax.Array


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3Config, *, dtype, rngs: nnx.Rngs):
        d, hd, eps = cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps
        self.input_norm = L.RMSNorm(d, eps=eps, dtype=dtype, offset=1.0)
        self.q = L.Dense(d, cfg.num_heads * hd, bias=False, dtype=dtype, rngs=rngs)
        self.k = L.Dense(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, rngs=rngs)
        self.v = L.Dense(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, rngs=rngs)
        self.o = L.Dense(cfg.num_heads * hd, d, bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = L.RMSNorm(hd, eps=eps, dtype=dtype, offset=1.0)
        self.k_norm = L.RMSNorm(hd, eps=eps, dtype=dtype, offset=1.0)
        self.post_attn_norm = L.RMSNorm(d, eps=eps, dtype=dtype, offset=1.0)
        self.pre_ff_norm = L.RMSNorm(d, eps=eps, dtype=dtype, offset=1.0)
        self.gate = L.Dense(d, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.up = L.Dense(d, cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.down = L.Dense(cfg.intermediate_size, d, bias=False, dtype=dtype, rngs=rngs)
        self.post_ff_norm = L.RMSNorm(d, eps=eps, dtype=dtype, offset=1.0)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.act = cfg.hidden_act

    def __call__(self, x, ctx: "Gemma3Context", taps: Taps, layer, rows=None):
        """x [B, T, D] (resid_pre) -> resid_post [B, T, D], or [B, Q, D] at `rows` [B, Q] only
        (keys and values still from every position). ctx: see Gemma3.lm_context; `layer` is traced."""
        x = taps.at(sites.LM_RESID_PRE, x, layer)
        sliding = ctx.is_sliding[layer]
        cos = jnp.where(sliding, ctx.cos_local, ctx.cos)[:, :, None].astype(x.dtype)
        sin = jnp.where(sliding, ctx.sin_local, ctx.sin)[:, :, None].astype(x.dtype)
        allowed = ctx.allowed & (~sliding | ctx.window)
        h = self.input_norm(x)
        # The head sites q/k/v sit before q_norm/k_norm, where HF's q_proj/k_proj hooks see them.
        k = L.split_heads(taps, sites.LM_ATTN_K, self.k(h), layer, self.kv_heads, self.head_dim)
        k = L.apply_rope(self.k_norm(k), cos, sin)
        v = L.split_heads(taps, sites.LM_ATTN_V, self.v(h), layer, self.kv_heads, self.head_dim)
        x, h, cos, sin, allowed = (L.select_rows(a, rows) for a in (x, h, cos, sin, allowed))
        q = L.split_heads(taps, sites.LM_ATTN_Q, self.q(h), layer, self.heads, self.head_dim, rows)
        q = L.apply_rope(self.q_norm(q), cos, sin)
        a = self.o(L.tapped_attention(taps, layer, rows, q, k, v, allowed, self.scale))
        x = x + taps.at(sites.LM_ATTN_OUT, self.post_attn_norm(a), layer, rows)
        h = self.pre_ff_norm(x)
        m = self.down(L.ACTIVATIONS[self.act](self.gate(h)) * self.up(h))
        x = x + taps.at(sites.LM_MLP_OUT, self.post_ff_norm(m), layer, rows)
        return taps.at(sites.LM_RESID_POST, x, layer, rows)


class Gemma3(L.LanguageModel):
    """Gemma3ForConditionalGeneration, as the pieces every family exposes to the runner in
    forward.py: embed_inputs -> lm_context -> layers (stacked) -> final -> unembed. The logits are
    not softcapped: HF's ConditionalGeneration has no final softcapping."""

    def __init__(self, cfg: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.init_language_model(cfg, lambda: DecoderLayer(cfg, dtype=dtype, rngs=rngs), dtype=dtype, rngs=rngs,
                                 norm_offset=1.0)

    def embed_inputs(self, batch, taps: Taps) -> jax.Array:
        """LM input [B, T, D]: sqrt(D)-scaled token embeddings, visual tokens (unscaled) over the
        `<image_soft_token>` slots."""
        cfg = self.cfg
        table = self.embed[...]
        ids = batch.input_ids
        is_img = ids == cfg.image_token_id
        if cfg.image_token_id >= cfg.vocab_size:  # HF looks such ids up as 0 (then overwrites them)
            ids = jnp.where(is_img, 0, ids)
        # HF: embed_scale is a float32 tensor cast to the weight dtype (sqrt(2560) -> 50.5 in bf16).
        scale = jnp.asarray(np.float32(math.sqrt(cfg.hidden_size))).astype(table.dtype)
        x = jnp.take(table, ids, axis=0) * scale
        if batch.pixel_values is None:
            return x
        vis = self.vision(batch.pixel_values, taps)
        return L.scatter_rows(x, is_img, vis.reshape(-1, vis.shape[-1]))

    @staticmethod
    def token_grids(cfg: Gemma3Config, batch) -> list[tuple[int, int]]:
        """(rows, cols) of soft tokens of each image of the batch: every image is the same pooled square."""
        return [(cfg.tokens_per_side, cfg.tokens_per_side)] * int(np.shape(batch.pixel_values)[0])

    @staticmethod
    def check_batch(cfg: Gemma3Config, batch) -> None:
        """Host-side input checks, raising ValueError with what is wrong."""
        if batch.token_type_ids is not None and np.shape(batch.token_type_ids) != np.shape(batch.input_ids):
            raise ValueError(f"token_type_ids shape {np.shape(batch.token_type_ids)} != input_ids "
                             f"{np.shape(batch.input_ids)}")
        ids = L.host_input_ids(batch)
        if batch.pixel_values is None:
            L.check_no_image_slots(ids, cfg.image_token_id, "<image_soft_token>")
            return
        shape = np.shape(batch.pixel_values)
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if len(shape) != 4 or tuple(shape[1:]) != want:
            raise ValueError(f"pixel_values must be [n_img, {want[0]}, {want[1]}, {want[2]}], got {shape}")
        if ids is not None:
            slots = int((ids == cfg.image_token_id).sum())
            if slots != shape[0] * cfg.mm_tokens_per_image:
                raise ValueError(f"the prompts have {slots} <image_soft_token> slots but the {shape[0]} images "
                                 f"give {shape[0] * cfg.mm_tokens_per_image} visual tokens")

    def lm_context(self, batch) -> "Gemma3Context":
        """What every decoder layer needs besides the residual: both RoPE tables, the global mask,
        the sliding window, and the per-layer pattern `is_sliding` [L]."""
        cfg = self.cfg
        pos = L.positions_from_mask(batch.attention_mask)
        cos_l, sin_l = L.rope_cos_sin(pos, cfg.head_dim, cfg.rope_local_theta, cfg.rope_local_factor)
        cos_g, sin_g = L.rope_cos_sin(pos, cfg.head_dim, cfg.rope_global_theta, cfg.rope_global_factor)
        allowed, window = attention_masks(batch.attention_mask, batch.token_type_ids, cfg.sliding_window)
        return Gemma3Context(cos=cos_g, sin=sin_g, allowed=allowed, cos_local=cos_l, sin_local=sin_l, window=window,
                             is_sliding=jnp.asarray(cfg.is_sliding))
