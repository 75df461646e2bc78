"""/console/spam: the spam defence at a glance and its settings (administrators); /account/junk: a
mailbox owner's Junk folder, where a message can be released into the inbox (and is learned as ham).

Thin: every action is one use-case of appliance/spam/content_service.py, the same ones `letterbox
spam ...` calls."""

from __future__ import annotations

import contextlib
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.account_errors import NotFound
from appliance.admin import SPAM_LAYERS
from appliance.settings import SpamSettings
from appliance.spam.content_service import ContentSettingsError, SpamContent, save_content_settings
from appliance.status_checks import content_filter_fix
from appliance.store.model import StoreError
from web.pages import admin, flash, read_form, redirect, render, require, services

MAILBOXES_COUNTED = 500  # Junk counts on the console page (a family box has a handful)
DECISIONS_SHOWN = 50
DAY = 86400


def _spam(request: Request) -> SpamContent:
    spam = services(request).spam_content
    if spam is None:
        raise HTTPException(503, "The spam filter is not running.")
    return spam


async def _junk_counts(request: Request, spam: SpamContent) -> list[tuple[str, int | None]]:
    counts: list[tuple[str, int | None]] = []
    for user in (await services(request).accounts.list_users())[:MAILBOXES_COUNTED]:
        count: int | None = None
        with contextlib.suppress(StoreError):
            count = await spam.junk_count(user.address)
        counts.append((user.address, count))
    return counts


GREYLIST_SHOWN = 100
LAYER_FIELDS = ("greylist_delay", "outbound_messages_per_hour", "outbound_recipients_per_hour")


def _layer_values(layers: SpamSettings) -> dict[str, str]:
    values = {name: "on" if getattr(layers, name) else "" for name in SPAM_LAYERS}
    values.update({name: str(getattr(layers, name)) for name in LAYER_FIELDS})
    values.update(dnsbl_lists=", ".join(layers.dnsbl_lists), domain_lists=", ".join(layers.domain_lists))
    return values


async def page(request: Request, errors: dict[str, str] | None = None,
               values: dict[str, str] | None = None, layer_values: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    spam = _spam(request)
    settings = await spam.settings()
    boss = admin(request)
    shown = values or {
        "enabled": "on" if settings.enabled else "", "scanner": settings.scanner,
        "controller": settings.controller, "junk": f"{settings.junk_score:g}", "reject": f"{settings.reject_score:g}",
    }
    decisions = services(request).spam_decisions
    counts = await decisions.counts(since=time.time() - DAY)
    status = await spam.status()
    return await render(request, "console/spam.html", {
        "title": "Spam", "section": "spam", "status": status, "learned": spam.learned,
        "fix": content_filter_fix(status, services(request).status_probes.installed),
        "decisions": await decisions.recent(DECISIONS_SHOWN),
        "day_counts": sorted(counts.items(), key=lambda item: (-item[1], item[0])),
        "junk_counts": await _junk_counts(request, spam), "values": shown, "errors": errors or {},
        "layers": layer_values or _layer_values((await services(request).settings.fresh()).spam),
        "lists": await boss.dnsbl_status(), "greylist": await boss.greylist_entries(GREYLIST_SHOWN),
        "suspended": await boss.outbound_suspensions(),
    }, status_code=400 if errors else 200)


def _score(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        return float("nan")  # refused by the validation, with its words


async def save_content(request: Request) -> Response:
    principal = await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    try:
        await save_content_settings(
            svc.settings, svc.events, enabled=values.get("enabled") == "on",
            scanner=values.get("scanner", ""), controller=values.get("controller", ""),
            junk=_score(values.get("junk", "")), reject=_score(values.get("reject", "")), by=principal.name,
        )
    except ContentSettingsError as exc:
        return await page(request, {exc.field: str(exc)}, values)
    flash(request, "The content filter settings were saved; they apply to the next message.")
    return redirect("/console/spam")


def _whole(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return -1  # refused by SpamSettings, with its words


async def save_layers(request: Request) -> Response:
    principal = await require(request, "admin")
    values = await read_form(request)
    try:
        await admin(request).save_spam_layers(
            by=principal.name, **{name: values.get(name) == "on" for name in SPAM_LAYERS},
            **{name: _whole(values.get(name, "")) for name in LAYER_FIELDS},
            dnsbl_lists=_names(values.get("dnsbl_lists", "")), domain_lists=_names(values.get("domain_lists", "")),
        )
    except ValueError as exc:
        return await page(request, {"layers": str(exc)}, layer_values=values)
    flash(request, "The spam layers were saved; they apply to the next connection.")
    return redirect("/console/spam")


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.lower() for item in text.replace(",", " ").split())


async def clear_greylist(request: Request) -> Response:
    await require(request, "admin")
    await read_form(request)
    count = await admin(request).clear_greylist()
    flash(request, f"The greylist was cleared ({count} entr{'y' if count == 1 else 'ies'}).")
    return redirect("/console/spam")


async def lift_suspension(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    try:
        mailbox = await admin(request).lift_suspension(values.get("address", ""))
    except NotFound as exc:
        flash(request, str(exc), problem=True)
        return redirect("/console/spam")
    flash(request, f"{mailbox} may send again.")
    return redirect("/console/spam")


async def junk_page(request: Request) -> Response:
    principal = await require(request, "user")
    spam = _spam(request)
    messages = []
    with contextlib.suppress(StoreError):
        messages = await spam.junk(principal.name)
    return await render(request, "account_junk.html", {"title": "Junk", "messages": messages})


async def release(request: Request) -> Response:
    principal = await require(request, "user")
    values = await read_form(request)
    uid = values.get("uid", "")
    if not (uid.isascii() and uid.isdigit()) or not 0 < int(uid) < 2**32:
        raise HTTPException(400, "No message was chosen.")
    try:
        released = await _spam(request).release(principal.name, int(uid), by=principal.name)
    except StoreError as exc:
        raise HTTPException(409, f"The message could not be moved: {exc}") from None
    flash(request, "The message was moved to your inbox; the filter learns from it." if released
          else "That message is no longer in Junk.")
    return redirect("/account/junk")


routes = [
    Route("/console/spam", page, methods=["GET"]),
    Route("/console/spam/content", save_content, methods=["POST"]),
    Route("/console/spam/layers", save_layers, methods=["POST"]),
    Route("/console/spam/greylist/clear", clear_greylist, methods=["POST"]),
    Route("/console/spam/suspended/lift", lift_suspension, methods=["POST"]),
    Route("/account/junk", junk_page, methods=["GET"]),
    Route("/account/junk/release", release, methods=["POST"]),
]
