"""Tiny random Hugging Face LLaVA-1.5 checkpoints (CLIP tower, Llama decoder), a llava-1.5-style
processor dir, and HF reference runs.

Importable from any test module (pytest puts tests/ on sys.path; tests/ has no __init__.py):

    import fixtures_llava as fl
    from fixtures_llava import llava_ckpts  # the session fixture

The config keeps every structural feature of llava-hf/llava-1.5-7b-hf at toy size:
  * CLIP tower: 14-px patches on a 56-px image (4 x 4 patches + CLS), class embedding, learned
    position table, pre_layrnorm, 3 pre-LN encoder layers with biases and quick_gelu, full
    attention within each image, post_layernorm (unused by Llava); vision_feature_layer -2 (the
    input of the last layer, so that layer does not reach the LM) and strategy "default" (CLS
    dropped); variant "features": [0, -2] concatenated, strategy "full";
  * Llava projector with biases (linear, GELU, linear);
  * Llama decoder: GQA (4 query heads, 2 KV heads), head_dim 24 != hidden 64 / 4 heads, RMSNorm,
    SiLU MLP, no biases, untied head.
Every parameter is random (norm weights and biases, the class embedding too), so a key-map,
transform or layout mistake anywhere shows up in the logits.

Every LLaVA-1.5 image has the same size (the processor resizes the short side and centre-crops
to image_size), so the "two images of different sizes" case of other families does not exist.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest

import fixtures_pixtral as fp
import hf_reference as hr
from hf_reference import torch_replace  # noqa: F401  (fl.torch_replace)

VOCAB = 128
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
UNK, BOS, EOS, IMG, PAD = 0, 1, 2, 3, 4
NL = 5
WORDS = ("USER", "ASSISTANT", ":", "You", "are", "a", "helpful", "assistant", "What", "is", "left", "right", "of",
         "the", "red", "blue", "green", "square", "circle", "above", "below", "Answer", "in", "one", "word", "?",
         ".", ",", "Is", "to")
PATCH = 14
IMAGE_SIZE = 56  # the tiny tower's image (hub: 336)
SIDE = IMAGE_SIZE // PATCH
TOKENS_PER_IMAGE = SIDE * SIDE  # "default": the CLS position is dropped
TOKENS = (*SPECIAL_TOKENS, "\n", *WORDS)  # the test tokenizer's vocabulary, in id order
assert TOKENS.index("\n") == NL and len(TOKENS) <= VOCAB


def vocab_id(token: str) -> int:
    return TOKENS.index(token)


TEXT_CONFIG = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_act="silu", rms_norm_eps=1e-5,
    max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
VISION_CONFIG = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
    patch_size=PATCH, image_size=IMAGE_SIZE, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
)


# ----------------------------------------------------------------------------------------------
# Models


def tiny_hf_config(vision_feature_layer=-2, strategy="default", **text_overrides):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=dict(VISION_CONFIG), text_config={**TEXT_CONFIG, **text_overrides},
                       image_token_index=IMG, projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
                       image_seq_length=TOKENS_PER_IMAGE)


def build_tiny_llava(out_dir: str, seed: int = 0, processor: bool = True, vision_feature_layer=-2,
                     strategy="default", **text_overrides) -> str:
    """Saves a tiny random LlavaForConditionalGeneration (CLIP tower, Llama decoder; float32) with
    save_pretrained, plus the processor files (hub layout)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_config(vision_feature_layer, strategy, **text_overrides)).eval()
    hr.randomize_(model, seed)
    model.save_pretrained(out_dir)
    if processor:
        write_processor_dir(out_dir)
    return out_dir


# LlavaForConditionalGeneration from a dir, eager attention, float32 unless dtype: as Pixtral's.
load_hf = fp.load_hf


def to_hub_layout(name: str) -> str:
    """save_pretrained name -> llava-hf/llava-1.5-7b-hf's (CLIP's `vision_model.` level)."""
    return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name


class LlavaCheckpoints(hr.Checkpoints):
    """Tiny HF LLaVA-1.5 checkpoints (see hr.Checkpoints). Variants: "base"; "features"
    (vision_feature_layer [0, -2], strategy "full")."""

    PREFIX = "llava"
    VARIANTS = {"base": {}, "features": {"vision_feature_layer": [0, -2], "strategy": "full"}}
    build = staticmethod(build_tiny_llava)
    load_hf = staticmethod(load_hf)


@pytest.fixture(scope="session")
def llava_ckpts(tmp_path_factory) -> LlavaCheckpoints:
    return LlavaCheckpoints(tmp_path_factory.mktemp("llava_ckpts"))


# ----------------------------------------------------------------------------------------------
# Processor dir

# llava-hf/llava-1.5-7b-hf's chat_template.json: "USER: <image>\n<prompt> ASSISTANT:"; a system
# message's text is written with no role in front.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(tokens: Sequence[str] = TOKENS):
    """The word-level test tokenizer over tokens (SPECIAL_TOKENS first); it prepends <s>, as Llama's does."""
    return hr.word_level_tokenizer(tokens, SPECIAL_TOKENS, "<s>")


TOKENIZER_CONFIG = {
    "tokenizer_class": "TokenizersBackend", "padding_side": "left", "bos_token": "<s>", "eos_token": "</s>",
    "pad_token": "<pad>", "unk_token": "<unk>", "processor_class": "LlavaProcessor", "model_max_length": 1_000_000,
}
IMAGE_PROCESSOR_CONFIG = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE_SIZE},
}
PROCESSOR_CONFIG = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": PATCH,
                    "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}


def write_processor_dir(out_dir: str, layout: str = "hub", padding_side: str = "left",
                        image_size: int = IMAGE_SIZE, tokens: Sequence[str] = TOKENS, patch: int = PATCH) -> str:
    """Writes the tokenizer and processor files into out_dir.

    layout "hub": as llava-hf/llava-1.5-7b-hf ships them (preprocessor_config.json,
    processor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json); "saved":
    what transformers 5.23's LlavaProcessor.save_pretrained writes for the same processor.
    """
    image = {**IMAGE_PROCESSOR_CONFIG, "size": {"shortest_edge": image_size},
             "crop_size": {"height": image_size, "width": image_size}}
    hub_files = {"preprocessor_config.json": image, "processor_config.json": {**PROCESSOR_CONFIG, "patch_size": patch},
                 "chat_template.json": {"chat_template": CHAT_TEMPLATE}}
    return hr.write_processor_files(out_dir, layout, build_tokenizer(tokens),
                                    {**TOKENIZER_CONFIG, "padding_side": padding_side}, hub_files,
                                    lambda d: write_processor_dir(d, "hub", padding_side, image_size, tokens, patch),
                                    hf_processor)


def hf_processor(path: str):
    """transformers 5.23's LlavaProcessor of a dir, with the PIL CLIP image processor."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return LlavaProcessor.from_pretrained(path, image_processor=CLIPImageProcessorPil.from_pretrained(path),
                                          tokenizer=AutoTokenizer.from_pretrained(path))


def hf_processor_inputs(proc_dir: str, images: Sequence[Any], prompts: Sequence[str], system=None):
    """HF's reference: `LlavaProcessor.apply_chat_template(conversations, tokenize=True, padding=True)`
    with the images inline in each user turn (before the text). numpy arrays."""
    return hr.hf_chat_inputs(hf_processor(proc_dir), images, prompts, system)


# ----------------------------------------------------------------------------------------------
# Model inputs and the HF reference run


def make_inputs(prompts: Sequence[Sequence[Any]], seed: int = 0, tokens_per_image: int = TOKENS_PER_IMAGE
                ) -> dict[str, np.ndarray]:
    """Prompts (lists of token ids and the string "image") -> left-padded numpy inputs for both
    models, laid out as the llava-1.5 template writes them (`<s> USER : <image>... \\n ... ASSISTANT :`).

    Returns input_ids, attention_mask, position_ids for HF (`where(mask, cumsum(mask) - 1, 0)`) and
    with images pixel_values [n_img, 3, 56, 56] N(0, 1).
    """
    rng = np.random.default_rng(seed)
    rows, n_img = [], 0
    user, assistant, colon = vocab_id("USER"), vocab_id("ASSISTANT"), vocab_id(":")
    for parts in prompts:
        ids: list[int] = [BOS, user, colon]
        for part in parts:
            if isinstance(part, str):
                ids += [IMG] * tokens_per_image + [NL]
                n_img += 1
            else:
                ids += list(part)
        rows.append(ids + [assistant, colon])
    input_ids, mask = hr.pad_rows(rows, PAD)
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": hr.hf_position_ids(mask)}
    if n_img:
        out["pixel_values"] = rng.standard_normal((n_img, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return out


def to_batch(inputs: dict[str, np.ndarray]):
    """The `sj.Batch` of `make_inputs` output (position_ids are HF-only: ours come from the mask)."""
    import spatial_jax as sj

    return sj.Batch(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"))


def hf_run(hf, inputs: dict[str, np.ndarray], hooks=()) -> dict[str, np.ndarray]:
    """hr.hf_run with LLaVA's sites: lm.attn_out / lm.mlp_out are the self_attn / mlp outputs;
    with images vision.block_out is [n_img, Lv, 1 + N_patches, Dv] (CLS first) and vision.tokens
    [n_img, N_patches, D]."""
    return hr.hf_run(hf, inputs, lambda layer: layer.self_attn, lambda layer: layer.mlp,
                     hf.model.vision_tower.encoder.layers, hooks)


def write_random_llava(out_dir: str, extra_words=(), geometry: str = "organism", seed: int = 0) -> str:
    """A tiny random LLaVA-1.5 checkpoint dir whose processor makes the `geometry` canvas one visual
    token a grid cell; vocabulary: the synthetic tasks' words, the template's, and extra_words."""
    import json
    import os

    from flax import nnx

    from experiments import common
    from spatial_jax.convert.export import export_hf
    from spatial_jax.data.geometry import get_geometry
    from spatial_jax.data.vocabulary import synthetic_words
    from spatial_jax.families.llava.model import Llava, LlavaConfig
    from spatial_jax.processing.words import split_words

    g = get_geometry(geometry)
    words = [*split_words("USER: ASSISTANT:"), *synthetic_words(), *extra_words]
    tokens = tuple(dict.fromkeys((*SPECIAL_TOKENS, "\n", *words)))
    write_processor_dir(out_dir, image_size=g.canvas_px, tokens=tokens, patch=g.token_px)
    cfg = LlavaConfig(vision_layers=2, vision_dim=32, vision_heads=2, vision_mlp_dim=64, vision_act="quick_gelu",
                      vision_eps=1e-5, image_size=g.canvas_px, patch_size=g.token_px, in_channels=3,
                      vocab_size=len(tokens), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, hidden_act="silu", rms_norm_eps=1e-5, image_token_id=IMG,
                      projector_act="gelu", projector_bias=True, feature_select="default", vision_feature_layer=-2,
                      tie_word_embeddings=False, rope_theta=1e4)
    export_hf(out_dir, "llava", cfg, nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(seed)))))
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, common.GEOMETRY_KEY: geometry}, f, indent=2)
    return out_dir
