"""Training the model organism: the jitted step, held-out evaluation and early stopping.

The forward pass used in training is the one runner's (`spatial_jax.runner.run`, after the tower's
`VisionTower.from_patches`), with these training-only differences, none of which changes the
function the model computes at inference:

* pixel_values are gathered from the cell table inside the step (see organism/data.py);
* the final norm and the unembedding run only at the last position (the loss reads only there);
* the recipe's treatments (organism/recipes.py) choose which visual token fills each LM image
  slot (`token_src`): shuffled order, ablated or mixed-in contents; every slot keeps its raster
  M-RoPE position;
* the recipe's auxiliary heads (not part of the exported model) read the post-merger visual tokens.

`organism_logits` equals `spatial_jax.forward.apply`'s last-position logits on the same batch
(tests/test_organism_train.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spatial_jax.batch import Batch
from spatial_jax.forward import load as sj_load
from spatial_jax.runner import run
from spatial_jax.interventions.taps import Taps
from spatial_jax.families.qwen2_vl.model import Qwen2VL, Qwen2VLConfig
from spatial_jax.organism import data as odata
from spatial_jax.organism.recipes import CONDITIONS, RECIPES, Recipe


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    clip: float = 1.0
    max_steps: int = 20000
    max_minutes: float = 30.0
    eval_every: int = 100
    stop_at: float = 0.98          # early stop once every task's val accuracy is >= this ...
    stop_evals: int = 2            # ... at this many consecutive evaluations
    recipe: Recipe = RECIPES["lm_position"]
    # The first evaluation whose mean val accuracy over tasks is in this range keeps its parameters
    # (RunResult.weak_params): a partly trained organism for the amplification experiment.
    weak_band: tuple[float, float] = (0.6, 0.75)


def visual_tokens(module: Qwen2VL, cells, cell_table, grid_thw: tuple) -> jax.Array:
    """[n_img, Ni, D] post-merger visual tokens of images given as cells [n_img, Ni] int rows of
    cell_table [n_cells, merge^2, patch_dim] (organism/data.py); the patch embedding runs once per
    cell-table row and is gathered per image. grid_thw: n_img equal (1, h, w)."""
    tower = module.vision
    patches = tower.patch_embed(cell_table.reshape(-1, cell_table.shape[-1]).astype(tower.patch_embed.kernel.dtype))
    patches = patches.reshape(cell_table.shape[0], cell_table.shape[1], -1)
    vis = tower.from_patches(patches[cells].reshape(-1, patches.shape[-1]), grid_thw, Taps())
    return vis.reshape(cells.shape[0], -1, vis.shape[-1])


def organism_logits(module: Qwen2VL, input_ids, attention_mask, cells, cell_table, grid_thw: tuple,
                    image_of_row: Optional[jax.Array] = None, token_src: Optional[jax.Array] = None,
                    vis: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits [B, V] at the last position of left-padded rows.

    cells, cell_table, grid_thw: the images (`visual_tokens`); vis: their tokens if already computed.
    image_of_row: [B] int, the image each row asks about (None: row b has image b). The vision
      tower runs once per image however many rows share it.
    token_src: [B, Ni] int or None; LM image slot j of row b gets token token_src[b, j] of the
      flattened [n_img * Ni] visual tokens (overrides image_of_row).
    """
    cfg = module.cfg
    B = input_ids.shape[0]
    if vis is None:
        vis = visual_tokens(module, cells, cell_table, grid_thw)
    x = jnp.take(module.embed[...], input_ids, axis=0)
    vis = vis.astype(x.dtype)
    if token_src is not None:
        vis = vis.reshape(-1, vis.shape[-1])[token_src]
    elif image_of_row is not None:
        vis = vis[image_of_row]
    is_img = input_ids == cfg.image_token_id
    slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, vis.shape[1] - 1)
    x = jnp.where(is_img[..., None], jnp.take_along_axis(vis, slot[..., None], axis=1), x)
    batch = Batch(input_ids=input_ids, attention_mask=attention_mask, image_grid_thw=grid_thw)
    # Only the last position's output is read: its query, attention output and MLP, keys and
    # values from every position.
    rows = jnp.full((B, 1), input_ids.shape[1] - 1, jnp.int32)
    return module.unembed(run(module, batch, Taps(), embeddings=x, rows=rows)[:, 0])


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """What the optimizer is made of (hashable: a static argument of the jitted step, so that runs
    with other seeds reuse the compiled step)."""

    lr: float
    warmup: int
    weight_decay: float
    b1: float
    b2: float
    clip: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> "OptConfig":
        return cls(cfg.lr, cfg.warmup, cfg.weight_decay, cfg.b1, cfg.b2, cfg.clip)

    def make(self, params) -> optax.GradientTransformation:
        """Clip, then AdamW after a linear warm-up; weight decay on matrices only."""
        warmup = max(self.warmup, 1)
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, self.lr, warmup), optax.constant_schedule(self.lr)], [warmup])
        decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
        return optax.chain(
            optax.clip_by_global_norm(self.clip),
            optax.adamw(schedule, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, mask=decay_mask))


def _grid(grid_thw, n: int) -> tuple:
    return (tuple(int(v) for v in grid_thw),) * n


def _forward(params, cell_table, batch: dict, graphdef, grid_thw) -> tuple[jax.Array, jax.Array]:
    """(logits [B, V], visual tokens [n_img, Ni, D]) of a batch."""
    module = nnx.merge(graphdef, params)
    grid = _grid(grid_thw, batch["cells"].shape[0])
    vis = visual_tokens(module, batch["cells"], cell_table, grid)
    # grid: the LM's M-RoPE positions of the image tokens (without it they would be text positions)
    logits = organism_logits(module, batch["input_ids"], batch["attention_mask"], None, None, grid,
                             batch.get("image_of_row"), batch.get("token_src"), vis=vis)
    return logits, vis


@functools.partial(jax.jit, static_argnames=("graphdef", "grid_thw"))
def _logits(params, cell_table, batch: dict, *, graphdef, grid_thw) -> jax.Array:
    return _forward(params, cell_table, batch, graphdef, grid_thw)[0]


def init_aux_heads(key: jax.Array, dim: int, n_entities: int) -> dict:
    """The auxiliary heads' parameters: linear strip (3 classes) and entity heads on visual tokens."""
    ks, ke = jax.random.split(key)
    return {"strip_w": 0.02 * jax.random.normal(ks, (dim, 3)), "strip_b": jnp.zeros(3),
            "entity_w": 0.02 * jax.random.normal(ke, (dim, n_entities)), "entity_b": jnp.zeros(n_entities)}


def aux_loss(heads: dict, vis: jax.Array, batch: dict) -> jax.Array:
    """Weighted mean cross-entropy of both heads over the real images' tokens (batch aux_weight
    [n_img, Ni]; extra images appended by `data.treat` come after them and are not read)."""
    weight = batch["aux_weight"]
    v = vis[:weight.shape[0]]
    total = jnp.maximum(weight.sum(), 1.0)
    out = 0.0
    for name in ("strip", "entity"):
        logits = v @ heads[f"{name}_w"] + heads[f"{name}_b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[f"aux_{name}"])
        out = out + (ce * weight).sum() / total
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "grid_thw", "opt", "aux_weight"), donate_argnums=(0, 1))
def _train_step(params, opt_state, cell_table, batch: dict, *, graphdef, grid_thw, opt: OptConfig,
                aux_weight: float):
    """params: (model params, auxiliary heads)."""
    def loss_fn(p):
        model_params, heads = p
        logits, vis = _forward(model_params, cell_table, batch, graphdef, grid_thw)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        if "aux_weight" in batch:
            loss = loss + aux_weight * aux_loss(heads, vis.astype(jnp.float32), batch)
        return loss, logits.argmax(-1) == batch["labels"]

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.make(params).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc


class Trainer:
    """Holds the parameters, optimizer state and data stream of one training run."""

    def __init__(self, model_cfg: Qwen2VLConfig, encoder: odata.Encoder, data_cfg: odata.DataConfig,
                 cfg: TrainConfig):
        self.model_cfg, self.encoder, self.data_cfg, self.cfg = model_cfg, encoder, data_cfg, cfg
        module = Qwen2VL(model_cfg, rngs=nnx.Rngs(cfg.seed))
        self.graphdef, self.params = nnx.split(module)
        recipe = cfg.recipe
        if recipe.init_from:  # warm start: the exported model's weights, fresh auxiliary heads
            nnx.replace_by_pure_dict(self.params, jax.tree.map(
                jnp.asarray, nnx.to_pure_dict(sj_load(recipe.init_from).params)))
        self.heads = init_aux_heads(jax.random.PRNGKey(cfg.seed), model_cfg.hidden_size, len(encoder.entity_ids))
        self.opt = OptConfig.of(cfg)
        self.opt_state = self.opt.make((self.params, self.heads)).init((self.params, self.heads))
        self.cell_table = jnp.asarray(encoder.cell_table)
        self.sampler = odata.Sampler(encoder, data_cfg, cfg.batch_size, cfg.seed, recipe.treatments, recipe.aux,
                                     recipe.aux_on)
        self.step_count = 0
        self._static = {"graphdef": self.graphdef, "grid_thw": tuple(int(v) for v in encoder.grid_thw)}

    def _predict(self, params, cell_table, batch: dict) -> jax.Array:
        return _logits(params, cell_table, batch, **self._static)

    def step(self) -> tuple[jax.Array, jax.Array]:
        """One optimizer step on the next sampled batch; returns (loss, [B] bool correct) as arrays
        (the rows' tasks are in `self.sampler.last_tasks`)."""
        batch = self.sampler.next()
        (self.params, self.heads), self.opt_state, loss, acc = _train_step(
            (self.params, self.heads), self.opt_state, self.cell_table, batch, opt=self.opt,
            aux_weight=self.cfg.recipe.aux_weight, **self._static)
        self.step_count += 1
        return loss, acc

    def predict(self, examples: list[tuple], treatment: str = "own", chunk: int = 64, params=None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(arg-max next token [N], answer ids [N]) for encoder examples shown under `treatment`
        (organism/recipes.py; seeded by `seed`), in chunks of `chunk` rows, one image per row (the
        last chunk padded with copies of its last example: one compile per treatment)."""
        params = self.params if params is None else params
        rng = np.random.default_rng(seed)
        out, labels = [], []
        for i in range(0, len(examples), chunk):
            part = list(examples[i:i + chunk])
            short = chunk - len(part)
            part += [part[-1]] * short
            batch = odata.treat(self.encoder, self.encoder.encode(part), part, [treatment] * chunk, rng)
            out.append(np.asarray(self._predict(params, self.cell_table, batch).argmax(-1))[:chunk - short])
            labels.append(batch["labels"][:chunk - short])
        return np.concatenate(out), np.concatenate(labels)

    def accuracy(self, examples: list[tuple], treatment: str = "own", params=None) -> float:
        pred, labels = self.predict(examples, treatment, params=params)
        return float((pred == labels).mean())

    def certificate(self, examples: list[tuple], conditions=None, params=None) -> dict[str, float]:
        """Accuracy under each certificate condition (recipes.CONDITIONS), by default the recipe's targets."""
        names = conditions or [name for name, _, _ in self.cfg.recipe.targets]
        return {name: self.accuracy(examples, CONDITIONS[name], params) for name in names}

    def param_count(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


def eval_sets(encoder: odata.Encoder, which: str) -> dict[str, list[tuple]]:
    """Per task, the paper's items (unshifted, paper system text) of the val or test triples, as examples."""
    return {name: odata.eval_examples(t, getattr(t.split, which)) for name, t in encoder.tasks.items()}


@dataclasses.dataclass
class RunResult:
    params: Any                      # best params (host numpy pure dict)
    best_step: int
    best_val: dict[str, float]
    best_certificate: dict[str, dict[str, float]]   # per task, val accuracy per target condition
    weak_params: Any                 # params at the first evaluation in TrainConfig.weak_band, or None
    weak_step: int
    steps: int
    train_seconds: float             # wall time of the training loop, evaluations included
    cpu_seconds: float               # CPU time of this process over the loop (all threads)
    stopped: str                     # "target", "time" or "steps"
    curve: list[dict]


def train(trainer: Trainer, progress: Optional[Callable] = None, log: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Trains until, at `stop_evals` consecutive evaluations, every task's val accuracy is >= stop_at
    and its accuracy under each of the recipe's target conditions is in range, or the step / time
    budget runs out; returns the best parameters by (targets met, distance to the targets, min,
    mean val accuracy).
    With a curriculum (DataConfig.warm_tasks), the evaluation at which every warm task reaches
    `warm_until` ends its first stage (the curve point gets "warm_ended").

    progress: a tqdm-like factory (total=...) -> bar with update() and set_postfix(); None: silent.
    """
    cfg = trainer.cfg
    val = eval_sets(trainer.encoder, "val")
    bar = progress(total=cfg.max_steps) if progress else None
    curve, best, best_key, best_step, streak = [], None, (-1, -np.inf, -1.0, -1.0), 0, 0
    weak, weak_step = None, 0
    losses, accs, tasks = [], [], []
    stopped = "steps"
    start, cpu_start = time.perf_counter(), time.process_time()
    while trainer.step_count < cfg.max_steps:
        loss, acc = trainer.step()
        losses.append(loss)
        accs.append(acc)
        tasks += trainer.sampler.last_tasks
        if bar:
            bar.update(1)
        if trainer.step_count % cfg.eval_every and trainer.step_count < cfg.max_steps:
            continue
        vals = {name: trainer.accuracy(examples) for name, examples in val.items()}
        certs = {name: trainer.certificate(examples) for name, examples in val.items()}
        elapsed = time.perf_counter() - start
        correct, tasks = np.concatenate(jax.device_get(accs)), np.asarray(tasks)
        point = {"step": trainer.step_count, "seconds": round(elapsed, 1),
                 "cpu_seconds": round(time.process_time() - cpu_start, 1),
                 "loss": float(np.mean(jax.device_get(losses))), "train_acc": float(correct.mean()),
                 "train": {name: float(correct[tasks == name].mean()) for name in val if (tasks == name).any()},
                 "val": vals, "val_certificate": certs}
        losses, accs, tasks = [], [], []
        curve.append(point)
        data_cfg = trainer.data_cfg
        if trainer.sampler.warm and all(vals[t] >= data_cfg.warm_until for t in data_cfg.warm_tasks):
            trainer.sampler.warm = False
            point["warm_ended"] = True
        if log:
            log(point)
        if bar:
            bar.set_postfix(loss=f"{point['loss']:.3f}", **{k[:2]: f"{v:.2f}" for k, v in vals.items()})
        # how far the evaluation is from the targets: 0 when every one is met
        miss = max(0.0, cfg.stop_at - min(vals.values())) + sum(
            max(0.0, lo - c[cond], c[cond] - hi) for c in certs.values() for cond, lo, hi in cfg.recipe.targets)
        met = miss == 0
        key = (int(met), -round(miss, 6), min(vals.values()), float(np.mean(list(vals.values()))))
        if key > best_key:
            best_key, best_step = key, trainer.step_count
            best = jax.device_get(nnx.to_pure_dict(trainer.params))
        if weak is None and cfg.weak_band[0] <= key[3] <= cfg.weak_band[1]:
            weak, weak_step = jax.device_get(nnx.to_pure_dict(trainer.params)), trainer.step_count
        streak = streak + 1 if met else 0
        if streak >= cfg.stop_evals:
            stopped = "target"
            break
        if elapsed > cfg.max_minutes * 60:
            stopped = "time"
            break
    if bar:
        bar.close()
    best_point = next((p for p in curve if p["step"] == best_step), None)
    return RunResult(params=best, best_step=best_step,
                     best_val=best_point["val"] if best_point else dict.fromkeys(val),
                     best_certificate=best_point["val_certificate"] if best_point else {},
                     weak_params=weak, weak_step=weak_step,
                     steps=trainer.step_count, train_seconds=time.perf_counter() - start,
                     cpu_seconds=time.process_time() - cpu_start, stopped=stopped, curve=curve)
