"""What every experiment binary shares: flags, loading, items -> batches, answers, resumable results.

Each binary defines its own flags on top of these and writes under --output_dir/<experiment>/:
results.json (finished parts, written atomically after each part, so an interrupted run resumes
where it stopped), a CSV of the main table, and PNG figures.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import flags, logging
from tqdm.auto import tqdm

import spatial_jax as sj
from experiments import mesh_flags
from spatial_jax import program
from spatial_jax.convert import hub
from spatial_jax.data import scoring
from spatial_jax.data.geometry import GEOMETRY_KEY, Geometry, get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.prompts import DIRECTIONS, HORIZONTAL, SYSTEM_TEXT
from spatial_jax.data.synthetic import TASKS, make_task, setup_task
from spatial_jax.data.whatsup import WhatsupTask, whatsup_items, whatsup_task

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "checkpoints/organism", "Converted checkpoint dir, HF model dir, or hub id "
                    "org/name[@revision] (e.g. Qwen/Qwen2-VL-7B-Instruct; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE apply).")
flags.DEFINE_list("dataset", ["squares"], "Datasets: squares, shapes, objects (synthetic); whatsup (needs "
                  "--whatsup_dir; the experiments the official code runs it in: behaviour, probe_vision, "
                  "last_token, criss_cross).")
flags.DEFINE_string("whatsup_dir", "", "What'sUp controlled_images folder (<obj>_{left,right}_of_<middle>.jpeg).")
flags.DEFINE_string("output_dir", "outputs", "Results go to <output_dir>/<experiment>/.")
flags.DEFINE_string("geometry", "", "Canvas geometry name; empty: the checkpoint's (see geometry_of).")
flags.DEFINE_integer("max_items", 0, "Use at most this many items per dataset (0: all).")
flags.DEFINE_integer("batch_size", 16, "Prompts per forward.")
flags.DEFINE_integer("n_pairs", 50, "Golden pairs per direction for the patching experiments.")
flags.DEFINE_enum("method", "exact", ["exact", "attribution", "both"],
                  "Patching experiments (last_token, criss_cross, backup): exact patches (the official protocol), "
                  "their first-order attribution-patching estimate (sj.attribution_sweep), or both, compared.")
flags.DEFINE_bool("qk_fix", False, "--method attribution|both: AtP*'s QK-fix (each patch's first attention layer "
                  "run exactly, the rest linearised; sj.attribution_sweep(qk_fix=True)).")
flags.DEFINE_bool("grad_drop", False, "--method attribution|both: also AtP*'s GradDrop score per slot and pair "
                  "(L more backwards; sj.attribution_sweep(grad_drop=True)), reported beside the estimate.")
flags.DEFINE_integer("seed", 0, "Seed for item sampling and pair building.")
flags.DEFINE_bool("golden", True, "Keep only pairs the model answers correctly (the paper's protocol). "
                  "--nogolden keeps every pair: for smoke runs on untrained models.")

DATASETS = (*TASKS, "whatsup")
flags.register_validator("dataset", lambda names: bool(names) and set(names) <= set(DATASETS),
                         f"expected a comma-separated list of {', '.join(DATASETS)}")
flags.register_multi_flags_validator(["dataset", "whatsup_dir"],
                                     lambda v: "whatsup" not in v["dataset"] or bool(v["whatsup_dir"]),
                                     "--dataset whatsup needs --whatsup_dir (the What'sUp controlled_images folder)")
for _name in ("batch_size", "n_pairs"):
    flags.register_validator(_name, lambda v: v >= 1, "expected a positive integer")
flags.register_validator("max_items", lambda v: v >= 0, "expected 0 (all) or a positive integer")



def geometry_of(model: sj.Model) -> Geometry:
    """--geometry, else the checkpoint's config.json `spatial_jax_geometry`, else its family's."""
    if FLAGS.geometry:
        return get_geometry(FLAGS.geometry)
    with open(os.path.join(model.path, "config.json")) as f:
        return get_geometry(json.load(f).get(GEOMETRY_KEY, model.family))


def load_model() -> tuple[sj.Model, Geometry]:
    path = hub.resolve(FLAGS.checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {FLAGS.checkpoint}: no such directory")
    # Opt-in scale-out: with --mesh or --distributed (experiments/mesh_flags.py) params go over
    # `model` and sweep variants over `data`; without, everything runs on the default device.
    mesh = mesh_flags.setup_from_flags(model_path=path) if FLAGS.mesh or FLAGS.distributed else None
    model = sj.load(path, mesh=mesh)
    return model, geometry_of(model)


def task_items(name: str, geometry: Geometry, max_items: int = 0, seed: int = 0, tokenizer=None) -> list[Item]:
    """A dataset's items; a seeded subsample of `max_items` if that is > 0. What'sUp reads
    --whatsup_dir and keeps the objects whose names are one token for `tokenizer`."""
    if name == "whatsup":
        items = whatsup_items(whatsup_dir(), geometry, tokenizer=tokenizer)
    else:
        items = make_task(name, geometry).items()
    if 0 < max_items < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
        items = [items[i] for i in keep]
    return items


def padded(items: Sequence, size: int) -> list:
    """items followed by copies of the last one up to `size` (the caller drops their results): every
    chunk of a run then has one batch shape, so each jitted function compiles once per prompt
    length instead of once more for every remainder (compiling, not computing, is most of a demo
    run on the organisms)."""
    return list(items) + [items[-1]] * (size - len(items))


def batches(model: sj.Model, items: Sequence[Item], batch_size: int) -> Iterator[tuple[Sequence[Item], sj.Batch]]:
    """(items, Batch) chunks, each prompt chat-templated with the paper's system text."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        yield chunk, prepare(model, chunk)


def pair_filter(model: sj.Model):
    """The `predict` the pair builders filter with: the model's answers, or (--nogolden) the truth."""
    if FLAGS.golden:
        return lambda items: predict(model, items, FLAGS.batch_size)
    return lambda items: [it.answer for it in items]


def prepare(model: sj.Model, items: Sequence[Item]) -> sj.Batch:
    """A Batch of items, each prompt chat-templated with the paper's system text."""
    return model.prepare(images=[it.image for it in items], prompts=[it.prompt for it in items], system=SYSTEM_TEXT)


def predict(model: sj.Model, items: Sequence[Item], batch_size: int) -> list[str]:
    """Top-1 next token of each item, decoded and normalised."""
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        logits = np.asarray(sj.next_token_logits(model, prepare(model, padded(chunk, batch_size))))[:len(chunk)]
        out += scoring.top1_tokens(logits, model.processor.tokenizer)
    return out


def directions_of(task) -> tuple[str, ...]:
    """The directions a task asks: What'sUp left/right only, the synthetic tasks all four."""
    return HORIZONTAL if isinstance(task, WhatsupTask) else DIRECTIONS


def pair_pool(model: sj.Model, task) -> list[str] | dict[str, tuple[str, ...]]:
    """The official candidate pool of a task's pairs (build_cf_pairs' candidate_pool): its entities,
    for Squares and Objects only those whose answer is one token lower-case and Capitalized; for
    What'sUp, middle -> side objects (`WhatsupTask.pair_pool`)."""
    tok = model.processor.tokenizer
    if isinstance(task, WhatsupTask):
        return task.pair_pool(tok)
    return [name for name, e in task.entities.items()
            if task.name == "shapes" or scoring.is_single_token(tok, e.attribute)]


def image_positions(model: sj.Model, batch: sj.Batch) -> np.ndarray:
    """[B, N] sequence position of each row's visual tokens, in grid (row-major) order."""
    ids = np.asarray(batch.input_ids)
    rows = [np.flatnonzero(r == model.config.image_token_id) for r in ids]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("rows have different numbers of visual tokens")
    return np.stack(rows)


class Results:
    """A resumable JSON record of finished parts: `done(key)`, `get(key)`, `put(key, value)`."""

    def __init__(self, out_dir: str, config: dict[str, Any]):
        self.dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "results.json")
        self.data: dict[str, Any] = {"config": config, "parts": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                old = json.load(f)
            if old.get("config") == config:
                self.data = old
                logging.info("resuming %s: %d parts already done", self.path, len(old["parts"]))
            else:
                logging.warning("%s was made with other settings; starting over", self.path)

    def done(self, key: str) -> bool:
        return key in self.data["parts"]

    def get(self, key: str) -> Any:
        return self.data["parts"][key]

    def put(self, key: str, value: Any) -> None:
        self.data["parts"][key] = value
        write_atomic(self.path, json.dumps(self.data, indent=1, default=_jsonable))


def whatsup_dir() -> str:
    if not FLAGS.whatsup_dir:
        raise ValueError("--dataset whatsup needs --whatsup_dir (the What'sUp controlled_images folder)")
    return FLAGS.whatsup_dir


def run_parts(name: str, subkeys: Sequence[str], measure: Callable[[sj.Model, Any, str], dict],
              setup: str = "behaviour", whatsup: dict | None = None, **config) -> tuple[str, dict[str, Any]]:
    """The resumable loop of the experiments measured per dataset and per direction (or
    orientation): for each --dataset and each of `subkeys` whose part is not in
    <output_dir>/<name>/results.json yet, measure(model, task, subkey) -> the JSON part stored
    under "dataset|subkey". setup: which official task set-up (`setup_task`) the tasks follow.
    whatsup: the What'sUp task's options (`whatsup_task`: size, regions, pair_sides) for an
    experiment the official code runs on it (its subkeys are then the horizontal ones); None
    refuses --dataset whatsup.
    config: extra run settings a stored result must match to be resumed.
    Returns the results dir and every part."""
    if "whatsup" in FLAGS.dataset:
        if whatsup is None:
            raise ValueError(f"{name} does not run on What'sUp (the official code does not either)")
        whatsup_dir()
    model, geometry = load_model()
    results = Results(experiment_dir(name), run_config(**config))
    for dataset in FLAGS.dataset:
        if dataset == "whatsup":
            task = whatsup_task(whatsup_dir(), geometry, tokenizer=model.processor.tokenizer, **whatsup)
            subkeys_here = [k for k in subkeys if k in (*HORIZONTAL, "horizontal")]
        else:
            task, subkeys_here = setup_task(dataset, geometry, setup), subkeys
        for sub in tqdm(subkeys_here, desc=f"{name} {dataset}"):
            program.check_interrupted()
            key = f"{dataset}|{sub}"
            if not results.done(key):
                results.put(key, measure(model, task, sub))
    return results.dir, dict(results.data["parts"])


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x)}")


@contextlib.contextmanager
def _atomic(path: str, newline: str | None = None):
    """A text file written in full or not at all: a temp file beside `path`, renamed onto it. mkstemp
    makes it 0600; it gets the mode a plain open() would give (0666 less the umask)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", newline=newline) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(path: str, text: str) -> None:
    with _atomic(path) as f:
        f.write(text)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with _atomic(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def pair_weighted_mean(parts: Sequence[dict], field: str) -> np.ndarray:
    """Mean of parts' `field` arrays weighted by their "n_pairs"; parts without pairs (and so
    without the field) are skipped. At least one part must have pairs."""
    parts = [p for p in parts if p["n_pairs"]]
    return sum(np.array(p[field]) * p["n_pairs"] for p in parts) / sum(p["n_pairs"] for p in parts)


def brief(values: dict[str, Any]) -> str:
    """A dict of numbers as one log line: 'accuracy 0.83, probe_relative 0.50' (None as -)."""
    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, (float, np.floating)) else str(v)
    return ", ".join(f"{k} {fmt(v)}" for k, v in values.items())


def slot_text(slot: int) -> str:
    """A residual slot in words, for log lines and headlines: the LM input, or layer i's output."""
    return "emb" if slot == 0 else f"layer {slot - 1}"


def experiment_dir(name: str) -> str:
    return os.path.join(FLAGS.output_dir, name)


def run_config(**extra) -> dict[str, Any]:
    """What a results file must match to be resumed."""
    checkpoint = os.path.abspath(FLAGS.checkpoint) if os.path.exists(FLAGS.checkpoint) else FLAGS.checkpoint  # hub id
    return {"checkpoint": checkpoint, "dataset": list(FLAGS.dataset),
            "geometry": FLAGS.geometry, "max_items": FLAGS.max_items, "n_pairs": FLAGS.n_pairs,
            "seed": FLAGS.seed, "golden": FLAGS.golden, **extra}
