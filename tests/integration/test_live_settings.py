"""Settings changed through the web take effect in the running services at once (issue 10 item 3).

The box runs with every listener on loopback; the host name is changed through the wizard's step 1
over real HTTPS, then each service that names the box is asked: SMTP banner and EHLO on the MX and
submission, Received on delivered mail, Message-ID added at submission, the MX's
Authentication-Results (and the forged one it strips), the IMAP and POP3 greetings, the DSN a failed
local copy produces, and the mail-client autoconfig the web serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.db import Database
from appliance.queue.smarthost import Smarthost
from appliance.settings import Settings
from tests.conftest import LETTERBOX, BoxHandle
from tests.integration.test_outbound_smarthost import RELAY_NAME, RELAY_PASSWORD, RELAY_USER, relay_tls
from tests.support.dns_server import ZoneServer
from tests.support.outbound import MX1, MX2, Outbound, mx, outbound_fixture  # noqa: F401  (fixture)
from tests.support.receivers import Receiver
from tests.support.smtp_wire import Wire, maildir_messages, parse
from tests.support.web import setup_code

NEW_NAME = "renamed.example.test"
ALICE, PASSWORD = "alice@example.test", "alice's long password 9"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextlib.contextmanager
def admin_console(box: BoxHandle, hostname: str = NEW_NAME) -> Iterator[httpx.Client]:
    """A browser-like client on the box's own HTTPS listener, logged in as the admin made by step 1."""
    base = f"https://localhost:{box.port('https')}"
    with httpx.Client(base_url=base, verify=box.client_context) as web:
        _step1(web, box, hostname)
        yield web


def rename_through_the_wizard(box: BoxHandle, hostname: str) -> None:
    """Wizard step 1 over the box's own HTTPS listener, as a person at a browser does it."""
    with admin_console(box, hostname):
        pass


def _step1(web: httpx.Client, box: BoxHandle, hostname: str) -> None:
    page = web.get("/setup/1")
    assert page.status_code == 200, page.text[:300]
    token = _CSRF.search(page.text)
    assert token, page.text[:500]
    response = web.post("/setup/1", data={
        "csrf": token.group(1), "code": setup_code(box.data.root), "name": ADMIN, "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD,
        "hostname": hostname,
    })
    assert response.status_code == 303, response.text[:500]


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer(ttl=0) as server:
        yield server


@pytest.fixture
def renamed(box: BoxHandle, zone: ZoneServer) -> BoxHandle:
    box.add_user(ALICE, PASSWORD)
    box.run(box.services.db.set_setting("dns_resolver", zone.address))
    box.run(box.services.db.set_setting("inbound_auth", "on"))
    assert box.services.hostname != NEW_NAME
    rename_through_the_wizard(box, NEW_NAME)
    return box


def test_smtp_banner_and_ehlo_name_follow_a_rename(renamed: BoxHandle) -> None:
    for service in ("smtp", "submission", "lmtp"):
        with Wire(renamed.port(service)) as wire:
            code, banner = wire.reply()
            assert code == 220, (service, banner)
            assert banner.startswith(NEW_NAME), (service, banner)
            hello = "LHLO" if service == "lmtp" else "EHLO"
            code, text = wire.cmd(f"{hello} client.test")
            assert code == 250, (service, text)
            assert text.splitlines()[0].startswith(NEW_NAME), (service, text)


def test_received_and_authentication_results_follow_a_rename(renamed: BoxHandle) -> None:
    forged = (f"Authentication-Results: {NEW_NAME}; dkim=pass header.d=bank.example\r\n"
              "From: Bank <ceo@bank.example>\r\nTo: alice@example.test\r\nSubject: pay\r\n\r\nPay.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", renamed.port("smtp"), timeout=30) as client:
        client.ehlo("mta.sender.test")
        client.sendmail("bounce@bank.example", [ALICE], forged)
    [raw] = maildir_messages(renamed.data.mail, ALICE)
    message = parse(raw)
    results = message.get_all("Authentication-Results")
    assert results is not None
    assert len(results) == 1, results
    flat = " ".join(results[0].split())
    assert flat.startswith(f"{NEW_NAME};")
    assert "dkim=pass" not in flat
    assert "header.d=bank" not in flat
    assert "dkim=none" in flat
    assert f"by {NEW_NAME} (Letterbox)" in " ".join(message["Received"].split())


def test_submission_names_the_new_host(renamed: BoxHandle) -> None:
    with smtplib.SMTP("127.0.0.1", renamed.port("submission"), timeout=30) as client:
        client.starttls(context=renamed.client_context)
        client.login(ALICE, PASSWORD)
        client.sendmail(ALICE, [ALICE], b"From: alice@example.test\r\nSubject: self\r\n\r\nHi.\r\n")
    [raw] = maildir_messages(renamed.data.mail, ALICE)
    message = parse(raw)
    assert message["Message-ID"].rstrip(">").endswith(f"@{NEW_NAME}")
    assert f"by {NEW_NAME} (Letterbox)" in " ".join(message["Received"].split())


def test_imap_and_pop3_greetings_follow_a_rename(renamed: BoxHandle) -> None:
    imap = imaplib.IMAP4("127.0.0.1", renamed.port("imap"), timeout=30)
    try:
        assert NEW_NAME.encode() in imap.welcome
    finally:
        imap.shutdown()
    pop = poplib.POP3("127.0.0.1", renamed.port("pop3"), timeout=30)
    try:
        assert NEW_NAME.encode() in pop.getwelcome()
    finally:
        pop.close()


def test_a_delivery_report_names_the_new_host(renamed: BoxHandle, zone: ZoneServer) -> None:
    """The MX's Deliverer (built at start) writes the DSN of a failed local copy with today's name:
    bob's mailbox is over quota, alice's copy is accepted, so alice gets the report (her domain's
    SPF passes: reports go only to senders proven not forged)."""
    zone.set("example.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    renamed.add_user("bob@example.test", PASSWORD, quota_bytes=1)
    with smtplib.SMTP("127.0.0.1", renamed.port("smtp"), timeout=30) as client:
        client.ehlo("mta.sender.test")
        client.mail(ALICE)  # no SIZE=: bob's quota is only found exceeded when the copy is written
        assert client.rcpt(ALICE)[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
    senders = [str(parse(raw)["From"]) for raw in maildir_messages(renamed.data.mail, ALICE)]
    assert any(f"MAILER-DAEMON@{NEW_NAME}" in sender for sender in senders), senders


def test_autoconfig_names_the_new_host(renamed: BoxHandle) -> None:
    http = renamed.port("http")
    response = httpx.get(f"http://localhost:{http}/mail/config-v1.1.xml?emailaddress={ALICE}")
    assert response.status_code == 200
    assert f"<hostname>{NEW_NAME}</hostname>" in response.text


def test_the_queue_says_helo_with_the_new_name(outbound: Outbound) -> None:
    """The outbound queue (started with the box) greets other servers with today's name."""
    rename_through_the_wizard(outbound.box, NEW_NAME)
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    with outbound.receiver(MX1) as receiver:
        outbound.submit(["someone@example.net"])
        [transaction] = receiver.wait(1)
    assert transaction.helo == NEW_NAME


# --- relay and hold: the queue reads the settings at use, whoever changed them ------------------------

def _relay_to_mx1(outbound: Outbound, tmp_path: Path) -> tuple[Receiver, Receiver]:
    """A relay (TLS + login) on MX1 and far-away.test's own MX on MX2, the relay stored and in use."""
    ca_file = tmp_path / "relay-ca.pem"
    outbound.ca.cert_pem.write_to_path(str(ca_file))
    outbound.zone.set(RELAY_NAME, "A", [MX1])
    mx(outbound.zone, "far-away.test", (10, "mx.far-away.test", MX2))
    relay = Receiver(MX1, outbound.port, tls_context=relay_tls(outbound.ca), require_starttls=True,
                     credentials={RELAY_USER: RELAY_PASSWORD})
    direct = Receiver(MX2, outbound.port)
    outbound.box.run(outbound.box.services.settings.save(relay=Smarthost(
        RELAY_NAME, outbound.port, "starttls", RELAY_USER, RELAY_PASSWORD, str(ca_file))))
    return relay, direct


def test_relay_off_from_the_cli_is_in_force_when_the_cli_returns(outbound: Outbound, tmp_path: Path) -> None:
    """Issue 12: `letterbox relay off` (another process, the same SQLite file) while the box runs: the
    very next message goes straight to the recipient's MX. The queue had just used the relay, so a
    cached reading of the settings (the old 1-second timer) would have carried it there."""
    relay, direct = _relay_to_mx1(outbound, tmp_path)
    with relay, direct:
        outbound.submit(["first@far-away.test"])
        assert [t.rcpt_tos for t in relay.wait(1)] == [("first@far-away.test",)]
        outbound.wait_empty()
        result = subprocess.run([LETTERBOX, "--data", str(outbound.box.data.root), "relay", "off"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        outbound.submit(["second@far-away.test"])
        assert [t.rcpt_tos for t in direct.wait(1)] == [("second@far-away.test",)]
        outbound.wait_empty()
        assert len(relay.transactions) == 1
    assert outbound.box.services.settings.now.relay is None


def test_relay_off_through_the_console_reaches_the_queue_at_once(outbound: Outbound, tmp_path: Path) -> None:
    relay, direct = _relay_to_mx1(outbound, tmp_path)
    with relay, direct:
        outbound.submit(["first@far-away.test"])
        relay.wait(1)
        outbound.wait_empty()
        with admin_console(outbound.box) as web:
            page = web.get("/console/sending")
            token = _CSRF.search(page.text)
            assert page.status_code == 200, page.text[:300]
            assert token, page.text[:300]
            response = web.post("/console/sending", data={"csrf": token.group(1), "mode": "direct", "action": "save"})
            assert response.status_code == 303, response.text[:500]
        outbound.submit(["second@far-away.test"])
        assert [t.rcpt_tos for t in direct.wait(1)] == [("second@far-away.test",)]
        assert len(relay.transactions) == 1


def test_hold_set_by_another_process_stops_delivery_and_lifting_it_resumes(outbound: Outbound) -> None:
    """queue_hold written through a second SQLite connection (as the CLI or a script would): seen by
    the running queue at its next use (PRAGMA data_version), and lifting it delivers what waited."""
    mx(outbound.zone, "far-away.test", (10, "mx.far-away.test", MX2))

    async def write_hold(value: bool) -> None:
        other = await Database.open(outbound.box.data.db)
        try:
            await Settings(other, default_hostname="other.test").save(hold=value)
        finally:
            await other.close()

    with Receiver(MX2, outbound.port) as direct:
        asyncio.run(write_hold(True))
        outbound.submit(["held@far-away.test"])
        [held] = outbound.messages()
        assert outbound.box.run(outbound.box.services.settings.fresh()).hold
        outbound.queue.wake()  # a pass with the hold on: nothing leaves
        outbound.box.run(asyncio.sleep(0.3))
        assert direct.transactions == []
        assert outbound.messages()[0].id == held.id
        asyncio.run(write_hold(False))
        outbound.wake()  # the next pass (or the 5 s poll) reads the hold lifted
        assert [t.rcpt_tos for t in direct.wait(1)] == [("held@far-away.test",)]


def test_the_queue_is_told_of_a_settings_change(outbound: Outbound) -> None:
    """One subscription: a change saved through Settings wakes the queue (no per-service copy)."""
    seen: list[tuple[bool, bool]] = []
    outbound.box.run(outbound.box.services.settings.fresh())  # the fixture's own changes are not ours to see
    unsubscribe = outbound.box.services.settings.subscribe(lambda before, after: seen.append((before.hold, after.hold)))
    try:
        outbound.box.run(outbound.box.services.settings.save(hold=True))
        outbound.box.run(outbound.box.services.settings.save(hold=False))
    finally:
        unsubscribe()
    assert seen == [(False, True), (True, False)]
