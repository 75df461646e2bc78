"""/.well-known/acme-challenge/<token>: the ACME http-01 answer (RFC 8555 8.3), served over plain HTTP.

The ACME client of the box puts the pending challenges in services.extra[ACME_CHALLENGES] (token ->
key authorization) while an order is open; this route only reads them.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from web.pages import services

ACME_CHALLENGES = "acme_http01"  # services.extra: dict[str, str], token -> key authorization
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # RFC 8555 8.3: base64url characters only


async def acme_challenge(request: Request) -> Response:
    token = str(request.path_params["token"])
    pending = services(request).extra.get(ACME_CHALLENGES) or {}
    answer = pending.get(token) if _TOKEN.fullmatch(token) else None
    if not isinstance(answer, str):
        return PlainTextResponse("no such challenge\n", status_code=404)
    return PlainTextResponse(answer, media_type="application/octet-stream")


routes = [Route("/.well-known/acme-challenge/{token}", acme_challenge, methods=["GET"])]
