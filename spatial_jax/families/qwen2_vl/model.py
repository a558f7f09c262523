"""Flax NNX port of transformers' Qwen2VLForConditionalGeneration (Qwen2-VL-7B/2B-Instruct).

Spec: shared/reference/architectures.md, part A. The vision tower works on the patches of all
images of a batch concatenated (as HF does), with attention kept inside each image by a segment
mask, so the vision sites have batch axis 1: `vision.block_out` [1, Lv, N_patches, Dv] and
`vision.tokens` [1, N_tokens, D], images in batch order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn import layers as L
from spatial_jax.nn.context import LMContext


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    # vision tower
    vision_depth: int
    vision_dim: int
    vision_heads: int
    vision_mlp_dim: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    vision_rope_theta: float
    # language model
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def patch_embed_shape(self) -> tuple[int, ...]:
        """HF's Conv3d kernel shape, [out, C, T, p, p]; ours is its flattened transpose."""
        return (self.vision_dim, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 5.x nested layout) that `from_hf` reads back."""
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "image_token_id": self.image_token_id, "video_token_id": self.image_token_id + 1,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {
                "model_type": "qwen2_vl_vision", "depth": self.vision_depth, "embed_dim": self.vision_dim,
                "num_heads": self.vision_heads, "mlp_ratio": self.vision_mlp_dim // self.vision_dim,
                "hidden_size": self.hidden_size, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "spatial_merge_size": self.merge_size,
                "in_channels": self.in_channels, "hidden_act": "quick_gelu",
                "rope_parameters": {"rope_type": "axial", "rope_theta": self.vision_rope_theta},
            },
            "text_config": {
                "model_type": "qwen2_vl_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "intermediate_size": self.intermediate_size,
                "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu", "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                    "mrope_section": list(self.mrope_section)},
                "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": None, "eos_token_id": None,
                "pad_token_id": None,
            },
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen2VLConfig":
        """From a HF config.json dict: hub layout (text keys at the top level, `rope_scaling`)
        or the nested `text_config` layout that transformers 5.x writes."""
        text = {**d, **d.get("text_config", {})}
        vis = d["vision_config"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError("Qwen2-VL config has no mrope_section (rope_parameters / rope_scaling)")
        rope_theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if sum(rope["mrope_section"]) != head_dim // 2:
            raise ValueError(f"mrope_section {list(rope['mrope_section'])} sums to {sum(rope['mrope_section'])}, "
                             f"but head_dim {head_dim} has {head_dim // 2} rotary frequencies")
        vis_heads = vis["num_heads"]
        vis_rope = vis.get("rope_parameters") or {}
        # As HF's Qwen2VLConfig: tied if the top level or (pre-v5 saves) text_config says so.
        tied = bool(d.get("tie_word_embeddings", False)) or bool(d.get("text_config", {}).get("tie_word_embeddings", False))
        return cls(
            vision_depth=vis["depth"], vision_dim=vis["embed_dim"], vision_heads=vis_heads,
            vision_mlp_dim=int(vis["embed_dim"] * vis.get("mlp_ratio", 4)),
            patch_size=vis.get("patch_size", 14), temporal_patch_size=vis.get("temporal_patch_size", 2),
            merge_size=vis.get("spatial_merge_size", 2), in_channels=vis.get("in_channels", 3),
            vision_rope_theta=float(vis_rope.get("rope_theta", 10000.0)),
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"], num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim,
            intermediate_size=text["intermediate_size"], rms_norm_eps=text.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta), mrope_section=tuple(rope["mrope_section"]),
            tie_word_embeddings=tied,
            image_token_id=d.get("image_token_id", 151655),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
        )


# ----------------------------------------------------------------------------------------------
# Vision tower


def vision_patch_layout(grid_thw: tuple[tuple[int, int, int], ...], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every patch of every image, in the processor's merge-block-major order.

    grid_thw: static ((t, h, w), ...) with t = 1. Returns h_idx, w_idx, each [N_patches] int32.
    """
    rows, cols = [], []
    for _, h, w in grid_thw:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        for a, out in ((hh, rows), (ww, cols)):
            out.append(a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1))
    return np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)


def image_groups(grid_thw: tuple[tuple[int, int, int], ...]) -> list[tuple[int, int, int]]:
    """Runs of consecutive equal-size images as (first patch, n images, patches per image)."""
    return L.equal_size_runs([h * w for _, h, w in grid_thw])


def vision_rope(cfg: Qwen2VLConfig, grid_thw: tuple[tuple[int, int, int], ...],
                dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N_patches, head_dim] in dtype (HF: float32) of the tower's 2D RoPE: half the
    rotary frequencies turn with the patch's row, half with its column."""
    h_idx, w_idx = vision_patch_layout(grid_thw, cfg.merge_size)
    hd = cfg.vision_dim // cfg.vision_heads
    inv_freq = 1.0 / cfg.vision_rope_theta ** (jnp.arange(0, hd // 2, 2, dtype=dtype) / (hd // 2))
    emb = jnp.concatenate([h_idx[:, None] * inv_freq, w_idx[:, None] * inv_freq], axis=-1)
    emb = jnp.concatenate([emb, emb], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.vision_dim
        self.norm1 = L.LayerNorm(d, eps=1e-6, dtype=dtype)
        self.qkv = L.Dense(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.proj = L.Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.norm2 = L.LayerNorm(d, eps=1e-6, dtype=dtype)
        self.fc1 = L.Dense(d, cfg.vision_mlp_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = L.Dense(cfg.vision_mlp_dim, d, bias=True, dtype=dtype, rngs=rngs)
        self.heads = cfg.vision_heads

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups) -> jax.Array:
        """x [1, N, Dv]; cos/sin [N, hd] in compute_dtype; groups: `image_groups` of the batch."""
        _, N, D = x.shape
        hd = D // self.heads
        qkv = self.qkv(self.norm1(x)).reshape(N, 3, self.heads, hd)
        # HF rotates the vision q/k in float32 whatever the model dtype (float64 here for float64).
        ct = L.compute_dtype(x.dtype)
        q = L.apply_rope(qkv[:, 0].astype(ct), cos[:, None], sin[:, None]).astype(x.dtype)
        k = L.apply_rope(qkv[:, 1].astype(ct), cos[:, None], sin[:, None]).astype(x.dtype)
        a = L.blockwise_attention(q, k, qkv[:, 2], groups, hd**-0.5)[None]
        x = x + self.proj(a)
        h = self.fc1(self.norm2(x))
        return x + self.fc2(L.ACTIVATIONS["quick_gelu"](h))


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        m2 = cfg.merge_size**2
        self.patch_embed = L.Dense(cfg.patch_dim, cfg.vision_dim, bias=False, dtype=dtype, rngs=rngs)
        self.blocks = L.stack_modules([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.vision_depth)])
        self.merger_norm = L.LayerNorm(cfg.vision_dim, eps=1e-6, dtype=dtype)
        self.merger_fc1 = L.Dense(m2 * cfg.vision_dim, m2 * cfg.vision_dim, bias=True, dtype=dtype, rngs=rngs)
        self.merger_fc2 = L.Dense(m2 * cfg.vision_dim, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, grid_thw: tuple, taps: Taps) -> jax.Array:
        """pixel_values [N, patch_dim], static grid_thw ((1, h, w), ...) -> visual tokens [1, N / merge^2, D]."""
        return self.from_patches(self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype)), grid_thw, taps)

    def from_patches(self, x: jax.Array, grid_thw: tuple, taps: Taps) -> jax.Array:
        """The tower after its patch embedding: x [N, Dv] -> visual tokens [1, N / merge^2, D]."""
        cfg = self.cfg
        N = x.shape[0]
        cos, sin = vision_rope(cfg, grid_thw, L.compute_dtype(x.dtype))
        groups = image_groups(grid_thw)
        x, _ = L.run_vision_blocks(self.blocks, x[None], taps, lambda block, h: block(h, cos, sin, groups))
        x = self.merger_norm(x).reshape(1, N // cfg.merge_size**2, -1)
        x = self.merger_fc2(jax.nn.gelu(self.merger_fc1(x), approximate=False))
        return taps.at(sites.VISION_TOKENS, x)


# ----------------------------------------------------------------------------------------------
# Language model


def mrope_positions(input_ids: jax.Array, attention_mask: jax.Array, grid_thw: Optional[tuple],
                    image_token_id: int, merge: int) -> jax.Array:
    """M-RoPE (t, h, w) position ids [3, B, T], as HF's get_rope_index, computed in-graph.

    Text advances every row by 1; an image run of H' x W' merged tokens puts token (r, c) at
    (p, p + r, p + c) and advances the position by max(H', W'). Padded slots get 0; positions
    count only unpadded tokens. Images are numbered in batch order, as image_grid_thw lists them.
    """
    B, T = input_ids.shape
    valid = attention_mask.astype(bool)
    ar = jnp.arange(T)
    if grid_thw is None:
        is_img = jnp.zeros((B, T), bool)
    else:
        is_img = (input_ids == image_token_id) & valid
    starts = is_img & ~jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
    k = ar - jax.lax.cummax(jnp.where(starts, ar, 0), axis=1)  # index inside the image run
    if grid_thw is None:
        r = c = advance_img = jnp.zeros((B, T), jnp.int32)
    else:
        grid_thw = jnp.asarray(grid_thw, jnp.int32)
        img = jnp.clip(jnp.cumsum(starts.reshape(-1)).reshape(B, T) - 1, 0, grid_thw.shape[0] - 1)
        hh, ww = grid_thw[img, 1] // merge, grid_thw[img, 2] // merge
        r, c = k // ww, k % ww
        advance_img = jnp.where(k == hh * ww - 1, jnp.maximum(hh, ww), 0)
    advance = jnp.where(is_img, advance_img, valid.astype(jnp.int32))
    base = jnp.cumsum(advance, axis=1) - advance
    pos = jnp.stack([base, base + jnp.where(is_img, r, 0), base + jnp.where(is_img, c, 0)])
    return jnp.where(valid[None], pos, 0).astype(jnp.int32)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, section: tuple[int, ...], dtype=jnp.float32):
    """positions [3, B, T] -> cos, sin [B, T, head_dim] in dtype (HF: float32); frequency slots
    take t/h/w in turn."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    freqs = positions[..., None].astype(dtype) * inv_freq  # [3, B, T, hd/2]
    axis_of_slot = jnp.concatenate([jnp.full((n,), i % 3) for i, n in enumerate(section)])
    f = jnp.where(axis_of_slot == 0, freqs[0], jnp.where(axis_of_slot == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Qwen2VL(L.LanguageModel):
    """Qwen2VLForConditionalGeneration, as the pieces every family exposes to the runner in
    forward.py: embed_inputs -> lm_context -> layers (stacked) -> final -> unembed."""

    def __init__(self, cfg: Qwen2VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.init_llama_decoder(cfg, qkv_bias=True, dtype=dtype, rngs=rngs)

    def embed_inputs(self, batch, taps: Taps) -> jax.Array:
        """LM input [B, T, D]: token embeddings with the visual tokens over the `<|image_pad|>` slots."""
        return self.embed_with_visual_tokens(
            batch, lambda: self.vision(batch.pixel_values, batch.image_grid_thw, taps)[0])

    @staticmethod
    def token_grids(cfg: Qwen2VLConfig, batch) -> list[tuple[int, int]]:
        """(rows, cols) of merged visual tokens of each image of the batch, in order."""
        return [(int(h) // cfg.merge_size, int(w) // cfg.merge_size) for _, h, w in np.asarray(batch.image_grid_thw)]

    @staticmethod
    def check_batch(cfg: Qwen2VLConfig, batch) -> None:
        """Host-side input checks, raising ValueError with what is wrong."""
        ids = L.host_input_ids(batch)
        if batch.pixel_values is None:
            L.check_no_image_slots(ids, cfg.image_token_id, "<|image_pad|>")
            return
        if batch.image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        n, dim = np.shape(batch.pixel_values)
        if dim != cfg.patch_dim:
            raise ValueError(f"pixel_values rows have {dim} values, expected {cfg.patch_dim}")
        grid = np.asarray(batch.image_grid_thw)
        if (grid[:, 0] != 1).any():
            raise ValueError("only still images (t = 1 in image_grid_thw) are supported, not video")
        if grid.prod(-1).sum() != n:
            raise ValueError(f"image_grid_thw covers {grid.prod(-1).sum()} patches, pixel_values has {n}")
        if ids is not None:
            slots = int((ids == cfg.image_token_id).sum())
            if slots * cfg.merge_size**2 != n:
                raise ValueError(f"the prompts have {slots} <|image_pad|> slots but the images give "
                                 f"{n // cfg.merge_size**2} visual tokens")
            # Each image is one contiguous run of slots, in order; equal totals can still pair a
            # run with the wrong image (HF's get_rope_index fails on that too).
            runs = []
            for row in ids == cfg.image_token_id:
                edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
                runs += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
            per_image = (grid.prod(-1) // cfg.merge_size**2).tolist()
            if runs != per_image:
                raise ValueError(f"the prompts' <|image_pad|> runs have {runs} slots, but image_grid_thw "
                                 f"gives {per_image} visual tokens per image")

    def lm_context(self, batch) -> LMContext:
        """What every decoder layer needs besides the residual: M-RoPE cos/sin and the mask."""
        cfg = self.cfg
        pos = mrope_positions(batch.input_ids, batch.attention_mask, batch.image_grid_thw,
                              cfg.image_token_id, cfg.merge_size)
        cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                 L.compute_dtype(self.embed[...].dtype))
        return LMContext(cos, sin, L.causal_mask(batch.attention_mask))
