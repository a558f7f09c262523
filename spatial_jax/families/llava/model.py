"""Flax NNX port of transformers' LlavaForConditionalGeneration with a CLIP vision tower and a
Llama decoder (llava-hf/llava-1.5-7b-hf), as transformers 5.23 runs it.

  * Vision tower (CLIPVisionModel): every image has the config's image_size (336; the processor
    resizes and crops each image to it), so images are batched: `vision.block_out`
    [n_img, Lv, 1 + N_patches, Dv] with the class (CLS) position at index 0 and patch (r, c) at
    1 + r * side + c; `vision.tokens` [n_img, N_patches, D] (strategy "default": no CLS).
    Patches (the bias-free Conv2d, as a matmul over flattened patches) after the learned class
    embedding, plus the learned position table, then LayerNorm `pre_layrnorm` and the pre-LN
    encoder layers of SigLIP (layers.ViTLayer: LayerNorms, attention with biases over the
    whole image, fc1 / activation / fc2 with biases), here with quick_gelu. `post_layernorm`
    only feeds CLIP's pooled output, which Llava never reads: it is converted (so that the
    parameter count and an export match HF's) and not run.
  * Projector (LlavaMultiModalProjector): the hidden state named by `vision_feature_layer`
    (index 0 is the pre_layrnorm output, i the output of layer i - 1; -2, llava-1.5's, is the
    input of the last layer; a list concatenates several), the CLS position dropped under
    strategy "default", then linear, GELU, linear. Every encoder layer runs, as in HF, so that
    `vision.block_out` holds all Lv of them; with -2 the last one does not reach the LM.
  * Decoder (Llama): layers.DecoderLayer without q/k/v biases (Mistral's, no sliding window),
    RoPE, causal mask, final RMSNorm, untied head. The visual tokens are written over the
    `<image>` slots in order (576 per image for llava-1.5).

Positions: `cumsum(attention_mask) - 1`, 0 on padding (HF generate's rule), as in the other ports.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.interventions import sites
from spatial_jax.interventions.taps import Taps
from spatial_jax.families.pixtral.model import PixtralConfig
from spatial_jax.nn import layers as L
from spatial_jax.nn.context import LMContext

STRATEGIES = ("default", "full")

# Defaults of transformers 5.23's LlamaConfig / CLIPVisionConfig / LlavaConfig: a hub config.json
# leaves many keys out and relies on them (a sub-config dict gets its class defaults, not
# LlavaConfig's llava-1.5 init_kwargs; a sub-config without model_type is CLIP / Llama).
_TEXT_DEFAULTS = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
)
_VISION_DEFAULTS = dict(
    model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_LLAVA_DEFAULTS = dict(
    image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
    vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False,
)


# Our config field <- the HF config key, per (sub-)config: from_hf reads through these, to_hf writes.
_VISION_FIELDS = (("vision_layers", "num_hidden_layers"), ("vision_dim", "hidden_size"),
                  ("vision_heads", "num_attention_heads"), ("vision_mlp_dim", "intermediate_size"),
                  ("vision_act", "hidden_act"), ("vision_eps", "layer_norm_eps"), ("image_size", "image_size"),
                  ("patch_size", "patch_size"), ("in_channels", "num_channels"))
_TEXT_FIELDS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                ("head_dim", "head_dim"), ("intermediate_size", "intermediate_size"), ("hidden_act", "hidden_act"),
                ("rms_norm_eps", "rms_norm_eps"))
_TOP_FIELDS = (("image_token_id", "image_token_index"), ("projector_act", "projector_hidden_act"),
               ("projector_bias", "multimodal_projector_bias"), ("feature_select", "vision_feature_select_strategy"),
               ("vision_feature_layer", "vision_feature_layer"), ("tie_word_embeddings", "tie_word_embeddings"))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    # vision tower
    vision_layers: int
    vision_dim: int
    vision_heads: int
    vision_mlp_dim: int
    vision_act: str
    vision_eps: float
    image_size: int
    patch_size: int
    in_channels: int
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
    # projector and the rest of the top level
    image_token_id: int
    projector_act: str
    projector_bias: bool
    feature_select: str  # "default" drops the CLS position, "full" keeps it
    vision_feature_layer: Union[int, tuple[int, ...]]  # as in the HF config (negative counts from the end)
    tie_word_embeddings: bool
    rope_theta: float

    # A Llava config like Pixtral's: the patch and feature-layer arithmetic are the same.
    patch_dim = PixtralConfig.patch_dim
    patch_embed_shape = PixtralConfig.patch_embed_shape
    feature_layers = PixtralConfig.feature_layers

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens (= `<image>` slots) per image: the patches, plus the CLS under "full"."""
        return self.patches_per_side**2 + (self.feature_select == "full")

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 5.x layout) that `from_hf` reads back."""
        top, vision, text = ({hf: getattr(self, ours) for ours, hf in fields}
                             for fields in (_TOP_FIELDS, _VISION_FIELDS, _TEXT_FIELDS))
        feature = self.vision_feature_layer
        top["vision_feature_layer"] = feature if isinstance(feature, int) else list(feature)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", **top,
                "image_seq_length": self.patches_per_side**2,
                "vision_config": {"model_type": "clip_vision_model", **vision},
                "text_config": {"model_type": "llama", **text, "rope_parameters": rope,
                                "tie_word_embeddings": self.tie_word_embeddings}}

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlavaConfig":
        """From a HF config.json dict: the hub layout (sparse sub-configs, legacy `rope_theta`) or
        what transformers 5.x writes (`rope_parameters`). Missing keys take the HF class defaults.
        A Llava config with another vision tower or decoder, or what this port does not run, is refused."""
        top = {**_LLAVA_DEFAULTS, **d}
        text = {**_TEXT_DEFAULTS, **(d.get("text_config") or {})}
        vis = {**_VISION_DEFAULTS, **(d.get("vision_config") or {})}
        _check_supported(top, vis, text)
        values = {ours: src[hf] for src, fields in ((top, _TOP_FIELDS), (vis, _VISION_FIELDS), (text, _TEXT_FIELDS))
                  for ours, hf in fields}
        feature = values["vision_feature_layer"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        values.update(
            image_token_id=top.get("image_token_id", top["image_token_index"]),
            vision_feature_layer=feature if isinstance(feature, int) else tuple(feature),
            num_kv_heads=values["num_kv_heads"] or values["num_heads"],
            head_dim=values["head_dim"] or values["hidden_size"] // values["num_heads"],
            vision_eps=float(values["vision_eps"]), rms_norm_eps=float(values["rms_norm_eps"]),
            projector_bias=bool(values["projector_bias"]),
            # As HF's LlavaConfig: tied if the top level or the text config says so.
            tie_word_embeddings=bool(top["tie_word_embeddings"] or text["tie_word_embeddings"]),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10_000.0))),
        )
        return cls(**values)


def _check_supported(top: dict, vis: dict, text: dict) -> None:
    """ValueError naming the first setting of a Llava config (defaults filled in) this port does not run."""
    if vis["model_type"] != "clip_vision_model":
        raise ValueError(f"vision_config.model_type {vis['model_type']!r}: LLaVA needs a CLIP tower")
    if text["model_type"] != "llama":
        raise ValueError(f"text_config.model_type {text['model_type']!r} with a {vis['model_type']!r} vision tower: "
                         "LLaVA-1.5 runs Llama decoders only")
    for key in ("attention_bias", "mlp_bias"):
        if text[key]:
            raise ValueError(f"text_config.{key}=true is not supported (Llama-2 / Vicuna have none)")
    if top["vision_feature_select_strategy"] not in STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r}: "
                         f"expected one of {STRATEGIES}")
    for key, act in (("text_config.hidden_act", text["hidden_act"]), ("vision_config.hidden_act", vis["hidden_act"]),
                     ("projector_hidden_act", top["projector_hidden_act"])):
        if act not in L.ACTIVATIONS:
            raise ValueError(f"unsupported {key} {act!r}; supported: {sorted(L.ACTIVATIONS)}")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported text rope_type {rope.get('rope_type', rope.get('type'))!r} (supported: default)")
    size, patch = vis["image_size"], vis["patch_size"]
    if not (isinstance(size, int) and isinstance(patch, int) and size % patch == 0):
        raise ValueError(f"image_size {size} must be an int multiple of the int patch_size {patch}")
    n, feature = vis["num_hidden_layers"], top["vision_feature_layer"]
    if any(not -(n + 1) <= i <= n for i in ((feature,) if isinstance(feature, int) else feature)):
        raise ValueError(f"vision_feature_layer {feature} is outside the {n + 1} vision hidden states")


# ----------------------------------------------------------------------------------------------
# Vision tower and projector


class VisionTower(nnx.Module):
    """CLIP vision encoder plus the Llava projector: images -> visual tokens [n, tokens_per_image, D]."""

    def __init__(self, cfg: LlavaConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.vision_dim
        self.patch_embed = L.Dense(cfg.patch_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.class_embed = nnx.Param(L.init_normal(rngs, (d,), dtype))
        self.pos_embed = nnx.Param(L.init_normal(rngs, (cfg.patches_per_side**2 + 1, d), dtype))
        self.pre_norm = L.LayerNorm(d, eps=cfg.vision_eps, dtype=dtype)
        self.layers = L.stack_modules([L.ViTLayer(cfg.vision_dim, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_eps,
                                                  cfg.vision_act, dtype=dtype, rngs=rngs)
                                       for _ in range(cfg.vision_layers)])
        self.post_norm = L.LayerNorm(d, eps=cfg.vision_eps, dtype=dtype)  # CLIP's pooler only: never run
        d_in = len(cfg.feature_layers) * d
        self.projector_fc1 = L.Dense(d_in, cfg.hidden_size, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.projector_fc2 = L.Dense(cfg.hidden_size, cfg.hidden_size, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, taps: Taps) -> jax.Array:
        """pixel_values [n, C, S, S] (S = image_size) -> visual tokens [n, tokens_per_image, D]."""
        cfg = self.cfg
        patches = self.patch_embed(L.patchify(pixel_values.astype(self.patch_embed.kernel.dtype), cfg.patch_size))
        cls = jnp.broadcast_to(self.class_embed[...], (patches.shape[0], 1, cfg.vision_dim))
        x = self.pre_norm(jnp.concatenate([cls, patches], axis=1) + self.pos_embed[...])
        # Layer outputs leave the scan only if the projector reads one other than the last.
        keep_outputs = any(0 < i < cfg.vision_layers for i in cfg.feature_layers)
        first = x
        x, outputs = L.run_vision_blocks(self.layers, x, taps, lambda layer, h: layer(h), keep_outputs)
        skip = 1 if cfg.feature_select == "default" else 0
        hidden = [first if i == 0 else x if i == cfg.vision_layers else outputs[i - 1] for i in cfg.feature_layers]
        features = jnp.concatenate([h[:, skip:] for h in hidden], axis=-1)
        x = self.projector_fc2(L.ACTIVATIONS[cfg.projector_act](self.projector_fc1(features)))
        return taps.at(sites.VISION_TOKENS, x)


# ----------------------------------------------------------------------------------------------
# The model


class Llava(L.LanguageModel):
    """LlavaForConditionalGeneration (CLIP tower, Llama decoder), as the pieces every family
    exposes to the runner: embed_inputs -> lm_context -> layers (stacked) -> final -> unembed."""

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.init_llama_decoder(cfg, qkv_bias=False, act=cfg.hidden_act, dtype=dtype, rngs=rngs)

    def embed_inputs(self, batch, taps: Taps) -> jax.Array:
        """LM input [B, T, D]: token embeddings with the visual tokens over the `<image>` slots."""
        return self.embed_with_visual_tokens(
            batch, lambda: self.vision(batch.pixel_values, taps).reshape(-1, self.cfg.hidden_size))

    @staticmethod
    def check_batch(cfg: LlavaConfig, batch) -> None:
        """Host-side input checks, raising ValueError with what is wrong: pixel_values of the
        tower's one size, and tokens_per_image `<image>` slots per image (none without images)."""
        ids = L.host_input_ids(batch)
        images = None if batch.pixel_values is None else np.shape(batch.pixel_values)
        if images is not None and (len(images) != 4 or tuple(images[1:]) != cfg.pixel_shape):
            raise ValueError(f"pixel_values must be [n_img, {', '.join(map(str, cfg.pixel_shape))}], got {images}")
        visual = 0 if images is None else images[0] * cfg.tokens_per_image
        if ids is not None and int((ids == cfg.image_token_id).sum()) != visual:
            given = "no pixel_values were given" if images is None else f"{images[0]} image(s) give {visual} visual tokens"
            raise ValueError(f"the prompts have {int((ids == cfg.image_token_id).sum())} <image> slots but {given}")

    @staticmethod
    def token_grids(cfg: LlavaConfig, batch) -> list[tuple[int, int]]:
        """(rows, cols) of patch tokens of each image of the batch (24 x 24 for llava-1.5; the CLS
        token that strategy "full" keeps is not on the grid)."""
        n = 0 if batch.pixel_values is None else np.shape(batch.pixel_values)[0]
        return [(cfg.patches_per_side, cfg.patches_per_side)] * n

    def lm_context(self, batch) -> LMContext:
        """What every decoder layer needs besides the residual: RoPE cos/sin and the causal mask."""
        cfg = self.cfg
        cos, sin = L.rope_cos_sin(L.positions_from_mask(batch.attention_mask), cfg.head_dim, cfg.rope_theta)
        return LMContext(cos, sin, L.causal_mask(batch.attention_mask))
