"""/.well-known/acme-challenge/<token>: the ACME http-01 answer (RFC 8555 8.3), served over plain HTTP.

The box's ACME orders (appliance/certificates.py) put the pending answers in the typed service field
`services.certificates.http01` (an order of this process) or the acme_challenges table (an order
started by the CLI in another process); this route only reads them.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from appliance.certificates import pending_http01
from web.pages import services

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # RFC 8555 8.3: base64url characters only


async def acme_challenge(request: Request) -> Response:
    token = str(request.path_params["token"])
    answer = await pending_http01(services(request).certificates, token) if _TOKEN.fullmatch(token) else None
    if answer is None:
        return PlainTextResponse("no such challenge\n", status_code=404)
    return PlainTextResponse(answer, media_type="application/octet-stream")


routes = [Route("/.well-known/acme-challenge/{token}", acme_challenge, methods=["GET"])]
