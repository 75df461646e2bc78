"""Client autoconfiguration: Thunderbird (both URLs it tries), Outlook's autodiscover POST.

These answer anyone, over HTTP too (Thunderbird asks autoconfig.<domain> over plain HTTP): they only
say which host and ports serve a domain, which its DNS records publish anyway. Addresses that are not
in one of the box's domains get 404, so the box does not describe itself for strangers' domains.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.account_errors import AccountError
from appliance.address import parse_address
from web.clients import (
    MAX_AUTODISCOVER_REQUEST,
    autodiscover_address,
    autodiscover_response,
    thunderbird_config,
)
from web.console_data import client_settings_for
from web.pages import services

XML = "application/xml"
AUTOCONFIG_PREFIXES = ("autoconfig.", "autodiscover.")


async def _local_domain_of(request: Request, address: str | None) -> str | None:
    accounts = services(request).accounts
    if address:
        try:
            domain = parse_address(address.strip()).domain
        except AccountError:
            return None
        return domain if await accounts.is_local_domain(domain) else None
    host = (request.url.hostname or "").lower()
    for prefix in AUTOCONFIG_PREFIXES:
        if host.startswith(prefix):
            host = host[len(prefix):]
    if await accounts.is_local_domain(host):
        return host
    domains = await accounts.list_domains()
    return domains[0] if len(domains) == 1 else None  # a box with one domain answers for it


def _not_found() -> Response:
    return Response("no mail settings for this address\n", status_code=404, media_type="text/plain")


async def thunderbird(request: Request) -> Response:
    address = request.query_params.get("emailaddress")
    domain = await _local_domain_of(request, address)
    if domain is None:
        return _not_found()
    return Response(thunderbird_config(domain, client_settings_for(services(request))), media_type=XML)


async def _read_limited(request: Request) -> bytes | None:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_AUTODISCOVER_REQUEST:
            return None
    return body


async def autodiscover(request: Request) -> Response:
    body = await _read_limited(request)
    if body is None:
        return Response("request too large\n", status_code=413, media_type="text/plain")
    address = autodiscover_address(body)
    if address is None:
        return Response("no EMailAddress in the request\n", status_code=400, media_type="text/plain")
    if await _local_domain_of(request, address) is None:
        return _not_found()
    # No display name: this answers anyone, and must not tell who has a mailbox here.
    return Response(autodiscover_response(address, "", client_settings_for(services(request))), media_type=XML)


class AnyCaseRoute(Route):
    """A route whose path matches in any letter case. Only Outlook's autodiscover: clients send
    /autodiscover/autodiscover.xml, /Autodiscover/Autodiscover.xml, /AutoDiscover/AutoDiscover.xml...
    as IIS, which Exchange runs on, matches paths in any case. Every other path of the box keeps one
    spelling (web/app.py's LazyRoutes and the first-run gate take this one in any case too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path_regex = re.compile(self.path_regex.pattern, self.path_regex.flags | re.IGNORECASE)


routes = [
    Route("/.well-known/autoconfig/mail/config-v1.1.xml", thunderbird, methods=["GET"]),
    Route("/mail/config-v1.1.xml", thunderbird, methods=["GET"]),
    AnyCaseRoute("/autodiscover/autodiscover.xml", autodiscover, methods=["POST"]),
]
