"""The package's module graph: no module imports one that imports it back (at module level or
inside a function), so each can be read, tested and loaded on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from builders import REPO

SOURCES = sorted((REPO / "pneumonia").glob("*.py")) + sorted((REPO / "web").glob("*.py")) + [REPO / "gradcam.py"]


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    known = {module_name(path) for path in SOURCES}
    return {module_name(path): imported_modules(path, known) for path in SOURCES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a ring, or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state and (cycle := visit(target, trail + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_ring():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_project_imports_itself_back():
    graph = import_graph()
    assert graph["pneumonia.preprocessing"] >= {"pneumonia.dicom"}  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", ["pneumonia.dicom", "pneumonia.preprocessing", "pneumonia.errors"])
def test_the_reading_modules_import_alone(module):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
