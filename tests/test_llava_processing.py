"""LLaVA-1.5 processor: `LlavaPrep` against transformers 5.23's `LlavaProcessor` with
`CLIPImageProcessorPil`, via `apply_chat_template(..., tokenize=True, padding=True)`, on processor
dirs in the hub layout and in the layout save_pretrained writes; the real 336-px config gives 576
`<image>` tokens an image; then model.prepare -> sj.forward against HF's processor -> HF model."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import fixtures_llava as fl
import hf_reference as hr
from fixtures_llava import llava_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax import families
from spatial_jax.data.coco import box_in_view
from spatial_jax.data.geometry import box_to_tokens
from spatial_jax.families.llava.model import Llava, LlavaConfig
from spatial_jax.families.llava.processor import LlavaPrep
from spatial_jax.processing.images import rescale_and_normalize

PROMPTS = ["What is left of the red square?", "  Is the blue circle above the green square ?  ",
           "Answer in one word."]
SYSTEM = "You are a helpful assistant."


def _images():
    """Per prompt: two images (a wide one and a tall RGBA one, both cropped), none, one grayscale
    smaller than the tower's size (upscaled)."""
    return [[hr.random_image(50, 130, seed=1), hr.random_image(100, 61, "RGBA", seed=2)], None,
            hr.random_image(33, 40, "L", seed=3)]


@pytest.fixture(scope="module")
def proc_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_proc")
    return {layout: fl.write_processor_dir(str(root / layout), layout) for layout in ("hub", "saved")}


def _check_equal(ours: dict, ref: dict) -> float:
    return hr.check_processor_outputs(ours, ref, ("input_ids", "attention_mask"))


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no_system", "system"])
@pytest.mark.parametrize("layout", ["hub", "saved"])
def test_matches_hf_processor(proc_dirs, layout, system):
    prep = LlavaPrep.from_dir(proc_dirs[layout])
    ours = prep(_images(), PROMPTS, system=system)
    ref = fl.hf_processor_inputs(proc_dirs[layout], _images(), PROMPTS,
                                 system=None if system is None else [{"type": "text", "text": system}])
    assert _check_equal(ours, ref) == 0.0  # the same operations in the same dtypes: bit-identical
    assert ours["pixel_values"].shape == (3, 3, 56, 56)
    assert prep.tokens_per_image == 16  # (56 / 14)^2 + 1 additional - 1 ("default")


def test_layout_of_the_tokens(proc_dirs):
    prep = LlavaPrep.from_dir(proc_dirs["hub"])
    out = prep(_images(), PROMPTS, system=SYSTEM)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert prep.padding_side == "left" and prep.image_token_id == fl.IMG
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    assert ((ids == fl.BOS).sum(1) == 1).all()
    row = ids[2][mask[2] == 1].tolist()
    user, assistant, colon = (fl.vocab_id(t) for t in ("USER", "ASSISTANT", ":"))
    # <s> system USER : <image> x 16 \n prompt ASSISTANT :
    start = row.index(fl.IMG)
    assert row[0] == fl.BOS and row[start - 2:start] == [user, colon] and row[-2:] == [assistant, colon]
    assert row[start:start + 17] == [fl.IMG] * 16 + [fl.NL]
    assert (ids == fl.IMG).sum(1).tolist() == [32, 0, 16]


def test_real_config_gives_576_tokens(tmp_path):
    """llava-1.5's processor files (336-px crop, patch 14, one additional token, "default"): 576
    <image> tokens an image and [n, 3, 336, 336] pixel_values, equal to HF's."""
    d = fl.write_processor_dir(str(tmp_path / "hub336"), "hub", image_size=336)
    prep = LlavaPrep.from_dir(d)
    images = [[hr.random_image(480, 640, seed=4), hr.random_image(300, 200, "RGBA", seed=5)]]
    prompt = ["Is the red square left of the blue circle ?"]
    ours = prep(images, prompt)
    ref = fl.hf_processor_inputs(d, images, prompt)
    assert _check_equal(ours, ref) == 0.0
    assert prep.tokens_per_image == 576 and ours["pixel_values"].shape == (2, 3, 336, 336)
    assert (ours["input_ids"] == fl.IMG).sum() == 2 * 576


def test_synthetic_canvas_gives_the_registered_grid(tmp_path):
    """The llava geometry's canvas is the processor's 336-px crop, untouched (resize to its own
    size, crop of nothing): 24 x 24 tokens of 14 px, as the model's token_grids says; a photo of
    another shape is cropped to the same grid ("fixed" rounding)."""
    from test_llava_convert import HUB_7B_CONFIG

    geometry = families.get("llava").geometry
    assert (geometry.n_tokens, geometry.token_px, geometry.canvas_px, geometry.grid_rounding) == (24, 14, 336, "fixed")
    assert geometry.strip_widths() == (9, 6, 9) and geometry.span == 15
    d = fl.write_processor_dir(str(tmp_path / "hub336"), "hub", image_size=336)
    canvas = hr.random_image(geometry.canvas_px, geometry.canvas_px, seed=6)
    out = LlavaPrep.from_dir(d)([[canvas, hr.random_image(200, 500, seed=7)]], ["Is the red square left ?"])
    prep = LlavaPrep.from_dir(d)
    untouched = rescale_and_normalize(np.asarray(canvas).transpose(2, 0, 1), prep.image_config)
    np.testing.assert_array_equal(out["pixel_values"][0], untouched)
    cfg = LlavaConfig.from_hf(HUB_7B_CONFIG)
    batch = sj.Batch(input_ids=out["input_ids"], pixel_values=out["pixel_values"])
    assert Llava.token_grids(cfg, batch) == [geometry.token_grid((336, 336)), geometry.token_grid((500, 200))] == \
        [(24, 24), (24, 24)]
    assert (out["input_ids"] == fl.IMG).sum() == 2 * geometry.n_visual_tokens


def test_right_padding_and_text_only(tmp_path):
    d = fl.write_processor_dir(str(tmp_path / "right"), "hub", padding_side="right")
    prep = LlavaPrep.from_dir(d)
    assert prep.padding_side == "right"
    for images in (_images(), None):
        ours = prep(images, PROMPTS)
        ref = fl.hf_processor_inputs(d, images or [None] * len(PROMPTS), PROMPTS)
        assert _check_equal(ours, ref) == 0.0
    assert ours["pixel_values"] is None


def test_bad_inputs_are_refused(proc_dirs, tmp_path):
    prep = LlavaPrep.from_dir(proc_dirs["hub"])
    with pytest.raises(ValueError, match="image entries"):
        prep([None], PROMPTS)
    with pytest.raises(ValueError, match="<image>"):
        prep([None], ["look: <image>"])
    from spatial_jax.families.llava.processor import ImageConfig
    with pytest.raises(ValueError, match="one size"):
        ImageConfig.from_dict({"do_center_crop": False, "size": {"shortest_edge": 336}})


def test_registered_for_the_family():
    assert families.get("llava").processor_cls is LlavaPrep


def test_prepare_then_forward_matches_hf(llava_ckpts):
    """The model dir carries the processor files: model.prepare + sj.forward equals HF's processor +
    HF's model on the same images and prompts."""
    model = llava_ckpts.model()
    images = [[hr.random_image(60, 90, seed=5), hr.random_image(20, 40, seed=6)], None]
    prompts = ["What is left of the red square?", "Answer in one word."]
    system = [{"type": "text", "text": SYSTEM}]
    batch = model.prepare(images=images, prompts=prompts, system=SYSTEM)
    ref_inputs = fl.hf_processor_inputs(llava_ckpts.hf_dir(), images, prompts, system=system)
    np.testing.assert_array_equal(np.asarray(batch.input_ids), ref_inputs["input_ids"])
    np.testing.assert_array_equal(np.asarray(batch.pixel_values), ref_inputs["pixel_values"])
    got = np.asarray(sj.forward(model, batch).logits)
    want = hr.hf_logits(llava_ckpts.hf_model(),
                        {**ref_inputs, "position_ids": hr.hf_position_ids(ref_inputs["attention_mask"])})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_visible_box_is_the_centre_crop(proc_dirs):
    """COCO boxes reach LLaVA's tokens through `visible_box` (the centre crop in the original image's
    pixels): a white square inside the crop lands on the token box_in_view + box_to_tokens predict,
    one outside it is not in pixel_values at all and box_in_view drops it."""
    prep = LlavaPrep.from_dir(proc_dirs["hub"])
    width, height = 200, 80  # resized to 140 x 56, crop columns 42..98: x 60..140 of the original
    view = prep.visible_box((width, height))
    np.testing.assert_allclose(view, (60, 0, 140, 80))

    def processed(box):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[box[1]:box[3], box[0]:box[2]] = 255
        return prep([Image.fromarray(pixels)], ["Where?"], system=None)["pixel_values"][0]  # [3, 56, 56]

    inside = (100, 20, 120, 40)  # resized x 70..84, y 14..28: crop patch (row 1, col 2)
    tokens = box_to_tokens(box_in_view(inside, view), (view[2] - view[0], view[3] - view[1]), (4, 4))
    patch_means = processed(inside).mean(0).reshape(4, 14, 4, 14).mean((1, 3)).ravel()
    assert tokens.tolist() == [6] and int(patch_means.argmax()) == 6
    outside = (10, 20, 40, 40)
    assert box_in_view(outside, view) is None and not np.ptp(processed(outside), axis=(1, 2)).any()
    # no crop: the whole image
    assert families.get("qwen2_vl").processor_cls.visible_box(None, (width, height)) == (0, 0, width, height)
