"""Linear probes trained with optax, vmapped over many probes (see `linear` for conventions)."""
from spatial_jax.probes.linear import (INITS, Probes, accuracy, class_directions, logits, loss, predict,
                                       predict_proba, random_directions, shuffle_split, split_by_group,
                                       train_probes)

__all__ = ["INITS", "Probes", "accuracy", "class_directions", "logits", "loss", "predict", "predict_proba",
           "random_directions", "shuffle_split", "split_by_group", "train_probes"]
