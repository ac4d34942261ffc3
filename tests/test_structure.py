"""The package's import structure: no module imports one that imports it back, and the analyses sit below
the trainer (they never import it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cure"


def _imports(path: Path) -> set[str]:
    """The cure.* modules ``path`` imports, at any depth (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cure."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cure."))
    return out


def _graph() -> dict[str, set[str]]:
    return {f"cure.{p.stem}": _imports(p) - {f"cure.{p.stem}"} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_analyses_do_not_import_the_trainer():
    graph = _graph()
    for module in ("cure.cka", "cure.evaluation", "cure.plots", "cure.layer_stats", "cure.corruptions"):
        assert "cure.train" not in graph[module], module
