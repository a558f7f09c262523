"""Golden (clean, counterfactual) pairs for the paper's interchange interventions (section 4).

Last-token patching (Fig. 3), from a 5-tuple (c0, c1, c2, c3, c4) and a direction d:

    pair            image, left/above d   image, right/below d   prompt direction   answer
    clean           (c0, c1, c2)          (c2, c1, c0)           d                  c0
    counterfactual  (c4, c1, c3)          (c3, c1, c4)           opposite of d      c3

Criss-cross swaps (Figs. 6, 7), from a 3-tuple (t0, t1, t2): the clean image puts t0 where d asks
((t0, t1, t2) for left/above, (t2, t1, t0) for right/below); the counterfactual is the same image
reversed, with the same prompt, so its answer is t2.

A pair is golden if the model answers both of its items correctly (decoded top-1, normalised as
the official `norm_token`); `predict(items) -> [answers]` is any model (this module does not depend
on one). Candidate tuples come from the official sampling stream (build_cf_pairs.py): ONE
`random.Random(seed)` shared by the directions in their given order, `rng.sample(pool, size)` per
draw (What'sUp: `rng.choice` of a middle, then `rng.sample` of its sides), repeats skipped but
counted as attempts, a direction ending at its `n_per_direction`-th survivor or after
`max_attempts` draws. The model is asked `batch_size` candidates at a time, and the generator is
rewound to the state right after the last survivor's draw, so the pairs (and the next direction's
stream) do not depend on `batch_size`: with seed 0 a model that passes exactly the tuples the
official repo ships in cf_pairs/*.json gets those tuples back.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from spatial_jax.data.items import Item
from spatial_jax.data.prompts import DIRECTIONS, OPPOSITE, target_slot
from spatial_jax.data.scoring import normalize

# (entities per slot, direction) -> Item, e.g. SyntheticTask.item or a partial of whatsup_item.
ItemMaker = Callable[[Sequence[str], str], Item]
Predict = Callable[[Sequence[Item]], Sequence[str]]
# Entity names, or for What'sUp a mapping middle -> side objects, in the official order (tuples then
# keep the middle at index 1).
Pool = Sequence[str] | Mapping[str, Sequence[str]]


@dataclass(frozen=True, eq=False)
class Pair:
    """A clean item, its counterfactual, and the answer word of each tuple entity, tuple order."""

    clean: Item
    counterfactual: Item
    candidates: tuple[str, ...]


def _pair(entities: Sequence[str], clean: Item, counterfactual: Item) -> Pair:
    attribute = dict(zip(clean.entities + counterfactual.entities, clean.attributes + counterfactual.attributes))
    return Pair(clean, counterfactual, tuple(attribute[e] for e in entities))


def last_token_pair(entities: Sequence[str], direction: str, make_item: ItemMaker) -> Pair:
    """The last-token patching pair of a 5-tuple; candidates = answers of (c0, c1, c2, c3, c4)."""
    c0, c1, c2, c3, c4 = entities
    if target_slot(direction) == 0:
        clean_slots, cf_slots = (c0, c1, c2), (c4, c1, c3)
    else:
        clean_slots, cf_slots = (c2, c1, c0), (c3, c1, c4)
    return _pair(entities, make_item(clean_slots, direction), make_item(cf_slots, OPPOSITE[direction]))


def criss_cross_pair(entities: Sequence[str], direction: str, make_item: ItemMaker) -> Pair:
    """The criss-cross pair of a 3-tuple; candidates = answers of (t0, t1, t2)."""
    t0, t1, t2 = entities
    clean_slots = (t0, t1, t2) if target_slot(direction) == 0 else (t2, t1, t0)
    return _pair(entities, make_item(clean_slots, direction), make_item(clean_slots[::-1], direction))


def _draw(pool: Pool, size: int, rng: random.Random) -> tuple[str, ...]:
    """One official draw: `size` distinct entities; What'sUp: a middle, then size - 1 of its sides
    with the middle put at index 1 (the reference slot)."""
    if isinstance(pool, Mapping):
        middle = rng.choice(list(pool))
        sides = rng.sample(list(pool[middle]), size - 1)
        return (sides[0], middle, *sides[1:])
    return tuple(rng.sample(list(pool), size))


def _usable(pool: Pool, size: int) -> Pool:
    """The pool without middles that have too few sides (the official pools leave them out)."""
    if isinstance(pool, Mapping):
        pool = {m: sides for m, sides in pool.items() if len(sides) >= size - 1}
        if not pool:
            raise ValueError(f"no middle has enough distinct side objects for {size}-tuples")
    elif len(pool) < size:
        raise ValueError(f"a pool of {len(pool)} entities has not enough distinct entities for {size}-tuples")
    return pool


def _golden_pairs(build: Callable[[Sequence[str], str, ItemMaker], Pair], size: int, make_item: ItemMaker,
                  pool: Pool, predict: Predict, directions: Sequence[str], n_per_direction: int, seed: int,
                  batch_size: int, max_attempts: int) -> dict[str, list[Pair]]:
    pool = _usable(pool, size)
    rng = random.Random(seed)
    golden: dict[str, list[Pair]] = {}
    for direction in directions:
        kept: list[Pair] = []
        seen: set[tuple[str, ...]] = set()
        attempts = 0
        while len(kept) < n_per_direction and attempts < max_attempts:
            chunk = []  # (candidate, generator state right after its draw)
            while len(chunk) < batch_size and attempts < max_attempts:
                attempts += 1
                candidate = _draw(pool, size, rng)
                if candidate not in seen:
                    seen.add(candidate)
                    chunk.append((candidate, rng.getstate()))
            if not chunk:
                break
            pairs = [build(c, direction, make_item) for c, _ in chunk]
            answers = list(predict([p.clean for p in pairs] + [p.counterfactual for p in pairs]))
            for pair, (_, state), clean, cf in zip(pairs, chunk, answers[:len(pairs)], answers[len(pairs):],
                                                   strict=True):
                if normalize(clean) == normalize(pair.clean.answer) and \
                        normalize(cf) == normalize(pair.counterfactual.answer):
                    kept.append(pair)
                    if len(kept) == n_per_direction:
                        rng.setstate(state)  # the official loop stops drawing here
                        break
        golden[direction] = kept
    return golden


def last_token_pairs(make_item: ItemMaker, pool: Pool, predict: Predict, *, directions: Sequence[str] = DIRECTIONS,
                     n_per_direction: int = 50, seed: int = 0, batch_size: int = 32,
                     max_attempts: int = 2000) -> dict[str, list[Pair]]:
    """direction -> up to `n_per_direction` golden last-token pairs (fewer if the stream runs out).

    `directions` is the stream's order: a direction's pairs depend on every direction before it,
    so ask for all of them (the official order is DIRECTIONS) and pick one.
    """
    return _golden_pairs(last_token_pair, 5, make_item, pool, predict, directions, n_per_direction, seed,
                         batch_size, max_attempts)


def criss_cross_pairs(make_item: ItemMaker, pool: Pool, predict: Predict, *, directions: Sequence[str] = DIRECTIONS,
                      n_per_direction: int = 50, seed: int = 0, batch_size: int = 32,
                      max_attempts: int = 2000) -> dict[str, list[Pair]]:
    """direction -> up to `n_per_direction` golden criss-cross pairs (fewer if the stream runs out).

    `directions` is the stream's order: a direction's pairs depend on every direction before it,
    so ask for all of them (the official order is DIRECTIONS) and pick one.
    """
    return _golden_pairs(criss_cross_pair, 3, make_item, pool, predict, directions, n_per_direction, seed,
                         batch_size, max_attempts)
