"""Golden (clean, counterfactual) pairs for the paper's interchange interventions (section 4).

Last-token patching (Fig. 3), from a 5-tuple (c0, c1, c2, c3, c4) and a direction d:

    pair            image, left/above d   image, right/below d   prompt direction   answer
    clean           (c0, c1, c2)          (c2, c1, c0)           d                  c0
    counterfactual  (c4, c1, c3)          (c3, c1, c4)           opposite of d      c3

Criss-cross swaps (Figs. 6, 7), from a 3-tuple (t0, t1, t2): the clean image puts t0 where d asks
((t0, t1, t2) for left/above, (t2, t1, t0) for right/below); the counterfactual is the same image
reversed, with the same prompt, so its answer is t2.

A pair is golden if the model answers both of its items correctly; `predict(items) -> [answers]`
is any model (this module does not depend on one). Candidate tuples come from a seeded stream of
distinct tuples (one stream per direction), and the first `n_per_direction` golden ones are kept,
so the result does not depend on `batch_size`.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

from spatial_jax.data.items import Item
from spatial_jax.data.prompts import DIRECTIONS, OPPOSITE, target_slot
from spatial_jax.data.scoring import normalize

# (entities per slot, direction) -> Item, e.g. SyntheticTask.item or a partial of whatsup_item.
ItemMaker = Callable[[Sequence[str], str], Item]
Predict = Callable[[Sequence[Item]], Sequence[str]]
# Entity names, or for What'sUp a mapping middle -> side objects (tuples then keep the middle at index 1).
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


def candidate_tuples(pool: Pool, size: int, rng: random.Random, max_attempts: int) -> Iterator[tuple[str, ...]]:
    """Distinct random `size`-tuples of distinct entities, from `max_attempts` draws.

    With a middle -> sides mapping, each draw picks a middle, then size - 1 of its sides, and puts
    the middle at index 1 (the reference slot).
    """
    middles = sorted(pool) if isinstance(pool, Mapping) else None
    groups = [pool[m] for m in middles] if middles is not None else [pool]
    if all(len(g) < size - (middles is not None) for g in groups):
        raise ValueError(f"no pool has enough distinct entities for {size}-tuples")
    seen: set[tuple[str, ...]] = set()
    for _ in range(max_attempts):
        if middles is None:
            candidate = tuple(rng.sample(list(pool), size))
        else:
            middle = rng.choice(middles)
            if len(pool[middle]) < size - 1:
                continue
            sides = rng.sample(list(pool[middle]), size - 1)
            candidate = (sides[0], middle, *sides[1:])
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


def _golden_pairs(build: Callable[[Sequence[str], str, ItemMaker], Pair], size: int, make_item: ItemMaker,
                  pool: Pool, predict: Predict, directions: Sequence[str], n_per_direction: int, seed: int,
                  batch_size: int, max_attempts: int) -> dict[str, list[Pair]]:
    golden: dict[str, list[Pair]] = {}
    for direction in directions:
        rng = random.Random(f"{seed}|{direction}")
        kept: list[Pair] = []
        stream = candidate_tuples(pool, size, rng, max_attempts)
        for chunk in iter(lambda: list(itertools.islice(stream, batch_size)), []):
            pairs = [build(c, direction, make_item) for c in chunk]
            answers = list(predict([p.clean for p in pairs] + [p.counterfactual for p in pairs]))
            for pair, clean, cf in zip(pairs, answers[:len(pairs)], answers[len(pairs):], strict=True):
                if normalize(clean) == pair.clean.answer and normalize(cf) == pair.counterfactual.answer:
                    kept.append(pair)
            if len(kept) >= n_per_direction:
                break
        golden[direction] = kept[:n_per_direction]
    return golden


def last_token_pairs(make_item: ItemMaker, pool: Pool, predict: Predict, *, directions: Sequence[str] = DIRECTIONS,
                     n_per_direction: int = 50, seed: int = 0, batch_size: int = 32,
                     max_attempts: int = 2000) -> dict[str, list[Pair]]:
    """direction -> up to `n_per_direction` golden last-token pairs (fewer if the stream runs out)."""
    return _golden_pairs(last_token_pair, 5, make_item, pool, predict, directions, n_per_direction, seed,
                         batch_size, max_attempts)


def criss_cross_pairs(make_item: ItemMaker, pool: Pool, predict: Predict, *, directions: Sequence[str] = DIRECTIONS,
                      n_per_direction: int = 50, seed: int = 0, batch_size: int = 32,
                      max_attempts: int = 2000) -> dict[str, list[Pair]]:
    """direction -> up to `n_per_direction` golden criss-cross pairs (fewer if the stream runs out)."""
    return _golden_pairs(criss_cross_pair, 3, make_item, pool, predict, directions, n_per_direction, seed,
                         batch_size, max_attempts)
