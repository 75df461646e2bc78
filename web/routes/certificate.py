"""The console's Certificate page (and the same choices in the wizard's step 4): Let's Encrypt or any
ACME CA, your own certificate, or self-signed. Thin: every action is an appliance.certificates call.

An order runs in the background; the page shows its stored progress (pending, validating, issued,
failed with the CA's reason in plain words) and reloads itself while it runs, so leaving and coming
back, or reloading, shows the same state."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from web.certificate_forms import check, order, page_context, self_signed, upload
from web.pages import render, require


async def console_page(request: Request) -> Response:
    await require(request, "admin")
    return await render(request, "console/certificate.html", {
        "title": "Certificate", "section": "certificate", "base": "/console/certificate",
        **await page_context(request),
    })


async def console_order(request: Request) -> Response:
    await require(request, "admin")
    return await order(request, "/console/certificate")


async def console_check(request: Request) -> Response:
    await require(request, "admin")
    return await check(request, "/console/certificate")


async def console_upload(request: Request) -> Response:
    await require(request, "admin")
    return await upload(request, "/console/certificate")


async def console_self_signed(request: Request) -> Response:
    await require(request, "admin")
    return await self_signed(request, "/console/certificate")


routes = [
    Route("/console/certificate", console_page, methods=["GET"]),
    Route("/console/certificate/order", console_order, methods=["POST"]),
    Route("/console/certificate/check", console_check, methods=["POST"]),
    Route("/console/certificate/upload", console_upload, methods=["POST"]),
    Route("/console/certificate/self-signed", console_self_signed, methods=["POST"]),
]
