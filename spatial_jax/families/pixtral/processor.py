"""Pixtral processor in numpy + PIL, equal to transformers 5.23's `PixtralProcessor`.

The reference is the processor with its PIL image backend, `PixtralImageProcessorPil` (the one
transformers picks when torchvision is absent), run through `processor.apply_chat_template(...,
tokenize=True)`. What is ported:

* RGB conversion as HF (`to_rgb`, shared with the other processors: alpha composited on white).
* Resize (HF's `get_resize_output_image_size`): an image that exceeds the size limit (hub:
  longest_edge 1024) is scaled by max(h / 1024, w / 1024), sides floored; then each side is
  rounded up to a multiple of the patch (16 px), so the aspect ratio is kept up to one patch.
  PIL resizes the uint8 RGB image with the checkpoint's `resample` (BICUBIC), even to its own size.
* Rescale in float64 then cast, normalise in float32 (CLIP mean / std), as HF.
* Padding: every image of the batch (all prompts together) is zero-padded after normalisation at
  the bottom and right to the largest height and width -> pixel_values [n_img, 3, H_max, W_max],
  with image_sizes [n_img, 2] the (height, width) of each image before padding.
* Text: the chat template writes one `[IMG]` per image; each becomes the image's patch rows, every
  row `w x [IMG]` then `[IMG_BREAK]`, the last `[IMG_BREAK]` replaced by `[IMG_END]`. The text is
  tokenized by the checkpoint's own tokenizer without adding special tokens again when it starts
  with BOS (HF's apply_chat_template does the same), padded on the tokenizer's padding side.

The patch is the processor's (processor_config.json `patch_size` x `spatial_merge_size`, default
16 x 1), which HF passes to the image processor over the image processor's own. All parameters
come from the checkpoint directory's files.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from spatial_jax.processing.chat import (
    images_per_prompt,     ChatPrep, ImageEntry, check_image_tokens, checked_dir, expand_placeholders, load_tokenizer,
    render_user_turn, token_id, tokenize_chat_texts,
)
from spatial_jax.processing.images import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PROCESSOR_CONFIG, read_json, image_processor_values, load_chat_template, read_image_processor_config, rescale_and_normalize, to_rgb,
)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Image-processor parameters of a checkpoint, with `PixtralImageProcessorPil`'s defaults.

    max_height / max_width: the size limit (HF's size {"longest_edge": L} gives L, L); patch_size:
    the processor's patch, to whose multiples the sides are rounded up.
    """

    max_height: int = 1024
    max_width: int = 1024
    patch_size: int = 16
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "the image processor config",
                  patch_size: int = 16) -> "ImageConfig":
        for flag in ("do_pad", "do_convert_rgb"):
            if config.get(flag) is False:
                raise ValueError(f"{source}: {flag}=false is not supported (images of a batch are padded RGB)")
        if config.get("do_center_crop"):
            raise ValueError(f"{source}: do_center_crop=true is not supported")
        values: dict[str, Any] = {"patch_size": int(patch_size)}
        size = config.get("size")
        if size is not None:
            if isinstance(size, Mapping) and size.get("longest_edge"):
                values["max_height"] = values["max_width"] = int(size["longest_edge"])
            elif isinstance(size, Mapping) and size.get("height") and size.get("width"):
                values["max_height"], values["max_width"] = int(size["height"]), int(size["width"])
            else:
                raise ValueError(f"{source}: size must be {{'longest_edge': ...}} or {{'height', 'width'}}, got {size}")
        values.update(image_processor_values(
            config, source, ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")))
        return cls(**values)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) HF resizes an image to: within the limit, sides floored, then rounded up to
        multiples of the patch (HF's get_resize_output_image_size)."""
        ratio = max(height / self.max_height, width / self.max_width)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        p = self.patch_size
        return ((height - 1) // p + 1) * p, ((width - 1) // p + 1) * p


def preprocess_image(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """One PIL image -> float32 [3, h, w] (not yet padded), as `PixtralImageProcessorPil._preprocess`."""
    rgb = to_rgb(image)
    if config.do_resize:
        height, width = config.resized_size(rgb.height, rgb.width)
        rgb = rgb.resize((width, height), resample=Image.Resampling(config.resample))
    return rescale_and_normalize(np.asarray(rgb).transpose(2, 0, 1), config)


def pad_images(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[3, h_i, w_i] images -> (pixel_values [n, 3, H_max, W_max] zero-padded at the bottom and right,
    image_sizes int32 [n, 2] of (h_i, w_i))."""
    sizes = np.asarray([im.shape[1:] for im in images], dtype=np.int32)
    out = np.zeros((len(images), images[0].shape[0], *sizes.max(0)), dtype=np.float32)
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]] = im
    return out, sizes


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """The strings that stand for an image in the text (processor_config.json, HF's defaults)."""

    image: str = "[IMG]"
    image_break: str = "[IMG_BREAK]"
    image_end: str = "[IMG_END]"

    def expansion(self, rows: int, cols: int) -> str:
        """An image of rows x cols patches: each row's [IMG]s then [IMG_BREAK], the last one [IMG_END]."""
        return ((self.image * cols + self.image_break) * rows)[:-len(self.image_break)] + self.image_end


class PixtralPrep(ChatPrep):
    """Chat prompts + images -> Pixtral model inputs, equal to HF's
    `PixtralProcessor.apply_chat_template(..., tokenize=True, padding=True)`.

    Attributes
    ----------
    tokenizer : the checkpoint's HF tokenizer (its `padding_side` decides where padding goes).
    chat_template : the Jinja chat template.
    image_config : ImageConfig.
    tokens : ImageTokens; `image_token_id` is the id of `tokens.image`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str, image_config: ImageConfig,
                 tokens: ImageTokens = ImageTokens()):
        super().__init__(tokenizer, chat_template, image_config)
        self.tokens = tokens
        self.image_token_id = token_id(tokenizer, tokens.image, "Pixtral")
        for token in (tokens.image_break, tokens.image_end):  # written as text by the expansion: must exist
            token_id(tokenizer, token, "Pixtral")

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "PixtralPrep":
        """Builds the processor from a checkpoint directory (hub or save_pretrained layout).

        Raises FileNotFoundError naming the first missing file among the image processor config,
        tokenizer.json, tokenizer_config.json and the chat template.
        """
        path = checked_dir(path)
        processor_file = os.path.join(path, PROCESSOR_CONFIG)
        proc = read_json(processor_file) if os.path.isfile(processor_file) else {}
        if proc.get("spatial_merge_size", 1) != 1:
            raise ValueError(f"{processor_file}: spatial_merge_size {proc['spatial_merge_size']} (a Mistral 3 "
                             "processor); Pixtral has 1")
        image_config = ImageConfig.from_dict(*read_image_processor_config(path), patch_size=proc.get("patch_size", 16))
        defaults = ImageTokens()
        tokens = ImageTokens(proc.get("image_token", defaults.image), proc.get("image_break_token", defaults.image_break),
                             proc.get("image_end_token", defaults.image_end))
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), image_config, tokens)

    def chat_text(self, prompt: str, num_images: int = 0, system: Optional[str] = None) -> str:
        """One user turn through the chat template, images before the text. Each image is a single
        `[IMG]`, not yet expanded. Pixtral's template has no generation prompt (the user turn ends
        with [/INST]) and writes a system text at the start of the last user turn."""
        # The original Pixtral template reads a text chunk's "content", later ones "text" too.
        return render_user_turn(self.tokenizer, self.chat_template,
                                {"type": "text", "text": prompt, "content": prompt}, num_images, system)

    def __call__(self, images: Optional[Sequence[ImageEntry]], prompts: Sequence[str],
                 system: Optional[str] = None) -> dict[str, Optional[np.ndarray]]:
        """Processes a batch of single-turn chats.

        Parameters
        ----------
        images : one entry per prompt: a PIL image, a list of PIL images (placed in order before the
            prompt's text), or None (text only). images=None makes every prompt text only.
        prompts : B user texts; they must not contain the image tokens.
        system : system text for every prompt, or None (no system text).

        Returns
        -------
        dict with exactly these keys:
            input_ids : int32 [B, T], padded on `self.padding_side` with the tokenizer's pad token
            attention_mask : int32 [B, T], 0 at padding
            pixel_values : float32 [n_img, 3, H_max, W_max] (prompt order, then order within a prompt), or None
            image_sizes : int32 [n_img, 2], (height, width) of each image inside pixel_values, or None
        """
        per_prompt = images_per_prompt(images, prompts)
        flat = [preprocess_image(image, self.image_config) for entry in per_prompt for image in entry]
        pixel_values, image_sizes = pad_images(flat) if flat else (None, None)
        p = self.image_config.patch_size
        expansions = iter([] if image_sizes is None else [self.tokens.expansion(h // p, w // p) for h, w in image_sizes])

        t = self.tokens
        texts = []
        for i, (prompt, entry) in enumerate(zip(prompts, per_prompt)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
            text = self.chat_text(prompt, len(entry), system)
            # The template writes one [IMG] per image; any other (or a break / end token) comes from
            # the user's text and would silently take the place of an image's tokens.
            if text.count(t.image) != len(entry) or t.image_break in text or t.image_end in text:
                raise ValueError(
                    f"prompt {i}: the chat text holds {text.count(t.image)} {t.image} for {len(entry)} image(s); "
                    f"prompt and system texts must not contain {t.image}, {t.image_break} or {t.image_end}")
            texts.append(expand_placeholders(text, t.image, expansions))

        encoded = tokenize_chat_texts(self.tokenizer, texts)
        input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        check_image_tokens(input_ids, texts, t.image, self.image_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }
