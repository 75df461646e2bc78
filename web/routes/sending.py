"""/console/sending: how outbound mail leaves the box (directly or through a relay), and the queue.

The relay form is the same as the wizard's "Sending mail" step (web/routes/setup.py): both validate
with forms.sending_form and act through `apply` and `form_context` here, and both render the
`sending_form` macro. The queue is listed, retried and deleted with the functions behind
`letterbox queue list|flush|delete` (appliance/queue/spool.py and state.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.queue import state as queue_state
from appliance.queue.relay_check import RelayCheck, check_relay
from appliance.queue.resolver import resolver_setting
from appliance.queue.service import SERVICE_KEY, SETTING_HOLD, OutboundQueue
from appliance.queue.smarthost import (
    SETTING_CA_FILE,
    Smarthost,
    SmarthostError,
    load_smarthost,
    save_smarthost,
)
from appliance.queue.spool import QueuedMessage, QueuedRecipient, shared_spool
from web import forms
from web.console_data import queue_summary, recipient_state
from web.pages import flash, read_form, redirect, render, require, services
from web.wizard import Form

if TYPE_CHECKING:
    from appliance.services import Services

MAX_SHOWN = 200  # queued messages listed on the page; the summary counts them all
_QUEUE_ID = re.compile(r"[0-9A-F]{8,64}")


# --- the relay form, shared with the wizard ------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    relay: Smarthost | None
    ca_file: str
    problem: str  # the stored setting is invalid (set by hand): why


async def stored_relay(svc: Services) -> Stored:
    ca_file = (await svc.db.get_setting(SETTING_CA_FILE) or "").strip()
    try:
        return Stored(await load_smarthost(svc.db), ca_file, "")
    except SmarthostError as exc:
        return Stored(None, ca_file, str(exc))


async def form_context(svc: Services, form: Form | None, check: RelayCheck | None = None) -> dict[str, object]:
    """What the `sending_form` macro needs: the values (typed, or the stored relay's), errors, the
    result of a test, and facts about the stored relay (never its password)."""
    stored = await stored_relay(svc)
    return {
        "values": dict(form.values) if form else forms.relay_values(stored.relay),
        "errors": dict(form.errors) if form else ({"": stored.problem} if stored.problem else {}),
        "relay_test": check,
        "stored_relay": stored.relay,
        "ca_file": stored.ca_file,
    }


def _wake_queue(svc: Services) -> None:
    queue = svc.extra.get(SERVICE_KEY)
    if isinstance(queue, OutboundQueue):
        queue.wake()  # read the settings again / look for due work now, not at its next poll


# What the relay that last passed "Test the relay" was (Smarthost.describe(): no password), so a relay
# changed since, here or with `letterbox relay`, no longer counts as tested.
RELAY_TESTED = "smarthost_tested"


async def relay_tested(svc: Services, relay: Smarthost) -> bool:
    return await svc.db.get_setting(RELAY_TESTED) == relay.describe()


async def save(svc: Services, relay: Smarthost | None, *, tested: bool = False) -> None:
    before = (await stored_relay(svc)).relay
    await save_smarthost(svc.db, relay)
    if relay is not None and tested:
        await svc.db.set_setting(RELAY_TESTED, relay.describe())
    elif relay != before or relay is None:  # a password changed untested counts as untested too
        await svc.db.set_setting(RELAY_TESTED, "")
    _wake_queue(svc)
    if relay is None:
        await svc.events.record("sending", "outbound mail goes directly to each domain's mail server")
    else:
        await svc.events.record("sending", f"outbound mail goes through the relay {relay.describe()}")


async def run_test(svc: Services, relay: Smarthost) -> RelayCheck:
    return await check_relay(relay, helo_name=svc.hostname, resolver=await resolver_setting(svc.db))


async def apply(request: Request, action: str, relay: Smarthost | None) -> RelayCheck | None:
    """'save': store the choice. 'test': try the relay typed in; only if it works is it stored (the
    password typed for the test is never shown again, so a failed test keeps nothing). Returns the
    failed test to show next to the form, or None when the choice was stored."""
    svc = services(request)
    if action == "test":
        assert relay is not None
        check = await run_test(svc, relay)
        if not check.ok:
            await svc.events.record("sending", f"relay test of {relay.describe()} failed: {check.detail}")
            return check
        await save(svc, relay, tested=True)
        flash(request, f"The relay works ({check.detail}). It is saved: all outbound mail goes through it.")
        return None
    await save(svc, relay)
    return None


# --- the page ------------------------------------------------------------------------------------------

def _queue_rows(messages: list[QueuedMessage]) -> list[tuple[QueuedMessage, list[tuple[QueuedRecipient, str]]]]:
    """Each message with its recipients and what each one's state means to a person."""
    return [(m, [(r, recipient_state(r)) for r in m.recipients]) for m in messages]


async def sending_page(request: Request, form: Form | None = None, check: RelayCheck | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    messages = await shared_spool(svc).messages()
    now = int(time.time())
    hold = (await svc.db.get_setting(SETTING_HOLD) or "").strip().lower() in ("1", "yes", "on", "true")
    return await render(request, "console/sending.html", {
        "title": "Sending", "section": "sending", **await form_context(svc, form, check),
        "queue": _queue_rows(messages[:MAX_SHOWN]), "summary": queue_summary(messages),
        "more": max(0, len(messages) - MAX_SHOWN), "now": now, "hold": hold,
    }, status_code=400 if form and form.errors else 200)


async def sending_submit(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    stored = await stored_relay(svc)
    action, relay, errors = forms.sending_form(values, stored.relay, stored.ca_file)
    if errors:
        return await sending_page(request, Form(errors, forms.relay_shown(values)))
    check = await apply(request, action, relay)
    if check is not None:
        return await sending_page(request, Form({}, forms.relay_shown(values)), check)
    if action == "save":
        flash(request, "Saved: outbound mail goes " + (f"through the relay {relay.host}." if relay else
                                                       "directly to each recipient's mail server."))
    return redirect("/console/sending")


# --- the queue -----------------------------------------------------------------------------------------

def _message_id(request: Request) -> str:
    message_id = str(request.path_params["message_id"])
    if not _QUEUE_ID.fullmatch(message_id):
        raise HTTPException(404, "No such message in the queue.")
    return message_id


async def retry_all(request: Request) -> Response:
    await require(request, "admin")
    await read_form(request)
    svc = services(request)
    count = await queue_state.flush(svc.db)
    _wake_queue(svc)
    await svc.events.record("sending", f"queue flushed from the console: {count} recipient(s) due now")
    flash(request, f"{count} recipient{'' if count == 1 else 's'} will be tried again now.")
    return redirect("/console/sending")


async def retry_one(request: Request) -> Response:
    await require(request, "admin")
    await read_form(request)
    message_id = _message_id(request)
    svc = services(request)
    count = await queue_state.flush(svc.db, [message_id])
    _wake_queue(svc)
    if count:
        await svc.events.record("sending", f"message {message_id} flushed from the console")
        flash(request, f"Message {message_id}: {count} recipient{'' if count == 1 else 's'} will be tried again now.")
    else:
        flash(request, f"Message {message_id} has no recipient waiting (delivered, failed or deleted meanwhile).")
    return redirect("/console/sending")


async def delete_one(request: Request) -> Response:
    await require(request, "admin")
    svc = services(request)
    if request.method == "GET":
        message_id = _message_id(request)
        found = [m for m in await shared_spool(svc).messages() if m.id == message_id]
        if not found:
            raise HTTPException(404, "This message is not in the queue (delivered or deleted meanwhile).")
        message = found[0]
        recipients = ", ".join(r.recipient for r in message.recipients)
        return await render(request, "console/confirm.html", {
            "title": f"Delete {message_id}", "section": "sending",
            "action": f"/console/sending/{message_id}/delete",
            "question": f"Delete the queued message {message_id}?",
            "detail": f"From <{message.sender}> to {recipients}. It is removed from the queue and never "
                      "delivered, and the sender is not told.",
            "back": "/console/sending",
        })
    await read_form(request)
    message_id = _message_id(request)
    deleted = await queue_state.delete(svc.db, svc.config.data.spool, [message_id])
    if deleted:
        await svc.events.record("sending", f"message {message_id} deleted from the queue (no report sent)")
        flash(request, f"Message {message_id} deleted from the queue.")
    else:
        flash(request, f"Message {message_id} was no longer in the queue.")
    return redirect("/console/sending")


routes = [
    Route("/console/sending", sending_page, methods=["GET"]),
    Route("/console/sending", sending_submit, methods=["POST"]),
    Route("/console/sending/retry", retry_all, methods=["POST"]),
    Route("/console/sending/{message_id}/retry", retry_one, methods=["POST"]),
    Route("/console/sending/{message_id}/delete", delete_one, methods=["GET", "POST"]),
]
