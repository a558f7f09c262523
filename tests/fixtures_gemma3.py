"""Tiny random Hugging Face Gemma 3 checkpoints, a Gemma-style processor dir, and HF reference runs.

Importable from any test module (pytest puts tests/ on sys.path; tests/ has no __init__.py):

    import fixtures_gemma3 as fg
    from fixtures_gemma3 import gemma3_ckpts  # the session fixture (tests/conftest.py is not ours)

The config keeps every structural feature of gemma-3-4b-it at toy size:
  * GQA (4 query heads, 2 KV heads) with head_dim 24 != hidden 64 / 4 heads, QK-norm, and
    query_pre_attn_scalar 16 != head_dim (a head_dim-derived scale fails);
  * sliding and global layers interleaved, S S F S F, with their own RoPE (sliding: theta 1e4;
    global: theta 1e6 with linear factor 8) and a sliding window of 4 keys, so every prompt is
    longer than the window and every image block (9 soft tokens) is longer too, which exercises
    the one-sided window inside an image block;
  * SigLIP with 84-px images of 14-px patches (6 x 6 = 36 patches), tanh-GELU, post-layernorm, and
    mm_tokens_per_image 9, so the projector average-pools 2 x 2 patches into a 3 x 3 grid;
  * tied embeddings, special-token ids inside the 128-token vocabulary.
Every parameter is random (norm weights and biases too, which HF initializes to 0, and the
projector, which HF initializes to 0) at scales that keep activations O(1) and logits O(1-10).

The processor dir: a word-level `tokenizers` tokenizer with the Gemma special tokens, a post-
processor that prepends <bos> (like Gemma's tokenizer.json), left padding, the hub chat template,
and the image-processor / processor config files, so `transformers.AutoProcessor` gives a
`Gemma3Processor` (with its PIL image backend).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np
import pytest

import hf_reference as hr

VOCAB = 128
# Token ids shared by the tokenizer and the model config.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
PAD, EOS, BOS, UNK, MASK, SOT, EOT, BOI, EOI, IMG = range(len(SPECIAL_TOKENS))
NL, NLNL = 10, 11  # "\n", "\n\n" (ordinary tokens, as 107 / 108 in Gemma's vocabulary)
WORDS = ("user", "model", "system", "You", "are", "a", "helpful", "assistant", "What", "is", "left", "right",
         "of", "the", "red", "blue", "green", "square", "circle", "above", "below", "Answer", "in", "one",
         "word", "?", ".", ",", "Is", "to")
TOKENS = (*SPECIAL_TOKENS, "\n", "\n\n", *WORDS)  # the test tokenizer's vocabulary, in id order
assert TOKENS.index("\n") == NL and TOKENS.index("\n\n") == NLNL and len(TOKENS) <= VOCAB


def vocab_id(token: str) -> int:
    """The id of a token of the test tokenizer."""
    return TOKENS.index(token)


MM_TOKENS = 9
IMAGE_SIZE, PATCH = 84, 14
SLIDING_WINDOW = 4
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]

TEXT_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=16,
    sliding_window=SLIDING_WINDOW, layer_types=LAYER_TYPES, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)
VISION_CONFIG = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
    patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
)

# google/gemma-3-4b-it's chat template (hub chat_template.json).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


# ----------------------------------------------------------------------------------------------
# Models


def tiny_hf_config(**text_overrides):
    from transformers import Gemma3Config

    return Gemma3Config(text_config={**TEXT_CONFIG, **text_overrides}, vision_config=dict(VISION_CONFIG),
                        mm_tokens_per_image=MM_TOKENS, boi_token_index=BOI, eoi_token_index=EOI,
                        image_token_index=IMG)


def _init(name: str, p, noise):
    """hr.default_init but for Gemma's parts: the projector [in, out] N(0, 1/in), position
    embeddings N(0, 0.5^2) like the token table (which the model then scales by sqrt(64) = 8), and
    Gemma's (1 + w) RMSNorm weights N(0, 0.2^2), not 1 + N(0, 0.2^2) as SigLIP's LayerNorms; HF
    initializes those norms and the projector to 0."""
    if p.ndim == 1 and not name.endswith("bias") and "layer_norm" not in name and "post_layernorm" not in name:
        return 0.2 * noise
    if "mm_input_projection_weight" in name:
        return noise / math.sqrt(p.shape[0])
    if "position_embedding" in name:
        return 0.5 * noise
    return hr.default_init(name, p, noise)


def build_tiny_gemma3(out_dir: str, seed: int = 0, processor: bool = True, **text_overrides) -> str:
    """Saves a tiny random Gemma3ForConditionalGeneration (float32) with save_pretrained (the
    transformers 5.x key layout: `vision_tower.*`), plus the processor files."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_hf_config(**text_overrides)).eval()
    hr.randomize_(model, seed, _init)
    model.save_pretrained(out_dir)
    if processor:
        write_processor_dir(out_dir)
    return out_dir


def load_hf(path: str, attn_implementation: str = "eager", dtype=None):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype or torch.float32).eval()


def to_hub_layout(name: str) -> str:
    """transformers 5.x save_pretrained name -> the google/gemma-3-4b-it shard name."""
    return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name


def to_runtime_layout(name: str) -> str:
    """save_pretrained name -> the 5.x module (state_dict) name."""
    for old, new in (("vision_tower.", "model.vision_tower."), ("language_model.model.", "model.language_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


class Gemma3Checkpoints(hr.Checkpoints):
    """Tiny HF Gemma 3 checkpoints (see hr.Checkpoints): "base", or "softcap" with
    attn_logit_softcapping."""

    PREFIX = "gemma3"
    VARIANTS = {"base": {}, "softcap": {"attn_logit_softcapping": 2.0}}
    build = staticmethod(build_tiny_gemma3)
    load_hf = staticmethod(load_hf)


@pytest.fixture(scope="session")
def gemma3_ckpts(tmp_path_factory) -> Gemma3Checkpoints:
    return Gemma3Checkpoints(tmp_path_factory.mktemp("gemma3_ckpts"))


# ----------------------------------------------------------------------------------------------
# Processor dir


def build_tokenizer():
    """The word-level test tokenizer over TOKENS; it prepends <bos>, as Gemma's does."""
    return hr.word_level_tokenizer(TOKENS, SPECIAL_TOKENS, "<bos>")


TOKENIZER_CONFIG = {
    "tokenizer_class": "TokenizersBackend", "padding_side": "left",
    "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
    "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
    "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                             "image_token": "<image_soft_token>"},
    "processor_class": "Gemma3Processor", "model_max_length": 1_000_000,
}
IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
    "rescale_factor": 1 / 255, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None, "image_seq_length": MM_TOKENS,
}


def write_processor_dir(out_dir: str, layout: str = "hub", padding_side: str = "left",
                        image_size: int = IMAGE_SIZE, image_seq_length: int = MM_TOKENS) -> str:
    """Writes the tokenizer and processor files into out_dir.

    layout "hub": as google/gemma-3-4b-it ships them: preprocessor_config.json (the image
    processor), processor_config.json {"image_seq_length"}, chat_template.json, tokenizer.json,
    tokenizer_config.json. layout "saved": what transformers 5.23's `Gemma3Processor.save_pretrained`
    writes for the same processor (processor_config.json with the image processor nested,
    chat_template.jinja).
    """
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    tok_cfg = {**TOKENIZER_CONFIG, "padding_side": padding_side}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    image_cfg = {**IMAGE_PROCESSOR_CONFIG, "size": {"height": image_size, "width": image_size},
                 "image_seq_length": image_seq_length}
    if layout == "hub":
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump(image_cfg, f, indent=1)
        with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
            json.dump({"image_seq_length": image_seq_length, "processor_class": "Gemma3Processor"}, f, indent=1)
        with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=1)
        return out_dir
    if layout != "saved":
        raise ValueError(f"unknown layout {layout!r}")
    from transformers import AutoProcessor

    return hr.resave_processor_dir(
        out_dir, lambda d: write_processor_dir(d, "hub", padding_side, image_size, image_seq_length),
        AutoProcessor.from_pretrained)


def hf_processor_inputs(proc_dir: str, images: Sequence[Any], prompts: Sequence[str], system=None):
    """HF's reference: `Gemma3Processor.apply_chat_template(conversations, tokenize=True, padding=True)`
    with the images inline in each user turn (before the text). numpy arrays."""
    from transformers import AutoProcessor

    return hr.hf_chat_inputs(AutoProcessor.from_pretrained(proc_dir), images, prompts,
                             None if system is None else [{"type": "text", "text": system}])


# ----------------------------------------------------------------------------------------------
# Model inputs and the HF reference run


IMAGE = ("image",)


def image_tokens() -> list[int]:
    """What the processor writes for one image: \\n\\n <boi> 9 x <image_soft_token> <eoi> \\n\\n."""
    return [NLNL, BOI] + [IMG] * MM_TOKENS + [EOI, NLNL]


def make_inputs(prompts: Sequence[Sequence[Any]], seed: int = 0, token_types: bool = True) -> dict[str, np.ndarray]:
    """Prompts (lists of token ids and IMAGE markers) -> left-padded numpy inputs for both models.

    Returns input_ids, attention_mask, token_type_ids (1 at soft tokens; omitted when
    token_types=False), position_ids for HF (`where(mask, cumsum(mask) - 1, 0)`, HF generate's
    rule, which our port uses), and pixel_values [n_img, 3, 84, 84] (N(0, 1), image after image in
    prompt order) when there are images.
    """
    rng = np.random.default_rng(seed)
    rows, n_img = [], 0
    for parts in prompts:
        ids: list[int] = [BOS]
        for part in parts:
            if part == IMAGE:
                ids += image_tokens()
                n_img += 1
            else:
                ids += list(part)
        rows.append(ids)
    input_ids, mask = hr.pad_rows(rows, PAD)
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": hr.hf_position_ids(mask)}
    if token_types:
        out["token_type_ids"] = (input_ids == IMG).astype(np.int64)
    if n_img:
        out["pixel_values"] = rng.standard_normal((n_img, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return out


def to_batch(inputs: dict[str, np.ndarray]):
    """The `sj.Batch` of `make_inputs` output (position_ids are HF-only: ours come from the mask)."""
    import spatial_jax as sj

    return sj.Batch(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), token_type_ids=inputs.get("token_type_ids"))


def hf_run(hf, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """hr.hf_run with Gemma's sites: lm.attn_out / lm.mlp_out are the post-attention /
    post-feedforward norm outputs, what is added to the residual; with images vision.block_out is
    [n_img, Lv, n_patches, Dv] and vision.tokens [n_img, mm_tokens, D]."""
    return hr.hf_run(hf, inputs, lambda layer: layer.post_attention_layernorm,
                     lambda layer: layer.post_feedforward_layernorm, hf.model.vision_tower.encoder.layers)
