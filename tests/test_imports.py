"""The package's import graph has no cycle: no module imports one that imports it back,
counting imports inside functions too (they are cycles a refactor can close)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hrem_ray"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        state[u] = 2
        path.pop()
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "hrem_ray.cli" in graph and "hrem_ray.demo.pipeline" in graph["hrem_ray.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_test_world():
    graph = import_graph()
    users = {m for m, deps in graph.items() if any(d.startswith("hrem_ray.testing") for d in deps)}
    assert "hrem_ray.testing" in graph and users <= {m for m in graph if "testing" in m}, users


def test_embedding_sits_below_evaluation():
    """``embed`` is the one embedding path: evaluation and the gallery use it, and it uses
    neither of them (no import runs back up the layers)."""
    graph = import_graph()
    assert not {d for d in graph["hrem_ray.embed"] if d.startswith("hrem_ray.eval")}
    assert not {d for d in graph["hrem_ray.index.gallery"] if d.startswith("hrem_ray.eval")}
    assert "hrem_ray.embed" in graph["hrem_ray.eval.evaluate"]
