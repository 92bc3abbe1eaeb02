"""The package's imports point one way: no module imports, at any depth and however late (inside a
function too), a module that imports it back; the runtime never imports the trainer; the policies
never import the engine, which imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lm_eval_rlae", "trainer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project's modules it imports anywhere in its source}."""
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            imported |= {target for target in targets if target in modules and target != name}
        graph[name] = imported
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_package_init(name: str, graph: dict) -> bool:
    return any(other.startswith(name + ".") for other in graph)


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    # `a.b` importing `a.b.c` goes through the package `a.b`'s __init__ only when it re-exports; an
    # __init__ that re-exports its own submodules is not a cycle of concerns, so packages are left out.
    modules = {name: {m for m in deps if not _is_package_init(m, graph)} for name, deps in graph.items() if not _is_package_init(name, graph)}
    assert _cycle(modules) is None, f"import cycle: {' -> '.join(_cycle(modules))}"


@pytest.mark.parametrize(
    "importer, imported",
    [("lm_eval_rlae", "trainer"), ("lm_eval_rlae.policies", "lm_eval_rlae.engine")],
    ids=["runtime-never-imports-the-trainer", "policies-never-import-the-engine"],
)
def test_imports_point_one_way(importer, imported):
    wrong = sorted(
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        if name == importer or name.startswith(importer + ".")
        for dep in deps
        if dep == imported or dep.startswith(imported + ".")
    )
    assert not wrong, f"{importer} must not import {imported}: {wrong}"
