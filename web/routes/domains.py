"""/console/domains: the box's mail domains, the DNS records of each and their live check."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from appliance.account_errors import AccountError
from appliance.address import idn
from appliance.dns_check import load_results
from appliance.store import trash
from web import forms, wizard
from web.console_data import dns_ports
from web.display import attachment
from web.pages import admin, flash, read_form, redirect, removed, render, require, services
from web.urls import path_address, segment


async def _domain(request: Request) -> str:
    domain = path_address(request, "domain").lower()
    if not await services(request).accounts.is_local_domain(domain):
        raise HTTPException(404, f"{domain[:100]} is not a domain of this box.")
    return domain


async def domains_page(request: Request, values: dict[str, str] | None = None,
                       errors: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    users = await svc.accounts.list_users()
    aliases = await svc.accounts.list_aliases()
    rows = []
    for domain in await svc.accounts.list_domains():
        rows.append((domain, sum(u.address.endswith("@" + domain) for u in users),
                     sum(a.source.endswith("@" + domain) for a in aliases)))
    return await render(request, "console/domains.html", {
        "title": "Domains", "section": "domains", "domains": rows, "values": values or {}, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def domain_add(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    domain, errors = forms.new_domain(values)
    if not errors:
        try:
            domain = await admin(request).add_domain(domain)
        except AccountError as exc:
            errors = {"domain": str(exc)}
    if errors:
        return await domains_page(request, {"domain": forms.text(values, "domain")}, errors)
    flash(request, f"Domain {idn(domain)} added: now create its DNS records.")
    return redirect(f"/console/domains/{segment(domain)}")


async def domain_dns(request: Request, errors: dict[str, str] | None = None,
                     values: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    domain = await _domain(request)
    records = await admin(request).dns_records(domain, dns_ports(svc))
    last = await load_results(svc.db, domain)
    shown = values or {"ipv4": (await svc.settings.fresh()).public_ipv4 or "",
                       "ipv6": svc.settings.now.public_ipv6 or ""}
    return await render(request, "console/domain.html", {
        "title": f"DNS for {domain}", "section": "domains", "domain": domain, "records": records,
        "checked_at": last[0] if last else None, "results": {r.key: r for r in last[1]} if last else {},
        "values": shown, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def domain_zone(request: Request) -> Response:
    """The records as a zone file to download: registrars import it, BIND and others load it."""
    await require(request, "admin")
    domain = await _domain(request)
    text = await admin(request).dns_zone_file(domain, dns_ports(services(request)))
    return PlainTextResponse(text, headers={
        "Content-Disposition": attachment(f"{domain}.zone"), "Cache-Control": "no-store"})


async def domain_check(request: Request) -> Response:
    await require(request, "admin")
    domain = await _domain(request)
    values = await read_form(request)
    result = wizard.dns_step({**values, "action": "check"})
    if isinstance(result, wizard.Form):
        return await domain_dns(request, dict(result.errors), dict(result.values))
    assert isinstance(result, wizard.Next)
    box = admin(request)
    await box.set_public_addresses(result.data.get("ipv4", ""), result.data.get("ipv6", ""))
    await box.check_dns(domain, dns_ports(services(request)))
    return redirect(f"/console/domains/{segment(domain)}")


async def domain_delete(request: Request) -> Response:
    await require(request, "admin")
    domain = await _domain(request)
    if request.method in ("GET", "HEAD"):  # HEAD is the page's GET without its body, never the removal
        return await render(request, "console/confirm.html", {
            "title": f"Remove {domain}", "section": "domains", "action": f"/console/domains/{segment(domain)}/delete",
            "question": f"Remove the domain {idn(domain)}?",
            "detail": "Only a domain without mailboxes and aliases can be removed. Its DKIM keys are moved to the "
                      f"deleted/ folder of the data directory and removed for good after {trash.RETENTION_DAYS} days.",
            "back": "/console/domains",
        })
    await read_form(request)
    return await removed(request, admin(request).remove_domain(domain), what=f"domain {idn(domain)}", verb="removed",
                         back="/console/domains")


routes = [
    Route("/console/domains", domains_page, methods=["GET"]),
    Route("/console/domains", domain_add, methods=["POST"]),
    # {domain:path} as for addresses (web/routes/mailboxes.py): whatever an earlier version stored
    # stays reachable, so it can at least be removed.
    Route("/console/domains/{domain:path}/check", domain_check, methods=["POST"]),
    Route("/console/domains/{domain:path}/zone", domain_zone, methods=["GET"]),
    Route("/console/domains/{domain:path}/delete", domain_delete, methods=["GET", "POST"]),
    Route("/console/domains/{domain:path}", domain_dns, methods=["GET"]),
]
