"""Forwards to other domains through the real queue, a loopback DNS zone and loopback receivers:
SRS senders and the bounces that come back to them (issue 10 item 13), no reports to senders that
did not authenticate (issue 11 item 3), and a DKIM key that follows the login (issue 11 item 2)."""

from __future__ import annotations

import smtplib
import time

from appliance import dkim_keys, srs
from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    MX1,
    MX2,
    OURS,
    Outbound,
    delivery_status,
    mx,
    outbound_fixture,
    parse,
    zone_fixture,
)
from tests.support.receivers import Script

ALIAS = f"friend@{OURS}"
TARGET = "friend@elsewhere.test"  # the alias's external target, at MX1
ORIGINAL = "sender@origin.test"  # who wrote to the alias, with its MX at MX2
BODY = b"From: Sender <sender@origin.test>\r\nTo: friend@ourdomain.test\r\nSubject: fwd\r\n\r\nHello.\r\n"
BOUNCE = (b"From: MAILER-DAEMON@elsewhere.test\r\nTo: whoever\r\nSubject: Undelivered\r\n\r\n"
          b"friend@elsewhere.test: no such user\r\n")


def forwarding(outbound: Outbound) -> None:
    outbound.box.run(outbound.box.services.accounts.add_alias(ALIAS, [TARGET]))
    mx(outbound.zone, "elsewhere.test", (10, "mx.elsewhere.test", MX1))
    mx(outbound.zone, "origin.test", (10, "mx.origin.test", MX2))
    mx(outbound.zone, "attacker.test", (10, "mx.attacker.test", MX2))


def send_mx(outbound: Outbound, sender: str, rcpt: str, data: bytes = BODY) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", outbound.box.port("smtp"), timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(data)


def rewriter(outbound: Outbound) -> srs.SenderRewriter:
    return outbound.box.services.srs


# --- SRS (issue 10 item 13) ---------------------------------------------------------------------------

def test_a_forward_leaves_with_an_srs_sender_and_its_bounce_goes_back(outbound: Outbound) -> None:
    forwarding(outbound)
    with outbound.receiver(MX1) as target, outbound.receiver(MX2) as origin:
        assert send_mx(outbound, ORIGINAL, ALIAS)[0] == 250
        [forward] = target.wait(1)
        outbound.wait_empty()
        assert forward.rcpt_tos == (TARGET,)
        srs_sender = forward.mail_from
        assert srs_sender.startswith("SRS0=")
        assert srs_sender.endswith(f"=origin.test=sender@{OURS}")
        assert forward.data.endswith(BODY)  # the message itself is untouched
        assert not forward.data.startswith(b"DKIM-Signature")  # not signed for someone else's From:

        # The target's server bounces to the SRS address: the MX takes it and relays it, null sender
        # kept, to the original sender.
        assert send_mx(outbound, "", srs_sender, BOUNCE)[0] == 250
        [bounce] = origin.wait(1)
        outbound.wait_empty()
    assert bounce.rcpt_tos == (ORIGINAL,)
    assert bounce.mail_from == "<>"
    assert bounce.data.endswith(BOUNCE)


def test_a_forward_that_comes_back_is_a_forwarding_loop_at_once(outbound: Outbound) -> None:
    """An alias forwarding to a mailbox elsewhere that forwards back (a .forward, a webmail's rule) went
    round 25 times, until its 50 Received: lines were a 554 5.4.6, each time a copy for every target
    (measured with a loopback forwarder: 25 copies in Alice's inbox, attack41). The forward now says
    which alias sent it (Delivered-To:, as Postfix's local(8) writes it) and comes back as a loop."""
    forwarding(outbound)
    family = f"family@{OURS}"
    outbound.box.run(outbound.box.services.accounts.add_alias(family, [TARGET, ALICE]))
    outbound.box.add_user(f"bob@{OURS}", "correct horse battery staple 9")
    with outbound.receiver(MX1) as target:
        assert send_mx(outbound, ORIGINAL, family)[0] == 250
        [forward] = target.wait(1)
        outbound.wait_empty()
    assert f"Delivered-To: {family}\r\n".encode() in forward.data
    # Elsewhere's server sends it back to the alias, with its own Received: line on top.
    back = b"Received: from mx.ourdomain.test by mx.elsewhere.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + forward.data
    code, text = send_mx(outbound, forward.mail_from, family, back)
    assert (code, text) == (554, f"5.4.6 mail forwarding loop for {family}".encode())
    assert len(outbound.inbox()) == 1
    # With another recipient that does not loop, that one still gets it (SMTP has one reply for all).
    with smtplib.SMTP("127.0.0.1", outbound.box.port("smtp"), timeout=30) as client:
        client.ehlo("mx.elsewhere.test")
        client.mail(forward.mail_from)
        assert client.rcpt(family)[0] == 250
        assert client.rcpt(f"bob@{OURS}")[0] == 250
        assert client.data(back)[0] == 250
    assert len(outbound.inbox(f"bob@{OURS}")) == 1
    assert len(outbound.inbox()) == 1
    assert outbound.messages() == []


def test_forged_and_expired_srs_addresses_are_refused(outbound: Outbound) -> None:
    forwarding(outbound)
    good = rewriter(outbound).forward(ORIGINAL, OURS)
    forged = good.replace("=origin.test=", "=victim.test=")
    expired = rewriter(outbound).forward(ORIGINAL, OURS, now=time.time() - (srs.MAX_AGE_DAYS + 2) * 86400)
    made_up = f"SRS0=abcdefgh=AA=origin.test=sender@{OURS}"
    long_forged = f"SRS0=abcdefgh=AA=origin.test={'x' * 80}@{OURS}"  # longer than a local part may be
    for address in (forged, expired, made_up, long_forged):
        code, text = send_mx(outbound, "", address, BOUNCE)
        assert code == 550, (address, code, text)
        assert b"SRS" in text
    # Someone else's SRS address is an ordinary remote one: no relaying for strangers.
    assert send_mx(outbound, "", "SRS0=abcdefgh=AA=origin.test=sender@elsewhere.test", BOUNCE)[0] == 554
    assert outbound.messages() == []
    assert send_mx(outbound, "", good, BOUNCE)[0] == 250  # the genuine one still works


def test_the_null_sender_and_our_own_senders_are_not_rewritten(outbound: Outbound) -> None:
    forwarding(outbound)
    with outbound.receiver(MX1) as target:
        assert send_mx(outbound, "", ALIAS)[0] == 250
        assert send_mx(outbound, ALICE, ALIAS)[0] == 250
        transactions = target.wait(2)
        outbound.wait_empty()
    assert sorted(t.mail_from for t in transactions) == ["<>", ALICE]


# --- backscatter (issue 11 item 3) --------------------------------------------------------------------

def test_a_failed_forward_is_not_reported_to_a_sender_that_failed_spf(outbound: Outbound) -> None:
    forwarding(outbound)
    outbound.setting("inbound_auth", "on")
    outbound.zone.set("attacker.test", "TXT", ['"v=spf1 -all"'])
    refuse = Script(rcpt={TARGET: "550 5.1.1 <friend@elsewhere.test>: no such user"})
    with outbound.receiver(MX1, script=refuse) as target, outbound.receiver(MX2) as attacker:
        assert send_mx(outbound, "spam@attacker.test", ALIAS,
                       BODY.replace(b"sender@origin.test", b"spam@attacker.test"))[0] == 250
        outbound.wait_until(lambda: target.connections >= 1, what="the forward attempt")
        # A message leaves the queue only after its failures are settled, any report first
        # (appliance/queue/reports.py): with the queue empty, a report would already be out.
        outbound.wait_empty()
        assert attacker.transactions == []
        assert attacker.connections == 0
    assert outbound.inbox() == []


def test_a_failed_forward_is_reported_to_an_authenticated_original_sender(outbound: Outbound) -> None:
    forwarding(outbound)
    outbound.setting("inbound_auth", "on")
    outbound.zone.set("origin.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    refuse = Script(rcpt={TARGET: "550 5.1.1 <friend@elsewhere.test>: no such user"})
    with outbound.receiver(MX1, script=refuse), outbound.receiver(MX2) as origin:
        assert send_mx(outbound, ORIGINAL, ALIAS)[0] == 250
        [report] = origin.wait(1)
        outbound.wait_empty()
    # Straight to the original sender (decoded from the SRS sender), from the null sender.
    assert report.rcpt_tos == (ORIGINAL,)
    assert report.mail_from == "<>"
    msg = parse(report.data)
    assert msg["To"] == ORIGINAL
    _, per_recipient = delivery_status(report.data)
    assert per_recipient["Final-Recipient"] == f"rfc822; {TARGET}"
    assert per_recipient["Status"] == "5.1.1"


# --- DKIM (issue 11 item 2) ---------------------------------------------------------------------------

def test_the_dkim_key_follows_what_the_login_may_send_as(outbound: Outbound) -> None:
    box = outbound.box
    box.run(box.services.accounts.add_domain("second.test"))
    for domain in (OURS, "second.test"):
        box.run(dkim_keys.ensure_key(box.services.db, box.data.dkim, domain))
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    spool = outbound.queue.spool

    def message(author: str) -> bytes:
        return f"From: {author}\r\nTo: a@example.net\r\nSubject: s\r\n\r\nbody\r\n".encode()

    with outbound.receiver(MX1) as receiver:
        # Queued with alice's login recorded: the second layer behind submission's From: check.
        box.run(spool.enqueue(ALICE, ["a@example.net"], message("Boss <boss@second.test>"), auth_user=ALICE))
        box.run(spool.enqueue(ALICE, ["a@example.net"], message(f"Alice <{ALICE}>"), auth_user=ALICE))
        box.run(spool.enqueue(ALICE, ["a@example.net"], message(f"Alice <{ALICE}>")))  # no login
        transactions = receiver.wait(3)
        outbound.wait_empty()
    outcome = sorted((str(parse(t.data)["From"]), t.data.startswith(b"DKIM-Signature")) for t in transactions)
    # alice may not send as boss@second.test: unsigned although the box has that domain's key; her own
    # address is signed only when her login came with it.
    assert outcome == [(f"Alice <{ALICE}>", False), (f"Alice <{ALICE}>", True), ("Boss <boss@second.test>", False)]
    [ours] = [t.data for t in transactions if t.data.startswith(b"DKIM-Signature")]
    assert b"d=ourdomain.test" in ours.split(b"\r\n\r\n")[0]
