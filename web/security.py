"""Security headers on every response; the CSRF token every form carries, and the browser's own word on
where a form came from."""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# No inline script or style anywhere: everything comes from /static. Forms post only to the box.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP 2
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# No Strict-Transport-Security: the box starts with a self-signed certificate, and HSTS would stop a
# browser from letting its owner past the warning to reach the wizard at all.

CSRF_FIELD = "csrf"
CSRF_SESSION_KEY = "csrf"
FORM_EXPIRED = "This form has expired or came from another site. Reload the page and try again."
# Sec-Fetch-Site values of a request this site's own pages made, or the person made ("none": a bookmark,
# the address bar). "same-site" is refused too: a sibling name (blog.example.org beside the box's
# mail.example.org) is another origin, whose page can plant a cookie on the box's name.
OWN_FETCHES = ("same-origin", "none")


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    # Pages show accounts and settings: keep them out of shared and back-button caches.
                    path = str(scope.get("path", ""))
                    headers["Cache-Control"] = "public, max-age=3600" if path.startswith("/static/") else "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def csrf_token(session: dict[str, Any]) -> str:
    """The session's token, made on first use (a form shown to someone not logged in gets one too)."""
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def csrf_ok(session: dict[str, Any], submitted: str | None) -> bool:
    expected = session.get(CSRF_SESSION_KEY)
    if not isinstance(expected, str) or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def made_by_another_site(request: Request) -> bool:
    """Whether the browser says a page of another origin sent this request: Sec-Fetch-Site, which every
    current browser sends and a page cannot forge; else Origin against the Host the request came to
    (Go 1.25's CrossOriginProtection rule, which does not trust a Host-rewriting proxy's Origin either).
    A request with neither (curl, a mail program, an old browser) is not judged here: its CSRF token is."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.lower() not in OWN_FETCHES
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()  # "null" too


def refuse_other_sites(request: Request) -> None:
    """The first step of reading any form: a form posted by another site's page is refused before its
    body is read (an upload's file too), even with a token it got hold of, as by a cookie that a sibling
    site planted (SameSite=Lax lets a same-site form through with it)."""
    if made_by_another_site(request):
        raise HTTPException(403, FORM_EXPIRED)
