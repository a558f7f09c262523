"""What every processor family shares: the processor's base (tokenizer, chat template, image
config), checking a directory's tokenizer files, one user turn through the
chat template, BOS-aware tokenizing, and the check that the tokenizer kept an image placeholder
whole."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

ImageEntry = Union[Image.Image, Sequence[Image.Image], None]  # one prompt's images (images_per_prompt)


def checked_dir(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    return path


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    # AutoTokenizer falls back to other files or the hub when these are missing; say which one is.
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: missing {name}")
    return AutoTokenizer.from_pretrained(path)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str, family: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    # An absent token maps to the unknown id (or None), whose string is not the token.
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"the tokenizer has no {token} token; it is not a {family} tokenizer")
    return int(token_id)


def render_user_turn(tokenizer: PreTrainedTokenizerBase, chat_template: str, text_chunk: Mapping[str, str],
                     num_images: int, system_content: Any = None) -> str:
    """One user turn (num_images image chunks, then text_chunk) through the chat template, with the
    generation prompt; a system turn first unless system_content is None. Templates differ in the
    shape they read a text chunk and a system turn in, so the caller builds those."""
    content: list[Mapping[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append(text_chunk)
    messages: list[dict[str, Any]] = [] if system_content is None else [{"role": "system", "content": system_content}]
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=True, tokenize=False)


def expand_placeholders(text: str, placeholder: str, expansions: Iterator[str]) -> str:
    """text with its k-th placeholder replaced by the k-th string of expansions."""
    pieces = text.split(placeholder)
    return pieces[0] + "".join(next(expansions) + piece for piece in pieces[1:])


def check_image_tokens(input_ids: np.ndarray, texts: Sequence[str], placeholder: str, placeholder_id: int) -> None:
    # A tokenizer that does not keep the placeholder whole would misplace the image features.
    expected = [text.count(placeholder) for text in texts]
    found = (input_ids == placeholder_id).sum(axis=1).tolist()
    if found != expected:
        raise ValueError(f"the tokenizer split {placeholder}: {found} image tokens where the text has "
                         f"{expected}; it must be an added token in {TOKENIZER_FILE}")


def tokenize_chat_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Mapping[str, Any]:
    """Padded numpy encodings of rendered chats, as HF's apply_chat_template(tokenize=True) makes
    them: it drops the tokenizer's own special tokens when the rendered text already starts with
    the BOS token, and otherwise lets the tokenizer add them."""
    bos = tokenizer.bos_token
    add_special = not (bos is not None and texts and texts[0].startswith(bos))
    return tokenizer(texts, padding=True, add_special_tokens=add_special, return_tensors="np")


class ChatPrep:
    """What every family's processor holds: the checkpoint's HF tokenizer (its `padding_side`
    decides where padding goes), the Jinja chat template, and the family's image config."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str, image_config: Any):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_config = image_config

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    def visible_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), in pixels of an image of image_size = (width, height), of the part the
        visual tokens show: the whole image, unless the family crops it (LLaVA's centre crop)."""
        width, height = image_size
        return 0.0, 0.0, float(width), float(height)


def images_per_prompt(images, prompts) -> list[list[Image.Image]]:
    """`prepare`'s images and prompts: one entry per prompt (a PIL image, a list of them, or None),
    or images=None for text only -> one list of PIL images per prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of strings (one per row), not a string")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a list of strings (one per row), got a {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}]: expected a str, got {type(prompt).__name__}")
    if images is None:
        images = [None] * len(prompts)
    if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list with one entry per prompt (a PIL image, a list of them, or "
                        f"None), got a {type(images).__name__}; for one prompt pass images=[img]")
    if len(images) != len(prompts):
        raise ValueError(f"images: got {len(prompts)} prompts but {len(images)} image entries; pass one entry "
                         "(an image, a list of images or None) per prompt")
    return [_as_image_list(entry, i) for i, entry in enumerate(images)]


def _as_image_list(entry, index: int) -> list[Image.Image]:
    if entry is None:
        return []
    items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    for j, item in enumerate(items):
        if not isinstance(item, Image.Image):
            raise TypeError(f"images[{index}]" + (f"[{j}]" if isinstance(entry, (list, tuple)) else "")
                            + f" is a {type(item).__name__}, expected a PIL.Image.Image")
    return items
