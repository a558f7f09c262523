"""Qwen2-VL configs and the key map at real size, without weights: the hub configs of
Qwen2-VL-7B/2B-Instruct (shared/reference/architectures.md A.0) give our model exactly the
parameters of transformers' model built on the meta device, and the converter's key map pairs
every HF tensor with one of ours, shapes included."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from spatial_jax.families.qwen2_vl.key_map import KEY_ALIASES, KEY_MAP
from spatial_jax.convert.convert import abstract_model, flatten_paths
from spatial_jax.families.qwen2_vl.model import Qwen2VLConfig
from spatial_jax.families import family_of

_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "in_channels": 3,
           "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
           "hidden_act": "quick_gelu"}
# Hub config.json layout (flat: text keys at the top level, `rope_scaling`).
HUB_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 32768, "use_sliding_window": False, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {**_VISION, "hidden_size": 3584},
}
HUB_2B = {**HUB_7B, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
          "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
          "vision_config": {**_VISION, "hidden_size": 1536}}


def test_hub_7b_config():
    cfg = Qwen2VLConfig.from_hf(HUB_7B)
    assert family_of(HUB_7B).name == "qwen2_vl"
    assert (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mrope_section) == (128, 28, 4, (16, 24, 24))
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings) == (1e-6, 1e6, False)
    assert (cfg.vision_dim, cfg.vision_heads, cfg.vision_mlp_dim, cfg.patch_dim) == (1280, 16, 5120, 1176)
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (151655, 151652, 151653)
    assert Qwen2VLConfig.from_hf(HUB_2B).tie_word_embeddings is True


@pytest.mark.parametrize("hub", [HUB_7B, HUB_2B], ids=["7B", "2B"])
def test_real_size_params_and_key_map(hub):
    import torch
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    hf_cfg = HFConfig(**hub)
    with torch.device("meta"):
        hf = Qwen2VLForConditionalGeneration(hf_cfg)
    # the names a checkpoint holds: runtime names rewritten by the family's aliases to hub names
    table, aliases = KEY_MAP, KEY_ALIASES
    hf_shapes = {}
    for name, p in hf.state_dict().items():
        for old, new in aliases:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        hf_shapes[name] = tuple(p.shape)
    if hf.config.tie_word_embeddings:
        hf_shapes.pop("lm_head.weight")  # tied: save_pretrained does not write it

    cfg = Qwen2VLConfig.from_hf(hub)
    ours = {k: tuple(v.shape) for k, v in
            flatten_paths(nnx.to_pure_dict(nnx.state(abstract_model(family_of(hub), cfg, np.float32)))).items()}
    assert sum(map(np.prod, ours.values())) == sum(map(np.prod, hf_shapes.values()))
    print(f"{hub['hidden_size']}: {sum(map(np.prod, ours.values())):,} params")

    used = set()
    for path, hf_name, how in table:
        if path not in ours:
            assert path == "lm_head/kernel" and cfg.tie_word_embeddings
            continue
        n = ours[path][0] if "{i}" in hf_name else None
        for i in range(n) if n is not None else [None]:
            name = hf_name.format(i=i) if i is not None else hf_name
            shape = hf_shapes[name]
            if how == "T":
                shape = shape[::-1]
            elif how == "flat_T":
                shape = (int(np.prod(shape[1:])), shape[0])
            assert shape == (ours[path][1:] if i is not None else ours[path]), (name, path)
            assert name not in used
            used.add(name)
    assert used == set(hf_shapes)


def test_mrope_sections_must_fill_head_dim():
    bad = {**HUB_7B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}
    with pytest.raises(ValueError, match=r"mrope_section \[16, 24, 16\] sums to 56, but head_dim 128 has 64"):
        Qwen2VLConfig.from_hf(bad)


def test_tied_embeddings_as_hf_reads_them():
    """HF ties when the top level or text_config says so (pre-v5 saves put it in text_config)."""
    nested = Qwen2VLConfig(**{**Qwen2VLConfig.from_hf(HUB_2B).__dict__}).to_hf()
    for top, inner, want in [(False, False, False), (True, False, True), (False, True, True), (None, True, True)]:
        d = {**nested, "text_config": {**nested["text_config"], "tie_word_embeddings": inner}}
        if top is None:
            d.pop("tie_word_embeddings")
        else:
            d["tie_word_embeddings"] = top
        assert Qwen2VLConfig.from_hf(d).tie_word_embeddings is want, (top, inner)
