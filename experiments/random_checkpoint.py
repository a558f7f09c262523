"""Writes a small random-weight Qwen2-VL checkpoint (HF format, word-level tokenizer over the
synthetic tasks' words, the organism's canvas geometry). The experiments run end to end on it;
its answers are chance-level by construction. Used by the tests and as a stand-in default.

    python -m experiments.random_checkpoint --output_dir /tmp/random_qwen
"""
from __future__ import annotations

import json
import os

from flax import nnx

from experiments import common
from spatial_jax import program
from spatial_jax.convert.export import export_hf
from spatial_jax.data.geometry import GEOMETRY_KEY, get_geometry
from spatial_jax.data.vocabulary import synthetic_words
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor

def _mrope_section(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) frequency counts summing to head_dim / 2, in Qwen2-VL's 16:24:24 proportions."""
    half = head_dim // 2
    t = half // 4
    return (t, (half - t) // 2, half - t - (half - t) // 2)


def write_random_checkpoint(out_dir: str, *, geometry: str = "organism", seed: int = 0, hidden: int = 64,
                            layers: int = 2, extra_words: tuple[str, ...] = ()) -> str:
    """A tiny random model whose processor accepts exactly the `geometry` canvas; its vocabulary
    is the synthetic tasks' words plus `extra_words` (e.g. What'sUp object names)."""
    canvas = get_geometry(geometry).canvas_px
    vocab = write_word_level_qwen2vl_processor(out_dir, synthetic_words(extra_words), min_pixels=canvas * canvas,
                                               max_pixels=canvas * canvas)
    ids = vocab.special_ids
    cfg = Qwen2VLConfig(vision_depth=2, vision_dim=32, vision_heads=4, vision_mlp_dim=64, patch_size=14,
                        temporal_patch_size=2, merge_size=2, in_channels=3, vision_rope_theta=1e4,
                        vocab_size=vocab.vocab_size, hidden_size=hidden, num_layers=layers, num_heads=4,
                        num_kv_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden, rms_norm_eps=1e-6,
                        rope_theta=1e4, mrope_section=_mrope_section(hidden // 4),
                        tie_word_embeddings=False, image_token_id=ids.image_pad,
                        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    export_hf(out_dir, "qwen2_vl", cfg, nnx.to_pure_dict(nnx.state(Qwen2VL(cfg, rngs=nnx.Rngs(seed)))))
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[GEOMETRY_KEY] = geometry
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def main(argv):
    del argv  # flags shared with the experiments: --output_dir, --geometry, --seed
    FLAGS = common.FLAGS
    write_random_checkpoint(FLAGS.output_dir, geometry=FLAGS.geometry or "organism", seed=FLAGS.seed)


if __name__ == "__main__":
    program.run(main, wrote=lambda: common.FLAGS.output_dir)
