"""The front door: /, /login, /logout. Admins log in with their name, mailbox owners with their address."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.auth import DEFAULT_POLICY, Device, LoginResult, Principal, Refused, read_device, sign_device
from web.pages import Role, current, log_in, log_out, peer, read_form, redirect, render, services
from web.state import setup_done

MAX_NEXT = 200
RESTORED_NOTICE_SECONDS = 30 * 60  # after a whole-box restore, the login page says why everyone was logged out
ADMIN_PATHS = ("/console", "/setup")
# The browser's proof that it logged in to an account before: its attempts then keep their own budget of
# password checks when that account is under attack (appliance/auth.py). Sent only to /login.
DEVICE_COOKIE = "letterbox_device"
DEVICE_MAX_AGE = int(DEFAULT_POLICY.trust_seconds)


def safe_next(path: str | None) -> str | None:
    """Only a path on this site: never '//host' or a full URL (an open redirect)."""
    if not path or len(path) > MAX_NEXT or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return None
    return path


async def home_for(request: Request) -> str:
    principal = await current(request)
    if principal is None:
        return "/login"
    if principal.role == "user":
        return "/account"
    return "/console" if await setup_done(services(request).settings) else "/setup"


async def index(request: Request) -> Response:
    return redirect(await home_for(request))


async def login_page(request: Request) -> Response:
    if await current(request) is not None:
        return redirect(await home_for(request))
    return await render(request, "login.html", {
        "title": "Log in", "next": safe_next(request.query_params.get("next")), "restored": restored_recently(request),
    })


def restored_recently(request: Request) -> bool:
    """A whole-box restore restarted the box lately: every session is gone, the backup's passwords count."""
    at = services(request).backups.restored_at
    return at is not None and time.time() - at < RESTORED_NOTICE_SECONDS


async def login_submit(request: Request) -> Response:
    form = await read_form(request)
    name = form.get("name", "").strip()[:320]
    password = form.get("password", "")[:1024]
    next_path = safe_next(form.get("next"))
    svc = services(request)
    client = peer(request)
    device = read_device(request.app.state.secret, request.cookies.get(DEVICE_COOKIE), time.time())
    principal: LoginResult = None
    if name and password:
        if "@" in name:
            principal = await svc.auth.login(name, password, "web", client, device=device)
        else:
            principal = await svc.auth.login_admin(name, password, client, device=device)
    if not isinstance(principal, Principal):
        refused = isinstance(principal, Refused)
        return await render(request, "login.html", {
            "title": "Log in", "next": next_path, "values": {"name": name}, "restored": restored_recently(request),
            "errors": {"": principal.message() + "." if isinstance(principal, Refused) else "Wrong name or password."},
        }, status_code=429 if refused else 401)
    role: Role = "admin" if principal.kind == "admin" else "user"
    await log_in(request, principal.name, role)
    await svc.events.record("web", f"login: {principal.name}")
    if next_path and role == "user" and next_path.startswith(ADMIN_PATHS):
        next_path = None  # a mailbox owner who followed an admin link goes to their own page, not a 403
    response = redirect(next_path or await home_for(request))
    remember_device(request, response, principal, device)
    return response


def remember_device(request: Request, response: Response, principal: Principal, device: Device | None) -> None:
    """(Re)sign the device cookie for the account just logged in to, for another DEVICE_MAX_AGE; a browser
    already known keeps its id. One account per browser: the last one logged in to."""
    known = device.id if device is not None and device.account == f"{principal.kind}:{principal.name}" else None
    response.set_cookie(
        DEVICE_COOKIE, sign_device(request.app.state.secret, principal, time.time(), known),
        max_age=DEVICE_MAX_AGE, path="/login", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )


async def logout(request: Request) -> Response:
    """Ends every session of the account on the server (issue 10 item 12): this browser's, a copy of
    its cookie, and the other browsers and devices logged in as the same account."""
    await read_form(request)  # the CSRF check
    principal = await current(request)
    await log_out(request)
    if principal is not None:
        await services(request).events.record("web", f"{principal.name} logged out (every session ended)")
    return redirect("/login")


routes = [
    Route("/", index, methods=["GET"]),
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login_submit, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
