"""Training and evaluation data of the model organism, as arrays ready for a jitted step.

Every synthetic image of the organism geometry is a white canvas whose merged-token cells each
hold either nothing or one whole sprite cell (objects are grid-aligned and the 168-px canvas is
never resized by the processor). So an image is fully described by `cells` [N*N] int (0 = white,
otherwise a row of `cell_table`), and its `pixel_values` are `cell_table[cells]` flattened: exactly
the HF processor's output (tests/test_organism_data.py checks it bit for bit), computed on the fly
inside the jitted step instead of storing 677 KB of pixels per image.

Prompts go through the real chat template (`Qwen2VLPrep` of the organism's processor dir), once per
distinct (task, reference, direction, system text); batches are left-padded to one length, as the
processor pads.

Held-out data: per task, the triples of the *test* entity set (the paper's 6 colours / 6 shapes /
8 objects) are split into train / val / test, a triple always with its mirror image (`split_mirrored`).
Training never sees a val or test triple, nor its mirror image, in any layout; val triples drive early stopping, test triples are what the organism's
accuracy is reported on. Training adds variety the test set does not have: random whole-token layout
shifts (`jitter`), extra colours for Squares and Shapes (every shape in every colour), and both the
paper's system text and the chat template's default one.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from spatial_jax.data.geometry import Geometry, get_geometry
from spatial_jax.data.prompts import DIRECTIONS, SYSTEM_TEXT, cloze_prompt, is_horizontal, target_slot
from spatial_jax.data.synthetic import SHAPES, make_task, split_triples
from spatial_jax.families.qwen2_vl.processor import Qwen2VLPrep, preprocess_image
from spatial_jax.organism.recipes import parse_treatment
from spatial_jax.organism.spec import training_colours

Triple = tuple[str, str, str]
# System texts a training prompt may carry: the paper's (what the experiment binaries pass) and
# None, the chat template's default turn (what `model.prepare` gives without `system=`).
SYSTEMS: tuple[Optional[str], ...] = (SYSTEM_TEXT, None)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How training data is drawn (see the module docstring)."""

    tasks: tuple[str, ...] = ("squares", "shapes", "objects")
    n_val: tuple[int, ...] = (20, 20, 32)        # held-out triples per task for early stopping
    n_test: tuple[int, ...] = (20, 20, 32)       # held-out triples per task for the reported accuracy
    split_seed: int = 0
    n_extra_colours: int = 8                      # EXTRA_COLOURS used in training (Squares, Shapes)
    p_standard: float = 0.5                       # P(a training triple is from the test entity set)
    jitter: int = 3                               # largest layout shift (tokens) per axis
    p_paper_system: float = 0.5                   # P(the paper's system text), else the default one
    rows_per_image: int = 2                       # questions asked of each training image: both
                                                  # directions of its axis (1: one random direction)
    warm_tasks: tuple[str, ...] = ()              # curriculum: batches draw only from these tasks ...
    warm_until: float = 0.9                       # ... until each has this val accuracy (train.train)


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[Triple]
    val: list[Triple]
    test: list[Triple]


def split_mirrored(triples: Sequence[Triple], n_held_out: int, seed: int = 0) -> tuple[list[Triple], list[Triple]]:
    """(kept, held_out) like `data.split_triples`, but a triple and its mirror image (c, b, a) always
    fall on the same side: `split_triples` over the mirror pairs, n_held_out // 2 pairs held out.

    With single triples held out, the mirror of most held-out triples is trained on, and a model that
    memorises "with reference b among {a, c} the left one is c" answers those held-out items wrongly;
    here every trained (reference, pair of others) is seen in both orders, so no such shortcut exists.
    """
    if n_held_out % 2:
        raise ValueError(f"n_held_out must be even (mirror pairs), got {n_held_out}")
    pairs = list(dict.fromkeys(min(t, t[::-1]) for t in map(tuple, triples)))
    _, held_pairs = split_triples(pairs, n_held_out // 2, seed)
    held = {t for p in held_pairs for t in (p, p[::-1])}
    return [t for t in triples if tuple(t) not in held], [t for t in triples if tuple(t) in held]


def split_task(triples: Sequence[Triple], n_val: int, n_test: int, seed: int) -> Split:
    """train / val / test triples: `split_mirrored` draws the held-out ones, then the test ones among them."""
    train, held = split_mirrored(triples, n_val + n_test, seed)
    val, test = split_mirrored(held, n_test, seed + 1)
    return Split(train, val, test)


class TaskData:
    """One task: its test entity set (`standard`), its training entity set (`extended`) and split."""

    def __init__(self, name: str, geometry: Geometry, cfg: DataConfig, n_val: int, n_test: int):
        self.name = name
        self.standard = make_task(name, geometry)
        colours = training_colours(cfg.n_extra_colours)
        if name == "squares":
            self.extended = make_task(name, geometry, colours=colours)
        elif name == "shapes":
            shapes = list(SHAPES) + [(s, c) for s, _ in SHAPES for c in colours if (s, c) not in SHAPES]
            self.extended = make_task(name, geometry, colours=colours, shapes=shapes)
        else:
            self.extended = self.standard
        for entity in self.standard.entities:
            if entity not in self.extended.entities:
                raise AssertionError(f"{name}: test entity {entity!r} missing from the training set")
        self.split = split_task(self.standard.triples(), n_val, n_test, cfg.split_seed)
        self.held = frozenset(self.split.val) | frozenset(self.split.test)
        self.extended_names = list(self.extended.entities)
        # Shapes: the answer is the colour, so a training triple has 3 distinct colours (as every
        # test triple does); otherwise the distinct entities of the triple suffice.
        self._attribute = {n: e.attribute for n, e in self.extended.entities.items()}

    def sample_train(self, rng: np.random.Generator, p_standard: float) -> Triple:
        """A training triple: with probability p_standard from the standard train triples, else any
        triple of the extended set that is not held out."""
        if rng.random() < p_standard or self.extended is self.standard:
            return self.split.train[rng.integers(len(self.split.train))]
        names = self.extended_names
        while True:
            triple = tuple(names[i] for i in rng.choice(len(names), 3, replace=False))
            if len({self._attribute[n] for n in triple}) == 3 and triple not in self.held:
                return triple


class Encoder:
    """(task, triple, direction, shift, system) -> token ids, image cells and answer id."""

    def __init__(self, prep: Qwen2VLPrep, geometry: Geometry, tasks: Sequence[TaskData]):
        self.prep = prep
        self.geometry = geometry
        self.tasks = {t.name: t for t in tasks}
        g = geometry
        if g.canvas_px % g.token_px or prep.image_config.factor != g.token_px:
            raise ValueError(f"geometry {g.name}: token size {g.token_px} != processor merge block "
                             f"{prep.image_config.factor}")
        self.pad_id = int(prep.tokenizer.pad_token_id)
        self.image_token_id = prep.image_token_id
        blank = Image.new("RGB", (g.canvas_px, g.canvas_px), (255, 255, 255))
        rows, self.grid_thw = preprocess_image(blank, prep.image_config)
        if self.grid_thw[1] * self.grid_thw[2] != g.n_visual_tokens * prep.image_config.merge_size**2:
            raise ValueError(f"the processor resizes the {g.canvas_px}-px canvas to {self.grid_thw}")
        per_token = prep.image_config.merge_size**2
        table = [rows[:per_token]]  # cell 0: white
        self.sprite_cells: dict[tuple[str, str], np.ndarray] = {}
        s = g.object_tokens
        for task in tasks:
            for name, entity in task.extended.entities.items():
                canvas = blank.copy()
                sprite = entity.sprite(s * g.token_px)
                canvas.paste(sprite, (0, 0), sprite)  # as synthetic.render_layout pastes
                patches, _ = preprocess_image(canvas, prep.image_config)
                ids = []
                for dr, dc in itertools.product(range(s), range(s)):
                    k = dr * g.n_tokens + dc
                    ids.append(len(table))
                    table.append(patches[k * per_token:(k + 1) * per_token])
                self.sprite_cells[task.name, name] = np.asarray(ids, np.int32)
        self.cell_table = np.stack(table).astype(np.float32)  # [n_cells, merge^2, patch_dim]
        # class ids of the auxiliary entity head: every (task, entity) the encoder can draw
        self.entity_ids = {key: i for i, key in enumerate(self.sprite_cells)}
        self._prompts: dict[tuple[str, Optional[str]], np.ndarray] = {}
        for task in tasks:
            for system in SYSTEMS:
                texts = [cloze_prompt(task.name, d, e) for e in task.extended.entities for d in DIRECTIONS]
                self._tokenize(texts, system)
        self.seq_len = max(len(v) for v in self._prompts.values())
        vocab = prep.tokenizer.get_vocab()
        self.answer_ids = {}
        for task in tasks:
            for entity in task.extended.entities.values():
                if entity.attribute not in vocab:
                    raise ValueError(f"answer {entity.attribute!r} is not a token of the organism vocabulary")
                self.answer_ids[entity.attribute] = vocab[entity.attribute]

    def _tokenize(self, texts: list[str], system: Optional[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if (t, system) not in self._prompts]
        if not todo:
            return
        blank = Image.new("RGB", (self.geometry.canvas_px,) * 2, (255, 255, 255))
        out = self.prep(images=[blank] * len(todo), prompts=todo, system=system)
        for text, ids, mask in zip(todo, out["input_ids"], out["attention_mask"]):
            self._prompts[text, system] = ids[mask.astype(bool)]

    def prompt_ids(self, text: str, system: Optional[str]) -> np.ndarray:
        if (text, system) not in self._prompts:
            self._tokenize([text], system)
        return self._prompts[text, system]

    def cells(self, task: str, triple: Sequence[str], direction: str, shift=(0, 0)) -> np.ndarray:
        """[N*N] int32 cell ids of the image of `triple` laid out for `direction`."""
        g = self.geometry
        out = np.zeros((g.n_tokens, g.n_tokens), np.int32)
        s = g.object_tokens
        for (row, col), name in zip(g.slot_origins(is_horizontal(direction), tuple(shift)), triple):
            out[row:row + s, col:col + s] = self.sprite_cells[task, name].reshape(s, s)
        return out.reshape(-1)

    def object_tokens(self, horizontal: bool, shift=(0, 0)) -> np.ndarray:
        """[3, S*S] raster indices of each slot's object tokens."""
        g, s = self.geometry, self.geometry.object_tokens
        return np.asarray([[(row + dr) * g.n_tokens + col + dc for dr in range(s) for dc in range(s)]
                           for row, col in g.slot_origins(horizontal, tuple(shift))], np.int32)

    def isolated_cells(self, task: str, name: str, horizontal: bool) -> np.ndarray:
        """[N*N] cells of `name` alone in the middle slot of the unshifted layout (Table 5's image)."""
        out = np.zeros(self.geometry.n_visual_tokens, np.int32)
        out[self.object_tokens(horizontal)[1]] = self.sprite_cells[task, name]
        return out

    def aux_labels(self, task: str, triple: Sequence[str], horizontal: bool, shift, mode: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets of the auxiliary heads for one image: strip [N*N], entity [N*N], weight [N*N].

        mode "strip": every token, its strip along the layout axis (`Geometry.strip_bounds` of the
        shifted layout) and the entity in that strip; "object": the object tokens only, their slot
        and entity (weight 0 elsewhere)."""
        g = self.geometry
        strip = np.zeros(g.n_visual_tokens, np.int32)
        weight = np.zeros(g.n_visual_tokens, np.float32)
        if mode == "strip":
            along = np.arange(g.n_visual_tokens) % g.n_tokens if horizontal else np.arange(g.n_visual_tokens) // g.n_tokens
            for k, (lo, hi) in enumerate(g.strip_bounds(shift[0])):
                strip[(along >= lo) & (along < hi)] = k
            weight[:] = 1.0
        elif mode == "object":
            for k, toks in enumerate(self.object_tokens(horizontal, shift)):
                strip[toks] = k
                weight[toks] = 1.0
        else:
            raise ValueError(f"aux mode must be strip or object, got {mode!r}")
        ids = np.asarray([self.entity_ids[task, n] for n in triple], np.int32)
        return strip, ids[strip], weight

    def encode(self, examples: Sequence[tuple], rows_per_image: int = 1, seq_len: Optional[int] = None
               ) -> dict[str, np.ndarray]:
        """examples: (task, triple, direction, shift, system) -> arrays of one batch.

        rows_per_image: each run of that many consecutive examples asks about one image (same
          task, triple, axis and shift), which the model then encodes once.
        Returns input_ids, attention_mask [B, T] int32 (left-padded to `seq_len`, default the
        longest prompt of any task), cells [B / rows_per_image, N*N] int32, image_of_row [B] int32,
        labels [B] int32 (answer token ids).
        """
        T = seq_len or self.seq_len
        B = len(examples)
        if B % rows_per_image:
            raise ValueError(f"{B} examples do not split into images of {rows_per_image} rows")
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        cells = np.zeros((B // rows_per_image, self.geometry.n_visual_tokens), np.int32)
        labels = np.zeros((B,), np.int32)
        for b, (task, triple, direction, shift, system) in enumerate(examples):
            t = self.tasks[task]
            reference = triple[1]
            row = self.prompt_ids(cloze_prompt(task, direction, reference), system)
            if len(row) > T:
                raise ValueError(f"prompt of {len(row)} tokens does not fit in {T}")
            ids[b, T - len(row):] = row
            mask[b, T - len(row):] = 1
            row_cells = self.cells(task, triple, direction, shift)
            if b % rows_per_image == 0:
                cells[b // rows_per_image] = row_cells
            elif not np.array_equal(cells[b // rows_per_image], row_cells):
                raise ValueError(f"example {b} does not show the image of example {b - b % rows_per_image}")
            labels[b] = self.answer_ids[t.extended.entities[triple[target_slot(direction)]].attribute]
        return {"input_ids": ids, "attention_mask": mask, "cells": cells,
                "image_of_row": np.arange(B, dtype=np.int32) // rows_per_image, "labels": labels}


def shift_range(geometry: Geometry, jitter: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive (along, across) shift bounds: the canvas' limits clipped to +-jitter."""
    return tuple((max(lo, -jitter), min(hi, jitter)) for lo, hi in geometry.max_shift())


def treat(encoder: Encoder, batch: dict[str, np.ndarray], examples: Sequence[tuple], treatments: Sequence[str],
          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the LM is shown of each image (organism/recipes.py names the treatments).

    batch: `encode(examples, rows_per_image=q)`; treatments: one per image. Appends to `cells` the
    extra images the treatments read (the empty canvas, then 3 isolated images per "ablated" image)
    and adds token_src [B, N*N] int32: LM image slot j of row b gets visual token
    token_src[b, j] of the flattened [n_images * N*N] tokens of every image in `cells`.
    """
    cells = batch["cells"]
    n_img, n = cells.shape
    if len(treatments) != n_img:
        raise ValueError(f"{len(treatments)} treatments for {n_img} images")
    q = len(examples) // n_img
    meta = [examples[i * q] for i in range(n_img)]  # (task, triple, direction, shift, system)
    objects = [encoder.object_tokens(is_horizontal(d), sh) for _, _, d, sh, _ in meta]
    extra = [np.zeros(n, np.int32)]  # the empty canvas
    empty = n_img * n + np.arange(n)
    own = np.arange(n_img)[:, None] * n + np.arange(n)
    src = own.copy()
    for i, name in enumerate(treatments):
        content, _ = parse_treatment(name)
        other = (i + 1) % n_img
        if content == "ablated":
            task, triple, direction, _, _ = meta[i]
            middle = encoder.object_tokens(is_horizontal(direction))[1]
            src[i] = empty
            for k in range(3):
                src[i, objects[i][k]] = (n_img + len(extra)) * n + middle
                extra.append(encoder.isolated_cells(task, triple[k], is_horizontal(direction)))
        elif content == "bgother":
            src[i] = own[other]
            src[i, objects[other].ravel()] = empty[objects[other].ravel()]
            src[i, objects[i].ravel()] = own[i, objects[i].ravel()]
        elif content == "objother":
            src[i, objects[i]] = own[other, objects[other]]
    rows = []
    for b in range(len(examples)):
        i = b // q
        row = src[i]
        if parse_treatment(treatments[i])[1]:
            row = row[rng.permutation(n)]
        rows.append(row)
    return {**batch, "cells": np.concatenate([cells, np.stack(extra)]).astype(np.int32),
            "token_src": np.stack(rows).astype(np.int32)}


def assign(treatments: Sequence[tuple[str, float]], n_img: int, rng: np.random.Generator) -> list[str]:
    """A treatment per image: each gets round(share * n_img) images (largest remainders), in random
    order, so that every batch has the same number of extra images (one compiled step)."""
    shares = np.asarray([p for _, p in treatments]) * n_img
    counts = np.floor(shares).astype(int)
    counts[np.argsort(-(shares - counts), kind="stable")[:n_img - counts.sum()]] += 1
    names = [t for (t, _), c in zip(treatments, counts) for _ in range(c)]
    return [names[j] for j in rng.permutation(n_img)]


class Sampler:
    """A deterministic stream of training batches (numpy arrays) from one seed.

    treatments: (treatment, share) of each batch's images (organism/recipes.py); aux: the
    auxiliary heads' label mode ("none", "strip", "object"), trained on images whose treatment is
    in aux_on."""

    def __init__(self, encoder: Encoder, cfg: DataConfig, batch_size: int, seed: int,
                 treatments: Sequence[tuple[str, float]] = (("own", 1.0),), aux: str = "none",
                 aux_on: Sequence[str] = ()):
        self.encoder = encoder
        self.cfg = cfg
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.task_names = list(cfg.tasks)
        self.bounds = shift_range(encoder.geometry, cfg.jitter)
        self.treatments = tuple(treatments)
        self.aux, self.aux_on = aux, frozenset(aux_on)
        unknown = set(cfg.warm_tasks) - set(self.task_names)
        if unknown:
            raise ValueError(f"warm_tasks {sorted(unknown)} are not among the trained tasks {self.task_names}")
        self.warm = bool(cfg.warm_tasks)  # the curriculum's first stage; train.train ends it

    def examples(self, n_images: int) -> list[tuple]:
        """rows_per_image examples for each of n_images fresh images."""
        rng, out, q = self.rng, [], self.cfg.rows_per_image
        # A curriculum: reading the layout is learnt much sooner on one task than on all of them
        # at once (BUILD_NOTES, organism); the other tasks then only add entities to recognise.
        names = list(self.cfg.warm_tasks) if self.warm else self.task_names
        for _ in range(n_images):
            name = names[rng.integers(len(names))]
            triple = self.encoder.tasks[name].sample_train(rng, self.cfg.p_standard)
            axis = ("left", "right") if rng.random() < 0.5 else ("above", "below")
            directions = axis if q == 2 else [axis[rng.integers(2)]] if q == 1 else None
            if directions is None:
                raise ValueError(f"rows_per_image must be 1 or 2, got {q}")
            shift = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in self.bounds)
            for direction in directions:
                system = SYSTEMS[0] if rng.random() < self.cfg.p_paper_system else SYSTEMS[1]
                out.append((name, triple, direction, shift, system))
        return out

    def next(self) -> dict[str, np.ndarray]:
        q = self.cfg.rows_per_image
        if self.batch_size % q:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of rows_per_image {q}")
        n_img = self.batch_size // q
        examples = self.examples(n_img)
        self.last_tasks = [e[0] for e in examples]
        batch = self.encoder.encode(examples, rows_per_image=q)
        treatments = assign(self.treatments, n_img, self.rng)
        batch = treat(self.encoder, batch, examples, treatments, self.rng)
        if self.aux != "none":
            labels = [self.encoder.aux_labels(task, triple, is_horizontal(d), shift, self.aux)
                      for task, triple, d, shift, _ in examples[::q]]
            on = np.asarray([t in self.aux_on for t in treatments], np.float32)
            batch["aux_strip"], batch["aux_entity"], weight = (np.stack(x) for x in zip(*labels))
            batch["aux_weight"] = weight * on[:, None]
        return batch


def eval_examples(task: TaskData, triples: Sequence[Triple], system: Optional[str] = SYSTEM_TEXT) -> list[tuple]:
    """The paper's items of `triples` (every direction, unshifted layout) as encoder examples."""
    return [(task.name, tuple(t), d, (0, 0), system) for t in triples for d in DIRECTIONS]


def build(prep: Qwen2VLPrep, cfg: DataConfig, geometry: Geometry | str = "organism") -> Encoder:
    """The encoder over every task of `cfg`."""
    geometry = get_geometry(geometry) if isinstance(geometry, str) else geometry
    if not (len(cfg.n_val) == len(cfg.n_test) == len(cfg.tasks)):
        raise ValueError("n_val and n_test need one entry per task")
    tasks = [TaskData(name, geometry, cfg, nv, nt) for name, nv, nt in zip(cfg.tasks, cfg.n_val, cfg.n_test)]
    return Encoder(prep, geometry, tasks)
