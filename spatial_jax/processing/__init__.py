"""What the families' processors share: chat rendering and tokenization (chat.py), HF's image
conversions and config lookup (images.py), the word-level split of the tiny tokenizers (words.py).
Each family's own processor is `spatial_jax/families/<name>/processor.py` (`Family.processor_cls`)."""
