r"""Trains the model organism: a small Qwen2-VL from scratch on Squares, Shapes and Objects.

    python -m experiments.train_organism --mechanism lm_position --output_dir checkpoints/organism
    python -m experiments.train_organism --mechanism vision_strip --output_dir checkpoints/organism_vision_strip
    python -m experiments.train_organism --mechanism vision_object --output_dir checkpoints/organism_vision_object
    python -m experiments.train_organism --mechanism dual --stop_evals 1 --output_dir checkpoints/organism_dual
    python -m experiments.train_organism --certify_only --mechanism lm_position --output_dir checkpoints/organism

Our Flax Qwen2VL with a small config (spatial_jax/organism/spec.py), the "organism" canvas geometry,
a word-level tokenizer with the Qwen2-VL special tokens and chat template, prompts made by the real
template (Qwen2VLPrep). Deterministic from --seed. Held-out = triples of the test entity set never
seen in training, per dataset: the val ones drive early stopping, the test ones give the reported
accuracy. With several --seeds, seeds are tried in order until one reaches --stop_at on every task.

Writes --output_dir as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer and
processor files) plus organism.json (flags, curves, splits, final accuracies, swap checks, the
mechanism, the geometry and the certificate: test-split accuracy with the visual tokens shuffled,
Table-5-ablated, and both, measured through sj.load at the LM input). --mechanism picks the recipe
(spatial_jax/organism/recipes.py); vision_object and dual start from the vision_strip checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import jax
from absl import flags, logging
from flax import nnx
from tqdm import tqdm

import spatial_jax as sj
from spatial_jax import program
from spatial_jax.organism import checkpoint, spec
from spatial_jax.organism import data as odata
from spatial_jax.organism import train as otrain
from spatial_jax.organism.recipes import MECHANISMS, RECIPES
from spatial_jax.data.geometry import get_geometry
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep
from spatial_jax.families.qwen2_vl.word_tokenizer import write_word_level_qwen2vl_processor

FLAGS = flags.FLAGS
_BEFORE = set(FLAGS)
flags.DEFINE_string("output_dir", "checkpoints/organism", "Where the HF checkpoint is written.")
flags.DEFINE_list("seeds", ["0"], "Training seeds, tried in order until one reaches --stop_at on every task.")
flags.DEFINE_float("max_minutes", 30.0, "Training wall-time budget per seed (evaluations included).")
flags.DEFINE_integer("max_steps", 20000, "Step budget per seed.")
flags.DEFINE_integer("batch_size", 32, "Prompts per step.")
flags.DEFINE_float("lr", 1e-3, "AdamW peak learning rate.")
flags.DEFINE_integer("warmup", 50, "Linear warm-up steps.")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (matrices only).")
flags.DEFINE_float("b2", 0.98, "AdamW beta2.")
flags.DEFINE_integer("eval_every", 100, "Steps between held-out (val) evaluations.")
flags.DEFINE_float("stop_at", 0.98, "Early stop when every task's val accuracy is >= this ...")
flags.DEFINE_integer("stop_evals", 2, "... at this many consecutive evaluations.")
flags.DEFINE_list("tasks", ["squares", "shapes", "objects"], "Synthetic tasks trained on.")
flags.DEFINE_list("n_val", ["20", "20", "32"], "Val (early-stopping) triples per task (even: mirror pairs).")
flags.DEFINE_list("n_test", ["20", "20", "32"], "Test (reported) triples per task (even: mirror pairs).")
flags.DEFINE_integer("split_seed", 0, "Seed of the train/val/test triple split.")
flags.DEFINE_integer("n_extra_colours", 8, "Extra training colours for Squares and Shapes (0..8).")
flags.DEFINE_float("p_standard", 0.5, "P(a training triple comes from the test entity set).")
flags.DEFINE_integer("jitter", 3, "Largest random layout shift in tokens (0: the paper's fixed layout).")
flags.DEFINE_float("p_paper_system", 0.5, "P(training prompt has the paper's system text; else the default).")
flags.DEFINE_integer("rows_per_image", 2, "Questions per training image (2: both directions of its axis).")
flags.DEFINE_list("warm_tasks", ["squares"], "Curriculum: train on these tasks only until ... (empty: none)")
flags.DEFINE_float("warm_until", 0.9, "... each has this val accuracy, then on every task.")
flags.DEFINE_enum("mechanism", "lm_position", list(MECHANISMS), "The organism's recipe (organism/recipes.py).")
flags.DEFINE_string("init_from", None, "Warm start from this checkpoint (default: the recipe's; '' = none).")
flags.DEFINE_string("weak_dir", "", "Also save the parameters of the first evaluation with mean val accuracy in "
                    "0.6-0.75 here (a weakened variant for the amplification experiment); '' = do not.")
flags.DEFINE_bool("certify_only", False, "Do not train: (re)write the certificate of --output_dir.")
flags.DEFINE_integer("vision_depth", 2, "Vision blocks.")
flags.DEFINE_integer("vision_dim", 64, "Vision width.")
flags.DEFINE_integer("hidden_size", 128, "LM width.")
flags.DEFINE_integer("num_layers", 2, "LM layers.")
flags.DEFINE_integer("intermediate_size", 256, "LM MLP width.")
flags.DEFINE_float("rope_theta", spec.ModelSize.rope_theta, "LM M-RoPE theta.")
flags.DEFINE_bool("check", True, "After saving, reload through sj.load and measure test accuracy and swaps.")
OUR_FLAGS = sorted(set(FLAGS) - _BEFORE)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _short(accs: dict) -> str:
    return " ".join(f"{k[:2]} {v:.3f}" for k, v in accs.items())


def _log_point(p: dict) -> None:
    logging.info("step %d %.0fs (cpu %.0fs) loss %.4f train %s val %s%s", p["step"], p["seconds"], p["cpu_seconds"],
                 p["loss"], _short(p["train"]), _short(p["val"]),
                 " (curriculum: every task from now on)" if p.get("warm_ended") else "")


def geometry_spec(name: str) -> dict:
    g = get_geometry(name)
    return {"name": g.name, "n_tokens": g.n_tokens, "token_px": g.token_px, "object_tokens": g.object_tokens,
            "spacing": g.spacing}


def certify(out_dir: str, mechanism: str) -> dict:
    """Writes mechanism, geometry_spec and the certificate (test split) into out_dir's organism.json."""
    meta = checkpoint.read_meta(out_dir)
    geometry = meta.get("geometry", spec.GEOMETRY)
    model = sj.load(out_dir)
    cert = checkpoint.certificate(model, geometry, checkpoint.held_out_items(out_dir, "test"))
    for name, figures in cert.items():
        logging.info("certificate %s: %s", name, figures)
    meta.update({"mechanism": mechanism, "geometry_spec": geometry_spec(geometry), "certificate": cert})
    checkpoint.write_meta(out_dir, meta)
    return meta


def main(argv):
    del argv
    if FLAGS.certify_only:
        print(json.dumps(certify(FLAGS.output_dir, FLAGS.mechanism)["certificate"], indent=1))
        return
    recipe = RECIPES[FLAGS.mechanism]
    if FLAGS.init_from is not None:
        recipe = dataclasses.replace(recipe, init_from=FLAGS.init_from)
    t0 = time.perf_counter()
    words = spec.organism_words()
    with tempfile.TemporaryDirectory() as proc_dir:
        vocab = write_word_level_qwen2vl_processor(proc_dir, words)
        prep = Qwen2VLPrep.from_dir(proc_dir)
    size = spec.ModelSize(vision_depth=FLAGS.vision_depth, vision_dim=FLAGS.vision_dim, hidden_size=FLAGS.hidden_size,
                          num_layers=FLAGS.num_layers, intermediate_size=FLAGS.intermediate_size,
                          rope_theta=FLAGS.rope_theta, vision_rope_theta=recipe.vision_rope_theta)
    model_cfg = spec.organism_config(vocab, size)
    data_cfg = odata.DataConfig(
        tasks=tuple(FLAGS.tasks), n_val=_ints(FLAGS.n_val), n_test=_ints(FLAGS.n_test), split_seed=FLAGS.split_seed,
        n_extra_colours=FLAGS.n_extra_colours, p_standard=FLAGS.p_standard, jitter=FLAGS.jitter,
        p_paper_system=FLAGS.p_paper_system, rows_per_image=FLAGS.rows_per_image,
        warm_tasks=tuple(FLAGS.warm_tasks), warm_until=FLAGS.warm_until)
    encoder = odata.build(prep, data_cfg, spec.GEOMETRY)
    logging.info("data ready in %.1f s: %d cell-table rows, prompts padded to %d tokens",
                 time.perf_counter() - t0, len(encoder.cell_table), encoder.seq_len)

    runs, chosen = [], None
    for seed in _ints(FLAGS.seeds):
        cfg = otrain.TrainConfig(
            seed=seed, batch_size=FLAGS.batch_size, lr=FLAGS.lr, warmup=FLAGS.warmup,
            weight_decay=FLAGS.weight_decay, b2=FLAGS.b2, max_steps=FLAGS.max_steps, max_minutes=FLAGS.max_minutes,
            eval_every=FLAGS.eval_every, stop_at=FLAGS.stop_at, stop_evals=FLAGS.stop_evals,
            recipe=recipe)
        trainer = otrain.Trainer(model_cfg, encoder, data_cfg, cfg)
        logging.info("seed %d: %d parameters", seed, trainer.param_count())
        result = otrain.train(trainer, progress=lambda total: tqdm(total=total, desc=f"seed {seed}", mininterval=2),
                              log=_log_point)
        best = nnx.state(nnx.merge(trainer.graphdef, trainer.params))
        nnx.replace_by_pure_dict(best, result.params)
        test = {name: trainer.accuracy(examples, params=best) for name, examples in otrain.eval_sets(encoder, "test").items()}
        run = {"seed": seed, "steps": result.steps, "best_step": result.best_step,
               "train_seconds": round(result.train_seconds, 1),
               "cpu_seconds": round(result.cpu_seconds, 1), "stopped": result.stopped,
               "best_val": result.best_val, "best_val_certificate": result.best_certificate,
               "test": test, "curve": result.curve}
        runs.append(run)
        logging.info("seed %d: stopped (%s) after %d steps, %.0f s; best step %d val %s test %s", seed,
                     result.stopped, result.steps, result.train_seconds, result.best_step, result.best_val, test)
        weak = (result.weak_params, result.weak_step) if result.weak_params is not None else None
        if chosen is None or (result.stopped == "target") > (chosen[0]["stopped"] == "target") or min(
                run["best_val"].values()) > min(chosen[0]["best_val"].values()):
            chosen = (run, result.params, trainer.param_count(), weak)
        if result.stopped == "target":
            break

    run, params, n_params, weak = chosen
    meta = {
        "geometry": spec.GEOMETRY, "mechanism": FLAGS.mechanism, "geometry_spec": geometry_spec(spec.GEOMETRY),
        "recipe": dataclasses.asdict(recipe), "family": "qwen2_vl", "param_count": n_params,
        "model_size": dataclasses.asdict(size), "data": dataclasses.asdict(data_cfg),
        "flags": {name: FLAGS[name].value for name in OUR_FLAGS},
        "seed": run["seed"], "runs": runs, "jax": jax.__version__,
        "splits": {name: {"train": [list(t) for t in task.split.train], "val": [list(t) for t in task.split.val],
                          "test": [list(t) for t in task.split.test]} for name, task in encoder.tasks.items()},
    }
    checkpoint.save(FLAGS.output_dir, model_cfg, params, words, meta)
    logging.info("saved %s (seed %d)", FLAGS.output_dir, run["seed"])
    if FLAGS.weak_dir and weak is not None:
        checkpoint.save(FLAGS.weak_dir, model_cfg, weak[0], words,
                        {**meta, "weak_variant_of": FLAGS.output_dir, "weak_step": weak[1]})
        logging.info("saved the weakened variant (step %d) to %s", weak[1], FLAGS.weak_dir)

    if FLAGS.check:
        model = sj.load(FLAGS.output_dir)
        checks = {}
        for name, items in checkpoint.held_out_items(FLAGS.output_dir, "test").items():
            checks[name] = {"test_acc": checkpoint.accuracy(model, items),
                            "test_acc_default_system": checkpoint.accuracy(model, items, system=None),
                            "swap": checkpoint.swap_rates(model, items),
                            "identity_swap": checkpoint.swap_rates(model, items, identity=True)}
            logging.info("%s (through sj.load + model.prepare): %s", name, checks[name])
        meta["checks"] = checks
        checkpoint.write_meta(FLAGS.output_dir, meta)
        meta = certify(FLAGS.output_dir, FLAGS.mechanism)
    print(json.dumps({"seed": run["seed"], "steps": run["steps"], "train_seconds": run["train_seconds"],
                      "cpu_seconds": run["cpu_seconds"],
                      "best_val": run["best_val"], "test": run["test"], "checks": meta.get("checks"),
                      "certificate": meta.get("certificate")}, indent=1))


if __name__ == "__main__":
    program.run(main, wrote=lambda: FLAGS.output_dir)
