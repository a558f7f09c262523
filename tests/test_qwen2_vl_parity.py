"""Qwen2-VL: our Flax port against transformers (eager attention, float32), logits and every site.

The reference is `Qwen2VLForConditionalGeneration` from the same tiny random checkpoint
(tests/fixtures_qwen2_vl.py), run with forward hooks that capture each site (`fq.hf_run`).
Padded batches are compared at real (non-pad) positions only.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import fixtures_qwen2_vl as fq
import hf_reference as hr
import spatial_jax as sj

TOL = 1e-4  # max abs difference, float32

CASES = {
    "text_only": [[range(3, 20)]],
    # left-padded text-only batch: HF positions run over the pads, ours skip them; RoPE is relative,
    # so the logits agree anyway
    "text_padded": [[range(3, 20)], [range(30, 39)]],
    "one_image": [[[5, 6, 7], fq.image(4, 6), [8, 9, 10, 11]]],
    "two_images": [[[5, 6], fq.image(4, 6), [7, 8, 9], fq.image(8, 4), [10, 11]]],
    # two prompts of different lengths, one image each, different (non-square) sizes
    "padded_batch": [[[5, 6, 7, 8, 9, 10, 11], fq.image(6, 4), [12, 13]],
                     [[5, 6], fq.image(4, 8), [14]]],
}
LM_SITES, VISION_SITES = hr.LM_SITES, hr.VISION_SITES

_runs: dict = {}


def _run(ckpts, case: str, tied: bool):
    """(inputs, ours, hf) for a case, computed once per module (one compile per case)."""
    key = (case, tied)
    if key not in _runs:
        inputs = fq.make_inputs(CASES[case], seed=len(case))
        ours = hr.forward_sites(ckpts.model(tied), fq.to_batch(inputs), "pixel_values" in inputs)
        _runs[key] = (inputs, ours, fq.hf_run(ckpts.hf_model(tied), inputs))
    return _runs[key]


def _real(x: np.ndarray, mask: np.ndarray, layer_axis: bool) -> np.ndarray:
    """Rows of x at real tokens: x [B, T, ...] or [B, L, T, ...] -> [n_real, ...] / [L, n_real, ...]."""
    m = mask.astype(bool)
    return np.moveaxis(x, 1, 0)[:, m] if layer_axis else x[m]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(qwen2_vl_ckpts, case, tied):
    inputs, ours, ref = _run(qwen2_vl_ckpts, case, tied)
    assert ours["logits"].dtype == np.float32
    assert ours["logits"].shape == ref["logits"].shape == (*inputs["input_ids"].shape, fq.VOCAB)
    mask = inputs["attention_mask"]
    a, b = _real(ours["logits"], mask, False), _real(ref["logits"], mask, False)
    assert np.abs(b).max() > 1.0  # the logits are not degenerate, so the tolerance means something
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("site", LM_SITES + VISION_SITES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", ["text_padded", "two_images", "padded_batch"])
def test_sites_match_hf(qwen2_vl_ckpts, case, tied, site):
    inputs, ours, ref = _run(qwen2_vl_ckpts, case, tied)
    if site.startswith("vision.") and "pixel_values" not in inputs:
        pytest.skip("no images in this case")
    cfg = qwen2_vl_ckpts.model(tied).config
    B, T = inputs["input_ids"].shape
    got, want = ours[site], ref[site]
    if site == "vision.block_out":
        N = int(inputs["image_grid_thw"].prod(-1).sum())
        assert got.shape == want.shape == (1, cfg.vision_depth, N, cfg.vision_dim)
    elif site == "vision.tokens":
        N = int(inputs["image_grid_thw"].prod(-1).sum()) // cfg.merge_size**2
        assert got.shape == want.shape == (1, N, cfg.hidden_size)
    elif site == "lm.final":
        assert got.shape == want.shape == (B, T, cfg.hidden_size)
        got, want = _real(got, inputs["attention_mask"], False), _real(want, inputs["attention_mask"], False)
    else:
        assert got.shape == want.shape == (B, cfg.num_layers, T, cfg.hidden_size)
        got, want = _real(got, inputs["attention_mask"], True), _real(want, inputs["attention_mask"], True)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_hf_hidden_states_convention(qwen2_vl_ckpts):
    """The convention the site mapping relies on: HF hidden_states[l + 1] is layer l's raw output
    for l < L - 1, and hidden_states[L] is the final-normed one, not the last raw output."""
    inputs, ours, ref = _run(qwen2_vl_ckpts, "two_images", False)
    L = ref["lm.resid_post"].shape[1]
    for l in range(L - 1):
        np.testing.assert_array_equal(ref["hidden_states"][l + 1], ref["lm.resid_post"][:, l])
    assert np.abs(ref["hidden_states"][L] - ref["lm.resid_post"][:, L - 1]).max() > 0.1
    np.testing.assert_allclose(ours["lm.resid_post"][:, :L - 1], ours["lm.resid_pre"][:, 1:], rtol=0, atol=0)


def test_converted_dir_matches_hf_dir(qwen2_vl_ckpts, tmp_path):
    """A converted (Orbax) checkpoint gives the same logits as loading the HF dir directly."""
    from spatial_jax.convert.checkpoint import write_converted
    from spatial_jax.convert.convert import convert_hf

    hf_dir = qwen2_vl_ckpts.hf_dir(False)
    family, _, _, params = convert_hf(hf_dir, "float32")
    out = str(tmp_path / "converted")
    write_converted(out, hf_dir, family.name, "float32", params)
    inputs, ours, _ = _run(qwen2_vl_ckpts, "two_images", False)
    got = sj.forward(sj.load(out), fq.to_batch(inputs), cache=LM_SITES + VISION_SITES).logits
    np.testing.assert_array_equal(np.asarray(got), ours["logits"])


# bfloat16 (`sj.load(dir, dtype="bfloat16")`, params and activations in bf16, logits returned as
# float32): max |bf16 - f32| logit difference over real positions, as a fraction of max |f32 logit|,
# measured over the five CASES at 0.013 - 0.022 (untied, max |logit| ~ 4) and 0.013 - 0.018 (tied,
# max |logit| ~ 17). bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), compounded over the
# vision tower and 3 layers. The bound leaves about 2x headroom.
BF16_REL_BOUND = 0.04


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bfloat16_close_to_float32(qwen2_vl_ckpts, tied):
    model = sj.load(qwen2_vl_ckpts.hf_dir(tied), dtype="bfloat16")
    assert model.dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(model.params))
    for case in ("padded_batch",):  # each case is a bf16 compile; all five were measured once
        inputs, ours, _ = _run(qwen2_vl_ckpts, case, tied)
        got = np.asarray(sj.forward(model, fq.to_batch(inputs)).logits)
        assert got.dtype == np.float32
        mask = inputs["attention_mask"].astype(bool)
        ref = ours["logits"][mask]
        rel = np.abs(got[mask] - ref).max() / np.abs(ref).max()
        print(f"bf16 {case} tied={tied}: max|diff| / max|logit| = {rel:.4f}")
        assert rel < BF16_REL_BOUND
        # wherever float32's top-1 leads by more than twice the error, bf16 picks the same token
        top2 = np.sort(ref, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(got[mask] - ref).max()
        assert clear.any()
        np.testing.assert_array_equal(got[mask].argmax(-1)[clear], ref.argmax(-1)[clear])


def test_image_pad_count_mismatch_is_a_clear_error(qwen2_vl_ckpts):
    model = qwen2_vl_ckpts.model(False)
    inputs = fq.make_inputs(CASES["two_images"], seed=0)
    ids = inputs["input_ids"]
    pad_at = np.flatnonzero(ids[0] == fq.IMAGE_PAD)
    # one <|image_pad|> too few (turned into text), and one too many
    fewer = ids.copy()
    fewer[0, pad_at[0]] = 7
    more = ids.copy()
    more[0, pad_at[-1] + 2] = fq.IMAGE_PAD  # past <|vision_end|>
    for bad in (fewer, more):
        batch = sj.Batch(input_ids=bad, attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        with pytest.raises(ValueError, match=r"image_pad"):
            sj.forward(model, batch)
    # only the first image's grid for both images' patches
    batch = sj.Batch(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"][:1])
    with pytest.raises(ValueError, match=r"image_grid_thw"):
        sj.forward(model, batch)
    # the right totals, but the images listed in the wrong order (6 + 8 slots vs 8 + 6 tokens)
    swapped = inputs["image_grid_thw"][::-1].copy()
    n0 = int(inputs["image_grid_thw"][0].prod())
    pv = np.concatenate([inputs["pixel_values"][n0:], inputs["pixel_values"][:n0]])
    batch = sj.Batch(input_ids=ids, pixel_values=pv, image_grid_thw=swapped)
    with pytest.raises(ValueError, match=r"image_pad\|> runs have \[6, 8\]"):
        sj.forward(model, batch)
    # image slots in the prompt but no image at all
    for grid in (inputs["image_grid_thw"], None):
        with pytest.raises(ValueError, match=r"image_pad.*no pixel_values"):
            sj.forward(model, sj.Batch(input_ids=ids, image_grid_thw=grid))


def test_eight_simulated_cpu_devices():
    """conftest sets --xla_force_host_platform_device_count=8 before jax starts (docs/design.md, "Scale")."""
    assert len(jax.devices("cpu")) == 8


def test_prepare_then_forward_matches_hf(qwen2_vl_ckpts, tiny_qwen2_vl_processor_dir):
    """End to end on a checkpoint with a processor: `model.prepare` (chat template, image
    preprocessing, left padding) then `sj.forward`, against HF on the same prepared inputs."""
    from PIL import Image

    model = qwen2_vl_ckpts.model("processor")
    rng = np.random.default_rng(5)

    def img(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    batch = model.prepare(images=[[img(56, 84), img(112, 56)], img(84, 84), None],
                          prompts=["Is the red square to the left of the blue circle ?",
                                   "What color ?", "Answer with one word : yes"])
    grid = np.asarray(batch.image_grid_thw)
    assert grid.tolist() == [[1, 4, 6], [1, 8, 4], [1, 6, 6]]
    image_pad = model.config.image_token_id
    ids = np.asarray(batch.input_ids)
    inputs = {"input_ids": ids.astype(np.int64), "attention_mask": np.asarray(batch.attention_mask).astype(np.int64),
              "mm_token_type_ids": (ids == image_pad).astype(np.int64),
              "pixel_values": np.asarray(batch.pixel_values), "image_grid_thw": grid.astype(np.int64)}
    ref = fq.hf_run(qwen2_vl_ckpts.hf_model("processor"), inputs)
    got = np.asarray(sj.forward(model, batch).logits)
    mask = inputs["attention_mask"].astype(bool)
    assert not mask.all()  # padded
    np.testing.assert_allclose(got[mask], ref["logits"][mask], rtol=0, atol=TOL)
