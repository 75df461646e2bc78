"""The shape the code keeps (issue 12): web routes only parse, call appliance/admin.py (or another
appliance module) and render; they never import one another, so a use-case has one home."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTES = Path(__file__).resolve().parents[2] / "web" / "routes"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_routes_never_import_routes() -> None:
    files = sorted(p for p in ROUTES.glob("*.py") if p.name != "__init__.py")
    assert files
    offenders = {p.name: sorted(n for n in _imports(p) if n.startswith("web.routes")) for p in files}
    assert {name: found for name, found in offenders.items() if found} == {}
