"""The shape the code keeps (issue 12): web routes only parse, call appliance/admin.py (or another
appliance module) and render; they never import one another, so a use-case has one home."""

from __future__ import annotations

import ast
import re
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


STORE = ROUTES.parents[1] / "appliance" / "store"
ACCOUNT_TABLES = re.compile(r"\b(FROM|JOIN|INTO|UPDATE)\s+(mailboxes|domains|aliases|alias_targets|admins)\b", re.I)


def test_the_store_asks_the_accounts_through_one_interface() -> None:
    """The mail store knows a mailbox only through store.model.MailboxDirectory (issue 12): it never
    imports the accounts layer and never reads or writes the accounts' tables itself."""
    files = sorted(STORE.glob("*.py"))
    assert files
    importing = {p.name for p in files if any(n.startswith("appliance.accounts") for n in _imports(p))}
    querying = {p.name for p in files if ACCOUNT_TABLES.search(p.read_text())}
    assert (importing, querying) == (set(), set())
