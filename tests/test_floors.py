"""The code's floors: `prune.core` < `prune.zoo` < `prune.outputs` < `prune.pipeline` < `prune.cli`; a
module imports only its own floor or those below (every import, module and function level, found
by reading the source); the benchmarks' modules import one another without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["prune.core", "prune.zoo", "prune.outputs", "prune.pipeline", "prune.cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at any level (a `from a import b` counts a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def floor(name: str) -> int | None:
    """The floor of module `name` (an index into FLOORS), None for a module outside them."""
    for i, prefix in enumerate(FLOORS):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return None


def test_a_floor_imports_only_its_own_or_lower_floors():
    upward = []
    for path in sorted((ROOT / "prune").rglob("*.py")):
        own = floor(module_name(path))
        if own is None:
            continue
        for name in imported(path):
            other = floor(name)
            if other is not None and other > own:
                upward.append(f"{module_name(path)} imports {name}")
    assert upward == []


def test_a_function_level_upward_import_is_seen(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from prune.pipeline import run\n")
    assert {floor(name) for name in imported(probe)} == {FLOORS.index("prune.pipeline")}


def benchmark_graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / "benchmarks").glob("*.py"))
    modules = {module_name(p): p for p in paths}
    return {name: {m for m in imported(p) if m in modules and m != name} for name, p in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_benchmarks_import_without_a_circle():
    graph = benchmark_graph()
    assert len(graph) > 10
    assert cycle(graph) is None


def test_the_circle_search_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
