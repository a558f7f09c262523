"""Tiny random Hugging Face Qwen2.5-VL checkpoints and HF reference runs, for tests.

    import fixtures_qwen2_5_vl as f25
    from fixtures_qwen2_5_vl import qwen2_5_vl_ckpts  # the session fixture

The config keeps every structural feature of Qwen2.5-VL-3B/7B at toy size. The language model is
the tiny Qwen2-VL one (tests/fixtures_qwen2_vl.py: GQA, M-RoPE sections (2, 3, 3), q/k/v biases),
and so are the token ids and `make_inputs` / `image` / `to_batch`. The vision tower: RMSNorm,
gated SiLU MLP with biases, 2D RoPE (head_dim 12), an RMSNorm 2x2 patch merger, and windowed
attention with windows of 56 px = 2 x 2 merged tokens, so an image of more than 2 x 2 merged
tokens has several windows (the last row / column of windows narrower when the grid is odd), with
one full-attention block (index 1) between two windowed ones. Every parameter is random (norm
weights and biases too), so a key-map, transform or layout mistake anywhere shows up in the logits.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fixtures_qwen2_vl as fq
import hf_reference as hr

WINDOW_PX = 56  # 2 x 2 merged tokens of 28 px
FULLATT = [1]
VISION_CONFIG = dict(
    depth=3, hidden_size=48, intermediate_size=80, num_heads=4, out_hidden_size=fq.TEXT_CONFIG["hidden_size"],
    hidden_act="silu", patch_size=fq.PATCH, temporal_patch_size=fq.TEMPORAL, spatial_merge_size=fq.MERGE,
    in_channels=fq.CHANNELS, window_size=WINDOW_PX, fullatt_block_indexes=FULLATT,
)


def tiny_hf_config(tie_word_embeddings: bool = False, special_ids=None):
    """The tiny Qwen2_5_VLConfig. special_ids: (vision_start, vision_end, image_pad, video_pad)."""
    from transformers import Qwen2_5_VLConfig

    start, end, img, vid = special_ids or (fq.VISION_START, fq.VISION_END, fq.IMAGE_PAD, fq.VIDEO_PAD)
    return Qwen2_5_VLConfig(
        vision_config=dict(VISION_CONFIG), text_config=dict(fq.TEXT_CONFIG), image_token_id=img,
        video_token_id=vid, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=tie_word_embeddings)


def build_tiny_qwen2_5_vl(out_dir: str, seed: int = 0, tie_word_embeddings: bool = False,
                          processor: bool = False) -> str:
    """Saves a tiny random Qwen2_5_VLForConditionalGeneration (float32) with save_pretrained.
    processor: also the word-level Qwen2-VL processor files (as fq.build_tiny_qwen2_vl's), whose
    special token ids the config then uses."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    special_ids = None
    if processor:
        from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor

        ids = write_word_level_qwen2vl_processor(out_dir, fq.PROCESSOR_WORDS).special_ids
        special_ids = (ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tie_word_embeddings, special_ids)).eval()
    hr.randomize_(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


def load_hf(path: str, dtype=None):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=dtype or torch.float32).eval()


class Qwen2_5_VLCheckpoints(hr.Checkpoints):
    """Tiny HF Qwen2.5-VL checkpoints (see hr.Checkpoints). Variants: "base" (untied, 7B style),
    "tied" (3B style), "processor" (with the word-level processor files)."""

    PREFIX = "qwen2_5_vl"
    VARIANTS = {"base": {}, "tied": {"tie_word_embeddings": True}, "processor": {"processor": True}}
    build = staticmethod(build_tiny_qwen2_5_vl)
    load_hf = staticmethod(load_hf)


@pytest.fixture(scope="session")
def qwen2_5_vl_ckpts(tmp_path_factory) -> Qwen2_5_VLCheckpoints:
    return Qwen2_5_VLCheckpoints(tmp_path_factory.mktemp("qwen2_5_vl_ckpts"))


def hf_window_order(grid_thw: np.ndarray) -> np.ndarray:
    """HF's own window permutation of the patches (transformers.vision_utils.get_vision_window_index,
    expanded to patches): HF's vision block j-th row is the processor's patch order[j]."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(torch.as_tensor(grid_thw), fq.MERGE, WINDOW_PX, fq.PATCH)
    unit = fq.MERGE**2
    return (index.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)


def hf_run(hf, inputs: dict[str, np.ndarray], hooks=()) -> dict[str, Any]:
    """hr.hf_run with Qwen2.5-VL's sites, vision.block_out put back into the processor's patch
    order (HF's blocks run in window order)."""
    res = hr.hf_run(hf, inputs, lambda layer: layer.self_attn, lambda layer: layer.mlp, hf.model.visual.blocks,
                    hooks=hooks, projector=hf.model.visual.merger)
    if "vision.block_out" in res:
        order = hf_window_order(inputs["image_grid_thw"])
        res["vision.block_out"] = res["vision.block_out"][:, :, np.argsort(order)]
        # the merger's output is in window order too (HF un-permutes after it)
        res["vision.tokens"] = res["vision.tokens"][:, np.argsort(order[::fq.MERGE**2] // fq.MERGE**2)]
    return res


def write_random_checkpoint(out_dir: str, *, window_px: int = 84, fullatt=(1,), **kwargs) -> str:
    """experiments.random_checkpoint's tiny random model (its processor files, vocabulary, canvas
    geometry and decoder) with a Qwen2.5-VL vision tower of 2 blocks, windows of window_px (84:
    3 x 3 tokens, so the organism's 6 x 6-token canvas has 4 windows, all of one size, which keeps
    the compiles few) and full attention at `fullatt`.
    kwargs go to experiments.random_checkpoint.write_random_checkpoint."""
    import dataclasses
    import json
    import os

    from flax import nnx

    from experiments.random_checkpoint import write_random_checkpoint as write_qwen2_vl
    from spatial_jax.convert.export import export_hf
    from spatial_jax.data.geometry import GEOMETRY_KEY
    from spatial_jax.families.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
    from spatial_jax.families.qwen2_vl.model import Qwen2VLConfig

    write_qwen2_vl(out_dir, **kwargs)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    cfg = Qwen2_5_VLConfig(**dataclasses.asdict(Qwen2VLConfig.from_hf(raw)), window_size=window_px,
                           fullatt_block_indexes=tuple(fullatt))
    export_hf(out_dir, "qwen2_5_vl", cfg, nnx.to_pure_dict(nnx.state(Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))))
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, GEOMETRY_KEY: raw[GEOMETRY_KEY]}, f, indent=2)
    return out_dir
