"""The package's shape: no module imports another in a cycle, and only the entry points import
``sweeplab.cli``."""

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for package in ("sweeplab", "hydra_plugins")
    for path in (SRC / package).rglob("*.py")
}


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Every module an ``import`` names, at module level or in a function, except under
    ``if TYPE_CHECKING:``; ``from a import b`` names ``a.b`` where that is a module."""
    names: list[str] = []
    skipped = {
        id(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for node in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            ]
    return names


GRAPH = {
    name: sorted(
        {imported for imported in _runtime_imports(ast.parse(path.read_text())) if imported in MODULES}
        - {name}
    )
    for name, path in MODULES.items()
}


def _cycle() -> list[str] | None:
    """One import cycle among the package's modules, if there is any."""
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for imported in GRAPH[name]:
            if state.get(imported) == "open":
                return [*trail[trail.index(imported) :], imported] if imported in trail else [name, imported]
            if imported not in state and (found := visit(imported, [*trail, imported])):
                return found
        state[name] = "done"
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_the_import_graph_is_seen() -> None:
    assert "sweeplab.config.errors" in GRAPH["sweeplab.config.validation"]
    assert "sweeplab.run.phases" in GRAPH["sweeplab.run.task"]


def test_no_module_imports_another_in_a_cycle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_only_the_entry_points_import_the_cli() -> None:
    importers = {
        name
        for name, imported in GRAPH.items()
        if any(m == "sweeplab.cli" or m.startswith("sweeplab.cli.") for m in imported)
    }
    assert {name for name in importers if not name.startswith("sweeplab.cli")} <= {"sweeplab.__main__"}


def test_the_models_do_not_import_the_stacking_engine() -> None:
    assert not [m for m in GRAPH["sweeplab.models"] if m.startswith("sweeplab.stacking")]
