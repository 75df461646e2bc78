"""Greylisting against a real sending MTA (issue 16): Debian's Postfix relays a message to the box's MX,
is told 451 (greylisted), keeps it in its queue, retries on its own, and gets it through once the delay
has passed; the triplet is then remembered. Postfix is a private instance on loopback (PEERS.md), with
its retry times shortened to seconds; the box runs in-process with greylisting reachable from loopback."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from dataclasses import replace

import pytest
import trustme

from appliance.spam.decisions import ACCEPT, DEFER, GREYLIST
from tests.conftest import BoxHandle, require_program
from tests.e2e.test_postfix_outbound import POSTFIX_HOST, PrivatePostfix
from tests.support.polling import wait_until
from tests.support.receivers import free_port
from tests.support.smtp_wire import maildir_messages

pytestmark = pytest.mark.e2e

ALICE, PASSWORD = "alice@example.test", "alice's long password"
BOB = "bob@example.net"  # Postfix's own domain: the sender


def sending_postfix(ca: trustme.CA, box_mx_port: int) -> PrivatePostfix:
    """The receiving test's Postfix, told to relay everything to the box's MX and retry within seconds."""
    instance = PrivatePostfix(free_port(("127.0.0.1", POSTFIX_HOST)), ca)
    with (instance.root / "etc" / "main.cf").open("a") as main_cf:  # later lines win in main.cf
        main_cf.write(f"relayhost = [127.0.0.1]:{box_mx_port}\n"
                      "smtp_tls_security_level = none\n"
                      "queue_run_delay = 2s\n"
                      "minimal_backoff_time = 2s\n"
                      "maximal_backoff_time = 4s\n")
    return instance


@pytest.fixture
def postfix(box: BoxHandle, ca: trustme.CA) -> Iterator[PrivatePostfix]:
    require_program("postfix")
    instance = sending_postfix(ca, box.port("smtp"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_postfix_is_greylisted_retries_by_itself_and_gets_through(box: BoxHandle, postfix: PrivatePostfix) -> None:
    box.add_user(ALICE, PASSWORD)
    settings = box.services.settings
    box.run(settings.save(spam=replace(settings.now.spam, skip_networks=(), dnsbl=False, domain_blocklist=False,
                                       greeting_delay=0.0, greylist=True, greylist_delay=3)))
    message = f"From: Bob <{BOB}>\r\nTo: {ALICE}\r\nSubject: greylisted\r\n\r\nPlease retry.\r\n"
    with smtplib.SMTP(POSTFIX_HOST, postfix.port, timeout=30) as client:
        assert client.sendmail(BOB, [ALICE], message) == {}
    try:
        delivered = wait_until(lambda: maildir_messages(box.data.mail, ALICE), seconds=90,
                               what="Postfix's retry delivered after the greylisting delay")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; Postfix's log:\n{postfix.log.read_text(errors='replace')}") from None
    assert b"Subject: greylisted" in delivered[0]
    def sent_log() -> str:
        text = postfix.log.read_text(errors="replace")
        return text if "status=sent" in text else ""

    log = wait_until(sent_log, seconds=30, what="Postfix's log of the delivery")
    assert "451 4.7.1 Greylisted" in log  # Postfix was deferred first...
    assert "status=deferred" in log
    assert "status=sent" in log  # ...and sent it itself later
    [entry] = box.run(box.services.greylist.entries(passed=True))
    assert (entry.sender, entry.recipient) == (BOB, ALICE)
    assert entry.passed_at is not None
    assert entry.passed_at - entry.first_seen >= 3
    verdicts = [d.verdict for d in reversed(box.run(box.services.spam_decisions.recent(layer=GREYLIST)))]
    assert verdicts[0] == DEFER
    assert verdicts[-1] == ACCEPT
