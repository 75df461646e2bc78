"""/setup: the first-run wizard. The steps' logic is in web/wizard.py; here each Next is applied.

Access: while no admin exists only step 1 is reachable, and it needs the one-time setup code the box
printed at its first start (appliance/setup_code.py): only the person at the box can claim it, not
whoever reaches an unconfigured box first. From then on the wizard is for the logged-in admin, who may
go back to any step already reached; a reload resumes at the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import setup_code, time_zone
from appliance.account_errors import AccountError, AlreadyExists, WeakPassword
from appliance.address import idn
from appliance.dns_check import load_results
from appliance.dns_records import detect_public_addresses
from appliance.tls import TlsManager
from web import certificate_forms as certificate
from web import forms, wizard
from web.checklist import still_to_do
from web.console_data import client_settings_for, dns_ports, forwarded_ports
from web.pages import admin, current, log_in, peer, read_form, redirect, render, require, services
from web.sending_form import apply, form_context, stored_relay
from web.state import reach, setup_done, setup_step
from web.wizard import Form, Next

if TYPE_CHECKING:  # a type only: the relay test's SMTP client loads when a relay is tested
    from appliance.queue.relay_check import RelayCheck


async def _guard(request: Request, step: int) -> Response | None:
    """A redirect when this step is not for this visitor now; None to go on."""
    svc = services(request)
    if not await svc.accounts.has_admin():
        return None if step == 1 else redirect("/setup/1")
    await require(request, "admin")
    if await setup_done(svc.settings) and step != wizard.LAST_STEP:
        return redirect("/console")
    furthest = await setup_step(svc.settings)
    if step > furthest:
        return redirect(f"/setup/{furthest}")
    return None


async def _page(request: Request, step: int, template: str, context: dict[str, object], status: int = 200) -> Response:
    return await render(request, template, {
        "title": f"Setup: {dict(wizard.STEPS)[step]}", "steps": wizard.STEPS, "step": step,
        "furthest": await setup_step(services(request).settings), **context,
    }, status_code=status)


async def setup_index(request: Request) -> Response:
    svc = services(request)
    if not await svc.accounts.has_admin():
        return redirect("/setup/1")
    if await setup_done(svc.settings):
        return redirect("/console")
    await require(request, "admin")
    return redirect(f"/setup/{await setup_step(svc.settings)}")


async def step_page(request: Request) -> Response:
    try:
        step = int(request.path_params["step"])
    except ValueError:
        step = 0
    if not wizard.FIRST_STEP <= step <= wizard.LAST_STEP:
        return redirect("/setup")
    blocked = await _guard(request, step)
    if blocked is not None:
        return blocked
    if request.method == "POST":
        return await POSTS[step](request)
    return await PAGES[step](request, None)


# --- 1: admin and host name -----------------------------------------------------------------------------

def suggested_hostname(current: str) -> str:
    """The box's current name if it can be a public one, else the system's full name (getfqdn, then
    the host name itself, which some systems set to the full name while getfqdn says 'localhost');
    '' when none can be (the field's placeholder shows an example)."""
    for candidate in (current, socket.getfqdn(), socket.gethostname()):
        name, problem = wizard.check_hostname(candidate.strip().rstrip("."))
        if name and not problem:
            return name
    return ""


async def admin_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    admin_exists = await svc.accounts.has_admin()
    if not admin_exists:  # normally made at start; made here too if it was removed meanwhile
        await asyncio.to_thread(setup_code.ensure_code, svc.config.data.root)
    values = dict(form.values) if form else {"hostname": suggested_hostname(svc.hostname)}
    if not values.get("time_zone"):
        values["time_zone"] = (await svc.settings.fresh()).time_zone or time_zone.system_zone()
    return await _page(request, 1, "setup/admin.html", {
        "admin_exists": admin_exists, "values": values, "errors": form.errors if form else {},
        "code_file": setup_code.code_path(svc.config.data.root), "time_zones": time_zone.available(),
    }, 400 if form else 200)


async def admin_submit(request: Request) -> Response:
    svc = services(request)
    values = await read_form(request)
    admin_exists = await svc.accounts.has_admin()
    if admin_exists:
        # _guard let this request in while the box had no administrator; one made since (a
        # simultaneous first step, finished while this form was still arriving) makes step 1 theirs
        # alone, as for any later visit: without this, a visitor with no code and no login would
        # change the host name and walk on into the wizard. Sent to log in, as the other requests
        # that lost the race are.
        principal = await current(request)
        if principal is None or principal.role != "admin":
            return redirect("/login")
    else:
        # The code first, on its own: without it nothing else of the form is looked at.
        code = values.get("code", "")
        if not await setup_code.verify(svc.auth.throttle, svc.config.data.root, code, peer(request)):
            if await svc.accounts.has_admin():
                return redirect("/login")  # someone else finished step 1 meanwhile
            problem = wizard.SETUP_CODE_MISSING if not code.strip() else wizard.SETUP_CODE_WRONG
            return await admin_page(request, Form({"code": problem}, {  # the chosen zone too: it fell back to UTC
                field: values.get(field, "")[:wizard.MAX_FIELD] for field in ("name", "hostname", "time_zone")
            }))
    result = wizard.admin_step(values, admin_exists=admin_exists)
    if isinstance(result, Form):
        return await admin_page(request, result)
    assert isinstance(result, Next)
    if not admin_exists:
        try:
            await admin(request).add_first_admin(result.data["name"], result.data["password"])
        except AlreadyExists:
            return redirect("/login")  # someone else finished step 1 first
        except AccountError as exc:
            field = "password" if isinstance(exc, WeakPassword) else "name"
            return await admin_page(request, Form({field: str(exc)}, {"name": values.get("name", ""),
                                                                      "hostname": result.data["hostname"]}))
        await asyncio.to_thread(setup_code.remove_code, svc.config.data.root)  # used: it opens nothing now
        await log_in(request, result.data["name"], "admin")
    await svc.set_hostname(result.data["hostname"])
    if "time_zone" in result.data:
        await svc.settings.save(time_zone=result.data["time_zone"])
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 2: domain ----------------------------------------------------------------------------------------

async def domain_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    chosen = (await svc.settings.fresh()).setup_domain
    values = dict(form.values) if form else {"domain": chosen or wizard.suggest_domain(svc.hostname)}
    return await _page(request, 2, "setup/domain.html", {"values": values, "errors": form.errors if form else {}},
                       400 if form else 200)


async def domain_submit(request: Request) -> Response:
    svc = services(request)
    result = wizard.domain_step(await read_form(request))
    if isinstance(result, Form):
        return await domain_page(request, result)
    assert isinstance(result, Next)
    domain = result.data["domain"]
    wizard_state = await svc.settings.fresh()
    previous = wizard_state.setup_domain
    previous_was_added_here = wizard_state.setup_domain_added
    added_here = previous_was_added_here and previous == domain
    box = admin(request)
    if not await svc.accounts.is_local_domain(domain):
        try:
            await box.add_domain(domain)  # with its DKIM key: step 3 shows its public key
        except AccountError as exc:
            return await domain_page(request, Form({"domain": str(exc)}, {"domain": domain}))
        added_here = True
    if previous and previous != domain and previous_was_added_here:
        # Back to step 2 to fix a typo: the domain this step made before is replaced, not kept beside
        # the new one. A domain that existed before the wizard, or got mailboxes since, stays.
        with contextlib.suppress(AccountError):
            await box.remove_domain(previous)
    await svc.settings.save(setup_domain=domain, setup_domain_added=added_here)
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 3: DNS -----------------------------------------------------------------------------------------

async def dns_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    domain = (await svc.settings.fresh()).setup_domain
    if not domain or not await svc.accounts.is_local_domain(domain):
        return redirect("/setup/2")
    current = await svc.settings.fresh()
    ipv4, ipv6 = current.public_ipv4, current.public_ipv6
    detected = False
    if not form and ipv4 is None and ipv6 is None:
        found4, found6 = await asyncio.to_thread(detect_public_addresses)
        detected = bool(found4 or found6)
        ipv4, ipv6 = found4, found6
    values = dict(form.values) if form else {"ipv4": ipv4 or "", "ipv6": ipv6 or ""}
    records = await admin(request).dns_records(domain, dns_ports(svc))
    last = await load_results(svc.db, domain)
    return await _page(request, 3, "setup/dns.html", {
        "domain": domain, "records": records, "values": values, "errors": form.errors if form else {},
        "detected": detected, "checked_at": last[0] if last else None, "forwarded": forwarded_ports(svc),
        "results": {r.key: r for r in last[1]} if last else {},
    }, 400 if form else 200)


async def dns_submit(request: Request) -> Response:
    svc = services(request)
    result = wizard.dns_step(await read_form(request))
    if isinstance(result, Form):
        return await dns_page(request, result)
    assert isinstance(result, Next)
    box = admin(request)
    await box.set_public_addresses(result.data.get("ipv4", ""), result.data.get("ipv6", ""))
    if result.action == "check":
        domain = (await svc.settings.fresh()).setup_domain
        if domain:
            await box.check_dns(domain, dns_ports(svc))
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 4: certificate ---------------------------------------------------------------------------------

def needs_new_self_signed(tls: TlsManager, hostname: str) -> bool:
    """The first start made a self-signed certificate for the system's name; the wizard may have chosen
    another. A certificate from a CA (installed by hand, or ACME) is never replaced here."""
    info = tls.info()
    return info.self_signed and hostname not in info.names


async def tls_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    return await _page(request, 4, "setup/tls.html", {
        **await certificate.page_context(request), "base": "/setup/4",
        "renew": needs_new_self_signed(svc.tls, svc.hostname),
    })


async def tls_action(request: Request) -> Response:
    """Step 4's own forms: order from an ACME CA, or upload (the console's Certificate page does the same)."""
    blocked = await _guard(request, 4)
    if blocked is not None:
        return blocked
    action = request.path_params["action"]
    if action == "order":
        return await certificate.order(request, "/setup/4")
    if action == "check":
        return await certificate.check(request, "/setup/4")
    return await certificate.upload(request, "/setup/4")


async def tls_submit(request: Request) -> Response:
    svc = services(request)
    result = wizard.tls_step(await read_form(request))
    assert isinstance(result, Next)
    if needs_new_self_signed(svc.tls, svc.hostname):
        # The console's and the CLI's own action: the same lock, source setting and event.
        await admin(request).self_signed_certificate()
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 5: sending mail ---------------------------------------------------------------------------------

async def sending_page(request: Request, form: Form | None, check: RelayCheck | None = None) -> Response:
    context = await form_context(admin(request), form, check)
    return await _page(request, 5, "setup/sending.html", context, 400 if form and form.errors else 200)


async def sending_submit(request: Request) -> Response:
    svc = services(request)
    values = await read_form(request)
    stored = await stored_relay(admin(request))
    result = wizard.sending_step(values, stored=stored.relay, ca_file=stored.ca_file)
    if isinstance(result, Form):
        return await sending_page(request, result)
    assert isinstance(result, Next)
    check = await apply(request, result.action, result.relay)
    if check is not None:  # the relay test failed: nothing saved, the form again with the error
        return await sending_page(request, Form({}, forms.relay_shown(values)), check)
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 6: mailboxes -------------------------------------------------------------------------------------

async def mailboxes_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    domains = await svc.accounts.list_domains()
    chosen = (await svc.settings.fresh()).setup_domain or (domains[0] if domains else "")
    return await _page(request, 6, "setup/mailboxes.html", {
        "domains": domains, "mailboxes": await svc.accounts.list_users(),
        "values": dict(form.values) if form else {"domain": chosen}, "errors": form.errors if form else {},
    }, 400 if form else 200)


async def mailboxes_submit(request: Request) -> Response:
    svc = services(request)
    values = await read_form(request)
    result = wizard.mailbox_step(values, domains=tuple(await svc.accounts.list_domains()))
    if isinstance(result, Form):
        return await mailboxes_page(request, result)
    assert isinstance(result, Next)
    if result.action == "add":
        try:
            info = await admin(request).create_mailbox(result.data["address"], result.data["password"],
                                                       display_name=result.data["name"])
        except AccountError as exc:
            field = "password" if isinstance(exc, WeakPassword) else "local"
            shown = {k: values.get(k, "") for k in ("local", "domain", "name")}
            return await mailboxes_page(request, Form({field: str(exc)}, shown))
        request.session["flash"] = [f"Mailbox {idn(info.address)} created."]
    if result.step == wizard.LAST_STEP:
        await _finish(request)  # here, a POST with the session's token: the last page's GET changes nothing
    await reach(svc.settings, result.step)
    return redirect(f"/setup/{result.step}")


# --- 7: done ------------------------------------------------------------------------------------------

async def _finish(request: Request) -> None:
    """Setup is over: the console from now on. Only a POST carrying the session's CSRF token gets here
    (step 6's Continue, or this page's button): the last page's GET once did it, so a link or an image
    on another site, loaded in the admin's browser, ended the wizard behind their back."""
    svc = services(request)
    if not await setup_done(svc.settings):
        await svc.settings.save(setup_done=True)
        await svc.events.record("setup", "first-run setup finished")


async def done_page(request: Request, form: Form | None) -> Response:
    svc = services(request)
    return await _page(request, 7, "setup/done.html", {
        "settings": client_settings_for(svc), "mailboxes": await svc.accounts.list_users(),
        "todos": await still_to_do(svc),
    })


async def done_submit(request: Request) -> Response:
    await read_form(request)  # refused without the session's CSRF token
    await _finish(request)  # a box whose wizard stopped here before it finished (an older version's)
    return redirect("/console")


PAGES = {1: admin_page, 2: domain_page, 3: dns_page, 4: tls_page, 5: sending_page, 6: mailboxes_page, 7: done_page}
POSTS = {1: admin_submit, 2: domain_submit, 3: dns_submit, 4: tls_submit, 5: sending_submit, 6: mailboxes_submit,
         7: done_submit}

routes = [
    Route("/setup", setup_index, methods=["GET"]),
    Route("/setup/{step}", step_page, methods=["GET", "POST"]),
    Route("/setup/4/{action:str}", tls_action, methods=["POST"]),
]
