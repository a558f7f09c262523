"""Tiny random Hugging Face Qwen2-VL checkpoints and the HF-side reference runs, for tests.

Importable from any test module (pytest puts tests/ on sys.path; tests/ has no __init__.py):

    from fixtures_qwen2_vl import build_tiny_qwen2_vl, make_inputs, image, hf_run

The config keeps every structural feature of Qwen2-VL-7B/2B at toy size: GQA (4 query heads, 2 KV
heads), M-RoPE with unequal sections (2, 3, 3 of head_dim/2 = 8 frequencies), q/k/v biases, a
vision tower with 2D RoPE, block-diagonal attention and a 2x2 patch merger, rms_norm_eps 1e-6,
tied (2B) or untied (7B) embeddings, and special token ids inside the 128-token vocabulary.
Every parameter is randomized (biases and norm weights too, which HF initializes to 0 / 1) at
scales that keep activations O(1) and logits O(10), so a key-map or transform mistake anywhere
shows up as a large logit difference.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import hf_reference as hr

VOCAB = 128
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 98, 99, 100, 101
PAD_ID = 0
PATCH, TEMPORAL, MERGE, CHANNELS = 14, 2, 2, 3
PATCH_DIM = CHANNELS * TEMPORAL * PATCH * PATCH  # 1176, as the real model

TEXT_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
    max_position_embeddings=512,
    rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
# head_dim 12: 3 rotary frequencies per axis, so the h/w halves of the 2D RoPE are distinguishable.
VISION_CONFIG = dict(
    depth=2, embed_dim=48, num_heads=4, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu",
    patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, in_channels=CHANNELS,
)


def tiny_hf_config(tie_word_embeddings: bool = False, special_ids: tuple[int, int, int, int] | None = None,
                   **text_overrides):
    """The tiny Qwen2VLConfig. special_ids: (vision_start, vision_end, image_pad, video_pad),
    default (98, 99, 100, 101)."""
    from transformers import Qwen2VLConfig

    start, end, img, vid = special_ids or (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    return Qwen2VLConfig(
        vision_config=dict(VISION_CONFIG), text_config={**TEXT_CONFIG, **text_overrides},
        image_token_id=img, video_token_id=vid, vision_start_token_id=start,
        vision_end_token_id=end, tie_word_embeddings=tie_word_embeddings)


# Words of the word-level tokenizer written by `build_tiny_qwen2_vl(..., processor=True)`.
PROCESSOR_WORDS = tuple(
    "Is the red blue green yellow square circle triangle cube sphere to left right of above below on "
    "under behind in front image object What color shape where ? Answer with one word : yes no".split())


def build_tiny_qwen2_vl(out_dir: str, tie_word_embeddings: bool = False, seed: int = 0,
                        max_shard_size: Any = None, processor: bool = False) -> str:
    """Saves a tiny random Qwen2VLForConditionalGeneration (float32) with save_pretrained.

    max_shard_size (e.g. "100KB") writes several shards and model.safetensors.index.json.
    processor: also write a word-level tokenizer, chat template and preprocessor config
    (spatial_jax.families.qwen2_vl.word_tokenizer, over PROCESSOR_WORDS), and use its special token ids
    (vision_start 3, vision_end 4, image_pad 6, video_pad 7) instead of 98..101, so that
    `sj.load(out_dir).prepare(...)` and transformers' processor both work on the dir.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    special_ids = None
    if processor:
        from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor

        vocab = write_word_level_qwen2vl_processor(out_dir, PROCESSOR_WORDS)
        assert vocab.vocab_size <= VOCAB, vocab.vocab_size
        ids = vocab.special_ids
        special_ids = (ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_hf_config(tie_word_embeddings, special_ids)).eval()
    hr.randomize_(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_hf(path: str, attn_implementation: str = "eager"):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation).eval()


# ----------------------------------------------------------------------------------------------
# Inputs


def image(h: int, w: int) -> tuple[str, int, int]:
    """A prompt part: an image of h x w patches (both even), expanded to
    <|vision_start|> + h*w/4 x <|image_pad|> + <|vision_end|>."""
    assert h % MERGE == 0 and w % MERGE == 0
    return ("image", h, w)


def make_inputs(prompts: Sequence[Sequence[Any]], seed: int = 0, pad_left: bool = True) -> dict[str, np.ndarray]:
    """Prompts (lists of text token ids and `image(h, w)` parts) -> HF/our model inputs.

    Returns numpy arrays: input_ids, attention_mask (left- or right-padded with PAD_ID),
    mm_token_type_ids (HF only), and when there are images pixel_values [N, 1176] (random, image
    after image in prompt order) and image_grid_thw [n_img, 3].
    """
    rng = np.random.default_rng(seed)
    rows, grids = [], []
    for parts in prompts:
        ids: list[int] = []
        for part in parts:
            if isinstance(part, tuple) and part[0] == "image":
                _, h, w = part
                ids += [VISION_START] + [IMAGE_PAD] * (h * w // MERGE**2) + [VISION_END]
                grids.append((1, h, w))
            else:
                ids += list(part) if isinstance(part, (list, tuple, range)) else [int(part)]
        rows.append(ids)
    input_ids, mask = hr.pad_rows(rows, PAD_ID, pad_left)
    out = {"input_ids": input_ids, "attention_mask": mask,
           "mm_token_type_ids": ((input_ids == IMAGE_PAD) & (mask == 1)).astype(np.int64)}
    if grids:
        grid = np.array(grids, np.int64)
        out["pixel_values"] = rng.standard_normal((int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
        out["image_grid_thw"] = grid
    return out


def to_batch(inputs: dict[str, np.ndarray]):
    """The `sj.Batch` of `make_inputs` output (mm_token_type_ids is HF-only)."""
    import spatial_jax as sj

    return sj.Batch(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"))


# ----------------------------------------------------------------------------------------------
# The HF reference run, with every site captured in our layout


def hf_run(hf, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """hr.hf_run with Qwen2-VL's sites: lm.attn_out / lm.mlp_out are the self_attn / mlp outputs;
    the vision tower is unbatched (vision.block_out [1, Lv, N, Dv]) and its merger gives
    vision.tokens [1, Ni, D]."""
    return hr.hf_run(hf, inputs, lambda layer: layer.self_attn, lambda layer: layer.mlp, hf.model.visual.blocks,
                     projector=hf.model.visual.merger)

