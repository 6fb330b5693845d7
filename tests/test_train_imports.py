"""Imports run one way: a walk over every ``import`` statement of the packages (module level and
inside functions, ``TYPE_CHECKING`` blocks included) finds no cycle between modules, and
``dinov2.train`` / ``dinov2.run`` hold no function-local imports of the project's own modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dinov2", "curation")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, is function-local) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the submodule when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.append((name, node.lineno, node.lineno in local_lines))
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
    modules = set(files)
    edges = {m: _imports(p, modules) for m, p in files.items()}
    # (A package's __init__ re-exporting its submodules is not counted as the submodules importing
    # their package: that order is fixed by Python and is no design dependency.)
    return {m: {t for t, _, _ in e} for m, e in edges.items()}, edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["dinov2.train", "dinov2.run"])
def test_no_import_cycle_through_the_trainer(package):
    graph, _ = _graph()
    bad = [c for c in _cycles(graph) if any(m == package or m.startswith(package + ".") for m in c)]
    assert not bad, f"import cycles through {package}: {bad}"


def test_no_import_cycle_anywhere():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_trainer_has_no_function_local_project_imports():
    _, edges = _graph()
    local = [(m, t, line) for m, e in edges.items() if m.startswith(("dinov2.train", "dinov2.run"))
             for t, line, is_local in e if is_local]
    assert not local, f"function-local imports of project modules (import at the top instead): {local}"
