"""LLaVA-1.5 processor in numpy + PIL, equal to transformers 5.23's `LlavaProcessor` with the PIL
image processor `CLIPImageProcessorPil` (the one transformers picks without torchvision), run
through `processor.apply_chat_template(..., tokenize=True)`. What is ported:

* RGB conversion as HF (`to_rgb`: alpha composited on white).
* Resize: the short side to size["shortest_edge"] (336), the long side int(336 * long / short)
  (HF's get_resize_output_image_size), or to size {"height", "width"}; PIL with the checkpoint's
  `resample` (BICUBIC) on the uint8 RGB image. Then the centre crop to crop_size (336 x 336): top
  = (h - 336) // 2, left = (w - 336) // 2. Every image thus has one size.
* Rescale in float64 then cast, normalise in float32 (CLIP mean / std), as HF.
* Text: the chat template writes `<image>\\n` per image, before the text ("USER: <image>\\n<prompt>
  ASSISTANT:"); each `<image>` becomes (crop / patch)^2 + num_additional_image_tokens, minus one
  under strategy "default", `<image>` tokens (576 for llava-1.5: 24 x 24 patches, CLS dropped).
  Tokenized by the checkpoint's tokenizer (which prepends <s>), padded on its padding side.

All parameters come from the checkpoint directory's files (processor_config.json: patch_size,
num_additional_image_tokens, vision_feature_select_strategy, image_token).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from spatial_jax.families.gemma3 import processor as gemma3
from spatial_jax.processing.chat import (
    ChatPrep, ImageEntry, images_per_prompt, check_image_tokens, checked_dir, expand_placeholders, load_tokenizer, render_user_turn,
    token_id, tokenize_chat_texts,
)
from spatial_jax.processing.images import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PROCESSOR_CONFIG, image_processor_values, load_chat_template, read_image_processor_config,
    read_json, rescale_and_normalize, to_rgb,
)

IMAGE_TOKEN = "<image>"


def _size_pair(size: Mapping[str, Any], source: str, key: str) -> tuple[int, int]:
    if not isinstance(size, Mapping) or not size.get("height") or not size.get("width"):
        raise ValueError(f"{source}: {key} must be {{'height': ..., 'width': ...}}, got {size}")
    return int(size["height"]), int(size["width"])


@dataclasses.dataclass(frozen=True)
class ImageConfig(gemma3.ImageConfig):
    """Image-processor parameters of a checkpoint, with `CLIPImageProcessorPil`'s defaults: Gemma 3's
    fixed-size ones (height / width: the resize when shortest_edge is None) plus shortest_edge (the
    short side's size) and crop_hw (the centre crop's (height, width), None without one)."""

    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    shortest_edge: Optional[int] = 224
    crop_hw: Optional[tuple[int, int]] = (224, 224)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "the image processor config") -> "ImageConfig":
        if config.get("do_convert_rgb") is False:
            raise ValueError(f"{source}: do_convert_rgb=false is not supported")
        values: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if isinstance(size, Mapping) and size.get("shortest_edge") and not size.get("longest_edge"):
                values["shortest_edge"] = int(size["shortest_edge"])
            else:
                values["shortest_edge"] = None
                values["height"], values["width"] = _size_pair(size, source, "size")
        if config.get("do_center_crop") is False:
            values["crop_hw"] = None
        elif config.get("crop_size") is not None:
            values["crop_hw"] = _size_pair(config["crop_size"], source, "crop_size")
        values.update(image_processor_values(
            config, source, ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")))
        out = cls(**values)
        # Without a crop every image keeps its own resized size; LLaVA batches one size.
        if out.crop_hw is None and not (out.do_resize and out.shortest_edge is None):
            raise ValueError(f"{source}: without do_center_crop images differ in size; LLaVA needs one size")
        if out.crop_hw is not None and out.do_resize and out.shortest_edge is not None \
                and min(out.crop_hw) > out.shortest_edge:
            raise ValueError(f"{source}: crop_size {out.crop_hw} exceeds the resized short side {out.shortest_edge}")
        return out

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of every processed image."""
        return self.crop_hw if self.crop_hw is not None else (self.height, self.width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) HF resizes an image to (get_resize_output_image_size, default_to_square False)."""
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def visible_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in the original image's pixels of the centre crop, the part the patches
        show (`preprocess_image`'s resize, then crop); the whole image without a crop."""
        if self.crop_hw is None:
            return 0.0, 0.0, float(width), float(height)
        resized_h, resized_w = self.resized_size(height, width) if self.do_resize else (height, width)
        (crop_h, crop_w), sx, sy = self.crop_hw, width / resized_w, height / resized_h
        top, left = (resized_h - crop_h) // 2, (resized_w - crop_w) // 2
        return left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy


def preprocess_image(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """One PIL image -> float32 [3, *config.output_hw], as `CLIPImageProcessorPil._preprocess`."""
    rgb = to_rgb(image)
    if config.do_resize:
        height, width = config.resized_size(rgb.height, rgb.width)
        rgb = rgb.resize((width, height), resample=Image.Resampling(config.resample))
    chw = np.asarray(rgb).transpose(2, 0, 1)
    if config.crop_hw is not None:
        (h, w), (ch, cw) = chw.shape[1:], config.crop_hw
        if h < ch or w < cw:
            raise ValueError(f"image of {h} x {w} px is smaller than the {ch} x {cw} crop (do_resize is false)")
        top, left = (h - ch) // 2, (w - cw) // 2
        chw = chw[:, top:top + ch, left:left + cw]
    return rescale_and_normalize(chw, config)


class LlavaPrep(ChatPrep):
    """Chat prompts + images -> LLaVA-1.5 model inputs, equal to HF's
    `LlavaProcessor.apply_chat_template(..., tokenize=True, padding=True)`.

    Attributes
    ----------
    tokenizer : the checkpoint's HF tokenizer (its `padding_side` decides where padding goes).
    chat_template : the Jinja chat template.
    image_config : ImageConfig.
    tokens_per_image : `<image>` tokens each image becomes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str, image_config: ImageConfig,
                 tokens_per_image: int, image_token: str = IMAGE_TOKEN):
        super().__init__(tokenizer, chat_template, image_config)
        self.tokens_per_image = tokens_per_image
        self.image_token = image_token
        self.image_token_id = token_id(tokenizer, image_token, "LLaVA")

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "LlavaPrep":
        """Builds the processor from a checkpoint directory (hub or save_pretrained layout).

        Raises FileNotFoundError naming the first missing file among the image processor config,
        tokenizer.json, tokenizer_config.json and the chat template; ValueError without a patch_size.
        """
        path = checked_dir(path)
        processor_file = os.path.join(path, PROCESSOR_CONFIG)
        proc = read_json(processor_file) if os.path.isfile(processor_file) else {}
        if not proc.get("patch_size"):
            raise ValueError(f"{processor_file}: no patch_size (LlavaProcessor needs it to count image tokens)")
        image_config = ImageConfig.from_dict(*read_image_processor_config(path))
        height, width = image_config.output_hw
        p = int(proc["patch_size"])
        tokens = (height // p) * (width // p) + int(proc.get("num_additional_image_tokens", 0)) \
            - (proc.get("vision_feature_select_strategy") == "default")
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), image_config, tokens,
                   proc.get("image_token", IMAGE_TOKEN))

    def visible_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        return self.image_config.visible_box(*image_size)

    def chat_text(self, prompt: str, num_images: int = 0, system: Optional[str] = None) -> str:
        """One user turn through the chat template, images before the text, with the generation
        prompt ("ASSISTANT:"). Each image is a single `<image>`, not yet expanded. The llava-1.5
        template writes a system text's chunks, without a role, before "USER:"."""
        return render_user_turn(self.tokenizer, self.chat_template, {"type": "text", "text": prompt}, num_images,
                                None if system is None else [{"type": "text", "text": system}])

    def __call__(self, images: Optional[Sequence[ImageEntry]], prompts: Sequence[str],
                 system: Optional[str] = None) -> dict[str, Optional[np.ndarray]]:
        """Single-turn chats, images (one entry per prompt: a PIL image, a list of them placed in
        order before the text, or None; images=None: all text only) before each user text (which
        must not contain `<image>`), after an optional system text.

        Returns exactly: input_ids and attention_mask int32 [B, T] (padded on `self.padding_side`,
        attention 0 at padding), pixel_values float32 [n_img, 3, *image_config.output_hw] in prompt
        order, or None without images.
        """
        per_prompt = images_per_prompt(images, prompts)
        flat = [image for entry in per_prompt for image in entry]
        pixel_values = np.stack([preprocess_image(im, self.image_config) for im in flat]) if flat else None
        expansion = self.image_token * self.tokens_per_image

        texts = []
        for i, (prompt, entry) in enumerate(zip(prompts, per_prompt)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
            text = self.chat_text(prompt, len(entry), system)
            # The template writes one <image> per image; another comes from the user's text and would
            # silently take the place of an image's tokens.
            if text.count(self.image_token) != len(entry):
                raise ValueError(f"prompt {i}: the chat text holds {text.count(self.image_token)} {self.image_token} "
                                 f"for {len(entry)} image(s); prompt and system texts must not contain it")
            texts.append(expand_placeholders(text, self.image_token, iter([expansion] * len(entry))))

        encoded = tokenize_chat_texts(self.tokenizer, texts)
        input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        check_image_tokens(input_ids, texts, self.image_token, self.image_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
            "pixel_values": pixel_values,
        }
