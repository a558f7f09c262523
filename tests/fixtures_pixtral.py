"""Tiny random Hugging Face Pixtral (Llava) checkpoints, a Pixtral-style processor dir, and HF reference runs.

Importable from any test module (pytest puts tests/ on sys.path; tests/ has no __init__.py):

    import fixtures_pixtral as fp
    from fixtures_pixtral import pixtral_ckpts  # the session fixture

The config keeps every structural feature of mistral-community/pixtral-12b at toy size:
  * Pixtral tower: 16-px patches (as the real one, so images of different sizes give different
    token grids), 2D RoPE over (row, column) with 4 rotary pairs per axis, RMSNorm pre-norms and
    ln_pre, SiLU-gated MLP, block-diagonal attention per image; vision_feature_layer -1 and
    strategy "full" (variant "features": [0, -2], two hidden states concatenated);
  * Llava projector with biases (linear, GELU, linear);
  * Mistral decoder: GQA (4 query heads, 2 KV heads), head_dim 24 != hidden 64 / 4 heads, RMSNorm,
    SiLU MLP, no biases, untied head, no sliding window (variant "window": a 4-token window);
  * the real special-token ids ([IMG] 10, [IMG_BREAK] 12, [IMG_END] 13, <s> 1, <pad> 11).
Every parameter is random (norm weights and biases too) at scales that keep activations O(1) and
logits O(1-10), so a key-map, transform or layout mistake anywhere shows up in the logits.

The processor dir: a word-level `tokenizers` tokenizer with the Pixtral special tokens (and a
post-processor that prepends <s>, as Pixtral's does), left padding, the Pixtral chat template, and
the image processor / processor config files (hub layout, or what transformers 5.23's
PixtralProcessor.save_pretrained writes). transformers 5.23 declares PixtralProcessor as needing
torchvision (only its fast image processor does); `hf_processor` builds it with the PIL image
processor, which is what transformers uses without torchvision.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any, Sequence

import numpy as np
import pytest

import hf_reference as hr
from hf_reference import torch_replace  # noqa: F401  (fp.torch_replace)

VOCAB = 128
# Pixtral's special tokens at their real ids (0..13).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]")
UNK, BOS, EOS, INST, INST_END = 0, 1, 2, 3, 4
IMG, PAD, IMG_BREAK, IMG_END = 10, 11, 12, 13
NL, NLNL = 14, 15
WORDS = ("You", "are", "a", "helpful", "assistant", "What", "is", "left", "right", "of", "the", "red", "blue",
         "green", "square", "circle", "above", "below", "Answer", "in", "one", "word", "?", ".", ",", "Is", "to")
PATCH = 16
LONGEST_EDGE = 96  # the processor's size limit in the tiny dir (hub: 1024)
TOKENS = (*SPECIAL_TOKENS, "\n", "\n\n", *WORDS)  # the test tokenizer's vocabulary, in id order
assert TOKENS.index("\n") == NL and TOKENS.index("\n\n") == NLNL and len(TOKENS) <= VOCAB


def vocab_id(token: str) -> int:
    """The id of a token of the test tokenizer."""
    return TOKENS.index(token)


TEXT_CONFIG = dict(
    model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_act="silu", rms_norm_eps=1e-5,
    max_position_embeddings=1024, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
VISION_CONFIG = dict(
    model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    patch_size=PATCH, image_size=LONGEST_EDGE, hidden_act="silu",
    rope_parameters={"rope_type": "axial", "rope_theta": 10_000.0},
)


# ----------------------------------------------------------------------------------------------
# Models


def tiny_hf_config(vision_feature_layer=-1, **text_overrides):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=dict(VISION_CONFIG), text_config={**TEXT_CONFIG, **text_overrides},
                       image_token_index=IMG, projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy="full", multimodal_projector_bias=True)


def build_tiny_pixtral(out_dir: str, seed: int = 0, processor: bool = True, vision_feature_layer=-1,
                       **text_overrides) -> str:
    """Saves a tiny random LlavaForConditionalGeneration (Pixtral tower, Mistral decoder; float32) with
    save_pretrained, plus the processor files (hub layout)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_config(vision_feature_layer, **text_overrides)).eval()
    hr.randomize_(model, seed)
    model.save_pretrained(out_dir)
    if processor:
        write_processor_dir(out_dir)
    return out_dir


def load_hf(path: str, dtype=None):
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager",
                                                         dtype=dtype or torch.float32).eval()


def to_runtime_layout(name: str) -> str:
    """save_pretrained (= hub) name -> the 5.x module (state_dict) name."""
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


class PixtralCheckpoints(hr.Checkpoints):
    """Tiny HF Pixtral checkpoints (see hr.Checkpoints). Variants: "base"; "window" (sliding_window
    4); "features" (vision_feature_layer [0, -2])."""

    PREFIX = "pixtral"
    VARIANTS = {"base": {}, "window": {"sliding_window": 4}, "features": {"vision_feature_layer": [0, -2]}}
    build = staticmethod(build_tiny_pixtral)
    load_hf = staticmethod(load_hf)


@pytest.fixture(scope="session")
def pixtral_ckpts(tmp_path_factory) -> PixtralCheckpoints:
    return PixtralCheckpoints(tmp_path_factory.mktemp("pixtral_ckpts"))


# ----------------------------------------------------------------------------------------------
# Processor dir

# The Pixtral chat template as transformers' Pixtral/Mistral 3 converters write it (a text chunk's
# "content" or "text"; a system text opens the last user turn; no generation prompt).
CHAT_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}\n{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    '{{- bos_token }}{%- for message in loop_messages %}'
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST]" + system_message + "\\n\\n" }}{%- else %}{{ "[INST]" }}{%- endif %}{%- endif %}'
    '{%- if message["content"] is not string %}{%- for chunk in message["content"] %}'
    '{%- if chunk["type"] == "text" %}{%- if "content" in chunk %}{{- chunk["content"] }}'
    '{%- elif "text" in chunk %}{{- chunk["text"] }}{%- endif %}'
    '{%- elif chunk["type"] == "image" %}{{- "[IMG]" }}'
    '{%- else %}{{- raise_exception("Unrecognized content type!") }}{%- endif %}{%- endfor %}'
    '{%- else %}{{- message["content"] }}{%- endif %}'
    '{%- if message["role"] == "user" %}{{- "[/INST]" }}{%- elif message["role"] == "assistant" %}'
    '{{- eos_token}}{%- else %}{{- raise_exception("Only user and assistant roles are supported, with the '
    'exception of an initial optional system message!") }}{%- endif %}{%- endfor %}'
)


def build_tokenizer():
    """The word-level test tokenizer over TOKENS; it prepends <s>, as Pixtral's does."""
    return hr.word_level_tokenizer(TOKENS, SPECIAL_TOKENS, "<s>")


TOKENIZER_CONFIG = {
    "tokenizer_class": "TokenizersBackend", "padding_side": "left", "bos_token": "<s>", "eos_token": "</s>",
    "pad_token": "<pad>", "unk_token": "<unk>", "processor_class": "PixtralProcessor", "model_max_length": 1_000_000,
}
IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": {"height": PATCH, "width": PATCH}, "resample": 3, "rescale_factor": 1 / 255,
    "size": {"longest_edge": LONGEST_EDGE},
}
PROCESSOR_CONFIG = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                    "patch_size": PATCH, "processor_class": "PixtralProcessor"}


def write_processor_dir(out_dir: str, layout: str = "hub", padding_side: str = "left",
                        longest_edge: int = LONGEST_EDGE) -> str:
    """Writes the tokenizer and processor files into out_dir.

    layout "hub": as mistral-community/pixtral-12b ships them: preprocessor_config.json,
    processor_config.json (the processor's own settings), chat_template.json, tokenizer.json,
    tokenizer_config.json. layout "saved": what transformers 5.23's PixtralProcessor.save_pretrained
    writes for the same processor (processor_config.json with the image processor nested,
    chat_template.jinja).
    """
    hub_files = {"preprocessor_config.json": {**IMAGE_PROCESSOR_CONFIG, "size": {"longest_edge": longest_edge}},
                 "processor_config.json": PROCESSOR_CONFIG, "chat_template.json": {"chat_template": CHAT_TEMPLATE}}
    return hr.write_processor_files(out_dir, layout, build_tokenizer(), {**TOKENIZER_CONFIG, "padding_side": padding_side},
                                    hub_files, lambda d: write_processor_dir(d, "hub", padding_side, longest_edge),
                                    hf_processor)


@contextlib.contextmanager
def _pixtral_processing_module():
    """transformers.models.pixtral.processing_pixtral, importable without torchvision: it imports one
    size function from the torchvision image processor module, whose PIL twin is identical."""
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    stub = types.ModuleType(name)
    stub.get_resize_output_image_size = pil.get_resize_output_image_size
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, name, stub)
        yield importlib.import_module("transformers.models.pixtral.processing_pixtral")


def hf_processor(path: str):
    """transformers 5.23's PixtralProcessor of a dir, with the PIL image processor."""
    from transformers import AutoTokenizer
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    with _pixtral_processing_module() as mod:
        return mod.PixtralProcessor.from_pretrained(
            path, image_processor=PixtralImageProcessorPil.from_pretrained(path),
            tokenizer=AutoTokenizer.from_pretrained(path))


def hf_processor_inputs(proc_dir: str, images: Sequence[Any], prompts: Sequence[str], system=None):
    """HF's reference: `PixtralProcessor.apply_chat_template(conversations, tokenize=True, padding=True)`
    with the images inline in each user turn (before the text). numpy arrays."""
    return hr.hf_chat_inputs(hf_processor(proc_dir), images, prompts, system)


# ----------------------------------------------------------------------------------------------
# Model inputs and the HF reference run


def image_tokens(height: int, width: int) -> list[int]:
    """What the processor writes for an image of height x width pixels (multiples of 16)."""
    rows, cols = height // PATCH, width // PATCH
    ids = ([IMG] * cols + [IMG_BREAK]) * rows
    return ids[:-1] + [IMG_END]


def make_inputs(prompts: Sequence[Sequence[Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Prompts (lists of token ids and (height, width) image sizes in pixels) -> left-padded numpy
    inputs for both models.

    Returns input_ids, attention_mask, position_ids for HF (`where(mask, cumsum(mask) - 1, 0)`, HF
    generate's rule, which our port uses), and with images pixel_values [n_img, 3, H_max, W_max]
    (N(0, 1) inside each image, zero padding outside, as the processor pads) and image_sizes [n_img, 2].
    """
    rng = np.random.default_rng(seed)
    rows, sizes = [], []
    for parts in prompts:
        ids: list[int] = [BOS, INST]
        for part in parts:
            if isinstance(part, tuple):
                ids += image_tokens(*part)
                sizes.append(part)
            else:
                ids += list(part)
        rows.append(ids + [INST_END])
    input_ids, mask = hr.pad_rows(rows, PAD)
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": hr.hf_position_ids(mask)}
    if sizes:
        h_max, w_max = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = np.zeros((len(sizes), 3, h_max, w_max), np.float32)
        for i, (h, w) in enumerate(sizes):
            pixels[i, :, :h, :w] = rng.standard_normal((3, h, w))
        out["pixel_values"], out["image_sizes"] = pixels, np.asarray(sizes, np.int64)
    return out


def to_batch(inputs: dict[str, np.ndarray]):
    """The `sj.Batch` of `make_inputs` output (position_ids are HF-only: ours come from the mask)."""
    import spatial_jax as sj

    return sj.Batch(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_sizes=inputs.get("image_sizes"))


def hf_run(hf, inputs: dict[str, np.ndarray], hooks=()) -> dict[str, np.ndarray]:
    """hr.hf_run with Pixtral's sites: lm.attn_out / lm.mlp_out are the self_attn / mlp outputs;
    with images vision.block_out is [1, Lv, N_patches, Dv] and vision.tokens [1, N_patches, D]."""
    return hr.hf_run(hf, inputs, lambda layer: layer.self_attn, lambda layer: layer.mlp,
                     hf.model.vision_tower.transformer.layers, hooks)

