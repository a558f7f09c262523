"""The package's structure: imports between top-level parts run one way, and a family that misses
a piece of the contract is refused when it registers."""
from __future__ import annotations

import ast
import dataclasses
import os

import pytest

import spatial_jax
from spatial_jax import families
from spatial_jax.families import contract

ROOT = os.path.dirname(spatial_jax.__file__)


def _part(module: str) -> str | None:
    """The top-level part (folder or module under spatial_jax/) a dotted module name is in."""
    parts = module.split(".")
    return parts[1] if parts[0] == "spatial_jax" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    """part -> the other parts its modules import (module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            here = _part(rel)
            if here is None:  # spatial_jax/__init__.py, the facade, sits above everything
                continue
            edges = graph.setdefault(here, set())
            for node in ast.walk(ast.parse(open(path).read())):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    base = node.module
                    targets = [base] + ([f"{base}.{a.name}" for a in node.names] if base == "spatial_jax" else [])
                for target in targets:
                    there = _part(target)
                    if there and there != here:
                        edges.add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_between_top_level_parts_run_one_way():
    graph = import_graph()
    assert {"families", "nn", "interventions", "runner", "forward", "sweeps"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between top-level parts: " + " -> ".join(cycle)
    # The layering the design names: vocabulary and building blocks below the families, the
    # runner above them, forward above the runner, the sweeps and the organism above forward.
    for low, high in (("interventions", "nn"), ("nn", "families"), ("families", "runner"), ("runner", "forward"),
                      ("forward", "sweeps"), ("forward", "organism")):
        assert high not in _reachable(graph, low), f"{low} reaches {high}"


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_library_module_imports_the_facade():
    """`import spatial_jax as sj` is for users and binaries: inside the library it would hide the
    real dependency (and a cycle) behind the package's __init__."""
    offenders = []
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py") and not (folder == ROOT and name == "__init__.py"):
                path = os.path.join(folder, name)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import) and any(a.name == "spatial_jax" for a in node.names):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_nothing_outside_a_family_folder_names_a_family_module():
    """Family code is reached through the registry: no module outside families/ imports a family's folder."""
    offenders = []
    for folder, _, files in os.walk(ROOT):
        if os.path.relpath(folder, ROOT).split(os.sep)[0] == "families":
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for node in ast.walk(ast.parse(open(path).read())):
                    module = getattr(node, "module", None) or ""
                    if isinstance(node, ast.ImportFrom) and module.startswith("spatial_jax.families.") and \
                            module.split(".")[2] in families.FAMILIES and "organism" not in path:
                        offenders.append(f"{os.path.relpath(path, ROOT)}: {module}")
    assert offenders == []


def _family(**changes):
    return dataclasses.replace(families.get("qwen2_vl"), name="broken", **changes)


def test_a_registered_family_keeps_the_contract():
    for family in families.FAMILIES.values():
        assert contract.check_family(family) is family


@pytest.mark.parametrize("missing", ["embed_inputs", "lm_context", "unembed", "check_batch", "token_grids"])
def test_an_incomplete_family_is_refused_with_what_it_lacks(missing):
    methods = {m: (lambda self, *a: None) for m in ("embed_inputs", "lm_context", "final", "unembed")}
    methods |= {m: staticmethod(lambda cfg, batch: None) for m in ("check_batch", "token_grids")}
    del methods[missing]
    geometry = dataclasses.replace(families.get("qwen2_vl").geometry, name="broken")
    with pytest.raises(TypeError, match=f"model family 'broken': Incomplete lacks {missing} "):
        contract.check_family(_family(model_cls=type("Incomplete", (), methods), geometry=geometry))


def test_other_broken_records_are_refused():
    geometry = dataclasses.replace(families.get("qwen2_vl").geometry, name="broken")
    with pytest.raises(TypeError, match="must be a staticmethod"):
        contract.check_family(_family(geometry=geometry, model_cls=type("M", (families.get("qwen2_vl").model_cls,),
                                                                          {"check_batch": lambda self, b: None})))
    with pytest.raises(TypeError, match="geometry must be"):
        contract.check_family(_family())  # the geometry is still named qwen2_vl
    with pytest.raises(TypeError, match="catch-all"):
        contract.check_family(_family(geometry=geometry, sharding_rules=((r"^embed$", None),)))
    with pytest.raises(TypeError, match="prompt_style"):
        contract.check_family(_family(geometry=geometry, prompt_style="polite"))
    with pytest.raises(TypeError, match="lacks from_dir"):
        contract.check_family(_family(geometry=geometry, processor_cls=object))


def test_registering_a_family_twice_or_an_unclaimed_config_fails_clearly():
    with pytest.raises(ValueError, match="unknown model family 'llama9'"):
        families.get("llama9")
    with pytest.raises(ValueError, match="unknown architecture.*'clip_vision_model'"):
        families.family_of({"architectures": ["LlavaForConditionalGeneration"],
                            "vision_config": {"model_type": "clip_vision_model"}} if "llava" not in families.FAMILIES
                           else {"architectures": ["NoSuchModel"], "vision_config": {"model_type": "clip_vision_model"}})
