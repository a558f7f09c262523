"""A word-level Qwen2-VL tokenizer and processor directory, for tiny test models and the model organism.

`write_word_level_qwen2vl_processor(out_dir, words)` writes what `transformers.AutoProcessor` (and
`Qwen2VLPrep.from_dir`) read for a Qwen2-VL checkpoint: tokenizer.json, tokenizer_config.json,
chat_template.jinja (the hub template) and preprocessor_config.json.

Tokenization (a `tokenizers` WordLevel model):
* The Qwen2-VL special tokens are added tokens with the fixed ids of `SPECIAL_IDS` (0..7, in the
  hub's order), so they are split off before anything else and a model config can hard-code them;
  `<unk>` is id 8 and "\\n" id 9.
* The rest of the text is cut by a regex: each "\\n" is a token of its own (the chat template puts
  one after every role name and turn, and keeping them makes the templated text round-trip), a run of
  word characters (\\w+) is a word, every other non-space character is a token by itself ("left?" ->
  "left", "?"), and spaces and tabs only separate. Matching is case-sensitive, with no normalizer.
* The vocabulary is: the special tokens, `<unk>`, "\\n", the words of the default system turn and the
  role names, then the given words in order of first appearance.
* Decoding joins tokens with single spaces (no decoder is set), so text does not round-trip exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Union

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel

from spatial_jax.processing.chat import TOKENIZER_CONFIG, TOKENIZER_FILE
from spatial_jax.processing.words import PRE_TOKENIZER, split_words
from spatial_jax.families.qwen2_vl.processor import ENDOFTEXT, IM_END, SPECIAL_TOKENS, SpecialTokenIds
from spatial_jax.processing.images import CHAT_TEMPLATE_JINJA, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_CONFIG

# Qwen2-VL-7B-Instruct's chat template (hub chat_template.json): a default system turn when the chat
# has none; each image is <|vision_start|><|image_pad|><|vision_end|> where its content item stands.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_IDS = SpecialTokenIds(*range(len(SPECIAL_TOKENS)))
UNK_TOKEN = "<unk>"
NEWLINE = "\n"
# Words the chat template itself writes (default system turn and role names).
TEMPLATE_WORDS = ("system", "You", "are", "a", "helpful", "assistant", ".", "user")

@dataclasses.dataclass(frozen=True)
class WordLevelVocab:
    """What the builder wrote: token ids a tiny model config needs, and the whole vocabulary."""

    special_ids: SpecialTokenIds
    unk_id: int
    newline_id: int
    vocab: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def word_level_vocab(words: Iterable[str]) -> dict[str, int]:
    """Token -> id: special tokens (SPECIAL_IDS), <unk>, "\\n", TEMPLATE_WORDS, then `words` deduplicated.

    Raises ValueError for a word the pre-tokenizer would not produce whole ("red square", "left?", "").
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, UNK_TOKEN, NEWLINE, *TEMPLATE_WORDS))}
    for word in words:
        if word in vocab:
            continue
        if split_words(word) != [word]:
            raise ValueError(f"{word!r} is not one word-level token (it splits into {split_words(word)}); "
                             f"pass the pieces given by split_words")
        vocab[word] = len(vocab)
    return vocab


def build_word_level_tokenizer(words: Iterable[str]) -> Tokenizer:
    """The `tokenizers` object behind tokenizer.json: WordLevel over `word_level_vocab(words)`."""
    tokenizer = Tokenizer(WordLevel(word_level_vocab(words), unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = PRE_TOKENIZER
    # Added tokens are cut out of the text before the pre-tokenizer runs, so "<|im_end|>\n" and runs of
    # "<|image_pad|>" tokenize without surrounding spaces.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK_TOKEN)])
    return tokenizer


def write_word_level_qwen2vl_processor(
    out_dir: Union[str, os.PathLike],
    words: Iterable[str],
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    padding_side: str = "left",
    model_max_length: int = 32768,
) -> WordLevelVocab:
    """Writes a Qwen2-VL processor directory with a word-level tokenizer over `words`.

    Files: tokenizer.json, tokenizer_config.json (pad <|endoftext|>, eos <|im_end|>, unk <unk>, no BOS,
    `padding_side` explicit: "left" by default, as batched generation needs), chat_template.jinja
    (QWEN2_VL_CHAT_TEMPLATE) and preprocessor_config.json (Qwen2VLImageProcessor, CLIP mean/std,
    BICUBIC, the given pixel bounds and patch sizes). The directory is created if needed; existing
    files of those names are overwritten.

    Returns
    -------
    WordLevelVocab with the special token ids (always SPECIAL_IDS: image_pad = 6, video_pad = 7,
    vision_start = 3, vision_end = 4), the <unk> and "\\n" ids and the vocabulary.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = build_word_level_tokenizer(words)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "Qwen2VLProcessor",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": UNK_TOKEN,
        "padding_side": padding_side,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    image_config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
    }
    for name, content in ((TOKENIZER_CONFIG, tokenizer_config), (PREPROCESSOR_CONFIG, image_config)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    with open(os.path.join(out_dir, CHAT_TEMPLATE_JINJA), "w", encoding="utf-8") as f:
        f.write(QWEN2_VL_CHAT_TEMPLATE)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return WordLevelVocab(special_ids=SPECIAL_IDS, unk_id=vocab[UNK_TOKEN], newline_id=vocab[NEWLINE], vocab=vocab)
