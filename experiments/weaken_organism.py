r"""Writes the weakened organism the amplification experiment runs on (issue 16).

    python -m experiments.weaken_organism --source checkpoints/organism_vision_strip --output_dir checkpoints/organism_vision_strip_weak

The source organism's visual tokens keep everything but their layout component, which is scaled
down in the exported weights (spatial_jax/organism/weaken.py: an affine edit of the vision
merger's output layer; the layout subspace from --n_items training-split images per task). The
scales in --scales are tried in order (largest first) and the first whose mean val-split accuracy
lies in --band is written (the band TrainConfig.weak_band uses for a partly trained variant);
organism.json records the source, the subspace's rank, every scale tried with its val accuracy,
and the chosen one's test-split accuracy. The source's certificate and checks are dropped: they
describe the source, not the variant.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from absl import flags, logging
from safetensors import safe_open
from safetensors.numpy import save_file

import spatial_jax as sj
from spatial_jax import program
from spatial_jax.convert.checkpoint import partial_dir
from spatial_jax.organism import checkpoint, weaken

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "checkpoints/organism_vision_strip", "The trained organism to weaken.")
flags.DEFINE_string("output_dir", "checkpoints/organism_vision_strip_weak", "Where the weakened checkpoint is written.")
flags.DEFINE_list("scales", ["0.5", "0.4", "0.3", "0.25", "0.2", "0.15", "0.1", "0.05", "0"],
                  "Layout-component scales tried in this order.")
flags.DEFINE_list("band", ["0.6", "0.75"], "Mean val accuracy (over tasks) the written variant must lie in.")
flags.DEFINE_integer("n_items", 64, "Training-split items per task the layout subspace is estimated on.")
flags.DEFINE_bool("centred", False, "Scale the layout component about the visual tokens' mean (h - (1-s) P (h - mean)); "
                  "False: scale the tokens' whole projection (h - (1-s) P h).")
flags.DEFINE_integer("seed", 0, "Seed of the training-split subsample.")
WEIGHTS = "model.safetensors"


def _write(out_dir: str, tensors: dict, metadata: dict, meta: dict) -> None:
    """The source dir's files with new weights and organism.json, written beside out_dir then renamed."""
    tmp = partial_dir(out_dir)
    try:
        for name in os.listdir(FLAGS.source):
            if name not in (WEIGHTS, checkpoint.META_FILE):
                shutil.copy(os.path.join(FLAGS.source, name), tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata=metadata)
        checkpoint.write_meta(tmp, meta)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _accuracies(model_dir: str, split: str) -> dict[str, float]:
    model = sj.load(model_dir)
    return {name: checkpoint.accuracy(model, items) for name, items in checkpoint.held_out_items(model_dir, split).items()}


def main(argv):
    del argv
    lo, hi = (float(x) for x in FLAGS.band)
    source_meta = checkpoint.read_meta(FLAGS.source)
    rng = np.random.default_rng(FLAGS.seed)
    items = []
    for task_items in checkpoint.held_out_items(FLAGS.source, "train").values():
        items += [task_items[i] for i in sorted(rng.permutation(len(task_items))[:FLAGS.n_items])]
    basis, mean = weaken.layout_subspace(weaken.visual_tokens(sj.load(FLAGS.source), items), items)
    logging.info("layout subspace: rank %d from %d training-split items", basis.shape[1], len(items))
    path = os.path.join(FLAGS.source, WEIGHTS)
    with safe_open(path, "np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tried = []
    with tempfile.TemporaryDirectory() as scratch:
        for scale in (float(s) for s in FLAGS.scales):
            w, b = weaken.scale_layout(tensors[f"{weaken.MERGER_OUT}.weight"], tensors[f"{weaken.MERGER_OUT}.bias"],
                                       basis, mean if FLAGS.centred else None, scale)
            edited = {**tensors, f"{weaken.MERGER_OUT}.weight": w, f"{weaken.MERGER_OUT}.bias": b}
            weakened = {"source": FLAGS.source, "how": "layout component of the visual tokens at the LM input scaled "
                        f"by {scale:g} in {weaken.MERGER_OUT} (spatial_jax/organism/weaken.py)",
                        "scale": scale, "centred": FLAGS.centred, "subspace_rank": int(basis.shape[1]), "subspace_items": len(items),
                        "subspace_split": "train", "seed": FLAGS.seed, "band": [lo, hi]}
            meta = {k: v for k, v in source_meta.items() if k not in ("certificate", "checks")}
            meta.update({"weak_variant_of": FLAGS.source, "weakened": weakened})
            candidate = os.path.join(scratch, f"scale_{scale:g}")
            _write(candidate, edited, metadata, meta)
            val = _accuracies(candidate, "val")
            tried.append({"scale": scale, "val": val})
            logging.info("scale %g: val %s", scale, val)
            if lo <= np.mean(list(val.values())) <= hi:
                weakened.update({"tried": tried, "val": val, "test": _accuracies(candidate, "test")})
                _write(FLAGS.output_dir, edited, metadata, meta)
                print(json.dumps(weakened, indent=1))
                return
    raise SystemExit(f"no scale in {FLAGS.scales} gives a mean val accuracy in [{lo}, {hi}]: {tried}")


if __name__ == "__main__":
    program.run(main, wrote=lambda: FLAGS.output_dir)
