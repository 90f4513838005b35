"""Dependencies point one way: flows -> stages -> dmsae. The library (`dmsae/`: SAE maths, store, LM plumbing,
config) imports nothing from the stages or the flows, and a stage imports no flow."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def test_the_library_imports_no_stage_and_no_flow():
    offenders = {f: sorted(n & {"stages", "flows"}) for f, n in imported_packages(REPO / "dmsae").items()
                 if n & {"stages", "flows"}}
    assert not offenders


def test_stages_import_no_flow():
    offenders = {f: sorted(n & {"flows"}) for f, n in imported_packages(REPO / "stages").items() if "flows" in n}
    assert not offenders
