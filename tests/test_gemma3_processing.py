"""Gemma 3 processor: `Gemma3Prep` against transformers 5.23's `Gemma3Processor` (PIL backend), via
`apply_chat_template(..., tokenize=True, padding=True)`, on processor dirs in the hub layout and in
the layout save_pretrained writes; then model.prepare -> sj.forward against HF's processor -> HF model."""
from __future__ import annotations

import numpy as np
import pytest

import fixtures_gemma3 as fg
import hf_reference as hr
from fixtures_gemma3 import gemma3_ckpts  # noqa: F401  (session fixture)
import spatial_jax as sj
from spatial_jax import families
from spatial_jax.families.gemma3.processor import Gemma3Prep

PROMPTS = ["What is left of the red square?", "  Is the blue circle above the green square ?  ",
           "Answer in one word."]
SYSTEM = "You are a helpful assistant."


def _images():
    """Per prompt: two images (non-square; RGBA), none, one (grayscale, already 84 x 84)."""
    return [[hr.random_image(50, 70, seed=1), hr.random_image(100, 30, "RGBA", seed=2)], None,
            hr.random_image(84, 84, "L", seed=3)]


@pytest.fixture(scope="module")
def proc_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3_proc")
    return {layout: fg.write_processor_dir(str(root / layout), layout) for layout in ("hub", "saved")}


def _check_equal(ours: dict, ref: dict) -> float:
    return hr.check_processor_outputs(ours, ref, ("input_ids", "attention_mask", "token_type_ids"))


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no_system", "system"])
@pytest.mark.parametrize("layout", ["hub", "saved"])
def test_matches_hf_processor(proc_dirs, layout, system):
    prep = Gemma3Prep.from_dir(proc_dirs[layout])
    ours = prep(_images(), PROMPTS, system=system)
    ref = fg.hf_processor_inputs(proc_dirs[layout], _images(), PROMPTS, system=system)
    assert _check_equal(ours, ref) == 0.0  # the same operations in the same dtypes: bit-identical
    assert ours["pixel_values"].shape == (3, 3, fg.IMAGE_SIZE, fg.IMAGE_SIZE)
    assert -1.0 <= ours["pixel_values"].min() and ours["pixel_values"].max() <= 1.0


def test_layout_of_the_tokens(proc_dirs):
    prep = Gemma3Prep.from_dir(proc_dirs["hub"])
    out = prep(_images(), PROMPTS)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert prep.padding_side == "left"
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    assert ((ids == fg.BOS).sum(1) == 1).all()  # one <bos>: the template's (the tokenizer's own is dropped)
    row = ids[0][mask[0] == 1].tolist()
    assert row[:3] == [fg.BOS, fg.SOT, fg.vocab_id("user")]
    first = row.index(fg.BOI)
    # "user\n" + "\n\n<boi>" + 9 x soft + "<eoi>\n\n": the word-level tokenizer cuts "\n\n\n" as "\n\n", "\n"
    assert row[first - 2:first + fg.MM_TOKENS + 3] == [fg.NLNL, fg.NL] + fg.image_tokens()[1:]
    assert out["token_type_ids"].sum(1).tolist() == [2 * fg.MM_TOKENS, 0, fg.MM_TOKENS]
    assert row[-3:] == [fg.SOT, fg.vocab_id("model"), fg.NL]  # the generation prompt


def test_right_padding_and_text_only(tmp_path):
    d = fg.write_processor_dir(str(tmp_path / "right"), "hub", padding_side="right")
    prep = Gemma3Prep.from_dir(d)
    assert prep.padding_side == "right"
    for images in (_images(), None):
        ours = prep(images, PROMPTS)
        ref = fg.hf_processor_inputs(d, images or [None] * len(PROMPTS), PROMPTS)
        assert _check_equal(ours, ref) == 0.0
    assert ours["pixel_values"] is None and not ours["token_type_ids"].any()


def test_bad_inputs_are_refused(proc_dirs):
    prep = Gemma3Prep.from_dir(proc_dirs["hub"])
    with pytest.raises(ValueError, match="image entries"):
        prep([None], PROMPTS)
    with pytest.raises(ValueError, match="<start_of_image>"):
        prep([None], ["look: <start_of_image>"])
    with pytest.raises(TypeError):
        prep(None, "a string, not a list")


def test_registered_for_the_family():
    assert families.get("gemma3").processor_cls is Gemma3Prep


def test_prepare_then_forward_matches_hf(gemma3_ckpts):
    """The model dir carries the processor files: model.prepare + sj.forward equals HF's processor +
    HF's model on the same images and prompts (token ids, the soft-token slots and the image
    mask all line up end to end)."""
    model = gemma3_ckpts.model()
    images = [hr.random_image(60, 90, seed=5), None]
    prompts = ["What is left of the red square?", "Answer in one word."]
    batch = model.prepare(images=images, prompts=prompts, system=SYSTEM)
    ref_inputs = fg.hf_processor_inputs(gemma3_ckpts.hf_dir(), images, prompts, system=SYSTEM)
    np.testing.assert_array_equal(np.asarray(batch.input_ids), ref_inputs["input_ids"])
    got = np.asarray(sj.forward(model, batch).logits)
    want = hr.hf_logits(gemma3_ckpts.hf_model(),
                        {**ref_inputs, "position_ids": hr.hf_position_ids(ref_inputs["attention_mask"])})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
