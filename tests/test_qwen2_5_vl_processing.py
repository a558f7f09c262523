"""Qwen2.5-VL's processor is Qwen2-VL's: transformers 5.23's `Qwen2_5_VLProcessor` uses the same
image processor (`Qwen2VLImageProcessorPil` without torchvision) and differs from
`Qwen2VLProcessor` only for video (second_per_grid_ts) and in also returning mm_token_type_ids.
So the family's processor is `Qwen2VLPrep`, shown here bit-identical to HF's Qwen2_5_VLProcessor on
a processor dir in the Qwen2.5-VL hub layout, and end to end (prepare -> forward) against HF.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures_qwen2_vl as fq
import hf_reference as hr
from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # noqa: F401  (session fixture)
from test_processing_qwen2_vl import WORDS, SMALL_MAX, assert_same_inputs, hf_inputs, noise_image
import spatial_jax as sj
from spatial_jax import families
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    """A word-level processor dir whose files name Qwen2_5_VLProcessor, as the Qwen2.5-VL hub's do."""
    path = tmp_path_factory.mktemp("qwen2_5_vl_proc")
    write_word_level_qwen2vl_processor(path, WORDS, max_pixels=SMALL_MAX)
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        config = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**config, "processor_class": "Qwen2_5_VLProcessor"}))
    return path


def test_processor_is_bit_identical_to_hf(proc_dir):
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    with hr.without_video_processor():
        hf = AutoProcessor.from_pretrained(proc_dir)
    assert type(hf) is Qwen2_5_VLProcessor and type(hf.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    ours = families.get("qwen2_5_vl").processor_cls.from_dir(proc_dir)
    cases = [
        ([noise_image(100, 150, "RGB", 1), noise_image(480, 640, "RGBA", 2)], ["Is the red square left ?", "yes"]),
        ([[noise_image(70, 98, "L", 3), noise_image(224, 224, "P", 4)], None], ["Which shape is above ?", "no"]),
    ]
    for images, prompts in cases:
        got, ref = ours(images, prompts), hf_inputs(hf, images, prompts)
        assert_same_inputs(got, ref)
        np.testing.assert_array_equal(ref["mm_token_type_ids"], got["input_ids"] == ours.image_token_id)


def test_prepare_then_forward_matches_hf(qwen2_5_vl_ckpts):
    """`model.prepare` (chat template, images, left padding) then `sj.forward`, against HF on the
    same prepared inputs."""
    model = qwen2_5_vl_ckpts.model("processor")
    batch = model.prepare(images=[[hr.random_image(56, 84, seed=1), hr.random_image(140, 84, seed=2)], None],
                          prompts=["Is the red square to the left of the blue circle ?", "What color ?"])
    ids = np.asarray(batch.input_ids)
    grid = np.asarray(batch.image_grid_thw)
    assert grid.tolist() == [[1, 4, 6], [1, 10, 6]]  # 2 and 6 windows
    inputs = {"input_ids": ids.astype(np.int64), "attention_mask": np.asarray(batch.attention_mask).astype(np.int64),
              "mm_token_type_ids": (ids == model.config.image_token_id).astype(np.int64),
              "pixel_values": np.asarray(batch.pixel_values), "image_grid_thw": grid.astype(np.int64)}
    ref = hr.hf_logits(qwen2_5_vl_ckpts.hf_model("processor"), inputs)
    mask = inputs["attention_mask"].astype(bool)
    assert not mask.all()
    np.testing.assert_allclose(np.asarray(sj.forward(model, batch).logits)[mask], ref[mask], rtol=0, atol=1e-4)
    assert fq.VOCAB == model.config.vocab_size
