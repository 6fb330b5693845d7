"""The import graph of the packages: no cycles, and dependencies that run one way.

Every module of ``dinov2``, ``curation`` and ``demo`` is parsed (nothing is imported), including
function-local imports, which is where cycles hide.  ``from pkg import name`` counts as an import
of ``pkg.name`` when that is a module, else of ``pkg``.  The layers: ``dinov2`` (backbone, trainer,
shard format) never imports ``curation`` or ``demo``; ``curation`` uses the trainer's code only
through ``load_pretrained`` and the shared low-level modules; ``demo`` may use both.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dinov2", "curation", "demo")
# What curation may import from dinov2: shared utilities, the decoder and the shard format, and
# ``load_pretrained`` from the backbone package (nothing else of it).
CURATION_MAY_USE = ("dinov2.utils", "dinov2.data.decode", "dinov2.data.shards")
BACKBONE_MODULES = ("dinov2.models", "dinov2.models.checkpoint")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


Graph = dict[str, set[str]]
Names = dict[tuple[str, str], set[str]]
LocalImports = dict[str, list[tuple[str, int]]]


def _function_local_lines(tree: ast.Module) -> set[int]:
    return {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}


def import_graph(root: Path, packages=PACKAGES) -> tuple[Graph, Names, LocalImports]:
    """(module → modules it imports, (module, imported) → names taken with ``from … import``,
    module → (imported module, line) of its imports inside functions)."""
    mods = module_files(root, packages)
    graph: Graph = {m: set() for m in mods}
    names: Names = {}
    local: LocalImports = {m: [] for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        local_lines = _function_local_lines(tree)
        for node in ast.walk(tree):
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    base = ".".join(pkg_parts + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append((sub, None) if sub in mods else (base, a.name))
            for target, taken in targets:
                dst = _resolve(target, mods)
                if dst is None or dst == mod:
                    continue
                graph[mod].add(dst)
                if taken:
                    names.setdefault((mod, dst), set()).add(taken)
                if node.lineno in local_lines:
                    local[mod].append((dst, node.lineno))
    return graph, names, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def _is_trainer(mod: str) -> bool:
    return mod == "dinov2.train" or mod.startswith("dinov2.train.")


def test_walker_sees_function_local_and_relative_imports(tmp_path):
    """The checks below can fail: a cycle through a function-local relative import is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("import pkg.c\n\ndef g():\n    pass\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    g, _, local = import_graph(tmp_path, ("pkg",))
    assert g["pkg.a"] == {"pkg.b"} and g["pkg.b"] == {"pkg.c"} and g["pkg.c"] == {"pkg.a"}
    assert local == {"pkg": [], "pkg.a": [("pkg.b", 2)], "pkg.b": [], "pkg.c": []}
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "c.py").write_text("")
    assert cycles(import_graph(tmp_path, ("pkg",))[0]) == []


def test_no_import_cycles(graph):
    found = [c for c in cycles(graph[0]) if not any(_is_trainer(m) for m in c)]
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_no_import_cycles_in_trainer(graph):
    found = [c for c in cycles(graph[0]) if any(_is_trainer(m) for m in c)]
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_dinov2_never_imports_curation_or_demo(graph):
    bad = sorted((m, d) for m, deps in graph[0].items() if m.split(".")[0] == "dinov2"
                 for d in deps if d.split(".")[0] in ("curation", "demo"))
    assert not bad, f"dinov2 → curation/demo imports: {bad}"


def test_curation_uses_the_trainer_only_through_narrow_interfaces(graph):
    g, names, _ = graph
    bad = []
    for mod, deps in g.items():
        if mod.split(".")[0] != "curation":
            continue
        for d in deps:
            if d.split(".")[0] == "demo":
                bad.append((mod, d))
            elif d in BACKBONE_MODULES:
                if names.get((mod, d), set()) != {"load_pretrained"}:
                    bad.append((mod, f"{d}: {sorted(names.get((mod, d), ['<module>']))}"))
            elif d.split(".")[0] == "dinov2" and not any(d == ok or d.startswith(ok + ".") for ok in CURATION_MAY_USE):
                bad.append((mod, d))
    assert not bad, f"curation imports beyond {CURATION_MAY_USE} (+ load_pretrained): {bad}"


def test_trainer_and_launcher_have_no_function_local_project_imports(graph):
    """Function-local imports are where cycles hide; the trainer and launcher import at the top."""
    local = [(m, d, line) for m, found in graph[2].items() if m.startswith(("dinov2.train", "dinov2.run"))
             for d, line in found]
    assert not local, f"function-local imports of project modules (import at the top instead): {local}"
