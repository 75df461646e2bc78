"""The relay form of the console's Sending page and the wizard's "Sending mail" step: both validate with
forms.sending_form, act through `apply` and fill the `sending_form` macro from `form_context`. The
relay itself is stored and tested by appliance/admin.py, as `letterbox relay` does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

from appliance.admin import Admin
from appliance.queue.smarthost import Smarthost
from web import forms
from web.pages import admin, flash
from web.wizard import Form

# A type only: the relay test (an SMTP client, the MX lookup) is imported by Admin.test_relay when a relay
# is tested, not with the wizard's pages.
if TYPE_CHECKING:
    from appliance.queue.relay_check import RelayCheck


@dataclass(frozen=True)
class Stored:
    relay: Smarthost | None
    ca_file: str
    problem: str  # the stored setting is invalid (set by hand): why


async def stored_relay(box: Admin) -> Stored:
    values = await box.settings.fresh()
    return Stored(values.relay, values.relay_ca_file, values.relay_problem)


async def form_context(box: Admin, form: Form | None, check: RelayCheck | None = None) -> dict[str, object]:
    """What the `sending_form` macro needs: the values (typed, or the stored relay's), errors, the
    result of a test, and facts about the stored relay (never its password)."""
    stored = await stored_relay(box)
    return {
        "values": dict(form.values) if form else forms.relay_values(stored.relay),
        "errors": dict(form.errors) if form else ({"": stored.problem} if stored.problem else {}),
        "relay_test": check,
        "stored_relay": stored.relay,
        "ca_file": stored.ca_file,
    }


async def apply(request: Request, action: str, relay: Smarthost | None) -> RelayCheck | None:
    """'save': store the choice. 'test': try the relay typed in; only if it works is it stored (the
    password typed for the test is never shown again, so a failed test keeps nothing). Returns the
    failed test to show next to the form, or None when the choice was stored."""
    box = admin(request)
    if action == "test":
        assert relay is not None
        check = await box.test_relay(relay)
        if not check.ok:
            return check
        await box.set_relay(relay, tested=True)
        flash(request, f"The relay works ({check.detail}). It is saved: all outbound mail goes through it.")
        return None
    await box.set_relay(relay)
    return None
