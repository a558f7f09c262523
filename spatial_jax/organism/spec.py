"""What the model organism is: its vocabulary, its model config and its training palette.

The organism is a small Qwen2-VL (our Flax modules, HF-loadable) trained from scratch on the
synthetic tasks at the "organism" canvas geometry (6x6 merged tokens of 28 px, 1-token objects).
Its tokenizer is word-level over the words of every synthetic prompt and answer, plus the extra
training colours, and keeps the Qwen2-VL special tokens and chat template.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from spatial_jax.data.synthetic import SQUARE_COLOURS
from spatial_jax.data.vocabulary import synthetic_words
from spatial_jax.families.qwen2_vl.model import Qwen2VLConfig
from spatial_jax.families.qwen2_vl.word_tokenizer import SPECIAL_IDS, WordLevelVocab

GEOMETRY = "organism"

# Colours seen only in training (Squares and the colours Shapes are painted in), so that the test
# palette's triples are a small part of what the model sees. Far enough from the 6 test colours and
# from each other to be told apart at 28 px; names are single word-level tokens and none is an
# object name.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "yellow": (255, 220, 0), "purple": (128, 0, 160), "pink": (255, 130, 200), "cyan": (0, 220, 220),
    "olive": (110, 120, 20), "navy": (0, 0, 110), "teal": (0, 130, 120), "maroon": (120, 0, 20),
}


def training_colours(n_extra: int) -> dict[str, tuple[int, int, int]]:
    """The test palette (SQUARE_COLOURS) followed by the first `n_extra` EXTRA_COLOURS."""
    if not 0 <= n_extra <= len(EXTRA_COLOURS):
        raise ValueError(f"n_extra must be in 0..{len(EXTRA_COLOURS)}, got {n_extra}")
    return {**SQUARE_COLOURS, **dict(list(EXTRA_COLOURS.items())[:n_extra])}


def organism_words() -> list[str]:
    """Every word the organism's tokenizer knows besides the special tokens and template words:
    the synthetic prompts and answers and all EXTRA_COLOURS (whether or not a run trains on them,
    so that every organism shares one vocabulary)."""
    return synthetic_words(extra=tuple(EXTRA_COLOURS))


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The free hyper-parameters of the organism's architecture (the rest is Qwen2-VL's)."""

    vision_depth: int = 2
    vision_dim: int = 64
    vision_heads: int = 4
    vision_mlp_ratio: int = 4
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    # The LM's M-RoPE gives the h and w axes its lowest frequencies; at theta 1e4 they turn by
    # 3e-3 rad per token or less, so a 6-token grid has no usable RoPE layout signal and training
    # sits for thousands of steps at "one of the two end entities" (50%). At 10 the w axis turns
    # 0.12-0.24 rad per token and Squares is learnt in ~250 steps (BUILD_NOTES, organism).
    rope_theta: float = 10.0
    vision_rope_theta: float = 1e4


def organism_config(vocab: WordLevelVocab | Mapping[str, int], size: ModelSize = ModelSize()) -> Qwen2VLConfig:
    """The organism's Qwen2VLConfig for a word-level vocabulary (`write_word_level_qwen2vl_processor`'s)."""
    vocab_size = vocab.vocab_size if isinstance(vocab, WordLevelVocab) else len(vocab)
    head_dim = size.hidden_size // size.num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even")
    # M-RoPE sections (t, h, w) must sum to head_dim / 2; Qwen2-VL-7B's [16, 24, 24] scaled down.
    half = head_dim // 2
    hw = (3 * half) // 8
    section = (half - 2 * hw, hw, hw)
    return Qwen2VLConfig(
        vision_depth=size.vision_depth, vision_dim=size.vision_dim, vision_heads=size.vision_heads,
        vision_mlp_dim=size.vision_dim * size.vision_mlp_ratio, patch_size=14, temporal_patch_size=2,
        merge_size=2, in_channels=3, vision_rope_theta=size.vision_rope_theta,
        vocab_size=vocab_size, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_heads=size.num_heads, num_kv_heads=size.num_kv_heads, head_dim=head_dim,
        intermediate_size=size.intermediate_size, rms_norm_eps=1e-6, rope_theta=size.rope_theta,
        mrope_section=section, tie_word_embeddings=False,
        image_token_id=SPECIAL_IDS.image_pad, vision_start_token_id=SPECIAL_IDS.vision_start,
        vision_end_token_id=SPECIAL_IDS.vision_end,
    )
