"""Per-item cost of experiments.coco_amplification at real size: Qwen2-VL-2B-Instruct's shapes
(the hub config: 28 layers x 1536, vision 32 x 1280; 2.2B parameters), random weights built in
memory (no checkpoint written), a word-level tokenizer (no hub tokenizer offline; prompts come out
a few tokens shorter than with the real BPE), the hub's image limits (min 3136, max 12845056 px).

Two COCO-spatial items on 640x480 photos (the commonest val2017 size: 17 x 23 = 391 visual
tokens), one per axis. Times each phase of the binary, cold (with compiles) and warm:
  baseline: both listings of an item (one batch of 2);
  probe features: the "Describe the image." forward of a golden item;
  sweep: both listings of a fail_both item x (Random, Probe) x --n_alpha alphas (the binary's
    default, 16, is 64 patched runs per fail_both item; fewer alphas time the same per-run cost).

    python benchmarks/bench_coco_item.py --dtype bfloat16 --n_alpha 2
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from experiments import coco_amplification as coco
from spatial_jax.convert.convert import DTYPES, abstract_model
from spatial_jax.data.coco import load_coco_spatial
from spatial_jax.data.prompts import COCO_TEMPLATES
from spatial_jax.forward import Model
from spatial_jax.families.qwen2_vl.model import Qwen2VLConfig
from spatial_jax.families import FAMILIES
from spatial_jax.families.qwen2_vl.word_tokenizer import split_words, write_word_level_qwen2vl_processor

flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype.")
flags.DEFINE_integer("n_alpha", 16, "Alphas 0..n_alpha-1 in the timed sweep.")
FLAGS = flags.FLAGS

_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu", "hidden_size": 1536}
HUB_2B = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "vocab_size": 151936,
          "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
          "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
          "image_token_id": 151655, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
          "vision_config": _VISION}
QA = [[1, "A photo of a cup to the left of a laptop", "A photo of a cup to the right of a laptop"],
      [2, "A photo of a tv above a couch", "A photo of a tv below a couch"]]
BOXES = {1: [("cup", (60, 200, 180, 320)), ("laptop", (300, 120, 600, 400))],
         2: [("tv", (200, 20, 460, 180)), ("couch", (80, 260, 580, 470))]}


def write_coco(root: str) -> list:
    os.makedirs(os.path.join(root, "val2017"))
    annotations, categories = [], {}
    for image_id, boxes in BOXES.items():
        photo = Image.new("RGB", (640, 480), (180, 180, 180))
        for name, box in boxes:
            photo.paste((200, 40 * len(categories), 40), box)
            cat = categories.setdefault(name, len(categories) + 1)
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": cat,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        photo.save(os.path.join(root, "val2017", f"{image_id:012d}.jpg"))
    with open(os.path.join(root, "qa.json"), "w") as f:
        json.dump(QA, f)
    with open(os.path.join(root, "instances.json"), "w") as f:
        json.dump({"images": [{"id": i, "width": 640, "height": 480} for i in BOXES], "annotations": annotations,
                   "categories": [{"id": i, "name": n} for n, i in categories.items()]}, f)
    return load_coco_spatial(os.path.join(root, "qa.json"), os.path.join(root, "val2017"),
                             os.path.join(root, "instances.json"))


def random_model(proc_dir: str, dtype: str) -> Model:
    words = [w for q in QA for w in split_words(q[1])] + split_words(coco.NEUTRAL_PROMPT)
    words += [w for t in COCO_TEMPLATES.values() for w in split_words(t.format(subj="", obj="", a="", b=""))]
    words += ["left", "right", "above", "below"]
    ids = write_word_level_qwen2vl_processor(proc_dir, dict.fromkeys(words), min_pixels=3136,
                                             max_pixels=12845056).special_ids
    cfg = dataclasses.replace(Qwen2VLConfig.from_hf(HUB_2B), image_token_id=ids.image_pad,
                              vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    graphdef, state = nnx.split(abstract_model(FAMILIES["qwen2_vl"], cfg, DTYPES[dtype]))
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(0)
    # numpy, one leaf at a time (a float32 draw per leaf, then the cast): host memory stays the
    # params plus one float32 leaf
    params = [jnp.asarray((0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)) for s in leaves]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, params))
    n = sum(int(np.prod(s.shape)) for s in leaves)
    print(f"random Qwen2-VL-2B: {n:,} parameters, {dtype}")
    return Model("qwen2_vl", cfg, graphdef, state, dtype, proc_dir)


def timed(label: str, fn):
    start = time.perf_counter()
    cpu = time.process_time()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU", flush=True)
    return out


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        items = write_coco(os.path.join(tmp, "coco"))
        model = timed("build", lambda: random_model(os.path.join(tmp, "proc"), FLAGS.dtype))
        item = items[0]
        for rep in ("cold", "warm"):
            questions = [coco.Question(item, o) for o in ("lr", "rl")]
            timed(f"baseline, one item (2 listings), {rep}", lambda: coco.ask(model, questions, "anchor", 2))
            timed(f"probe features, one golden item, {rep}",
                  lambda: coco.box_features(model, [item], "overlap", 2))
            d = model.config.hidden_size
            w = np.random.default_rng(0).standard_normal((2, d, 2)).astype(np.float32)
            timed(f"sweep, one fail_both item (2 listings x 2 direction sets x {FLAGS.n_alpha} alphas = "
                  f"{4 * FLAGS.n_alpha} patched runs), {rep}",
                  lambda: coco.sweep(model, questions, {item.axis: w}, np.arange(FLAGS.n_alpha), "anchor", 2))
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    app.run(main)
