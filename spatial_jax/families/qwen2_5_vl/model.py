"""Flax NNX port of transformers' Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-3B/7B-Instruct).

Qwen2.5-VL is Qwen2-VL (spatial_jax/families/qwen2_vl/model.py, whose pieces are reused) with another
vision tower: its blocks use RMSNorm and a gated MLP (SiLU, with biases), the merger's norm is an
RMSNorm, and every block not listed in `fullatt_block_indexes` attends only within windows of
`window_size` pixels (window_size / patch_size / merge_size merged tokens a side; images are cut
into windows from the top-left, the last row and column of windows may be narrower). The language
model is Qwen2-VL's: a Qwen2 decoder with M-RoPE. For still images transformers 5.23's
get_rope_index gives exactly Qwen2-VL's positions (time_interval 1 for images); its
second_per_grid_ts / tokens_per_second only space the temporal positions of video frames, and
video is not supported here.

Window order. HF permutes the patches into window order before the first block and un-permutes
the merged tokens after the merger. Here the residual stays in the processor's patch order
throughout (RMSNorm, the MLP and the full-attention blocks act per patch or over a whole image,
so the order does not matter to them); a windowed block gathers its q/k/v into window order and
scatters its attention output back. Each window's attention runs over the same keys in the same
order as HF's. So the vision sites are in the processor's order, as Qwen2-VL's:
`vision.block_out` [1, Lv, N_patches, Dv] in merge-block-major patch order (not HF's window
order), `vision.tokens` [1, N_tokens, D] in the LM's token order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.families.qwen2_vl import model as qwen2_vl
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig, image_groups, vision_rope
from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.nn import layers as L


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """Qwen2VLConfig's fields (vision_mlp_dim is the vision config's intermediate_size) and the
    windowed attention's."""

    window_size: int  # pixels a window side
    fullatt_block_indexes: tuple[int, ...]
    vision_act: str = "silu"

    @property
    def window_tokens(self) -> int:
        """Merged tokens a window side (HF's vit_merger_window_size)."""
        return self.window_size // self.merge_size // self.patch_size

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 5.x nested layout) that `from_hf` reads back."""
        d = super().to_hf()
        d.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl")
        d["text_config"]["model_type"] = "qwen2_5_vl_text"
        vis = d["vision_config"]
        d["vision_config"] = {
            "model_type": "qwen2_5_vl_vision", "depth": self.vision_depth, "hidden_size": self.vision_dim,
            "intermediate_size": self.vision_mlp_dim, "num_heads": self.vision_heads,
            "out_hidden_size": self.hidden_size, "hidden_act": self.vision_act, "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            **{k: vis[k] for k in ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels",
                                   "rope_parameters")},
        }
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """From a HF config.json dict: the hub layout (text keys at the top level, `rope_scaling`,
        vision `in_chans`) or the nested layout transformers 5.x writes."""
        vis = d["vision_config"]
        text_hidden = {**d, **d.get("text_config", {})}["hidden_size"]
        out_hidden = vis.get("out_hidden_size", 3584)
        if out_hidden != text_hidden:
            raise ValueError(f"vision_config.out_hidden_size {out_hidden} differs from the language model's "
                             f"hidden_size {text_hidden}")
        if vis.get("hidden_act", "silu") not in L.ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {vis['hidden_act']!r}; supported: {sorted(L.ACTIVATIONS)}")
        depth = vis.get("depth", 32)
        full = tuple(int(i) for i in vis.get("fullatt_block_indexes", (7, 15, 23, 31)))
        if any(not 0 <= i < depth for i in full):
            raise ValueError(f"fullatt_block_indexes {list(full)} outside the {depth} vision blocks")
        # Qwen2-VL's reader with the vision sizes in its names; the MLP width is set below.
        base = Qwen2VLConfig.from_hf({**d, "vision_config": {
            **vis, "depth": depth, "embed_dim": vis.get("hidden_size", 1280), "num_heads": vis.get("num_heads", 16),
            "in_channels": vis.get("in_channels", vis.get("in_chans", 3)), "mlp_ratio": 1}})
        cfg = cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(Qwen2VLConfig)},
                     "vision_mlp_dim": vis.get("intermediate_size", 3420)},
                  window_size=vis.get("window_size", 112), fullatt_block_indexes=full,
                  vision_act=vis.get("hidden_act", "silu"))
        if cfg.window_tokens < 1:
            raise ValueError(f"window_size {cfg.window_size} px is smaller than one merged token "
                             f"({cfg.patch_size * cfg.merge_size} px)")
        return cfg


# ----------------------------------------------------------------------------------------------
# Vision tower


def window_layout(grid_thw: tuple[tuple[int, int, int], ...], merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """The windows of every image, as HF's get_vision_window_index (t = 1).

    Each image's merged-token grid is cut into window x window tiles from the top-left, tiles in
    row-major order, tokens row-major inside a tile. Returns (order, sizes): order [N_patches]
    int32, the processor-order index of each patch in window order (a token's merge block of
    merge^2 patches stays together); sizes, the patches of each window in that order.
    """
    order, sizes, offset = [], [], 0
    for _, h, w in grid_thw:
        tokens = np.arange(offset, offset + (h // merge) * (w // merge)).reshape(h // merge, w // merge)
        for r in range(0, tokens.shape[0], window):
            for c in range(0, tokens.shape[1], window):
                tile = tokens[r:r + window, c:c + window].reshape(-1)
                order.append(tile)
                sizes.append(tile.size * merge**2)
        offset += tokens.size
    tokens = np.concatenate(order)
    return (tokens[:, None] * merge**2 + np.arange(merge**2)).reshape(-1).astype(np.int32), sizes


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, dtype, rngs: nnx.Rngs):
        d, mlp = cfg.vision_dim, cfg.vision_mlp_dim
        self.norm1 = L.RMSNorm(d, eps=1e-6, dtype=dtype)
        self.qkv = L.Dense(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.proj = L.Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.norm2 = L.RMSNorm(d, eps=1e-6, dtype=dtype)
        self.gate = L.Dense(d, mlp, bias=True, dtype=dtype, rngs=rngs)
        self.up = L.Dense(d, mlp, bias=True, dtype=dtype, rngs=rngs)
        self.down = L.Dense(mlp, d, bias=True, dtype=dtype, rngs=rngs)
        self.heads, self.act = cfg.vision_heads, cfg.vision_act

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend) -> jax.Array:
        """x [1, N, Dv] in patch order; cos/sin [N, hd] in compute_dtype; attend(q, k, v) -> [N, H * hd]
        with q/k/v [N, H, hd]: the block's full or windowed attention."""
        _, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(N, 3, self.heads, D // self.heads)
        # HF rotates the vision q/k in float32 whatever the model dtype (float64 here for float64).
        ct = L.compute_dtype(x.dtype)
        q, k = (L.apply_rope(qkv[:, i].astype(ct), cos[:, None], sin[:, None]).astype(x.dtype) for i in (0, 1))
        x = x + self.proj(attend(q, k, qkv[:, 2])[None])
        h = self.norm2(x)
        return x + self.down(L.ACTIVATIONS[self.act](self.gate(h)) * self.up(h))


class _BlockAndKind(nnx.Module):
    """The stacked blocks beside whether each attends in full ([Lv] bool), so that the one vision
    block loop (nn.layers.run_vision_blocks) hands every block its own kind. Built per call; not
    part of the model's parameters."""

    def __init__(self, blocks: nnx.Module, cfg: Qwen2_5_VLConfig):
        self.block = blocks
        self.full = nnx.Variable(np.isin(np.arange(cfg.vision_depth), cfg.fullatt_block_indexes))


class VisionTower(qwen2_vl.VisionTower):
    """Qwen2-VL's tower (its __call__: patch embedding, then `from_patches`) with these blocks,
    windows and an RMSNorm merger."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        merged = cfg.merge_size**2 * cfg.vision_dim
        self.patch_embed = L.Dense(cfg.patch_dim, cfg.vision_dim, bias=False, dtype=dtype, rngs=rngs)
        self.blocks = L.stack_modules([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.vision_depth)])
        self.merger_norm = L.RMSNorm(cfg.vision_dim, eps=1e-6, dtype=dtype)
        self.merger_fc1 = L.Dense(merged, merged, bias=True, dtype=dtype, rngs=rngs)
        self.merger_fc2 = L.Dense(merged, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def from_patches(self, x: jax.Array, grid_thw: tuple, taps: Taps) -> jax.Array:
        """The tower after its patch embedding: x [N, Dv] in the processor's patch order, static
        grid_thw ((1, h, w), ...) -> visual tokens [1, N / merge^2, D]."""
        cfg = self.cfg
        N = x.shape[0]
        cos, sin = vision_rope(cfg, grid_thw, L.compute_dtype(x.dtype))
        images = image_groups(grid_thw)
        order, sizes = window_layout(grid_thw, cfg.merge_size, cfg.window_tokens)
        windows, inverse = L.equal_size_runs(sizes), np.argsort(order)
        scale = (cfg.vision_dim // cfg.vision_heads) ** -0.5

        def full(q, k, v):
            return L.blockwise_attention(q, k, v, images, scale)

        def windowed(q, k, v):
            return L.blockwise_attention(q[order], k[order], v[order], windows, scale)[inverse]

        def block_fn(step: _BlockAndKind, h):
            return step.block(h, cos, sin, lambda q, k, v: jax.lax.cond(step.full[...], full, windowed, q, k, v))

        x, _ = L.run_vision_blocks(_BlockAndKind(self.blocks, cfg), x[None], taps, block_fn)
        x = self.merger_norm(x).reshape(1, N // cfg.merge_size**2, -1)
        x = self.merger_fc2(jax.nn.gelu(self.merger_fc1(x), approximate=False))
        return taps.at(sites.VISION_TOKENS, x)


# ----------------------------------------------------------------------------------------------
# The model: Qwen2-VL's language model, batch checks and M-RoPE context with this vision tower


class Qwen2_5_VL(Qwen2VL):
    """Qwen2_5_VLForConditionalGeneration; embed_inputs, token_grids, check_batch and lm_context are Qwen2-VL's."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        # Qwen2-VL's language model; the Qwen2-VL vision tower it builds too is replaced at once
        # (free under nnx.eval_shape, which is how checkpoints are loaded).
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.vision = VisionTower(cfg, dtype=dtype, rngs=rngs)
