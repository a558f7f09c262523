"""Gemma 3 processor in numpy + PIL, equal to transformers 5.23's `Gemma3Processor`.

The reference is the processor with its PIL image backend, `Gemma3ImageProcessorPil` (the one
transformers picks when torchvision is absent), run through `processor.apply_chat_template(...,
tokenize=True)`. Spec: shared/reference/architectures.md, C.2. What is ported:

* RGB conversion as HF (`to_rgb`, shared with the Qwen2-VL processor: alpha composited on white).
* Resize of the uint8 RGB image to the checkpoint's `size` (hub: 896 x 896) with its `resample`
  (BILINEAR), ignoring the aspect ratio; rescale in float64 then cast to float32, normalise in
  float32 (mean = std = 0.5, so [-1, 1]): the same operations in the same dtypes as HF.
* Pan-and-scan is off (HF's default; a checkpoint asking for it is refused).
* Text: the chat template (`<bos>` included) renders each image as `<start_of_image>`; that is
  replaced by "\\n\\n<start_of_image>" + image_seq_length x "<image_soft_token>" +
  "<end_of_image>\\n\\n", as the HF processor does, and the text is tokenized by the checkpoint's
  own tokenizer without adding special tokens again (HF's apply_chat_template does the same when
  the rendered text starts with `<bos>`), padded on the tokenizer's padding side (Gemma: left).
* token_type_ids: 1 at `<image_soft_token>`, 0 elsewhere (padding included). The model needs them
  for the bidirectional attention inside each image.

All preprocessing parameters come from the checkpoint directory's files.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from spatial_jax.processing.chat import (
    images_per_prompt,     ChatPrep, ImageEntry, checked_dir, load_tokenizer, render_user_turn, token_id,
    tokenize_chat_texts,
)
from spatial_jax.processing.images import (
    PROCESSOR_CONFIG, read_json, image_processor_values, load_chat_template, read_image_processor_config, rescale_and_normalize, to_rgb,
)

BOI = "<start_of_image>"
EOI = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
DEFAULT_IMAGE_SEQ_LENGTH = 256  # Gemma3Processor's default when processor_config.json has none


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Image-processor parameters of a checkpoint, with `Gemma3ImageProcessorPil`'s defaults."""

    height: int = 224
    width: int = 224
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BILINEAR)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "the image processor config") -> "ImageConfig":
        if config.get("do_pan_and_scan"):
            raise ValueError(f"{source}: do_pan_and_scan=true is not supported (pan-and-scan crops)")
        if config.get("do_convert_rgb") is False:
            raise ValueError(f"{source}: do_convert_rgb=false is not supported")
        values: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if not isinstance(size, Mapping) or "height" not in size or "width" not in size:
                raise ValueError(f"{source}: size must be {{'height': ..., 'width': ...}}, got {size}")
            values["height"], values["width"] = int(size["height"]), int(size["width"])
        values.update(image_processor_values(
            config, source, ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")))
        return cls(**values)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "ImageConfig":
        """As transformers 5.23 loads it (see `read_image_processor_config`)."""
        return cls.from_dict(*read_image_processor_config(path))


def preprocess_image(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """One PIL image -> float32 [3, height, width], as `Gemma3ImageProcessorPil._preprocess`."""
    rgb = to_rgb(image)
    if config.do_resize:
        rgb = rgb.resize((config.width, config.height), resample=Image.Resampling(config.resample))
    return rescale_and_normalize(np.asarray(rgb).transpose(2, 0, 1), config)


def _image_seq_length(path: str) -> int:
    """processor_config.json's image_seq_length (HF's source); else the model config's
    mm_tokens_per_image (HF would fall back to 256 and the model would then refuse the input)."""
    for name, key in ((PROCESSOR_CONFIG, "image_seq_length"), ("config.json", "mm_tokens_per_image")):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            value = read_json(file).get(key)
            if value is not None:
                return int(value)
    return DEFAULT_IMAGE_SEQ_LENGTH


class Gemma3Prep(ChatPrep):
    """Chat prompts + images -> Gemma 3 model inputs, equal to HF's
    `Gemma3Processor.apply_chat_template(..., tokenize=True, padding=True)`.

    Attributes
    ----------
    tokenizer : the checkpoint's HF tokenizer (its `padding_side` decides where padding goes).
    chat_template : the Jinja chat template.
    image_config : ImageConfig.
    image_seq_length : soft tokens per image (the model's mm_tokens_per_image).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str, image_config: ImageConfig,
                 image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH):
        super().__init__(tokenizer, chat_template, image_config)
        self.image_seq_length = image_seq_length
        self.boi_token_id, self.eoi_token_id, self.image_token_id = (
            token_id(tokenizer, token, "Gemma 3") for token in (BOI, EOI, IMAGE_SOFT_TOKEN))
        self.full_image_sequence = f"\n\n{BOI}{IMAGE_SOFT_TOKEN * image_seq_length}{EOI}\n\n"

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "Gemma3Prep":
        """Builds the processor from a checkpoint directory (hub or save_pretrained layout).

        Raises FileNotFoundError naming the first missing file among the image processor config,
        tokenizer.json, tokenizer_config.json and the chat template.
        """
        path = checked_dir(path)
        image_config = ImageConfig.from_dir(path)
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), image_config, _image_seq_length(path))

    def chat_text(self, prompt: str, num_images: int = 0, system: Optional[str] = None) -> str:
        """One user turn through the chat template, images before the text, with the generation
        prompt. Each image is a single `<start_of_image>`, not yet expanded. Gemma's template has
        no default system turn; a system text goes in front of the first user turn."""
        return render_user_turn(self.tokenizer, self.chat_template, {"type": "text", "text": prompt}, num_images,
                                None if system is None else [{"type": "text", "text": system}])

    def __call__(self, images: Optional[Sequence[ImageEntry]], prompts: Sequence[str],
                 system: Optional[str] = None) -> dict[str, Optional[np.ndarray]]:
        """Processes a batch of single-turn chats.

        Parameters
        ----------
        images : one entry per prompt: a PIL image, a list of PIL images (placed in order before the
            prompt's text), or None (text only). images=None makes every prompt text only.
        prompts : B user texts; they must not contain `<start_of_image>` or `<image_soft_token>`.
        system : system text for every prompt, or None (no system turn).

        Returns
        -------
        dict with exactly these keys:
            input_ids : int32 [B, T], padded on `self.padding_side` with the tokenizer's pad token
            attention_mask : int32 [B, T], 0 at padding
            pixel_values : float32 [n_img, 3, H, W] (prompt order, then order within a prompt), or None
            token_type_ids : int32 [B, T], 1 at `<image_soft_token>`
        """
        per_prompt = images_per_prompt(images, prompts)
        flat = [image for entry in per_prompt for image in entry]
        pixel_values = np.stack([preprocess_image(im, self.image_config) for im in flat]) if flat else None

        texts = []
        for i, (prompt, entry) in enumerate(zip(prompts, per_prompt)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
            text = self.chat_text(prompt, len(entry), system)
            # The template writes one BOI per image; any other comes from the user's text and would
            # silently take the place of an image.
            if text.count(BOI) != len(entry) or IMAGE_SOFT_TOKEN in text:
                raise ValueError(
                    f"prompt {i}: the chat text holds {text.count(BOI)} {BOI} and {text.count(IMAGE_SOFT_TOKEN)} "
                    f"{IMAGE_SOFT_TOKEN} for {len(entry)} image(s); prompt and system texts must not contain "
                    f"{BOI} or {IMAGE_SOFT_TOKEN} (the template inserts one {BOI} per image)")
            texts.append(text.replace(BOI, self.full_image_sequence))

        encoded = tokenize_chat_texts(self.tokenizer, texts)
        input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        token_type_ids = (input_ids == self.image_token_id).astype(np.int32)
        expected = [len(entry) * self.image_seq_length for entry in per_prompt]
        if token_type_ids.sum(axis=1).tolist() != expected:
            raise ValueError(f"the tokenizer split {IMAGE_SOFT_TOKEN}: {token_type_ids.sum(axis=1).tolist()} "
                             f"image tokens where {expected} were written; it must be an added token")
        return {
            "input_ids": input_ids,
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
            "pixel_values": pixel_values,
            "token_type_ids": token_type_ids,
        }
