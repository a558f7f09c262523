"""Qwen2VLPrep and the word-level processor builder against transformers 5.23's Qwen2VLProcessor.

The reference is `AutoProcessor.from_pretrained(dir)`, which picks the PIL image backend here.
transformers 5.23 cannot build any processor that has a video processor without torchvision (the
`VideoProcessorMixin` class check and `AutoVideoProcessor` both need it), and Qwen2-VL has one; the
fixture `hf_processor` lets it load with video_processor=None, which the image/text path never reads.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

import hf_reference as hr
from spatial_jax.families.qwen2_vl.processor import IMAGE_PAD, ImageConfig, Qwen2VLPrep, SpecialTokenIds, preprocess_images, smart_resize
from spatial_jax.families.qwen2_vl.word_tokenizer import (
    SPECIAL_IDS, TEMPLATE_WORDS, split_words, word_level_vocab, write_word_level_qwen2vl_processor,
)

WORDS = split_words("Is the red square left of the blue circle ? Which shape is above the other one ? yes no")
SMALL_MAX = 28 * 28 * 64  # 50,176 pixels: a 400x300 image is shrunk, a 20x30 one is enlarged to 3,136


def load_hf_processor(path):
    with hr.without_video_processor():
        return AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2vl_proc")
    write_word_level_qwen2vl_processor(path, WORDS, max_pixels=SMALL_MAX)
    return path


@pytest.fixture(scope="module")
def hf(proc_dir):
    return load_hf_processor(proc_dir)


@pytest.fixture(scope="module")
def prep(proc_dir):
    return Qwen2VLPrep.from_dir(proc_dir)


def noise_image(height: int, width: int, mode: str, seed: int = 0) -> Image.Image:
    """Deterministic uniform noise (with a random alpha for modes that have one) in the given mode."""
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P+transparency":
        image = image.convert("P")
        image.info["transparency"] = 7
        return image
    if mode == "PA":
        return image.convert("P").convert("PA")
    return image.convert(mode)


# ---------------------------------------------------------------------------------------- smart_resize

# Sides that are odd multiples of 14 put side/28 on an exact .5: banker's rounding sends 42, 98 up
# and 70, 126 down.
TIE_SIDES = [14, 42, 70, 98, 126, 154, 182, 210, 238, 266]


def test_smart_resize_bankers_rounding():
    assert smart_resize(70, 98) == (56, 112)  # round(2.5) = 2, round(3.5) = 4
    assert smart_resize(126, 154) == (112, 168)  # round(4.5) = 4, round(5.5) = 6


@pytest.mark.parametrize("min_pixels,max_pixels", [(56 * 56, 28 * 28 * 1280), (56 * 56, SMALL_MAX),
                                                   (4 * 28 * 28, 16 * 28 * 28), (1, 10**9)])
def test_smart_resize_matches_hf(min_pixels, max_pixels):
    rng = random.Random(0)
    sizes = [(h, w) for h in TIE_SIDES for w in TIE_SIDES]
    sizes += [(h, w) for h, w in ((rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(600))
              if max(h, w) <= 200 * min(h, w)]
    sizes += [(1, 150), (150, 1), (1, 1), (3, 600), (1080, 1920), (480, 640), (224, 224)]
    for factor in (28, 14):
        for h, w in sizes:
            expected = hf_qwen2_vl.smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w, factor)


def test_smart_resize_aspect_ratio_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)


# ------------------------------------------------------------------------------------------- pixels

IMAGE_CASES = [
    ((224, 224), "RGB"),  # square, already a multiple of 28
    ((100, 150), "RGB"),  # non-square, rounded
    ((70, 98), "RGB"),  # banker's-rounding ties on both sides
    ((480, 640), "RGB"),  # above max_pixels: shrunk
    ((20, 30), "RGB"),  # below min_pixels: enlarged
    ((9, 400), "RGB"),  # thin strip
    ((100, 150), "RGBA"),  # composited onto white
    ((480, 640), "RGBA"),
    ((20, 30), "L"),
    ((130, 90), "L"),
    ((100, 150), "LA"),
    ((100, 150), "P"),
    ((100, 150), "P+transparency"),
    ((100, 150), "PA"),
    ((100, 150), "1"),
    ((100, 150), "CMYK"),
    ((100, 150), "YCbCr"),
    ((100, 150), "RGBX"),
]


@pytest.mark.parametrize("size,mode", IMAGE_CASES)
def test_pixel_values_match_hf(prep, hf, size, mode):
    image = noise_image(*size, mode, seed=size[0] * 1000 + size[1])
    ours, grid = preprocess_images([image], prep.image_config)
    ref = hf.image_processor(images=[image], return_tensors="np")
    assert ours.dtype == np.float32 and grid.dtype == np.int32
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert ours.shape == ref["pixel_values"].shape
    assert np.abs(ours - ref["pixel_values"]).max() == 0.0


def test_pixel_values_several_images_and_other_config(tmp_path):
    """Patch/merge sizes and pixel bounds come from the directory, not from defaults."""
    write_word_level_qwen2vl_processor(tmp_path, WORDS, patch_size=7, merge_size=2, min_pixels=14 * 14 * 4,
                                       max_pixels=14 * 14 * 30)
    prep, hf = Qwen2VLPrep.from_dir(tmp_path), load_hf_processor(tmp_path)
    assert (prep.image_config.patch_size, prep.image_config.max_pixels) == (7, 14 * 14 * 30)
    images = [noise_image(90, 60, "RGB", 1), noise_image(10, 10, "RGBA", 2), noise_image(200, 333, "L", 3)]
    ours, grid = preprocess_images(images, prep.image_config)
    ref = hf.image_processor(images=images, return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert ours.shape == ref["pixel_values"].shape == (int(grid.prod(axis=1).sum()), 3 * 2 * 7 * 7)
    assert np.abs(ours - ref["pixel_values"]).max() == 0.0


@pytest.mark.parametrize("override", [{"resample": 2}, {"do_normalize": False}, {"do_rescale": False},
                                      {"image_mean": 0.5, "image_std": 0.5, "rescale_factor": 1 / 127.5}])
def test_pixel_values_follow_preprocessor_config(tmp_path, override):
    write_word_level_qwen2vl_processor(tmp_path, WORDS, max_pixels=SMALL_MAX)
    config_file = tmp_path / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **override}))
    prep, hf = Qwen2VLPrep.from_dir(tmp_path), load_hf_processor(tmp_path)
    image = noise_image(100, 150, "RGBA", 6)
    ours, _ = preprocess_images([image], prep.image_config)
    assert np.abs(ours - hf.image_processor(images=[image], return_tensors="np")["pixel_values"]).max() == 0.0


def test_nested_processor_config_and_legacy_chat_template_win(tmp_path):
    """As in transformers 5.23: processor_config.json's "image_processor" over preprocessor_config.json,
    chat_template.json over chat_template.jinja."""
    write_word_level_qwen2vl_processor(tmp_path, WORDS)
    nested = {**json.loads((tmp_path / "preprocessor_config.json").read_text()), "max_pixels": 28 * 28 * 16}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
    template = (tmp_path / "chat_template.jinja").read_text().replace("a helpful assistant", "a red square")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    prep, hf = Qwen2VLPrep.from_dir(tmp_path), load_hf_processor(tmp_path)
    assert prep.image_config.max_pixels == hf.image_processor.size["longest_edge"] == 28 * 28 * 16
    assert "a red square" in prep.chat_text("yes")
    images, prompts = [noise_image(480, 640, "RGB", 7), None], ["Is the red square left ?", "yes"]
    assert_same_inputs(prep(images, prompts), hf_inputs(hf, images, prompts))


def test_image_config_precedence():
    """HF: min/max_pixels override `size`; missing keys take Qwen2VLImageProcessorPil's defaults."""
    config = ImageConfig.from_dict({"size": {"shortest_edge": 10, "longest_edge": 20}, "max_pixels": 30})
    assert (config.min_pixels, config.max_pixels, config.resample, config.patch_size) == (10, 30, 3, 14)
    assert ImageConfig.from_dict({}).max_pixels == hf_qwen2_vl.Qwen2VLImageProcessorPil.size["longest_edge"]


# ------------------------------------------------------------------------------------ text and batch

def hf_inputs(hf, images, prompts, system=None):
    """The reference: processor.apply_chat_template, then processor(text, images, padding=True)."""
    chats, flat = [], []
    for entry, prompt in zip(images, prompts):
        entry = [] if entry is None else entry if isinstance(entry, list) else [entry]
        flat += entry
        chat = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
        chat.append({"role": "user", "content": [{"type": "image"} for _ in entry] + [{"type": "text", "text": prompt}]})
        chats.append(chat)
    texts = hf.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    return hf(text=texts, images=flat or None, padding=True, return_tensors="np")


def assert_same_inputs(ours, ref):
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    if ours["pixel_values"] is None:
        assert "pixel_values" not in ref and ours["image_grid_thw"] is None
    else:
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() == 0.0


def test_two_prompts_one_image_each_left_padded(prep, hf):
    images = [noise_image(100, 150, "RGB", 1), noise_image(224, 224, "RGBA", 2)]
    prompts = ["Is the red square left of the blue circle ?", "yes"]
    ours = prep(images, prompts)
    assert_same_inputs(ours, hf_inputs(hf, images, prompts))
    mask = ours["attention_mask"]
    assert prep.padding_side == "left" and not mask.all() and (np.diff(mask, axis=1) >= 0).all()
    assert (ours["input_ids"] == prep.image_token_id).sum() == (ours["image_grid_thw"].prod(axis=1) // 4).sum()


def test_mixed_batch_matches_hf(prep, hf):
    images = [noise_image(100, 150, "RGB", 1), [noise_image(60, 90, "L", 2), noise_image(480, 640, "RGB", 3)], None,
              noise_image(20, 30, "RGBA", 4)]
    prompts = ["Which shape is above ?", "Is the red square left of the blue circle ? unseen words here", "no",
               "yes\nno"]
    assert_same_inputs(prep(images, prompts), hf_inputs(hf, images, prompts))
    system = "You are a red square ."
    assert_same_inputs(prep(images, prompts, system=system), hf_inputs(hf, images, prompts, system=system))


def test_text_only_batch(prep, hf):
    prompts = ["Is the red square left of the blue circle ?", "yes"]
    ours = prep(None, prompts)
    assert ours["pixel_values"] is None and ours["image_grid_thw"] is None
    assert_same_inputs(ours, hf_inputs(hf, [None, None], prompts))


def test_right_padding_follows_tokenizer_config(tmp_path):
    write_word_level_qwen2vl_processor(tmp_path, WORDS, padding_side="right", max_pixels=SMALL_MAX)
    prep, hf = Qwen2VLPrep.from_dir(tmp_path), load_hf_processor(tmp_path)
    images, prompts = [noise_image(56, 56, "RGB", 5), None], ["yes", "Is the red square left of the blue circle ?"]
    ours = prep(images, prompts)
    assert prep.padding_side == "right" and ours["attention_mask"][0, -1] == 0
    assert_same_inputs(ours, hf_inputs(hf, images, prompts))


# ------------------------------------------------------------------------------------------- builder

def test_builder_files_load_as_hf_processor(proc_dir, hf, prep):
    assert type(hf).__name__ == "Qwen2VLProcessor"
    assert type(hf.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert hf.tokenizer.padding_side == "left" and hf.tokenizer.pad_token == "<|endoftext|>"
    assert hf.image_token_id == SPECIAL_IDS.image_pad == prep.image_token_id == 6
    assert SpecialTokenIds.from_tokenizer(hf.tokenizer) == prep.special_ids == SPECIAL_IDS
    assert sorted(os.listdir(proc_dir)) == ["chat_template.jinja", "preprocessor_config.json",
                                            "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((proc_dir / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_builder_tokenizes_the_chat_template(proc_dir, prep):
    info = write_word_level_qwen2vl_processor(proc_dir, WORDS, max_pixels=SMALL_MAX)  # same files again
    assert info.special_ids == SPECIAL_IDS and (info.unk_id, info.newline_id) == (8, 9)
    assert info.vocab == word_level_vocab(WORDS) and info.vocab_size == 10 + len(TEMPLATE_WORDS) + 17
    text = prep.chat_text("Is the red square left?", num_images=1)
    tokens = prep.tokenizer.convert_ids_to_tokens(prep.tokenizer(text)["input_ids"])
    assert tokens == ["<|im_start|>", "system", "\n", "You", "are", "a", "helpful", "assistant", ".", "<|im_end|>",
                      "\n", "<|im_start|>", "user", "\n", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                      "Is", "the", "red", "square", "left", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert prep.tokenizer("purple")["input_ids"] == [info.unk_id]


def test_builder_rejects_multi_token_words(tmp_path):
    with pytest.raises(ValueError, match="not one word-level token"):
        write_word_level_qwen2vl_processor(tmp_path, ["red square"])
    with pytest.raises(ValueError, match="not one word-level token"):
        word_level_vocab(["left?"])


# -------------------------------------------------------------------------------------------- errors

def test_prompt_with_image_tokens_is_rejected(prep):
    image = noise_image(56, 56, "RGB")
    with pytest.raises(ValueError, match="must not contain"):
        prep([image], [f"look {IMAGE_PAD} here"])
    with pytest.raises(ValueError, match="must not contain"):
        prep([None], [f"{IMAGE_PAD}"])
    with pytest.raises(ValueError, match="must not contain"):
        prep([None], ["yes"], system="<|video_pad|>")


def test_bad_image_inputs_are_rejected(prep):
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        prep([noise_image(56, 56, "RGB")], ["yes", "no"])
    with pytest.raises(TypeError, match=r"images\[0\]\[1\] is a ndarray"):
        prep([[noise_image(56, 56, "RGB"), np.zeros((56, 56, 3), np.uint8)]], ["yes"])
    with pytest.raises(TypeError, match="not a string"):
        prep(None, "yes")
    for mode in ("F", "I;16", "HSV", "RGBa"):
        with pytest.raises(ValueError, match=f"unsupported image mode '{mode}'"):
            prep([noise_image(56, 56, "RGB").convert(mode)], ["yes"])


@pytest.mark.parametrize("missing", ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                                     "chat_template.jinja"])
def test_missing_file_is_named(tmp_path, missing):
    write_word_level_qwen2vl_processor(tmp_path, WORDS)
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        Qwen2VLPrep.from_dir(tmp_path)


def test_unsupported_preprocessor_flag(tmp_path):
    write_word_level_qwen2vl_processor(tmp_path, WORDS)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_resize": False}))
    with pytest.raises(ValueError, match="do_resize=false"):
        Qwen2VLPrep.from_dir(tmp_path)
