"""/console/mailboxes and /console/aliases: create, change, disable, delete (after a confirmation)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.account_errors import AccountError, AlreadyExists, InvalidAddress, WeakPassword
from appliance.accounts import AliasInfo, MailboxInfo
from appliance.address import idn
from appliance.admin import nowhere_note
from appliance.store import trash
from appliance.store.model import StoreError
from web import forms
from web.console_data import console_address
from web.pages import admin, flash, read_form, redirect, removed, render, require, services
from web.urls import alias_url, mailbox_url, path_address

MAX_USAGE_LOOKUPS = 200  # the list shows usage for this many mailboxes; the rest on their own page


async def _usage(request: Request, address: str) -> int | None:
    try:
        used, _quota = await services(request).store.usage(address)
    except StoreError:
        return None
    return used


async def _mailbox(request: Request) -> MailboxInfo:
    info = await services(request).accounts.get_user(path_address(request, "address"))
    if info is None:
        raise HTTPException(404, "No such mailbox.")
    return info


# --- mailboxes ----------------------------------------------------------------------------------------

async def mailboxes_page(request: Request, values: dict[str, str] | None = None,
                         errors: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    users = await svc.accounts.list_users()
    usage: dict[str, int | None] = {}
    for info in users[:MAX_USAGE_LOOKUPS]:
        usage[info.address] = await _usage(request, info.address)
    domains = await svc.accounts.list_domains()
    return await render(request, "console/mailboxes.html", {
        "title": "Mailboxes", "section": "mailboxes", "mailboxes": users, "usage": usage, "domains": domains,
        "values": values or {"domain": domains[0] if domains else ""}, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def mailbox_create(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    data, errors = forms.new_mailbox(values, tuple(await svc.accounts.list_domains()))
    if not errors:
        try:
            info = await admin(request).create_mailbox(data["address"], data["password"], display_name=data["name"],
                                                       quota_bytes=int(data.get("quota", "0")))
        except AccountError as exc:
            errors = {"password" if isinstance(exc, WeakPassword) else "local": str(exc)}
    if errors:
        shown = {k: forms.text(values, k) for k in ("local", "domain", "name", "quota")}
        return await mailboxes_page(request, shown, errors)
    # What the administrator hands on: the page where the owner finds everything to set up a phone.
    flash(request, f"Mailbox {idn(info.address)} created. Tell its owner to log in at {console_address(svc)} with the"
                   " address and this password: that page has the settings for their phone and mail program"
                   " (and a profile for an iPhone), and changes the password to one of their own.")
    return redirect("/console/mailboxes")


async def mailbox_page(request: Request, errors: dict[str, str] | None = None,
                       values: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    info = await _mailbox(request)
    shown = values or {"name": info.display_name, "quota": forms.format_quota(info.quota_bytes)}
    return await render(request, "console/mailbox.html", {
        "title": info.address, "section": "mailboxes", "mailbox": info, "used": await _usage(request, info.address),
        "values": shown, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def mailbox_update(request: Request) -> Response:
    await require(request, "admin")
    info = await _mailbox(request)
    values = await read_form(request)
    name, errors = forms.display_name(values)
    quota = 0
    try:
        quota = forms.parse_quota(forms.text(values, "quota"))
    except ValueError as exc:
        errors["quota"] = str(exc)
    if errors:
        return await mailbox_page(request, errors, {"name": name, "quota": forms.text(values, "quota")})
    enabled = values.get("enabled") == "on"
    try:
        await admin(request).update_mailbox(info.address, display_name=name, quota_bytes=quota, enabled=enabled)
    except AccountError as exc:
        return await mailbox_page(request, {"": str(exc)}, {"name": name, "quota": forms.text(values, "quota")})
    flash(request, f"Mailbox {idn(info.address)} saved.")
    return redirect(mailbox_url(info.address))


async def mailbox_password(request: Request) -> Response:
    await require(request, "admin")
    info = await _mailbox(request)
    values = await read_form(request)
    errors = forms.check_password(forms.secret(values, "password"), forms.secret(values, "password2"), info.address)
    if not errors:
        try:
            await admin(request).set_mailbox_password(info.address, forms.secret(values, "password"))
        except AccountError as exc:
            errors = {"password": str(exc)}
    if errors:
        return await mailbox_page(request, errors)
    flash(request, f"New password set for {idn(info.address)}.")
    return redirect(mailbox_url(info.address))


async def mailbox_delete(request: Request) -> Response:
    await require(request, "admin")
    info = await _mailbox(request)
    if request.method in ("GET", "HEAD"):  # HEAD is the page's GET without its body, never the removal
        return await render(request, "console/confirm.html", {
            "title": f"Delete {info.address}", "section": "mailboxes",
            "action": mailbox_url(info.address, "delete"),
            "question": f"Delete the mailbox {idn(info.address)}?",
            "detail": "It can no longer log in or receive mail. Its stored mail is moved to the deleted/ folder "
                      f"of the data directory and removed for good after {trash.RETENTION_DAYS} days; a mailbox "
                      "created later with the same address starts empty.",
            "back": mailbox_url(info.address),
        })
    await read_form(request)
    response = await removed(request, admin(request).remove_mailbox(info.address), what=f"mailbox {idn(info.address)}",
                             verb="deleted", back="/console/mailboxes")
    for note in await admin(request).aliases_to_nowhere(info.address):
        flash(request, f"Note: {note}.", problem=True)
    return response


# --- aliases ------------------------------------------------------------------------------------------

async def aliases_page(request: Request, values: dict[str, str] | None = None,
                       errors: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    domains = await svc.accounts.list_domains()
    return await render(request, "console/aliases.html", {
        "title": "Aliases", "section": "aliases", "aliases": await svc.accounts.list_aliases(), "domains": domains,
        "values": values or {"domain": domains[0] if domains else ""}, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def alias_create(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    source, targets, errors = forms.new_alias(values, tuple(await svc.accounts.list_domains()))
    if not errors:
        try:
            made = await admin(request).add_alias(source, targets)
        except AlreadyExists as exc:
            errors = {"local": str(exc)}
        except InvalidAddress as exc:
            errors = {"targets": str(exc)}
        except AccountError as exc:
            errors = {"": str(exc)}
    if errors:
        shown = {k: forms.text(values, k, forms.MAX_TARGETS_TEXT) for k in ("local", "domain", "targets")}
        return await aliases_page(request, shown, errors)
    flash(request, f"Alias {idn(source)} created.")
    await _note_nowhere(request, made)
    return redirect("/console/aliases")


async def _note_nowhere(request: Request, info: AliasInfo) -> None:
    nowhere = await admin(request).targets_going_nowhere(info)
    if nowhere:
        flash(request, f"Note: {nowhere_note(info.source, nowhere)}.", problem=True)


async def _alias_source(request: Request) -> tuple[str, tuple[str, ...]]:
    source = path_address(request, "source")
    info = await services(request).accounts.get_alias(source)
    if info is None:
        raise HTTPException(404, "No such alias.")
    return info.source, info.targets


async def alias_page(request: Request, errors: dict[str, str] | None = None, targets_text: str | None = None) -> Response:
    await require(request, "admin")
    source, targets = await _alias_source(request)
    context: dict[str, Any] = {
        "title": f"Alias {source}", "section": "aliases", "source": source,
        "values": {"targets": targets_text if targets_text is not None else "\n".join(targets)},
        "errors": errors or {},
    }
    return await render(request, "console/alias.html", context, status_code=400 if errors else 200)


async def alias_update(request: Request) -> Response:
    await require(request, "admin")
    source, _ = await _alias_source(request)
    values = await read_form(request)
    targets, errors = forms.alias_targets(values, catch_all=source.startswith("@"))
    if not errors:
        try:
            changed = await admin(request).set_alias_targets(source, targets)
        except AccountError as exc:
            errors = {"targets": str(exc)}
    if errors:
        return await alias_page(request, errors, forms.text(values, "targets", forms.MAX_TARGETS_TEXT))
    flash(request, f"Alias {idn(source)} saved.")
    await _note_nowhere(request, changed)
    return redirect("/console/aliases")


async def alias_delete(request: Request) -> Response:
    await require(request, "admin")
    source, targets = await _alias_source(request)
    if request.method in ("GET", "HEAD"):  # HEAD is the page's GET without its body, never the removal
        return await render(request, "console/confirm.html", {
            "title": f"Delete {source}", "section": "aliases", "action": alias_url(source, "delete"),
            "question": f"Delete the alias {idn(source)}?",
            "detail": f"Mail to it will no longer reach {', '.join(idn(t) for t in targets)}.", "back": "/console/aliases",
        })
    await read_form(request)
    return await removed(request, admin(request).remove_alias(source),
                         what=f"alias {idn(source)}", verb="deleted", back="/console/aliases")


# {name:path}: a stored address may contain '/' (an alias's local part), which arrives decoded. The
# action routes come first: an address always ends in '@domain', so '.../delete' is never one.
routes = [
    Route("/console/mailboxes", mailboxes_page, methods=["GET"]),
    Route("/console/mailboxes", mailbox_create, methods=["POST"]),
    Route("/console/mailboxes/{address:path}/password", mailbox_password, methods=["POST"]),
    Route("/console/mailboxes/{address:path}/delete", mailbox_delete, methods=["GET", "POST"]),
    Route("/console/mailboxes/{address:path}", mailbox_page, methods=["GET"]),
    Route("/console/mailboxes/{address:path}", mailbox_update, methods=["POST"]),
    Route("/console/aliases", aliases_page, methods=["GET"]),
    Route("/console/aliases", alias_create, methods=["POST"]),
    Route("/console/aliases/{source:path}/delete", alias_delete, methods=["GET", "POST"]),
    Route("/console/aliases/{source:path}", alias_page, methods=["GET"]),
    Route("/console/aliases/{source:path}", alias_update, methods=["POST"]),
]
