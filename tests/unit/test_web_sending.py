"""The console's Sending page and the wizard's "Sending mail" step over HTTP (starlette TestClient, real
services): direct delivery or a relay, the password never shown and kept when left empty, "Test the
relay" against a real relay on loopback that requires STARTTLS and AUTH (tests/support/receivers.py,
as in tests/integration/test_outbound_smarthost.py), and the queue: listed, retried, deleted with the
CLI's functions, admin only and CSRF-protected."""

from __future__ import annotations

import asyncio
import html
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from appliance.delivery_log import Delivery, Search
from appliance.queue.client import Outcome
from appliance.queue.relay_check import check_relay
from appliance.queue.smarthost import Smarthost
from appliance.queue.state import spool_file
from tests.support.dns_server import ZoneServer
from tests.support.receivers import Receiver, free_port
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, WebClient, logged_in

RELAY_NAME, RELAY_USER, RELAY_PASSWORD = "relay.example.test", "relay-user", "relay pass 5ecret!"
BOB, CAROL = "bob@elsewhere.example", "carol@far-away.example"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with logged_in(tmp_path / "data", ADMIN, ADMIN_PASSWORD) as client:
        yield client


def error_of(page: str, field: str) -> str:
    m = re.search(rf'id="e-{field}">([^<]*)<', page)
    assert m, f"no error next to {field}"
    return html.unescape(m.group(1))


def relay_form(**changes: str) -> dict[str, str]:
    values = {"mode": "relay", "relay_host": RELAY_NAME, "relay_port": "", "relay_tls": "starttls",
              "relay_user": RELAY_USER, "relay_password": RELAY_PASSWORD, "action": "save", "save_untested": "on"}
    values.update(changes)
    return values


def stored(web: WebClient) -> Smarthost | None:
    return web.run(web.services.settings.fresh).relay


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


# --- the relay form -----------------------------------------------------------------------------------

def test_sending_page_starts_with_direct_delivery(web: WebClient) -> None:
    page = web.get("/console/sending")
    assert page.status_code == 200
    assert 'id="mode-direct" checked' in page.text
    assert "Now: directly to each recipient" in page.text
    assert 'href="/console/sending" class="active">Sending</a>' in page.text
    assert "Nothing is waiting" in page.text


def test_save_a_relay_and_the_password_is_never_shown(web: WebClient) -> None:
    response = web.post("/console/sending", relay_form(relay_tls="implicit"), token_from="/console/sending")
    assert (response.status_code, response.headers["location"]) == (303, "/console/sending")
    assert stored(web) == Smarthost(RELAY_NAME, 465, "implicit", RELAY_USER, RELAY_PASSWORD)
    page = web.get("/console/sending").text
    assert "Saved: outbound mail goes through the relay relay.example.test." in page
    assert 'id="mode-relay" checked' in page
    assert f'value="{RELAY_NAME}"' in page
    assert 'value="465"' in page
    assert '<option value="implicit" selected>' in page
    assert f'value="{RELAY_USER}"' in page
    assert "A password is stored: leave this empty to keep it." in page
    assert "5ecret" not in page
    assert "relay.example.test:465 (implicit) as relay-user" in page
    events = [text for _, _, text in web.run(web.services.events.recent)]
    assert "outbound mail goes through the relay relay.example.test:465 (implicit) as relay-user" in events
    assert not any("5ecret" in text for text in events)


def test_an_empty_password_keeps_the_stored_one(web: WebClient) -> None:
    web.post("/console/sending", relay_form(), token_from="/console/sending")
    response = web.post("/console/sending", relay_form(relay_password="", relay_port="2525"),
                        token_from="/console/sending")
    assert response.status_code == 303
    assert stored(web) == Smarthost(RELAY_NAME, 2525, "starttls", RELAY_USER, RELAY_PASSWORD)
    # ...but not for another user: that password was never typed for them.
    response = web.post("/console/sending", relay_form(relay_password="", relay_user="someone-else"),
                        token_from="/console/sending")
    assert response.status_code == 400
    assert "another user or host" in error_of(response.text, "relay_password")
    assert stored(web) == Smarthost(RELAY_NAME, 2525, "starttls", RELAY_USER, RELAY_PASSWORD)


def test_errors_are_shown_next_to_their_fields_and_nothing_is_saved(web: WebClient) -> None:
    response = web.post("/console/sending", relay_form(relay_host="not a host", relay_port="70000",
                                                       relay_password="typed secret"), token_from="/console/sending")
    assert response.status_code == 400
    assert "not a valid domain" in error_of(response.text, "relay_host")
    assert "between 1 and 65535" in error_of(response.text, "relay_port")
    assert 'value="70000"' in response.text
    superscript = web.post("/console/sending", relay_form(relay_port="\u00b2"), token_from="/console/sending")
    assert "between 1 and 65535" in error_of(superscript.text, "relay_port")  # it answered 500
    assert "typed secret" not in response.text
    assert stored(web) is None


def test_choosing_direct_delivery_clears_the_relay(web: WebClient) -> None:
    web.run(web.services.settings.save, relay=Smarthost(RELAY_NAME, 587, "starttls", RELAY_USER, RELAY_PASSWORD))
    response = web.post("/console/sending", {"mode": "direct", "action": "save"}, token_from="/console/sending")
    assert response.status_code == 303
    assert stored(web) is None
    assert web.setting("smarthost_password") == ""
    assert "directly to each recipient's mail server." in text_of(web.get("/console/sending").text)


def test_testing_needs_a_relay(web: WebClient) -> None:
    response = web.post("/console/sending", {"mode": "direct", "action": "test"}, token_from="/console/sending")
    assert response.status_code == 400
    assert "to test one" in error_of(response.text, "mode")


def test_wizard_step_resumes_with_the_stored_relay(web: WebClient) -> None:
    web.set_setting("setup_done", "0")
    web.set_setting("setup_step", "5")
    response = web.post("/setup/5", relay_form(relay_password=""), token_from="/setup/5")
    assert response.status_code == 400
    assert "enter the password" in error_of(response.text, "relay_password")
    response = web.post("/setup/5", relay_form(), token_from="/setup/5")
    assert response.headers["location"] == "/setup/6"
    assert stored(web) == Smarthost(RELAY_NAME, 587, "starttls", RELAY_USER, RELAY_PASSWORD)
    # A reload (or a new login) shows the step as it was left, without the password.
    web.client.cookies.clear()
    web.login(ADMIN, ADMIN_PASSWORD)
    assert web.get("/setup").headers["location"] == "/setup/6"
    page = web.get("/setup/5").text
    assert 'id="mode-relay" checked' in page
    assert f'value="{RELAY_NAME}"' in page
    assert "5ecret" not in page
    assert "A password is stored" in page
    # Left empty, the password stays; changed to direct delivery, the relay goes.
    assert web.post("/setup/5", relay_form(relay_password=""), token_from="/setup/5").status_code == 303
    assert stored(web) == Smarthost(RELAY_NAME, 587, "starttls", RELAY_USER, RELAY_PASSWORD)
    assert web.post("/setup/5", {"mode": "direct"}, token_from="/setup/5").headers["location"] == "/setup/6"
    assert stored(web) is None


# --- "Test the relay" against a real relay --------------------------------------------------------------

@pytest.fixture
def relay_zone() -> Iterator[ZoneServer]:
    with ZoneServer({(RELAY_NAME, "A"): ["127.0.0.1"]}, ttl=0) as zone:
        yield zone


@pytest.fixture
def relay(web: WebClient, ca: trustme.CA, relay_zone: ZoneServer, tmp_path: Path) -> Iterator[Receiver]:
    """A relay on loopback requiring STARTTLS and then AUTH, its certificate from the test CA; the box
    trusts that CA through the smarthost_ca_file setting, as a real box could."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(RELAY_NAME).configure_cert(tls)
    ca_file = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    web.set_setting("smarthost_ca_file", str(ca_file))
    web.set_setting("dns_resolver", relay_zone.address)
    with Receiver("127.0.0.1", free_port(("127.0.0.1",)), tls_context=tls, require_starttls=True,
                  credentials={RELAY_USER: RELAY_PASSWORD}) as receiver:
        yield receiver


def test_the_relay_test_logs_in_sends_nothing_and_saves(web: WebClient, relay: Receiver) -> None:
    response = web.post("/console/sending", relay_form(relay_port=str(relay.port), action="test"),
                        token_from="/console/sending")
    assert (response.status_code, response.headers["location"]) == (303, "/console/sending")
    page = text_of(web.get("/console/sending").text)
    assert "The relay works (relay.example.test[127.0.0.1], TLSv1." in page
    assert f"logged in as {RELAY_USER}). It is saved" in page
    assert relay.connections == 1
    assert relay.failed_logins == 0
    assert relay.transactions == []
    saved = stored(web)
    assert saved is not None
    assert (saved.port, saved.password) == (relay.port, RELAY_PASSWORD)
    assert saved.ca_file == web.setting("smarthost_ca_file")


def test_a_wrong_password_shows_the_relays_answer_and_saves_nothing(
    web: WebClient, relay: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = web.post("/console/sending", relay_form(relay_port=str(relay.port), relay_password="wrong password",
                                                       action="test"), token_from="/console/sending")
    assert response.status_code == 200
    result = re.search(r'<div class="test-result error" id="relay-test"[^>]*>(.*?)</div>', response.text, re.S)
    assert result, response.text[-3000:]
    shown = text_of(result.group(1))
    assert "The test failed:" in shown
    assert "relay refused our login: 535" in shown
    assert "Nothing was saved" in shown
    assert "wrong password" not in response.text
    assert f'value="{RELAY_NAME}"' in response.text
    assert relay.failed_logins >= 1
    assert relay.transactions == []
    assert stored(web) is None
    assert "wrong password" not in caplog.text
    events = [text for _, _, text in web.run(web.services.events.recent)]
    assert any("relay test of relay.example.test" in text and "535" in text for text in events)


def test_the_wizard_step_tests_the_relay_too(web: WebClient, relay: Receiver) -> None:
    web.set_setting("setup_done", "0")
    web.set_setting("setup_step", "5")
    response = web.post("/setup/5", relay_form(relay_port=str(relay.port), action="test"), token_from="/setup/5")
    assert response.headers["location"] == "/setup/5"  # tested and saved; Continue is still to be pressed
    assert "The relay works" in text_of(web.get("/setup/5").text)
    saved = stored(web)
    assert saved is not None
    assert web.setting("smarthost_tested") == saved.describe()
    response = web.post("/setup/5", relay_form(relay_port=str(relay.port), relay_password=""), token_from="/setup/5")
    assert response.headers["location"] == "/setup/6"


def test_a_relay_named_localhost_is_found_through_the_system_resolver(
    web: WebClient, ca: trustme.CA, tmp_path: Path
) -> None:
    """Issue 10 item 16: `localhost` gave "no address found" (DNS only); without a dns_resolver setting
    the relay is looked up as any program would, /etc/hosts included."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    web.set_setting("smarthost_ca_file", str(tmp_path / "relay-ca.pem"))
    assert not web.setting("dns_resolver")
    with Receiver("127.0.0.1", free_port(("127.0.0.1",)), tls_context=tls, require_starttls=True,
                  credentials={RELAY_USER: RELAY_PASSWORD}) as receiver:
        response = web.post("/console/sending", relay_form(relay_host="localhost", relay_port=str(receiver.port),
                                                           action="test"), token_from="/console/sending")
        assert response.status_code == 303, text_of(response.text)[-800:]
        assert "The relay works (localhost[127.0.0.1]" in text_of(web.get("/console/sending").text)
        assert receiver.connections >= 1


@pytest.mark.parametrize("path", ["/setup/5", "/console/sending"])
def test_continue_after_a_failed_test_needs_a_second_yes(web: WebClient, relay: Receiver, path: str) -> None:
    """Issue 10 item 9: a failed test, then Continue, saved a relay that does not work."""
    web.set_setting("setup_done", "0")
    web.set_setting("setup_step", "5")
    failing = relay_form(relay_port=str(relay.port), relay_password="wrong password")
    response = web.post(path, {**failing, "action": "test"}, token_from=path)
    assert 'id="f-save_untested"' in response.text  # offered right after the failure
    response = web.post(path, {**failing, "save_untested": ""}, token_from=path)
    assert response.status_code == 400
    assert "has not passed a test" in error_of(response.text, "save_untested")
    assert stored(web) is None
    response = web.post(path, {**failing, "save_untested": "on"}, token_from=path)
    assert response.status_code == 303
    assert stored(web) == Smarthost(RELAY_NAME, relay.port, "starttls", RELAY_USER, "wrong password",
                                    web.setting("smarthost_ca_file") or "")


def test_an_untrusted_certificate_and_a_closed_port(web: WebClient, relay: Receiver, tmp_path: Path) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    web.set_setting("smarthost_ca_file", str(tmp_path / "other-ca.pem"))
    response = web.post("/console/sending", relay_form(relay_port=str(relay.port), action="test"),
                        token_from="/console/sending")
    shown = text_of(response.text)
    assert "TLS handshake failed" in shown
    assert "not signed by an authority this box trusts" in shown
    assert "CERTIFICATE_VERIFY_FAILED" not in response.text
    assert "_ssl.c" not in response.text
    assert relay.failed_logins == 0
    assert stored(web) is None
    closed = free_port(("127.0.0.1",))
    response = web.post("/console/sending", relay_form(relay_port=str(closed), action="test"),
                        token_from="/console/sending")
    assert "connection refused: nothing accepts connections" in text_of(response.text)
    assert "Errno" not in response.text


# --- the queue ------------------------------------------------------------------------------------------

def test_the_queue_is_listed_with_each_recipients_state(web: WebClient) -> None:
    first = web.enqueue([BOB, CAROL])
    second = web.enqueue(["dave@nowhere.example"])
    web.attempt(first, {BOB: Outcome("4.4.1", "mx.elsewhere.example[192.0.2.1]:25: connection failed: [Errno 111] "
                                              "Connection refused", "mx.elsewhere.example[192.0.2.1]")})
    web.attempt(second, {"dave@nowhere.example": Outcome("5.1.1", "550 5.1.1 no such user", "mx[192.0.2.2]")})
    page = web.get("/console/sending").text
    assert f'id="msg-{first}"' in page
    assert f'id="msg-{second}"' in page
    assert f"<code>{ALICE}</code>" in page
    text = text_of(page)
    assert re.search(rf"{BOB}\s+deferred\s+1\s+\d{{4}}-\d\d-\d\d [\d:]+ [A-Z]+\s+connection refused by "
                     r"mx\.elsewhere\.example \(192\.0\.2\.1\) port 25", text), text
    assert "Errno" not in page
    assert re.search(rf"{CAROL}\s+waiting\s+0\s+now", text), text
    assert re.search(r"dave@nowhere.example\s+failed\s+1\s+–\s+550 5.1.1 no such user", text), text
    assert re.search(r"2 messages\s*, [\d.]+ (bytes|KiB)\s+1 deferred\s+1 failed", text), text
    status = text_of(web.get("/console").text)
    assert re.search(r"Outbound queue\s+2 messages\s*, [\d.]+ (bytes|KiB)\s+1 deferred\s+1 failed", status), status
    assert '<a href="/console/sending">2 messages</a>' in web.get("/console").text


def test_the_delivery_log_says_a_deferral_as_the_sending_page_does(web: WebClient) -> None:
    # The row's detail is the queue's exact text (as _finish records it); the page says it in words.
    exact = "mx.elsewhere.example[192.0.2.1]:25: connection failed: [Errno 111] Connection refused"
    row = Delivery(direction="out", result="deferred", sender=ALICE, recipient=BOB, detail=exact,
                   client="mx.elsewhere.example[192.0.2.1]")

    async def record() -> None:
        web.services.delivery_log.record(row)

    web.run(record)
    page = web.get("/console/log").text
    assert "connection refused by mx.elsewhere.example (192.0.2.1) port 25" in text_of(page), text_of(page)
    assert "Errno" not in page
    assert web.run(web.services.delivery_log.search, Search(address=BOB))[0].detail == exact  # kept exact


def test_retry_now_makes_a_deferred_message_due(web: WebClient) -> None:
    first = web.enqueue([BOB])
    second = web.enqueue([CAROL])
    for message_id, rcpt in ((first, BOB), (second, CAROL)):
        web.attempt(message_id, {rcpt: Outcome("4.4.1", "connection refused")})  # next attempt in a minute
    assert all(m.recipients[0].next_attempt > time.time() for m in web.queue())
    response = web.post(f"/console/sending/{first}/retry", token_from="/console/sending")
    assert response.headers["location"] == "/console/sending"
    due = {m.id: m.recipients[0].next_attempt for m in web.queue()}
    assert due[first] <= time.time() < due[second]
    assert f"Message {first}: 1 recipient will be tried again now." in web.get("/console/sending").text
    web.post("/console/sending/retry", token_from="/console/sending")
    assert all(m.recipients[0].next_attempt <= time.time() for m in web.queue())
    assert "2 recipients will be tried again now." in web.get("/console/sending").text  # every queued one


def test_delete_asks_first_then_removes_rows_and_file(web: WebClient) -> None:
    message_id = web.enqueue([BOB])
    path = spool_file(web.services.config.data.spool, message_id)
    assert path.exists()
    confirm = web.get(f"/console/sending/{message_id}/delete")
    assert confirm.status_code == 200
    assert f"Delete the queued message {message_id}?" in confirm.text
    assert BOB in confirm.text
    assert [m.id for m in web.queue()] == [message_id]  # asking deletes nothing
    response = web.post(f"/console/sending/{message_id}/delete", token_from=f"/console/sending/{message_id}/delete")
    assert response.headers["location"] == "/console/sending"
    assert web.queue() == []
    assert not path.exists()
    page = web.get("/console/sending").text
    assert f"Message {message_id} deleted from the queue." in page
    assert "Nothing is waiting" in page
    assert web.get(f"/console/sending/{message_id}/delete").status_code == 404
    response = web.post(f"/console/sending/{message_id}/delete", token_from="/console/sending")
    assert "was no longer in the queue" in web.get("/console/sending").text
    assert web.get("/console/sending/not-an-id/delete").status_code == 404


def test_queue_actions_need_the_csrf_token(web: WebClient) -> None:
    message_id = web.enqueue([BOB])
    web.attempt(message_id, {BOB: Outcome("4.4.1", "connection refused")})
    for path in (f"/console/sending/{message_id}/delete", f"/console/sending/{message_id}/retry",
                 "/console/sending/retry", "/console/sending"):
        for token in ("", "forged-" + "x" * 40):
            response = web.client.post(path, data={"csrf": token, "mode": "direct"}, follow_redirects=False)
            assert response.status_code == 403, path
    [message] = web.queue()
    assert message.id == message_id
    assert message.recipients[0].next_attempt > time.time()


def test_a_mailbox_owner_gets_403_everywhere(web: WebClient) -> None:
    message_id = web.enqueue([BOB])
    web.logout()
    web.login(ALICE, ALICE_PASSWORD)
    for path in ("/console/sending", f"/console/sending/{message_id}/delete"):
        assert web.get(path).status_code == 403, path
    token = web.csrf("/account")
    for path in ("/console/sending", "/console/sending/retry", f"/console/sending/{message_id}/retry",
                 f"/console/sending/{message_id}/delete"):
        response = web.client.post(path, data={"csrf": token, **relay_form()}, follow_redirects=False)
        assert response.status_code == 403, path
    assert [m.id for m in web.queue()] == [message_id]
    assert stored(web) is None


def test_a_relay_that_never_answers_is_given_up_on_in_time() -> None:
    """The test is bounded: a server that accepts the connection but never greets costs `seconds`."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts; nobody ever says 220
        relay = Smarthost("127.0.0.1", silent.getsockname()[1], "starttls", RELAY_USER, RELAY_PASSWORD)
        started = time.monotonic()
        result = asyncio.run(check_relay(relay, helo_name="mail.example.test", seconds=1.0))
    assert time.monotonic() - started < 5
    assert not result.ok
    assert "timed out" in result.detail
    assert RELAY_PASSWORD not in result.detail
