"""transformers' Qwen2-VL with its float32 islands run in the model's dtype, so that a `.double()`
model computes in float64 throughout: the exact reference the float64 port is checked against.

modeling_qwen2_vl casts to float32 explicitly, whatever the model dtype, in four places:
RMSNorm (`hidden_states.to(torch.float32)`), the eager attention's softmax (`dtype=torch.float32`),
the LM's and the vision tower's RoPE tables (`.float()` angles from float32 inverse frequencies),
and the vision q/k rotation (`apply_rotary_pos_emb_vision`'s `.float()`). `exact()` swaps each for
the same computation without the cast (inverse frequencies recomputed in float64); everything else
is transformers' own code. In float32 these are transformers' own numerics, so only float64 runs
use this.
"""
from __future__ import annotations

import contextlib


def _inv_freq(base: float, dim: int, like):
    import torch
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=like.device) / dim)).to(like.dtype)


def _rms_norm(self, h):
    import torch
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _lm_rope(self, x, position_ids):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = position_ids.expand(3, -1, -1)[..., None].to(x.dtype) * _inv_freq(cfg.rope_parameters["rope_theta"], dim, x)
    return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())


def _vision_rope(self, x, position_ids):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.embed_dim // cfg.num_attention_heads
    freqs = position_ids[..., None].to(x.dtype) * _inv_freq(cfg.rope_parameters["rope_theta"], dim // 2, x)
    return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())


@contextlib.contextmanager
def exact():
    """Within: Qwen2-VL in transformers computes in its parameters' dtype everywhere."""
    import torch
    import transformers.models.qwen2_vl.modeling_qwen2_vl as m

    def rotate_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + m.rotate_half(q) * sin, k * cos + m.rotate_half(k) * sin

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key, value = m.repeat_kv(key, module.num_key_value_groups), m.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    patches = [(m.Qwen2VLRMSNorm, "forward", _rms_norm), (m.Qwen2VLRotaryEmbedding, "forward", _lm_rope),
               (m.Qwen2VLVisionRotaryEmbedding, "forward", _vision_rope),
               (m, "apply_rotary_pos_emb_vision", rotate_vision), (m, "eager_attention_forward", eager)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
