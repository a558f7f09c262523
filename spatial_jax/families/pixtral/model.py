"""Flax NNX port of transformers' LlavaForConditionalGeneration with a Pixtral vision tower and a
Mistral decoder (mistral-community/pixtral-12b), as transformers 5.23 runs it.

  * Vision tower (PixtralVisionModel): each image, at its own size (a multiple of the 16-px patch,
    given by `image_sizes`), is cropped out of the zero-padded pixel_values and cut into patches (a
    matmul over flattened patches: the bias-free Conv2d). The patches of all images are
    concatenated, as HF does, so the vision sites have batch axis 1: `vision.block_out`
    [1, Lv, N_patches, Dv] and `vision.tokens` [1, N_patches, D], images in batch order, patches
    row-major in each. Then RMSNorm `ln_pre` and pre-norm blocks (RMSNorm eps 1e-5, attention
    without biases, gated MLP); no final norm. Attention stays inside each image (HF's
    block-diagonal mask), computed per run of equal-size images. Queries and keys are rotated by
    an axial 2D RoPE over each patch's (row, column): the first half of each rotated half-vector
    turns with the row at the even-indexed frequencies, the second with the column at the odd
    ones; the tables are cast to the activation dtype before rotating, as HF does.
  * Projector (LlavaMultiModalProjector): the hidden state named by `vision_feature_layer`
    (index 0 is the ln_pre output, i the output of block i - 1; a list concatenates several),
    linear, GELU, linear: one visual token per patch (no merge).
  * Decoder (Mistral): the Llama-lineage layer shared with Qwen2 (layers.DecoderLayer, here
    without q/k/v biases), RoPE, causal mask (and a sliding window when the config sets one; the
    Pixtral-12B config sets none), final RMSNorm, untied head. The visual tokens are written over
    the `[IMG]` slots in order; `[IMG_BREAK]` (after each row) and `[IMG_END]` (after the last)
    are ordinary tokens.

Positions: `cumsum(attention_mask) - 1`, 0 on padding (HF generate's rule). Unpadded, this is HF's
forward default `arange(T)`; left-padded, HF's forward default shifts every real token of a row
by the same amount, which RoPE does not see.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn import layers as L
from spatial_jax.nn.context import LMContext

VISION_EPS = 1e-5  # PixtralRMSNorm's eps in the vision tower, fixed in HF's code (not in the config)

# Defaults of transformers 5.23's MistralConfig / PixtralVisionConfig / LlavaConfig: a hub
# config.json leaves many keys out and relies on them.
_TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6, sliding_window=4096,
)
_VISION_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_channels=3,
    patch_size=16, hidden_act="gelu",
)
_LLAVA_DEFAULTS = dict(
    image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
    vision_feature_layer=-2, multimodal_projector_bias=True,
)


@dataclasses.dataclass(frozen=True)
class PixtralConfig:
    # vision tower
    vision_layers: int
    vision_dim: int
    vision_heads: int
    vision_mlp_dim: int
    vision_act: str
    patch_size: int
    in_channels: int
    vision_rope_theta: float
    # projector
    vision_feature_layer: Union[int, tuple[int, ...]]  # as in the HF config (negative counts from the end)
    projector_act: str
    projector_bias: bool
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
    rope_theta: float
    sliding_window: Optional[int]
    tie_word_embeddings: bool
    image_token_id: int


    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def patch_embed_shape(self) -> tuple[int, ...]:
        """HF's Conv2d kernel shape, [out, C, p, p]; ours is its flattened transpose."""
        return (self.vision_dim, self.in_channels, self.patch_size, self.patch_size)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """vision_feature_layer as indices into (ln_pre output, block 0 output, ..., block Lv-1 output)."""
        raw = self.vision_feature_layer
        return tuple(i % (self.vision_layers + 1) for i in ((raw,) if isinstance(raw, int) else raw))

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 5.x layout) that `from_hf` reads back."""
        feature = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": self.image_token_id, "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": feature if isinstance(feature, int) else list(feature),
            "vision_feature_select_strategy": "full", "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {
                "model_type": "pixtral", "hidden_size": self.vision_dim, "intermediate_size": self.vision_mlp_dim,
                "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads,
                "head_dim": self.vision_dim // self.vision_heads, "num_channels": self.in_channels,
                "patch_size": self.patch_size, "hidden_act": self.vision_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": self.vision_rope_theta},
            },
            "text_config": {
                "model_type": "mistral", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
                "sliding_window": self.sliding_window,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings,
            },
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "PixtralConfig":
        """From a HF config.json dict: the hub layout (sparse sub-configs, legacy `rope_theta`
        keys) or what transformers 5.x writes (`rope_parameters`). Missing keys take the HF class
        defaults. A Llava config with another vision tower or decoder is refused."""
        top = {**_LLAVA_DEFAULTS, **d}
        text = {**_TEXT_DEFAULTS, **(d.get("text_config") or {})}
        vis = {**_VISION_DEFAULTS, **(d.get("vision_config") or {})}
        if vis.get("model_type", "pixtral") != "pixtral":
            raise ValueError(f"vision_config.model_type {vis['model_type']!r}: only Pixtral vision towers are supported")
        if text.get("model_type", "mistral") != "mistral":
            raise ValueError(f"text_config.model_type {text['model_type']!r}: only Mistral decoders are supported")
        if top["vision_feature_select_strategy"] != "full":
            # "default" drops the first vision token as if it were a CLS token; Pixtral has none
            # (and HF then fails on the token count).
            raise ValueError(f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r}: "
                             "Pixtral needs 'full'")
        for key, act in (("text_config.hidden_act", text["hidden_act"]), ("vision_config.hidden_act", vis["hidden_act"]),
                         ("projector_hidden_act", top["projector_hidden_act"])):
            if act not in L.ACTIVATIONS:
                raise ValueError(f"unsupported {key} {act!r}; supported: {sorted(L.ACTIVATIONS)}")
        vis_rope = vis.get("rope_parameters") or {}
        if vis_rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type {vis_rope['rope_type']!r}: Pixtral uses 'axial'")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"unsupported text rope_type {kind!r} (supported: default)")
        patch = vis["patch_size"]
        if not isinstance(patch, int):
            raise ValueError(f"only square patches (an int patch_size) are supported, got {patch}")
        n_vis = vis["num_hidden_layers"]
        feature = top["vision_feature_layer"]
        feature = feature if isinstance(feature, int) else tuple(feature)
        for i in (feature,) if isinstance(feature, int) else feature:
            if not -(n_vis + 1) <= i <= n_vis:
                raise ValueError(f"vision_feature_layer {i} is outside the {n_vis + 1} vision hidden states")
        heads = text["num_attention_heads"]
        # As HF's LlavaConfig: tied if the top level or the text config says so.
        tied = bool(d.get("tie_word_embeddings", False)) or bool((d.get("text_config") or {}).get("tie_word_embeddings"))
        sliding = text.get("sliding_window")
        return cls(
            vision_layers=n_vis, vision_dim=vis["hidden_size"], vision_heads=vis["num_attention_heads"],
            vision_mlp_dim=vis["intermediate_size"], vision_act=vis["hidden_act"], patch_size=patch,
            in_channels=vis["num_channels"],
            vision_rope_theta=float(vis_rope.get("rope_theta", vis.get("rope_theta", 10_000.0))),
            vision_feature_layer=feature, projector_act=top["projector_hidden_act"],
            projector_bias=bool(top["multimodal_projector_bias"]),
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            intermediate_size=text["intermediate_size"], hidden_act=text["hidden_act"],
            rms_norm_eps=float(text["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10_000.0))),
            sliding_window=None if sliding is None else int(sliding), tie_word_embeddings=tied,
            image_token_id=top.get("image_token_id", top["image_token_index"]),
        )


# ----------------------------------------------------------------------------------------------
# Vision tower and projector


def patch_grids(image_sizes: tuple[tuple[int, int], ...], patch: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of patches of each image: HF crops the patch grid to size // patch."""
    return tuple((h // patch, w // patch) for h, w in image_sizes)


def vision_rope(grids: tuple[tuple[int, int], ...], head_dim: int, theta: float):
    """Axial 2D RoPE tables cos, sin [N_patches, head_dim] float32 for images with these patch
    grids, patches row-major per image, as HF's PixtralVisionRotaryEmbedding: each half of the
    rotation pairs holds row * inv_freq[0::2] then column * inv_freq[1::2]."""
    rows = np.concatenate([np.repeat(np.arange(r), c) for r, c in grids])
    cols = np.concatenate([np.tile(np.arange(c), r) for r, c in grids])
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = jnp.concatenate([rows[:, None] * inv_freq[0::2], cols[:, None] * inv_freq[1::2]], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: PixtralConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.vision_dim
        self.norm1 = L.RMSNorm(d, eps=VISION_EPS, dtype=dtype)
        self.q = L.Dense(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.k = L.Dense(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.v = L.Dense(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.o = L.Dense(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = L.RMSNorm(d, eps=VISION_EPS, dtype=dtype)
        self.gate = L.Dense(d, cfg.vision_mlp_dim, bias=False, dtype=dtype, rngs=rngs)
        self.up = L.Dense(d, cfg.vision_mlp_dim, bias=False, dtype=dtype, rngs=rngs)
        self.down = L.Dense(cfg.vision_mlp_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.heads = cfg.vision_heads
        self.act = cfg.vision_act

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, runs) -> jax.Array:
        """x [1, N, Dv]; cos/sin [N, 1, hd] in x's dtype; runs: `equal_size_runs` of the images."""
        _, N, D = x.shape
        hd = D // self.heads
        h = self.norm1(x)[0]
        q = L.apply_rope(self.q(h).reshape(N, self.heads, hd), cos, sin)
        k = L.apply_rope(self.k(h).reshape(N, self.heads, hd), cos, sin)
        v = self.v(h).reshape(N, self.heads, hd)
        x = x + self.o(L.blockwise_attention(q, k, v, runs, hd**-0.5))[None]
        h = self.norm2(x)
        return x + self.down(L.ACTIVATIONS[self.act](self.gate(h)) * self.up(h))


class VisionTower(nnx.Module):
    """Pixtral encoder plus the Llava projector: pixels -> one visual token per patch."""

    def __init__(self, cfg: PixtralConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = L.Dense(cfg.patch_dim, cfg.vision_dim, bias=False, dtype=dtype, rngs=rngs)
        self.ln_pre = L.RMSNorm(cfg.vision_dim, eps=VISION_EPS, dtype=dtype)
        self.blocks = L.stack_modules([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.vision_layers)])
        d_in = len(cfg.feature_layers) * cfg.vision_dim
        self.projector_fc1 = L.Dense(d_in, cfg.hidden_size, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.projector_fc2 = L.Dense(cfg.hidden_size, cfg.hidden_size, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, image_sizes: tuple, taps: Taps) -> jax.Array:
        """pixel_values [n, C, H, W], static image_sizes ((h, w), ...) -> visual tokens [1, N_patches, D]."""
        cfg = self.cfg
        p = cfg.patch_size
        grids = patch_grids(image_sizes, p)
        pixels = pixel_values.astype(self.patch_embed.kernel.dtype)
        patches = jnp.concatenate([L.patchify(pixels[i:i + 1, :, :r * p, :c * p], p)[0]
                                   for i, (r, c) in enumerate(grids)])
        x = self.ln_pre(self.patch_embed(patches))[None]
        cos, sin = vision_rope(grids, cfg.vision_dim // cfg.vision_heads, cfg.vision_rope_theta)
        cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)
        runs = L.equal_size_runs([r * c for r, c in grids])
        # Block outputs leave the scan only if the projector reads one other than the last.
        keep_outputs = any(0 < i < cfg.vision_layers for i in cfg.feature_layers)

        first = x
        x, outputs = L.run_vision_blocks(self.blocks, x, taps, lambda block, h: block(h, cos, sin, runs), keep_outputs)

        def hidden(i: int) -> jax.Array:
            return first if i == 0 else x if i == cfg.vision_layers else outputs[i - 1]

        features = jnp.concatenate([hidden(i) for i in cfg.feature_layers], axis=-1)
        x = self.projector_fc2(L.ACTIVATIONS[cfg.projector_act](self.projector_fc1(features)))
        return taps.at(sites.VISION_TOKENS, x)


# ----------------------------------------------------------------------------------------------
# The model


def image_sizes_of(batch) -> tuple[tuple[int, int], ...]:
    """The batch's image_sizes; without them every image is its whole (padded) pixel_values, as in HF."""
    if batch.image_sizes is not None:
        return batch.image_sizes
    n, _, height, width = np.shape(batch.pixel_values)
    return ((height, width),) * n


class Pixtral(L.LanguageModel):
    """LlavaForConditionalGeneration (Pixtral tower, Mistral decoder), as the pieces every family
    exposes to the runner in forward.py: embed_inputs -> lm_context -> layers (stacked) -> final
    -> unembed."""

    def __init__(self, cfg: PixtralConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.init_llama_decoder(cfg, qkv_bias=False, act=cfg.hidden_act, dtype=dtype, rngs=rngs)

    def embed_inputs(self, batch, taps: Taps) -> jax.Array:
        """LM input [B, T, D]: token embeddings with the visual tokens over the `[IMG]` slots."""
        return self.embed_with_visual_tokens(
            batch, lambda: self.vision(batch.pixel_values, image_sizes_of(batch), taps)[0])

    @staticmethod
    def token_grids(cfg: PixtralConfig, batch) -> list[tuple[int, int]]:
        """(rows, cols) of visual tokens of each image of the batch ([IMG_BREAK]s not counted), in order."""
        return [(int(h) // cfg.patch_size, int(w) // cfg.patch_size) for h, w in np.asarray(batch.image_sizes)]

    @staticmethod
    def check_batch(cfg: PixtralConfig, batch) -> None:
        """Host-side input checks, raising ValueError with what is wrong."""
        ids = L.host_input_ids(batch)
        if batch.pixel_values is None:
            L.check_no_image_slots(ids, cfg.image_token_id, "[IMG]")
            return
        shape = np.shape(batch.pixel_values)
        if len(shape) != 4 or shape[1] != cfg.in_channels:
            raise ValueError(f"pixel_values must be [n_img, {cfg.in_channels}, H, W], got {shape}")
        sizes = image_sizes_of(batch)
        if len(sizes) != shape[0]:
            raise ValueError(f"image_sizes lists {len(sizes)} images, pixel_values has {shape[0]}")
        p = cfg.patch_size
        for i, (h, w) in enumerate(sizes):
            if not (p <= h <= shape[2] and p <= w <= shape[3]):
                raise ValueError(f"image {i}: size ({h}, {w}) must be at least one {p}-px patch and fit in "
                                 f"pixel_values' {shape[2]} x {shape[3]}")
        if ids is not None:
            slots = int((ids == cfg.image_token_id).sum())
            tokens = sum(r * c for r, c in patch_grids(sizes, p))
            if slots != tokens:
                raise ValueError(f"the prompts have {slots} [IMG] slots but the images give {tokens} visual tokens")

    def lm_context(self, batch) -> LMContext:
        """What every decoder layer needs besides the residual: RoPE cos/sin and the mask."""
        cfg = self.cfg
        cos, sin = L.rope_cos_sin(L.positions_from_mask(batch.attention_mask), cfg.head_dim, cfg.rope_theta)
        return LMContext(cos, sin, L.causal_mask(batch.attention_mask, cfg.sliding_window))
