"""A route module imported on the first request for one of its pages (issue 15).

The console's pages pull in most of the box (backups with age and zstandard, updates, certificates,
charts...), and a box that has just started serves the wizard or nothing at all: `LazyRoutes` stands
in the route list where a module's routes were, answers `matches` by the path alone until a request
for one of the module's paths arrives, then imports the module once and routes as its routes would.
Order and precedence stay those of the flat list: the first full match wins, else the first partial
one (a wrong method: 405), exactly as starlette's Router does over the module's own routes.

`paths` says which request paths can belong to the module: an entry matches itself, and an entry
ending in `*` every path that starts with what is before it; `any_case` entries (prefixes, `*`-less)
match in any letter case, for the routes that do too (Outlook's autodiscover). tests/unit/test_web_lazy_routes.py
checks that every route of each module is covered, so a page added to a module without a path here
fails a test rather than answering 404.
"""

from __future__ import annotations

import importlib
from typing import Any

from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

_MATCHED = "letterbox.lazy_route"  # the scope key that carries the matched inner route to handle()


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's, less where the app is mounted (as starlette's Router)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class LazyRoutes(BaseRoute):
    def __init__(self, module: str, paths: tuple[str, ...], any_case: tuple[str, ...] = ()) -> None:
        self.module = module
        self.paths = paths
        self._exact = frozenset(p for p in paths if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._any_case = tuple(p.lower() for p in any_case)
        self._routes: list[BaseRoute] | None = None

    def covers(self, path: str) -> bool:
        return (path in self._exact or path.startswith(self._prefixes)
                or path.lower().startswith(self._any_case))  # () matches nothing

    @property
    def routes(self) -> list[BaseRoute]:
        if self._routes is None:
            loaded: list[BaseRoute] = importlib.import_module(self.module).routes
            self._routes = loaded
        return self._routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or not self.covers(route_path(scope)):
            return Match.NONE, {}
        partial: tuple[Match, Scope] = (Match.NONE, {})
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return match, {**child, _MATCHED: route}
            if match is Match.PARTIAL and partial[0] is Match.NONE:
                partial = (match, {**child, _MATCHED: route})
        return partial

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: BaseRoute = scope.pop(_MATCHED)
        scope["route"] = route
        await route.handle(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        for route in self.routes:
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                continue
        raise NoMatchFound(name, path_params)

    def __repr__(self) -> str:
        return f"LazyRoutes({self.module!r}, loaded={self._routes is not None})"
