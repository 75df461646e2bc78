"""The certificate actions behind the console's Certificate page and the wizard's step 4 (both call
these with the page to go back to): each is an Admin use-case (appliance/admin.py), shared by the CLI."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from appliance import acme_terms, certificates
from appliance.tls import CertificateProblem
from web.pages import admin, flash, read_form, redirect, services

CA_CHOICES = {
    "letsencrypt": acme_terms.LETS_ENCRYPT,
    "staging": acme_terms.LETS_ENCRYPT_STAGING,
}
MAX_PEM_FIELD = 60 * 1024


async def page_context(request: Request) -> dict[str, object]:
    svc = services(request)
    status = await admin(request).certificate_status()
    directory = status.directory
    ca = next((k for k, v in CA_CHOICES.items() if v == directory), "custom")
    running = status.order.phase in ("pending", "validating") and svc.certificates.running is not None \
        and not svc.certificates.running.done()
    return {
        "status": status, "cert": status.info, "running": running, "ca": ca, "directory": directory,
        "email": await svc.db.get_setting(certificates.EMAIL) or "",
        "eab_kid": await svc.db.get_setting(certificates.EAB_KID) or "",
        "challenge": await svc.db.get_setting(certificates.CHALLENGE) or acme_terms.HTTP_01,
        "port80": svc.config.port("http"), "port443": svc.config.port("https"),
    }


def _directory(values: dict[str, str]) -> str | None:
    choice = values.get("ca", "letsencrypt")
    if choice == "custom":
        url = values.get("directory", "").strip()
        if not url.startswith("https://") or len(url) > 500:
            raise ValueError("Enter the directory URL of your CA (it starts with https://).")
        return url
    return CA_CHOICES.get(choice, acme_terms.LETS_ENCRYPT)


async def order(request: Request, back: str) -> Response:
    values = await read_form(request)
    try:
        directory = _directory(values)
    except ValueError as exc:
        flash(request, str(exc), problem=True)
        return redirect(back)
    challenge = values.get("challenge", acme_terms.HTTP_01)
    if challenge not in (acme_terms.HTTP_01, acme_terms.TLS_ALPN_01):
        challenge = acme_terms.HTTP_01
    options: dict[str, str | None] = {
        "directory": directory, "email": values.get("email", "").strip()[:254], "challenge": challenge,
    }
    if values.get("eab_kid", "").strip():
        options["eab_kid"] = values["eab_kid"].strip()[:200]
        options["eab_hmac_key"] = values.get("eab_hmac_key", "").strip()[:200]
    if not await admin(request).start_certificate_request(**options):
        flash(request, "An order is already running: wait for it to finish.", problem=True)
    return redirect(back)


async def check(request: Request, back: str) -> Response:
    """The check list's first item, tried now: do the names lead to this box? (Port 80 cannot be tested
    from inside the network: only the CA's connection shows it.)"""
    svc = services(request)
    await read_form(request)
    try:
        names = await certificates.check_names(svc.certificates, list(await svc.accounts.list_domains()))
    except acme_terms.AcmeProblem as exc:
        flash(request, f"Not ready: {exc.message}", problem=True)
        return redirect(back)
    text = f"Ready: {', '.join(names.names)} lead{'s' if len(names.names) == 1 else ''} to this box."
    if names.left_out:
        text += " Left out: " + "; ".join(names.left_out) + "."
    flash(request, text)
    return redirect(back)


async def upload(request: Request, back: str) -> Response:
    values = await read_form(request)
    cert, key, chain = (values.get(name, "").strip() for name in ("cert", "key", "chain"))
    if not cert or not key:
        flash(request, "Not installed: paste both the certificate and its private key.", problem=True)
        return redirect(back)
    if max(len(cert), len(key), len(chain)) > MAX_PEM_FIELD:
        flash(request, "Not installed: that is too large to be a certificate.", problem=True)
        return redirect(back)
    try:
        info = await admin(request).import_certificate(cert.encode(), key.encode(), chain.encode())
    except CertificateProblem as exc:
        flash(request, f"Not installed: {exc}", problem=True)
        return redirect(back)
    except UnicodeEncodeError:
        flash(request, "Not installed: the text is not a PEM certificate.", problem=True)
        return redirect(back)
    flash(request, f"Installed: the certificate for {', '.join(info.names)} is served from now on.")
    return redirect(back)


async def self_signed(request: Request, back: str) -> Response:
    await read_form(request)
    await admin(request).self_signed_certificate()
    flash(request, "A new self-signed certificate is served from now on.")
    return redirect(back)
