"""/console/sending: how outbound mail leaves the box (directly or through a relay), and the queue.

The relay form is the same as the wizard's "Sending mail" step (web/routes/setup.py): both use
web/sending_form.py. The queue is listed, retried and deleted with the use-cases behind
`letterbox queue list|flush|delete` (appliance/admin.py).
"""

from __future__ import annotations

import re
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.queue.relay_check import RelayCheck
from appliance.queue.spool import QueuedMessage, QueuedRecipient
from web import forms
from web.console_data import queue_summary, recipient_state
from web.pages import admin, flash, read_form, redirect, render, require, services
from web.sending_form import apply, form_context, stored_relay
from web.wizard import Form

MAX_SHOWN = 200  # queued messages listed on the page; the summary counts them all
_QUEUE_ID = re.compile(r"[0-9A-F]{8,64}")


# --- the page ------------------------------------------------------------------------------------------

def _queue_rows(messages: list[QueuedMessage]) -> list[tuple[QueuedMessage, list[tuple[QueuedRecipient, str]]]]:
    """Each message with its recipients and what each one's state means to a person."""
    return [(m, [(r, recipient_state(r)) for r in m.recipients]) for m in messages]


async def sending_page(request: Request, form: Form | None = None, check: RelayCheck | None = None) -> Response:
    await require(request, "admin")
    svc = services(request)
    messages = await svc.spool.messages()
    now = int(time.time())
    hold = (await svc.settings.fresh()).hold
    return await render(request, "console/sending.html", {
        "title": "Sending", "section": "sending", **await form_context(admin(request), form, check),
        "queue": _queue_rows(messages[:MAX_SHOWN]), "summary": queue_summary(messages),
        "more": max(0, len(messages) - MAX_SHOWN), "now": now, "hold": hold,
    }, status_code=400 if form and form.errors else 200)


async def sending_submit(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    stored = await stored_relay(admin(request))
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
    count = await admin(request).flush_queue()
    flash(request, f"{count} recipient{'' if count == 1 else 's'} will be tried again now.")
    return redirect("/console/sending")


async def retry_one(request: Request) -> Response:
    await require(request, "admin")
    await read_form(request)
    message_id = _message_id(request)
    count = await admin(request).flush_queue([message_id])
    if count:
        flash(request, f"Message {message_id}: {count} recipient{'' if count == 1 else 's'} will be tried again now.")
    else:
        flash(request, f"Message {message_id} has no recipient waiting (delivered, failed or deleted meanwhile).")
    return redirect("/console/sending")


async def delete_one(request: Request) -> Response:
    await require(request, "admin")
    svc = services(request)
    if request.method in ("GET", "HEAD"):  # HEAD is the page's GET without its body, never the removal
        message_id = _message_id(request)
        found = [m for m in await svc.spool.messages() if m.id == message_id]
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
    deleted = await admin(request).delete_queued([message_id])
    if deleted:
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
