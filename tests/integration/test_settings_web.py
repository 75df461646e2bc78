"""The console's Settings page over the box's own HTTPS listener: the settings `letterbox settings`
covers, each with its plain-words help; a value saved there is in force in the running box at once (the
queue held and released, the next lookup asking the new DNS server), and a bad one is refused with the
CLI's words and saves nothing."""

from __future__ import annotations

import html
import re

import httpx
import pytest

from appliance.settings import SETTABLE, SettingError, parse_setting
from tests.integration.test_live_settings import admin_console
from tests.support.dns_server import ZoneServer
from tests.support.outbound import MX2, Outbound, mx, outbound_fixture, zone_fixture  # noqa: F401  (fixtures)

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def settings_rows(outbound: Outbound) -> dict[str, str]:
    rows = outbound.box.run(outbound.box.services.db.fetchall("SELECT key, value FROM settings"))
    return {str(r["key"]): str(r["value"]) for r in rows}


def save(console: httpx.Client, name: str, value: str) -> httpx.Response:
    """The form of one setting on the page, as a browser sends it (with the page's CSRF token)."""
    page = console.get("/console/settings")
    assert page.status_code == 200, page.text[:300]
    token = _CSRF.search(page.text)
    assert token, page.text[:300]
    return console.post("/console/settings", data={"csrf": token.group(1), "name": name, "value": value})


def section(page: str, name: str) -> str:
    start = page.index(f'id="setting-{name}"')
    return page[start:page.index("</section>", start)]


def test_the_page_shows_each_setting_with_its_help_and_value(outbound: Outbound) -> None:
    with admin_console(outbound.box, "mail.example.test") as console:
        page = console.get("/console/settings")
        assert page.status_code == 200
        assert '<a href="/console/settings" class="active">Settings</a>' in page.text  # in the console's menu
        text = html.unescape(page.text)
        for name, settable in SETTABLE.items():
            own = html.unescape(section(page.text, name))
            assert settable.plain in own, name
            assert f"Takes {settable.accepts}." in own, name
            assert 'name="csrf"' in own, name
        assert "Now: <strong>off</strong>" in section(text, "queue_hold")
        assert f"Now: <strong>{outbound.zone.address}</strong>" in section(text, "dns_resolver")
        assert f'value="{outbound.zone.address}"' in section(text, "dns_resolver")  # the field starts from it
        # Without the form's token nothing is saved (as every form of the console).
        refused = console.post("/console/settings", data={"csrf": "x" * 43, "name": "queue_hold", "value": "on"})
        assert refused.status_code == 403
        assert outbound.box.run(outbound.box.services.settings.fresh()).hold is False


def test_queue_hold_set_in_the_console_holds_and_releases_the_running_queue(outbound: Outbound) -> None:
    mx(outbound.zone, "far-away.test", (10, "mx.far-away.test", MX2))
    with admin_console(outbound.box, "mail.example.test") as console, outbound.receiver(MX2) as direct:
        held = save(console, "queue_hold", "on")
        assert held.status_code == 303, held.text[:300]
        assert held.headers["location"] == "/console/settings#setting-queue_hold"
        after = console.get(held.headers["location"])
        assert "Saved: queue_hold is on, in force now" in after.text
        assert "Now: <strong>on</strong>" in section(after.text, "queue_hold")
        outbound.stays_queued("held@far-away.test", direct)
        assert "Delivery is on hold" in console.get("/console/sending").text

        released = save(console, "queue_hold", "off")
        assert released.status_code == 303, released.text[:300]
        assert [t.rcpt_tos for t in direct.wait(1)] == [("held@far-away.test",)]
        outbound.wait_empty()
        events = console.get("/console/events").text
        assert "queue_hold set to on" in events
        assert "queue_hold set to off" in events


def test_dns_resolver_set_in_the_console_is_asked_for_the_next_message(outbound: Outbound) -> None:
    """The fixture's zone knows nothing of far-away.test; a second loopback DNS server does."""
    with ZoneServer(ttl=0) as other, outbound.receiver(MX2) as direct, \
            admin_console(outbound.box, "mail.example.test") as console:
        mx(other, "far-away.test", (10, "mx.far-away.test", MX2))
        response = save(console, "dns_resolver", other.address)
        assert response.status_code == 303, response.text[:300]
        outbound.submit(["someone@far-away.test"])
        assert [t.rcpt_tos for t in direct.wait(1)] == [("someone@far-away.test",)]


@pytest.mark.parametrize(("name", "value"), [
    ("nosuch", "1"),
    ("dns_resolver", "resolver.example"),
    ("dns_resolver", "127.0.0.1:99999"),
    ("delivery_log_days", "0"),
    ("delivery_log_days", "ten"),
    ("queue_hold", "maybe"),
    ("status_checks", ""),
    ("port25_probe", "bad name!:25"),
])
def test_a_bad_value_is_shown_back_with_the_clis_message_and_nothing_saved(
        outbound: Outbound, name: str, value: str) -> None:
    with pytest.raises(SettingError) as refused:
        parse_setting(name, value)  # what `letterbox settings set` says, before its "; nothing was saved"
    with admin_console(outbound.box, "mail.example.test") as console:
        before = settings_rows(outbound)
        response = save(console, name, value)
        assert response.status_code == 400
        assert f"{refused.value}; nothing was saved." in html.unescape(response.text)
        if name in SETTABLE:
            own = section(response.text, name)
            assert 'class="error-text"' in own  # beside the setting it is about
            if not SETTABLE[name].choices:
                assert f'value="{html.escape(value)}"' in own  # what was typed, to correct
        assert settings_rows(outbound) == before
