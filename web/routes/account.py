"""/account: a mailbox owner's own page: client settings, password change, Apple profile."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.store.model import StoreError
from web.clients import mobileconfig
from web.console_data import client_settings_for
from web.display import attachment
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
CERTIFICATE_TYPE = "application/x-x509-ca-cert"  # what Android and desktop systems offer to install
PEM_END = b"-----END CERTIFICATE-----"


def fingerprint_words(hex_digest: str) -> str:
    """A SHA-256 fingerprint as mail programs show it (Thunderbird, Apple): AB:CD:... in capitals."""
    return ":".join(hex_digest[i:i + 2] for i in range(0, len(hex_digest), 2)).upper()


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
    cert = svc.tls.info()
    return await render(request, "account.html", {
        "title": "Your mailbox", "mailbox": info, "settings": client_settings_for(svc), "used": used,
        "quota": quota, "errors": errors or {}, "self_signed": cert.self_signed, "junk": junk,
        "fingerprint": fingerprint_words(cert.fingerprint),
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
                    headers={"Content-Disposition": attachment(filename)})


async def certificate(request: Request) -> Response:
    """The certificate the box serves (its first, its own, without the chain), for a program that trusts a
    self-signed certificate only from a file: mbsync's CertificateFile, Android's "install a certificate"."""
    await require(request, "user")
    svc = services(request)
    pem = await asyncio.to_thread(svc.tls.cert_path.read_bytes)
    leaf = pem[:pem.index(PEM_END) + len(PEM_END)] + b"\n"
    filename = svc.tls.info().names[0] if svc.tls.info().names else "letterbox"
    return Response(leaf, media_type=CERTIFICATE_TYPE,
                    headers={"Content-Disposition": attachment(f"{filename}.crt")})


routes = [
    Route("/account", account_page, methods=["GET"]),
    Route("/account/password", password_submit, methods=["POST"]),
    Route("/account/mobileconfig", profile, methods=["GET"]),
    Route("/account/certificate.crt", certificate, methods=["GET"]),
]
