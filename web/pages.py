"""What every route shares: who is logged in, role checks, reading a form (with its CSRF token),
rendering a template, flash messages, redirects."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from appliance.account_errors import AccountError
from appliance.admin import Admin
from appliance.version import running_version
from appliance.web_sessions import Kind, WebSessions
from web.forms import check_password, secret
from web.security import CSRF_FIELD, FORM_EXPIRED, csrf_ok, csrf_token, refuse_other_sites
from web.session import LOGIN_MAX_SECONDS

if TYPE_CHECKING:
    from appliance.services import Services
    from web.app import Templates

Role = Literal["admin", "user"]
MAX_FORM_FIELDS = 50
MAX_FORM_PART = 64 * 1024
MAX_FLASHES = 5
_LOGIN_KEYS = ("sid", "user", "role", "at")


@dataclass(frozen=True)
class Principal:
    name: str  # admin user name, or canonical mailbox address
    role: Role


class LoginRequired(Exception):
    """Raised by require(): the exception handler sends the browser to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def admin(request: Request) -> Admin:
    """The box's use-cases (appliance/admin.py), the same functions the CLI calls."""
    return Admin.of(services(request))


def _sessions(request: Request) -> WebSessions:
    return request.app.state.sessions  # type: ignore[no-any-return]


def _kind(role: Role) -> Kind:
    return "admin" if role == "admin" else "mailbox"


async def _account_enabled(request: Request, name: str, role: Role) -> bool:
    accounts = services(request).accounts
    creds = await (accounts.admin_credentials(name) if role == "admin" else accounts.mailbox_credentials(name))
    return creds is not None and creds.enabled


async def log_in(request: Request, name: str, role: Role) -> None:
    """A fresh session (new CSRF token too) for this principal. The cookie carries only the token of a
    server-side session (appliance/web_sessions.py), which logout, a password change or disabling the
    account ends, whoever holds a copy of the cookie."""
    await end_session(request)
    token = await _sessions(request).open(_kind(role), name)
    request.session.update(sid=token, user=name, role=role, at=int(time.time()))
    csrf_token(request.session)


async def refresh_login(request: Request) -> None:
    """After the logged-in person changed their own password (which ended every session of the
    account, this one too): a new session here, so they stay logged in; the others stay ended."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        await log_in(request, principal.name, principal.role)
        request.state.principal = principal


async def end_session(request: Request) -> None:
    """Forget the login here and end it on the server: a copy of the cookie is worth nothing after."""
    token = request.session.get("sid")
    if isinstance(token, str):
        await _sessions(request).end(token)
    request.session.clear()
    request.state.principal = None


async def log_out(request: Request) -> None:
    """End every session of the logged-in account (other browsers and devices too), then this one."""
    principal = await current(request)
    if principal is not None:
        await _sessions(request).end_all(_kind(principal.role), principal.name)
    await end_session(request)


async def current(request: Request) -> Principal | None:
    """The logged-in principal, or None (and the login is forgotten) when the session was ended or
    expired, or the account is gone or disabled."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    session = request.session
    token, name, role, at = session.get("sid"), session.get("user"), session.get("role"), session.get("at")
    if not isinstance(token, str) or not isinstance(name, str) or role not in ("admin", "user") \
            or not isinstance(at, int):
        for key in _LOGIN_KEYS:
            session.pop(key, None)
        return None
    stored = await _sessions(request).get(token)
    valid = (stored is not None and stored.kind == _kind(role) and stored.name == name
             and time.time() - stored.created_at <= LOGIN_MAX_SECONDS and await _account_enabled(request, name, role))
    if not valid:
        for key in _LOGIN_KEYS:
            session.pop(key, None)
        return None
    principal = Principal(name, role)
    request.state.principal = principal
    return principal


def _return_path(request: Request) -> str:
    """Where the login sends the browser back to: the page asked for; for a form sent without a
    session (it ended in another tab, or by a password change), the page the form was on, as the
    browser's same-origin Referer names it. The form's own address answers only POST: the login led to
    a "Not allowed" page (405) there, with nothing done. '' when no page is known (then: home)."""
    if request.method in ("GET", "HEAD"):
        return request.url.path
    sent_from = urlsplit(request.headers.get("referer", ""))
    if sent_from.netloc == request.url.netloc and sent_from.path.startswith("/"):
        return unquote(sent_from.path)  # as request.url.path is: quoted once, by the redirect
    return ""


async def require(request: Request, role: Role) -> Principal:
    principal = await current(request)
    if principal is None:
        raise LoginRequired(_return_path(request))
    if principal.role != role:
        raise HTTPException(403, "This page is for the box's administrators." if role == "admin"
                            else "This page is for mailbox owners: log in with your mail address.")
    return principal


async def read_form(request: Request) -> dict[str, str]:
    """The submitted fields as text; 403 unless the form carries this session's CSRF token and came from
    this site's own page."""
    refuse_other_sites(request)
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_PART)
    except HTTPException:
        raise
    except Exception as exc:  # malformed multipart, too many fields: the client's fault
        raise HTTPException(400, "The form could not be read.") from exc
    values = {key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)}
    if not csrf_ok(request.session, values.get(CSRF_FIELD)):
        raise HTTPException(403, FORM_EXPIRED)
    return values


def peer(request: Request) -> str:
    """The client's address, as the auth throttle and the log know it."""
    return request.client.host if request.client else "unknown"


async def change_own_password(
    values: Mapping[str, str],
    name: str,
    verify: Callable[[str], Awaitable[object | None]],
    store: Callable[[str], Awaitable[object]],
) -> dict[str, str]:
    """The "your password" form of users and admins: the current password must verify (through the
    throttled auth service), the new one pass the strength check; errors by field, {} once stored."""
    if await verify(secret(values, "current")) is None:
        return {"current": "this is not your current password"}
    password = secret(values, "password")
    errors = check_password(password, secret(values, "password2"), name)
    if not errors:
        try:
            await store(password)
        except AccountError as exc:
            errors = {"password": str(exc)}
    return errors


@dataclass(frozen=True)
class Flash:
    """A message for the next page: what was done (green), or, with `problem`, why it was not (red,
    read out at once by screen readers)."""

    text: str
    problem: bool = False


def flash(request: Request, message: str, *, problem: bool = False) -> None:
    messages = list(request.session.get("flash", []))[-MAX_FLASHES + 1:]
    request.session["flash"] = [*messages, [message, "problem"] if problem else message]


def _flashes(stored: object) -> list[Flash]:
    """The session's messages: a text, or [text, "problem"]."""
    found = []
    for item in stored if isinstance(stored, list) else []:
        if isinstance(item, str):
            found.append(Flash(item))
        elif isinstance(item, list) and item and isinstance(item[0], str):
            found.append(Flash(item[0], problem="problem" in item[1:]))
    return found


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


async def removed(request: Request, removal: Awaitable[object], *, what: str, verb: str, back: str) -> Response:
    """The POST after a confirmation page: remove (the use-case records its event), say so, back to
    the list. An AccountError (e.g. a domain that still has mailboxes) is shown instead."""
    try:
        await removal
    except AccountError as exc:
        flash(request, f"Not {verb}: {exc}", problem=True)
        return redirect(back)
    flash(request, f"{what[:1].upper()}{what[1:]} {verb}.")
    return redirect(back)


async def render(
    request: Request, template: str, context: Mapping[str, Any] | None = None, status_code: int = 200
) -> Response:
    templates: Templates = request.app.state.templates
    flashes = request.session.pop("flash", [])
    full = {
        "principal": await current(request),
        "csrf_token": csrf_token(request.session),
        "hostname": services(request).hostname,
        "letterbox_version": running_version(),
        "flashes": _flashes(flashes),
        "errors": {},
        "values": {},
        **(context or {}),
    }
    return templates.get().TemplateResponse(request, template, full, status_code=status_code)
