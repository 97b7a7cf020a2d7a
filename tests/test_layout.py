"""The floor plan (docs/architecture.md): imports only point down, `wsss` never imports Ray,
MLflow or `tune`, and no module reaches into another's private names. Read from the source
(every import, also those inside functions), so a new cycle fails here, not in a user's
import order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules(package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of ``package`` (a package's ``__init__`` under the
    package's name)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[tuple[str, str]]:
    """(module, name) for every ``import`` / ``from ... import`` of a known module in ``path``;
    ``from pkg import mod`` counts as an import of ``pkg.mod`` where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(a.name, "") for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add((sub, "") if sub in known else (node.module, alias.name))
    return found


def graph(packages: tuple[str, ...]) -> tuple[dict[str, set[str]], dict[str, set[tuple]]]:
    files = {m: p for pkg in packages for m, p in modules(pkg).items()}
    raw = {m: imports(p, set(files)) for m, p in files.items()}
    edges = {m: {target for target, _ in deps if target in files and target != m}
             for m, deps in raw.items()}
    return edges, raw


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("packages", [("wsss",), ("wsss", "tune")])
def test_no_import_cycle(packages):
    edges, _ = graph(packages)
    # a package's __init__ re-exports its modules: the package is not a layer of its own
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    assert cycle(edges) is None, f"import cycle: {' -> '.join(cycle(edges))}"


def test_the_library_does_not_import_the_search_system():
    _, raw = graph(("wsss",))
    for module, deps in raw.items():
        roots = {target.split(".")[0] for target, _ in deps}
        assert not roots & {"tune", "ray", "mlflow", "optuna"}, (module, roots)


def test_no_private_name_crosses_a_module():
    _, raw = graph(("wsss", "tune"))
    crossing = sorted((module, f"{target}.{name}") for module, deps in raw.items()
                      for target, name in deps
                      if name.startswith("_") and target.split(".")[0] in ("wsss", "tune"))
    assert crossing == []
