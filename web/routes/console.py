"""/console: the status page, recent events, and the admin's own password."""

from __future__ import annotations

import asyncio
import datetime as dt

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import backup, status_checks
from appliance.config import STANDARD_PORTS
from appliance.dns_check import load_results, summary
from web import charts
from web.console_data import disk_usage, listeners, queue_summary
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
from web.state import setup_done

EVENTS_SHOWN = 200


async def status(request: Request) -> Response:
    await require(request, "admin")
    svc = services(request)
    bound = listeners(svc)
    rows = [(name, *bound[name]) for name in STANDARD_PORTS if name in bound]
    rows += [(name, *value) for name, value in bound.items() if name not in STANDARD_PORTS]
    cert = svc.tls.info()
    days_left = (cert.not_after - dt.datetime.now(dt.UTC)).days
    disk = await asyncio.to_thread(disk_usage, svc.config.data.root)
    queue = queue_summary(await svc.spool.messages())
    dns = []
    for domain in await svc.accounts.list_domains():
        last = await load_results(svc.db, domain)
        dns.append((domain, last[0] if last else None, summary(last[1]) if last else None))
    spam = svc.spam_content
    return await render(request, "console/status.html", {
        "spam": await spam.status() if spam is not None else None,
        "title": "Status", "section": "status", "listeners": rows, "cert": cert, "days_left": days_left,
        "disk": disk, "queue": queue, "dns": dns,
        "mailbox_count": len(await svc.accounts.list_users()), "alias_count": len(await svc.accounts.list_aliases()),
        "ipv4": (await svc.settings.fresh()).public_ipv4 or "", "ipv6": svc.settings.now.public_ipv6 or "",
        "setup_done": await setup_done(svc.settings),
        "backup_schedule": await backup.read_schedule(svc.db),
        "checks": await status_checks.current(svc),
        "mail_chart": charts.bars("Messages per day, last 30 days", await svc.delivery_log.per_day(30),
                                  ("in", "out", "junk", "rejected")),
        "disk_chart": charts.line("Disk used (GiB)", await status_checks.disk_history(svc.db), " GiB"),
    })


async def status_check(request: Request) -> Response:
    """Check now: every item of the checklist again (the background runs it every few hours)."""
    await require(request, "admin")
    await read_form(request)
    items = await status_checks.check_everything(services(request))
    problems = sum(item.level in ("fail", "warn") for item in items)
    flash(request, "Everything checked is fine." if not problems else
          f"Checked: {problems} item{'' if problems == 1 else 's'} to look at.")
    return redirect("/console")


async def events(request: Request) -> Response:
    await require(request, "admin")
    svc = services(request)
    recent = await svc.events.recent(EVENTS_SHOWN)
    return await render(request, "console/events.html", {
        "title": "Events", "section": "events", "events": recent, "lockouts": svc.auth.lockouts()})


async def unlock(request: Request) -> Response:
    """Lift a lockout the admin vouches for (a family member's phone with an old password, fixed now)."""
    principal = await require(request, "admin")
    values = await read_form(request)
    client = values.get("peer", "")[:100]
    account = values.get("account", "")[:400] or None
    if await services(request).auth.unlock(client, account, by=principal.name):
        flash(request, "Lockout lifted: that client can log in again.")
    else:
        flash(request, "That lockout had already ended.")
    return redirect("/console/events")


async def password_page(request: Request) -> Response:
    await require(request, "admin")
    return await render(request, "console/password.html", {"title": "Your password", "section": "password"})


async def password_submit(request: Request) -> Response:
    principal = await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    errors = await change_own_password(
        values, principal.name,
        lambda current: svc.auth.verify_admin(principal.name, current, peer(request)),
        lambda password: admin(request).set_admin_password(principal.name, password, by_owner=True),
    )
    if errors:
        return await render(request, "console/password.html", {
            "title": "Your password", "section": "password", "errors": errors}, status_code=400)
    await refresh_login(request)
    flash(request, "Your password was changed. Other sessions have been logged out.")
    return redirect("/console")


routes = [
    Route("/console", status, methods=["GET"]),
    Route("/console/status/check", status_check, methods=["POST"]),
    Route("/console/events", events, methods=["GET"]),
    Route("/console/events/unlock", unlock, methods=["POST"]),
    Route("/console/password", password_page, methods=["GET"]),
    Route("/console/password", password_submit, methods=["POST"]),
]
