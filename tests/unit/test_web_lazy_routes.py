"""web/lazy_routes.py: the console's route modules are imported on their first request, and every route
of each is reachable through the paths its LazyRoutes declares (a page added to a module without a path
in web/app.py would otherwise answer 404)."""

from __future__ import annotations

import re

import pytest
from starlette.routing import BaseRoute, Match, Route

from web.app import routes
from web.lazy_routes import LazyRoutes


def lazy_groups() -> list[LazyRoutes]:
    return [r for r in routes() if isinstance(r, LazyRoutes)]


def example_path(route: Route) -> str:
    """A request path the route matches: each {param} filled with a value its converter accepts."""
    return re.sub(r"\{[^}:]+(:[a-z]+)?\}", lambda m: "1" if m.group(1) == ":int" else "x", route.path)


@pytest.mark.parametrize("group", lazy_groups(), ids=lambda g: g.module)
def test_every_route_of_a_lazy_module_is_covered_by_its_paths(group: LazyRoutes) -> None:
    for route in group.routes:
        assert isinstance(route, Route), route
        path = example_path(route)
        assert group.covers(path), f"{group.module}: {route.path} is not under {group.paths}"
        method = sorted(route.methods or {"GET"})[0]
        scope = {"type": "http", "path": path, "root_path": "", "method": method}
        match = group.matches(scope)[0]
        assert match is Match.FULL, (group.module, route.path)


def test_a_module_is_imported_on_its_first_request_only() -> None:
    group = LazyRoutes("web.routes.updates", ("/console/updates*",))
    scope = {"type": "http", "path": "/console/mailboxes", "root_path": "", "method": "GET"}
    assert group.matches(scope) == (Match.NONE, {})
    assert "loaded=False" in repr(group)
    scope["path"] = "/console/updates"
    match = group.matches(scope)[0]
    assert match is Match.FULL
    assert "loaded=True" in repr(group)
    scope["method"] = "DELETE"  # a path of the module with a method it does not take: 405, as before
    assert group.matches(scope)[0] is Match.PARTIAL


def test_any_case_paths_cover_every_casing_and_nothing_else() -> None:
    group = LazyRoutes("web.routes.autoconfig", ("/mail/config-v1.1.xml",), ("/autodiscover/",))
    for path in ("/autodiscover/autodiscover.xml", "/AutoDiscover/AutoDiscover.xml", "/AUTODISCOVER/x"):
        assert group.covers(path), path
    for path in ("/MAIL/config-v1.1.xml", "/autodiscoverx", "/x/autodiscover/"):
        assert not group.covers(path), path


def test_the_flat_order_is_kept() -> None:
    """The lazy groups stand where the modules' routes stood: the restore pages under /console/backups/
    before the backups module's own, the wizard's restore before /setup/{step}."""
    names = [r.module.rsplit(".", 1)[1] if isinstance(r, LazyRoutes) else getattr(r, "path", "") for r in routes()]
    assert names.index("restore") < names.index("backups")
    assert names.index("restore") < names.index("/setup/{step}")
    assert all(isinstance(r, BaseRoute) for r in routes())
