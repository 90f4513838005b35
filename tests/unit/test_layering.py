"""Dependencies point one way: flows -> stages -> dmsae. The library (`dmsae/`: SAE maths, training, evaluation,
store, LM plumbing, config, reports) imports nothing from the stages or the flows, a stage imports no flow and no
other stage (what stages share lives in the library), and the library's modules import each other without a cycle.

Imports are read with `ast` at any depth of a module (function-level imports included), so a lazy import
counts like a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """file -> top-level packages it imports (absolute imports, at any depth of the module)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


def module_name(path: Path) -> str:
    """dmsae/eval/probing.py -> dmsae.eval.probing; dmsae/eval/__init__.py -> dmsae.eval."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names a module imports, relative imports resolved: for `from a.b import c`, both `a.b` and
    `a.b.c` (c may be a module or a name in a.b; callers keep the ones that are modules)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def module_graph(folder: Path) -> dict[str, set[str]]:
    """module -> the modules of `folder`'s package it imports, each with the packages above it (importing
    a.b.c runs a/__init__ and a/b/__init__ first)."""
    modules = {module_name(p): p for p in sorted(folder.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for imported in imported_modules(path):
            parts = imported.split(".")
            targets |= {m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules}
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_library_imports_no_stage_and_no_flow():
    offenders = {f: sorted(n & {"stages", "flows"}) for f, n in imported_packages(REPO / "dmsae").items()
                 if n & {"stages", "flows"}}
    assert not offenders


def test_reports_import_no_flow_and_no_stage():
    """The reports read the store through `dmsae.readers` and `dmsae.plan`, never through the flows or stages."""
    reports = REPO / "dmsae" / "reports"
    offenders = {f: sorted(n & {"stages", "flows"}) for f, n in imported_packages(reports).items()
                 if n & {"stages", "flows"}} if reports.is_dir() else {}
    assert not offenders


def test_stages_import_no_flow():
    offenders = {f: sorted(n & {"flows"}) for f, n in imported_packages(REPO / "stages").items() if "flows" in n}
    assert not offenders


def test_stages_import_no_other_stage():
    """A stage imports the library only: what two stages share belongs in `dmsae/`."""
    offenders = {}
    for path in sorted((REPO / "stages").glob("*.py")):
        stage_imports = {m for m in imported_modules(path) if m == "stages" or m.startswith("stages.")}
        # `import stages` / `from stages import x` / `from . import x` all name the package or a stage in it
        if stage_imports:
            offenders[path.name] = sorted(stage_imports)
    assert not offenders


def test_the_library_has_no_import_cycle():
    graph = module_graph(REPO / "dmsae")
    assert "dmsae.sae" in graph and "dmsae.readers" in graph["dmsae.training"]  # the graph sees real imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
