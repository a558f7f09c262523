"""What the families' image processors share: HF's RGB conversion, rescale and normalisation in
HF's dtypes, the image-processor config and chat template as transformers 5.23 finds them in a
checkpoint dir."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PreTrainedTokenizerBase

from spatial_jax.processing.chat import TOKENIZER_CONFIG

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# Modes whose conversion to RGB HF performs with PIL and that hold 8-bit colour. The rest are refused:
# "I", "I;16" and "F" would be clipped to 0..255 without a word, "La"/"RGBa" (premultiplied alpha) are
# not composited by HF's alpha test, and "HSV"/"LAB" cannot be converted to RGB by PIL.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def image_processor_values(config: Mapping[str, Any], source: str, fields: Sequence[str]) -> dict[str, Any]:
    """The given fields of an image processor config where set (null means the default), and
    image_mean / image_std where set, as RGB triples (HF accepts one number for all three)."""
    values = {field: config[field] for field in fields if config.get(field) is not None}
    for field in ("image_mean", "image_std"):
        stats = config.get(field)
        if stats is not None:
            values[field] = tuple(float(v) for v in (stats if isinstance(stats, Sequence) else [stats] * 3))
            if len(values[field]) != 3:
                raise ValueError(f"{source}: {field} must have 3 entries (RGB), got {stats}")
    return values


def read_json(path: str) -> dict[str, Any]:
    """A JSON file's contents (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_image_processor_config(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], str]:
    """(the image processor's settings, the file they came from) of a checkpoint dir, as transformers
    5.23 loads them: processor_config.json's nested "image_processor" first (what save_pretrained
    writes), then preprocessor_config.json (the hub layout). FileNotFoundError if neither has them."""
    processor_file = os.path.join(path, PROCESSOR_CONFIG)
    if os.path.isfile(processor_file):
        nested = read_json(processor_file).get("image_processor")
        if isinstance(nested, dict):
            return nested, processor_file
    preprocessor_file = os.path.join(path, PREPROCESSOR_CONFIG)
    if not os.path.isfile(preprocessor_file):
        raise FileNotFoundError(
            f"{path}: missing {PREPROCESSOR_CONFIG} (nor does {PROCESSOR_CONFIG} hold an 'image_processor')"
        )
    return read_json(preprocessor_file), preprocessor_file


def rescale_and_normalize(chw: np.ndarray, config) -> np.ndarray:
    """uint8 [3, H, W] -> float32 pixels with the dtypes of HF's PIL backend: rescaled in float64 then
    cast, normalised in float32. config: an image config with do_rescale, rescale_factor,
    do_normalize, image_mean and image_std."""
    pixels = (chw.astype(np.float64) * config.rescale_factor).astype(np.float32) if config.do_rescale \
        else chw.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """HF's `convert_to_rgb` for PIL images: transparency is composited onto opaque white.

    Raises TypeError for a non-PIL input and ValueError for a mode outside SUPPORTED_MODES.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {image.mode!r}; supported: {', '.join(SUPPORTED_MODES)}")
    # HF's test for transparency: an alpha band, or a palette/colour key in info["transparency"].
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_chat_template(path: Union[str, os.PathLike], tokenizer: Optional[PreTrainedTokenizerBase] = None) -> str:
    """The processor's chat template, with transformers 5.23's precedence.

    processor_config.json["chat_template"], then chat_template.json (legacy), then chat_template.jinja.
    HF's processor stops there (it has no template, and cannot render chats); here the tokenizer's own
    template (tokenizer_config.json), when a tokenizer is given, is the last resort.
    """
    processor_file = os.path.join(path, PROCESSOR_CONFIG)
    if os.path.isfile(processor_file) and read_json(processor_file).get("chat_template"):
        return read_json(processor_file)["chat_template"]
    legacy_file = os.path.join(path, CHAT_TEMPLATE_JSON)
    if os.path.isfile(legacy_file):
        return read_json(legacy_file)["chat_template"]
    jinja_file = os.path.join(path, CHAT_TEMPLATE_JINJA)
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    if tokenizer is not None and isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{path}: missing {CHAT_TEMPLATE_JINJA} (no chat template in {CHAT_TEMPLATE_JSON}, "
                            f"{PROCESSOR_CONFIG} or {TOKENIZER_CONFIG} either)")
