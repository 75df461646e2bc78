"""Console URLs that carry an address or a domain as one path segment, and reading them back."""

from __future__ import annotations

import contextlib
from urllib.parse import quote, unquote

from starlette.requests import Request


def segment(value: str) -> str:
    """An address as one URL path segment: '/', '%', '?', '#', spaces and non-ASCII percent-encoded
    (RFC 3986 3.3), '@' and '+' kept for readability. The routes take the rest of the path
    ({name:path}), since the server decodes '%2F' back into '/' before routing (issue 11 item 5)."""
    return quote(value, safe="@+")


def path_address(request: Request, name: str) -> str:
    """The address in the path, decoded exactly once from the raw path when it came as one encoded
    segment (`/console/<section>/<segment>[/<action>]`): a literal '%2F' in an alias stays '%2F'
    whatever the server (or a test client) did with the decoded path. Else the route's parameter."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        parts = raw.decode("latin-1").partition("?")[0].split("/")
        if len(parts) in (4, 5) and parts[3]:
            with contextlib.suppress(UnicodeDecodeError):
                return unquote(parts[3], errors="strict")
    return str(request.path_params[name])


def mailbox_url(address: str, action: str = "") -> str:
    return f"/console/mailboxes/{segment(address)}{'/' + action if action else ''}"


def alias_url(source: str, action: str = "") -> str:
    return f"/console/aliases/{segment(source)}{'/' + action if action else ''}"
