"""Qwen2-VL processor in numpy + PIL, equal to transformers 5.23's `Qwen2VLProcessor`.

The reference is the processor with its PIL image backend, `Qwen2VLImageProcessorPil` (the one
transformers picks when torchvision is absent; the torchvision backend resizes to slightly different
pixels). Spec: shared/reference/architectures.md, C.1. What is ported, and how it stays exact:

* RGB conversion: the same PIL calls as `transformers.image_transforms.convert_to_rgb` (alpha is
  composited onto white with `Image.alpha_composite`).
* `smart_resize`: Python's `round` (banker's rounding), as HF.
* Resize: PIL on the uint8 RGB image with the checkpoint's `resample` (BICUBIC), as HF's
  `image_transforms.resize` does after its uint8 round trip.
* Rescale in float64 then cast to float32, normalise in float32, patchify in merge-block order with
  the frame repeated along the temporal axis: the same operations in the same dtypes, so
  `pixel_values` are bit-identical.
* Text: the chat template is rendered and tokenized by the checkpoint's own tokenizer
  (`transformers.AutoTokenizer`; pure Python + `tokenizers`, no torch code is used here), after each
  `<|image_pad|>` is expanded to `t*h*w / merge_size**2` copies, as the HF processor does.

All preprocessing parameters come from the checkpoint directory's files, never from constants here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from spatial_jax.processing.chat import (
    images_per_prompt,     TOKENIZER_CONFIG, ChatPrep, ImageEntry, check_image_tokens, checked_dir, expand_placeholders,
    load_tokenizer, render_user_turn, token_id,
)
from spatial_jax.processing.images import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_processor_values, load_chat_template, read_image_processor_config,
    rescale_and_normalize, to_rgb,
)

# Qwen2-VL's special tokens, in their hub id order (151643, 151644, 151645, 151652..151656).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)




@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the Qwen2-VL special tokens in one tokenizer."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokenIds":
        return cls(*(token_id(tokenizer, token, "Qwen2-VL") for token in SPECIAL_TOKENS))


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The image-processor parameters of a checkpoint, with `Qwen2VLImageProcessorPil`'s defaults.

    min_pixels / max_pixels bound the resized area (HF's size["shortest_edge"] / size["longest_edge"]);
    resample is a PIL filter id (3 = BICUBIC).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge block of patches."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one row of `pixel_values`: C * T * p * p."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "the image processor config") -> "ImageConfig":
        """Reads a preprocessor config with HF's precedence: min/max_pixels override `size`; null means default."""
        for flag in ("do_resize", "do_convert_rgb"):
            if config.get(flag) is False:
                raise ValueError(f"{source}: {flag}=false is not supported (Qwen2-VL always resizes RGB images)")
        size = dict(config.get("size") or {})
        min_pixels = config.get("min_pixels")
        max_pixels = config.get("max_pixels")
        min_pixels = min_pixels if min_pixels is not None else size.get("shortest_edge", cls.min_pixels)
        max_pixels = max_pixels if max_pixels is not None else size.get("longest_edge", cls.max_pixels)
        values = {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}
        values.update(image_processor_values(config, source, ("patch_size", "temporal_patch_size", "merge_size",
                                                              "rescale_factor", "resample", "do_rescale",
                                                              "do_normalize")))
        return cls(**values)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "ImageConfig":
        """As transformers 5.23 loads it (see `read_image_processor_config`)."""
        return cls.from_dict(*read_image_processor_config(path))


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width) of an image: multiples of `factor`, area within [min_pixels, max_pixels].

    A copy of HF's `smart_resize`, including Python's banker's rounding (`round(2.5) == 2`) of the
    side / factor ratios, which decides the size of images whose sides are odd multiples of factor/2.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, config: ImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image to its flattened patches, as `Qwen2VLImageProcessorPil._preprocess`.

    Parameters
    ----------
    image : PIL image of a mode in SUPPORTED_MODES, any size (aspect ratio <= 200).
    config : the checkpoint's ImageConfig.

    Returns
    -------
    patches : float32 [gh*gw, 3*T*p*p], rows in merge-block order (each run of merge_size**2 rows is
        one LM token), each row laid out as (C, T, p, p) with the frame repeated T times.
    grid_thw : (1, gh, gw), the patch grid.
    """
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, config.factor, config.min_pixels, config.max_pixels)
    resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling(config.resample)))
    pixels = rescale_and_normalize(resized.transpose(2, 0, 1), config)
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    gh, gw = height // p, width // p
    blocks = pixels.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # [gh/m, gw/m, m, m, C, p, p] -> [gh/m, gw/m, m, m, C, T, p, p]: a still image fills every frame.
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return frames.reshape(gh * gw, config.patch_dim), (1, gh, gw)


def preprocess_images(images: Sequence[Image.Image], config: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images, concatenated as the HF image processor returns them.

    Returns
    -------
    pixel_values : float32 [sum of gh*gw over images, 3*T*p*p]
    image_grid_thw : int32 [n_images, 3]
    """
    if not images:
        raise ValueError("no images to preprocess")
    patches, grids = zip(*(preprocess_image(image, config) for image in images))
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int32)


class Qwen2VLPrep(ChatPrep):
    """Chat prompts + images -> Qwen2-VL model inputs, equal to HF's `Qwen2VLProcessor(..., padding=True)`.

    Attributes
    ----------
    tokenizer : the checkpoint's HF tokenizer (its `padding_side` decides where padding goes).
    chat_template : the Jinja chat template.
    image_config : ImageConfig.
    special_ids : SpecialTokenIds; `image_token_id` is `special_ids.image_pad`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str, image_config: ImageConfig):
        super().__init__(tokenizer, chat_template, image_config)
        self.special_ids = SpecialTokenIds.from_tokenizer(tokenizer)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "Qwen2VLPrep":
        """Builds the processor from a checkpoint directory (HF layout).

        Raises FileNotFoundError naming the first missing file among preprocessor_config.json,
        tokenizer.json, tokenizer_config.json and the chat template.
        """
        path = checked_dir(path)
        image_config = ImageConfig.from_dir(path)
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), image_config)

    @property
    def image_token_id(self) -> int:
        return self.special_ids.image_pad

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        """LM tokens of one image: its patches divided by the merge block, t*h*w / merge_size**2."""
        return int(np.prod(grid_thw)) // self.image_config.merge_size**2

    def chat_text(self, prompt: str, num_images: int = 0, system: Optional[str] = None) -> str:
        """One user turn through the chat template, images before the text, with the generation prompt.

        With system=None the template inserts its default system turn. Each image appears as a single
        `<|vision_start|><|image_pad|><|vision_end|>`, not yet expanded.
        """
        return render_user_turn(self.tokenizer, self.chat_template, {"type": "text", "text": prompt}, num_images,
                                system)

    def __call__(
        self, images: Optional[Sequence[ImageEntry]], prompts: Sequence[str], system: Optional[str] = None
    ) -> dict[str, Optional[np.ndarray]]:
        """Processes a batch of single-turn chats.

        Parameters
        ----------
        images : one entry per prompt: a PIL image, a list of PIL images (placed in order before the
            prompt's text), or None (text only). images=None makes every prompt text only.
        prompts : B user texts. They must not contain `<|image_pad|>` or `<|video_pad|>`.
        system : system turn for every prompt; None keeps the template's default one.

        Returns
        -------
        dict with exactly these keys:
            input_ids : int32 [B, T], padded on `self.padding_side` with the tokenizer's pad token
            attention_mask : int32 [B, T], 0 at padding
            pixel_values : float32 [N, 3*T*p*p] (N = sum of gh*gw over all images, prompt order), or None
            image_grid_thw : int32 [n_images, 3], or None
        """
        per_prompt = images_per_prompt(images, prompts)
        flat = [image for entry in per_prompt for image in entry]
        pixel_values, grid_thw = preprocess_images(flat, self.image_config) if flat else (None, None)
        expansions = iter([] if grid_thw is None else [IMAGE_PAD * self.num_image_tokens(g) for g in grid_thw])

        texts = []
        for i, (prompt, entry) in enumerate(zip(prompts, per_prompt)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
            text = self.chat_text(prompt, len(entry), system)
            # The template writes one IMAGE_PAD per image; any other comes from the user's own text and
            # would silently take the place of an image's tokens.
            if text.count(IMAGE_PAD) != len(entry) or VIDEO_PAD in text:
                raise ValueError(
                    f"prompt {i}: the chat text holds {text.count(IMAGE_PAD)} {IMAGE_PAD} and {text.count(VIDEO_PAD)} "
                    f"{VIDEO_PAD} for {len(entry)} image(s); prompt and system texts must not contain "
                    f"{IMAGE_PAD} or {VIDEO_PAD} (the template inserts one {IMAGE_PAD} per image)"
                )
            texts.append(expand_placeholders(text, IMAGE_PAD, expansions))

        encoded = self.tokenizer(texts, padding=True, return_tensors="np")
        input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        check_image_tokens(input_ids, texts, IMAGE_PAD, self.image_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
            "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
        }

