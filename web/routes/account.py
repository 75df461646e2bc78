"""/account: a mailbox owner's own page: client settings, password change, Apple profile."""

from __future__ import annotations

import contextlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.store.model import StoreError
from web.clients import mobileconfig
from web.console_data import client_settings_for
from web.pages import (
    admin,
    change_own_password,
    flash,
    peer,
    read_form,
    redirect,
    refresh_login,
    render,
    require,
    services,
)

MOBILECONFIG_TYPE = "application/x-apple-aspen-config"


async def account_page(request: Request, errors: dict[str, str] | None = None) -> Response:
    principal = await require(request, "user")
    svc = services(request)
    info = await svc.accounts.get_user(principal.name)
    used = quota = 0
    junk: int | None = None
    with contextlib.suppress(StoreError):  # the page is still useful without the figures
        used, quota = await svc.store.usage(principal.name)
        if svc.spam_content is not None:
            junk = await svc.spam_content.junk_count(principal.name)
    return await render(request, "account.html", {
        "title": "Your mailbox", "mailbox": info, "settings": client_settings_for(svc), "used": used,
        "quota": quota, "errors": errors or {}, "self_signed": svc.tls.info().self_signed, "junk": junk,
    }, status_code=400 if errors else 200)


async def password_submit(request: Request) -> Response:
    principal = await require(request, "user")
    values = await read_form(request)
    svc = services(request)
    errors = await change_own_password(
        values, principal.name,
        lambda current: svc.auth.verify(principal.name, current, "web", peer(request)),
        lambda password: admin(request).set_mailbox_password(principal.name, password, by_owner=True),
    )
    if errors:
        return await account_page(request, errors)
    await refresh_login(request)
    flash(request, "Your password was changed. Use the new one in your mail programs too.")
    return redirect("/account")


async def profile(request: Request) -> Response:
    principal = await require(request, "user")
    svc = services(request)
    info = await svc.accounts.get_user(principal.name)
    body = mobileconfig(principal.name, info.display_name if info else "", client_settings_for(svc))
    filename = principal.name.replace("@", "_at_") + ".mobileconfig"
    return Response(body, media_type=MOBILECONFIG_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


routes = [
    Route("/account", account_page, methods=["GET"]),
    Route("/account/password", password_submit, methods=["POST"]),
    Route("/account/mobileconfig", profile, methods=["GET"]),
]
