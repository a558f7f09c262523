"""The model organism: a small Qwen2-VL trained here on the synthetic tasks (issue #7).

spec: vocabulary, model config, training palette; data: training/eval arrays; train: the jitted
step, evaluation and early stopping; checkpoint: HF export and the public-API checks (accuracy,
visual-token swaps) run on a saved organism.
"""
