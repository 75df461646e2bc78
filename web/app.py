"""create_app(services): the web console as one Starlette application.

Layers, outside in: security headers; a request body limit; the signed-cookie session; the first-run
gate (while no admin exists, every page leads to /setup); the routes. Routes are thin: they read a
form (CSRF-checked), call the services, and render a template. Nothing here writes SQL.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import time_zone
from appliance.address import idn
from appliance.disk_full import is_disk_full
from appliance.plain_errors import plain, queue_error
from appliance.web_sessions import WebSessions
from web.lazy_routes import LazyRoutes
from web.pages import LoginRequired, render, services
from web.routes import login, setup, wellknown
from web.security import SecurityHeadersMiddleware
from web.session import LOGIN_MAX_SECONDS, SessionMiddleware, load_or_create_secret

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

    from appliance.services import Services

HERE = Path(__file__).resolve().parent
log = logging.getLogger("letterbox.web")
MAX_REQUEST_BODY = 256 * 1024  # forms are small; the limit bounds what one request can make us parse
# Reachable before the first admin exists: the wizard itself, its assets, and client autoconfig.
OPEN_BEFORE_SETUP = ("/setup", "/static/", "/.well-known/", "/mail/config-v1.1.xml")
# ...and these in any letter case: Outlook sends /autodiscover/, /Autodiscover/, /AutoDiscover/... (IIS,
# which it was written for, matches paths in any case). Lower case here.
OPEN_BEFORE_SETUP_ANY_CASE = ("/autodiscover/",)
ERROR_TITLES = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Not allowed",
                413: "Too large"}
# Said instead of Starlette's bare reason phrase: a 404 read "Not found" over "Not Found".
ERROR_MESSAGES = {404: "There is no page at this address: the link may be old, or mistyped.",
                  405: "This page does not take that kind of request."}
PHRASES = {status.value: status.phrase for status in HTTPStatus}


class SetupGate:
    """While no admin exists, every page except the wizard redirects to /setup."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self._admin_exists = False  # once true, stays true: the last admin cannot be removed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._admin_exists:
            path = str(scope.get("path", ""))
            if not path.startswith(OPEN_BEFORE_SETUP) and not path.lower().startswith(OPEN_BEFORE_SETUP_ANY_CASE):
                self._admin_exists = await self.services.accounts.has_admin()
                if not self._admin_exists:
                    await RedirectResponse("/setup", status_code=303)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _when(context: Mapping[str, Any], timestamp: int | float | dt.datetime | None) -> str:
    """A time in the box's time zone (the wizard's setting), with the zone's name beside it."""
    if timestamp is None:
        return ""
    request = context.get("request")
    name = services(request).settings.now.time_zone if isinstance(request, Request) else ""
    return time_zone.shown(timestamp, name, seconds=not isinstance(timestamp, dt.datetime))


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)  # pragma: no cover


def make_templates() -> Jinja2Templates:
    import jinja2
    from starlette.templating import Jinja2Templates

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a template mistake fails a test instead of rendering blank
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = jinja2.pass_context(_when)
    env.filters["size"] = _size
    env.filters["idn"] = idn  # international names in Unicode, the xn-- form beside
    env.filters["plain"] = plain  # library error texts (TLS, DNS, sockets) in plain words
    env.filters["queue_error"] = queue_error  # a queue recipient's last error as a sentence
    env.filters["path"] = lambda text: quote(str(text), safe="@")
    return Jinja2Templates(env=env)


class Templates:
    """The console's templates, made at the first page rendered, not at start: jinja2 and its 20
    modules were 1.8 MB of the RSS of a box idle since its start (issue 19's idle target: 60 MB)."""

    def __init__(self) -> None:
        self._made: Jinja2Templates | None = None

    def get(self) -> Jinja2Templates:
        if self._made is None:
            self._made = make_templates()
        return self._made


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if "session" not in request.scope:
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    message = exc.detail
    if message == PHRASES.get(exc.status_code):  # no words of the route's own
        message = ERROR_MESSAGES.get(exc.status_code, "")
    return await render(request, "error.html", {
        "title": ERROR_TITLES.get(exc.status_code, "Error"), "status": exc.status_code, "message": message,
    }, status_code=exc.status_code)


DISK_FULL_MESSAGE = ("The box's disk is full, so this could not be saved. Delete old mail or backups, or move "
                     "the box to a bigger disk, then try again.")


async def _server_error(request: Request, exc: Exception) -> Response:
    """A page that failed: a full disk is said in plain words (507 Insufficient Storage), anything else
    is Starlette's bare 500. Starlette raises the error on after either answer, so it is logged."""
    if not is_disk_full(exc):
        return PlainTextResponse("Internal Server Error", status_code=500)
    if "session" not in request.scope:
        return PlainTextResponse(DISK_FULL_MESSAGE, status_code=507)
    return await render(request, "error.html", {"title": "The disk is full", "status": 507,
                                                "message": DISK_FULL_MESSAGE}, status_code=507)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that went away while its request's body was read (an upload cancelled, a network lost):
    one line, not a traceback of 60 at ERROR, which anyone could have the log fill with. What the route
    had begun is undone by its own cleanup (web/uploads.py removes a file half written); the answer
    goes nowhere."""
    log.info("%s: the client went away during %s %s", request.client.host if request.client else "?",
             request.method, request.url.path)
    return PlainTextResponse("", status_code=400)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    if not exc.next_path:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/@')}", status_code=303)


def lazy(name: str, *paths: str, any_case: tuple[str, ...] = ()) -> LazyRoutes:
    return LazyRoutes(f"web.routes.{name}", paths, any_case)


def routes() -> list[BaseRoute]:
    """In precedence order. The login page, the wizard and the ACME challenge answers are imported with
    the app; every other page's module on its first request (web/lazy_routes.py): a box that has just
    started serves the wizard, or nothing, and its start should not pay for backups, updates, charts."""
    return [
        *login.routes,
        lazy("restore", "/console/backups/*", "/setup/restore*"),
        *setup.routes,
        lazy("console", "/console", "/console/events*", "/console/password", "/console/status/*"),
        lazy("domains", "/console/domains*"),
        lazy("mailboxes", "/console/mailboxes*", "/console/aliases*"),
        lazy("sending", "/console/sending*"),
        lazy("settings", "/console/settings"),
        lazy("account", "/account", "/account/mobileconfig", "/account/password", "/account/certificate.crt"),
        lazy("autoconfig", "/.well-known/autoconfig/*", "/mail/config-v1.1.xml", any_case=OPEN_BEFORE_SETUP_ANY_CASE),
        *wellknown.routes,
        lazy("certificate", "/console/certificate*"),
        lazy("backups", "/console/backups*"),
        lazy("updates", "/console/updates*"),
        lazy("delivery_log", "/console/log", "/account/log"),
        lazy("spam", "/console/spam*", "/account/junk*"),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


def every_route() -> list[BaseRoute]:
    """routes() with each lazy module's own routes in its place (so every module is imported): for the
    tests that walk every page, such as the CSRF and login checks of tests/unit/test_web_security.py."""
    return [inner for route in routes() for inner in (route.routes if isinstance(route, LazyRoutes) else [route])]


def create_app(services: Services) -> Starlette:
    secret = load_or_create_secret(services.config.data.root)
    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(SecurityHeadersMiddleware),
            Middleware(RequestBodyLimitMiddleware, max_body_size=MAX_REQUEST_BODY),
            Middleware(SessionMiddleware, secret=secret),
            Middleware(SetupGate, services=services),
        ],
        exception_handlers={HTTPException: _http_error, LoginRequired: _login_required, ClientDisconnect: _client_gone,
                            Exception: _server_error},
    )
    app.state.services = services
    app.state.secret = secret
    app.state.sessions = WebSessions(services.db, max_age=LOGIN_MAX_SECONDS)
    app.state.templates = Templates()
    return app
