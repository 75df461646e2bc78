"""A signed-cookie session (itsdangerous): the session's small data (CSRF token, flash messages, the
login's token) lives in the cookie, signed with a secret kept in the data directory, so restarts keep
people logged in. A login itself is valid only while its server-side row exists
(appliance/web_sessions.py, checked by web/pages.py): the server can end it, a copied cookie included.

The cookie is HttpOnly, SameSite=Lax, Secure and named with the __Host- prefix when the request came over
HTTPS, and expires after
SESSION_IDLE_SECONDS without a request (each response re-signs it). A login also ends after
LOGIN_MAX_SECONDS whatever the activity (checked by web/pages.py against the login time it stores).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "letterbox_session"  # over plain HTTP, where the box serves no page that has a session
# Over HTTPS: a browser takes a __Host- cookie only from this very host, over HTTPS, with Path=/ and no
# Domain. Without it a sibling site (blog.example.org beside mail.example.org) could plant its own session
# cookie for the whole domain, and of two cookies of one name the last sent wins: the browser was in the
# attacker's session, logged in to the attacker's mailbox, without a form or a click.
SECURE_COOKIE_NAME = f"__Host-{COOKIE_NAME}"
SESSION_IDLE_SECONDS = 2 * 3600
LOGIN_MAX_SECONDS = 12 * 3600
MAX_COOKIE_BYTES = 4000  # browsers drop larger cookies; a session here is a few hundred bytes
SECRET_FILE = "web-session.key"  # noqa: S105  a file name, not a secret
SECRET_BYTES = 32
_SALT = "letterbox.session"


def load_or_create_secret(data_root: Path) -> str:
    """The signing secret, generated once (0600) in the data directory and reused after."""
    path = data_root / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) >= SECRET_BYTES:
            return secret
        raise RuntimeError(f"{path} is damaged (too short): remove it to make a new one") from None
    secret = secrets.token_hex(SECRET_BYTES)
    try:
        os.write(fd, secret.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


class SessionMiddleware:
    """scope["session"]: a dict, read from the cookie and written back on every response."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.serializer = URLSafeTimedSerializer(secret, salt=_SALT)

    def _load(self, raw: str | None) -> dict[str, Any]:
        if not raw or len(raw) > MAX_COOKIE_BYTES:
            return {}
        try:
            data = self.serializer.loads(raw, max_age=SESSION_IDLE_SECONDS)
        except BadSignature:  # includes SignatureExpired
            return {}
        return data if isinstance(data, dict) else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        https = scope.get("scheme") == "https"
        name, secure = (SECURE_COOKIE_NAME, "; Secure") if https else (COOKIE_NAME, "")
        had_cookie = name in connection.cookies
        session = self._load(connection.cookies.get(name))
        scope["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                current: dict[str, Any] = scope["session"]
                if current:
                    value = self.serializer.dumps(current)
                    headers.append(
                        "Set-Cookie",
                        f"{name}={value}; Path=/; Max-Age={SESSION_IDLE_SECONDS}; HttpOnly; "
                        f"SameSite=Lax{secure}",
                    )
                elif had_cookie:
                    headers.append(
                        "Set-Cookie",
                        f"{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
                    )
            await send(message)

        await self.app(scope, receive, send_with_cookie)
