"""Pixtral processor: `PixtralPrep` against transformers 5.23's `PixtralProcessor` (PIL backend), via
`apply_chat_template(..., tokenize=True, padding=True)`, on processor dirs in the hub layout and in
the layout save_pretrained writes; the 240-px synthetic canvas gives the 15 x 15 grid the geometry
registry assumes; then model.prepare -> sj.forward against HF's processor -> HF model."""
from __future__ import annotations

import numpy as np
import pytest

import fixtures_pixtral as fp
import hf_reference as hr
from fixtures_pixtral import pixtral_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax.data.geometry import get_geometry
from spatial_jax import families
from spatial_jax.families.pixtral.processor import PixtralPrep

PROMPTS = ["What is left of the red square?", "  Is the blue circle above the green square ?  ",
           "Answer in one word."]
SYSTEM = "You are a helpful assistant."


def _images():
    """Per prompt: two images (one above the 96-px limit and not a patch multiple, one RGBA thin
    one), none, one (grayscale, exactly 2 x 3 patches)."""
    return [[hr.random_image(50, 130, seed=1), hr.random_image(100, 30, "RGBA", seed=2)], None,
            hr.random_image(32, 48, "L", seed=3)]


@pytest.fixture(scope="module")
def proc_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixtral_proc")
    return {layout: fp.write_processor_dir(str(root / layout), layout) for layout in ("hub", "saved")}


def _check_equal(ours: dict, ref: dict) -> float:
    return hr.check_processor_outputs(ours, ref, ("input_ids", "attention_mask"), ("image_sizes",))


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no_system", "system"])
@pytest.mark.parametrize("layout", ["hub", "saved"])
def test_matches_hf_processor(proc_dirs, layout, system):
    prep = PixtralPrep.from_dir(proc_dirs[layout])
    ours = prep(_images(), PROMPTS, system=system)
    ref = fp.hf_processor_inputs(proc_dirs[layout], _images(), PROMPTS, system=system)
    assert _check_equal(ours, ref) == 0.0  # the same operations in the same dtypes: bit-identical
    # 50 x 130 -> floor(50 / (130 / 96)) = 36 x 96 -> 48 x 96; 100 x 30 -> 96 x 28 -> 96 x 32; 32 x 48 kept
    assert ours["image_sizes"].tolist() == [[48, 96], [96, 32], [32, 48]]
    assert ours["pixel_values"].shape == (3, 3, 96, 96)
    assert not ours["pixel_values"][1, :, :, 32:].any()  # zero padding right of the thin image


def test_layout_of_the_tokens(proc_dirs):
    prep = PixtralPrep.from_dir(proc_dirs["hub"])
    out = prep(_images(), PROMPTS, system=SYSTEM)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert prep.padding_side == "left" and prep.image_token_id == fp.IMG
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    assert ((ids == fp.BOS).sum(1) == 1).all()  # the template's <s> only (the tokenizer's own is dropped)
    row = ids[2][mask[2] == 1].tolist()
    # <s>[INST] system "\n\n" image prompt [/INST]; the 2 x 3-patch image row by row
    assert row[:2] == [fp.BOS, fp.INST] and row[-1] == fp.INST_END
    start = row.index(fp.IMG)
    assert row[start - 1] == fp.NLNL
    assert row[start:start + 8] == [fp.IMG] * 3 + [fp.IMG_BREAK] + [fp.IMG] * 3 + [fp.IMG_END]
    assert (ids == fp.IMG).sum(1).tolist() == [3 * 6 + 6 * 2, 0, 6]
    assert (ids == fp.IMG_BREAK).sum(1).tolist() == [2 + 5, 0, 1]  # rows - 1 per image
    assert (ids == fp.IMG_END).sum(1).tolist() == [2, 0, 1]


def test_right_padding_and_text_only(tmp_path):
    d = fp.write_processor_dir(str(tmp_path / "right"), "hub", padding_side="right")
    prep = PixtralPrep.from_dir(d)
    assert prep.padding_side == "right"
    for images in (_images(), None):
        ours = prep(images, PROMPTS)
        ref = fp.hf_processor_inputs(d, images or [None] * len(PROMPTS), PROMPTS)
        assert _check_equal(ours, ref) == 0.0
    assert ours["pixel_values"] is None


def test_synthetic_canvas_gives_the_registered_grid(tmp_path):
    """With the hub's 1024-px limit, the 240-px canvas of the pixtral geometry is 15 x 15 patches of
    16 px (225 [IMG], a break after each of the first 14 rows), and images above the limit are
    shrunk to it, sides rounded up to the patch, as the geometry's 'ceil' rounding assumes."""
    d = fp.write_processor_dir(str(tmp_path / "hub1024"), "hub", longest_edge=1024)
    prep = PixtralPrep.from_dir(d)
    geometry = get_geometry("pixtral")
    assert (geometry.n_tokens, geometry.token_px, geometry.canvas_px) == (15, 16, 240)
    canvas = hr.random_image(geometry.canvas_px, geometry.canvas_px, seed=4)
    big = hr.random_image(700, 1500, seed=5)
    ours = prep([[canvas, big]], ["Is the red square left of the blue circle ?"])
    ref = fp.hf_processor_inputs(d, [[canvas, big]], ["Is the red square left of the blue circle ?"])
    assert _check_equal(ours, ref) == 0.0
    assert ours["image_sizes"].tolist() == [[240, 240], [480, 1024]]  # 700 / (1500 / 1024) = 477.9 -> 477 -> 480
    assert geometry.token_grid((240, 240)) == (15, 15)
    ids = ours["input_ids"][0]
    assert (ids == fp.IMG).sum() == 225 + 30 * 64 and (ids == fp.IMG_BREAK).sum() == 14 + 29


def test_bad_inputs_are_refused(proc_dirs):
    prep = PixtralPrep.from_dir(proc_dirs["hub"])
    with pytest.raises(ValueError, match="image entries"):
        prep([None], PROMPTS)
    for text in ("look: [IMG]", "a [IMG_BREAK] b"):
        with pytest.raises(ValueError, match=r"\[IMG\]"):
            prep([None], [text])
    with pytest.raises(TypeError):
        prep(None, "a string, not a list")


def test_registered_for_the_family():
    assert families.get("pixtral").processor_cls is PixtralPrep


def test_prepare_then_forward_matches_hf(pixtral_ckpts):
    """The model dir carries the processor files: model.prepare + sj.forward equals HF's processor +
    HF's model on the same images and prompts (token ids, the [IMG] slots, image_sizes and the
    padded pixel_values all line up end to end)."""
    model = pixtral_ckpts.model()
    images = [[hr.random_image(60, 90, seed=5), hr.random_image(20, 40, seed=6)], None]
    prompts = ["What is left of the red square?", "Answer in one word."]
    batch = model.prepare(images=images, prompts=prompts, system=SYSTEM)
    ref_inputs = fp.hf_processor_inputs(pixtral_ckpts.hf_dir(), images, prompts, system=SYSTEM)
    np.testing.assert_array_equal(np.asarray(batch.input_ids), ref_inputs["input_ids"])
    assert batch.image_sizes == ((64, 96), (32, 48))
    got = np.asarray(sj.forward(model, batch).logits)
    want = hr.hf_logits(pixtral_ckpts.hf_model(),
                        {**ref_inputs, "position_ids": hr.hf_position_ids(ref_inputs["attention_mask"])})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
