"""Nested parameter dicts <-> flat {'a/b/c': leaf} maps (the pure-dict layout of an nnx state)."""
from __future__ import annotations

from typing import Any, Mapping


def flatten_paths(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten_paths(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
