"""Settings changed through the web take effect in the running services at once (issue 10 item 3).

The box runs with every listener on loopback; the host name is changed through the wizard's step 1
over real HTTPS, then each service that names the box is asked: SMTP banner and EHLO on the MX and
submission, Received on delivered mail, Message-ID added at submission, the MX's
Authentication-Results (and the forged one it strips), the IMAP and POP3 greetings, the DSN a failed
local copy produces, and the mail-client autoconfig the web serves.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import BoxHandle
from tests.support.dns_server import ZoneServer
from tests.support.outbound import MX1, Outbound, mx, outbound_fixture  # noqa: F401  (fixture)
from tests.support.smtp_wire import Wire, maildir_messages, parse
from tests.support.web import setup_code

NEW_NAME = "renamed.example.test"
ALICE, PASSWORD = "alice@example.test", "alice's long password 9"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def rename_through_the_wizard(box: BoxHandle, hostname: str) -> None:
    """Wizard step 1 over the box's own HTTPS listener, as a person at a browser does it."""
    base = f"https://localhost:{box.port('https')}"
    with httpx.Client(base_url=base, verify=box.client_context) as web:
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
