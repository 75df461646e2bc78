"""Submission drops Bcc: and Resent-Bcc: from what it sends, as Postfix's cleanup does (audit30): every
recipient gets the same copy, so a Bcc: left in told each of them who else got a blind copy. The
envelope is kept (the blind recipients still get the message), the queued copy is DKIM-signed without
them, and a user's own copy saved by IMAP APPEND (their Sent folder) keeps its Bcc:."""

from __future__ import annotations

import imaplib
import smtplib

import dkim

from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    MX1,
    OURS,
    PASSWORD,
    Outbound,
    mx,
    outbound_fixture,
    parse,
    zone_fixture,
)

BOB, CAROL = f"bob@{OURS}", f"carol@{OURS}"
FAR, HIDDEN = "far@example.net", "hidden@example.net"
HEAD = (f"From: Alice <{ALICE}>\r\nTo: {BOB}, {FAR}\r\nBcc: {CAROL},\r\n {HIDDEN}\r\nSubject: plans\r\n"
        f"resent-bcc : {HIDDEN}\r\nBCC:\r\nMessage-ID: <plans@{OURS}>\r\n")
BODY = b"Bcc: this line is text of the body.\r\n"
MESSAGE = HEAD.encode() + b"\r\n" + BODY


def assert_no_bcc(raw: bytes) -> None:
    message = parse(raw)
    assert message.get_all("Bcc") is None, raw
    assert message.get_all("Resent-Bcc") is None, raw
    assert b"hidden@" not in raw.partition(b"\r\n\r\n")[0]
    assert message["To"] == f"{BOB}, {FAR}"
    assert message["Subject"] == "plans"
    assert message["Message-ID"] == f"<plans@{OURS}>"
    assert raw.endswith(b"\r\n\r\n" + BODY)


def test_bcc_fields_leave_every_copy_and_the_blind_recipients_still_get_it(outbound: Outbound) -> None:
    box = outbound.box
    box.add_user(BOB, PASSWORD)
    box.add_user(CAROL, PASSWORD)
    outbound.publish_dkim_key()
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    with outbound.receiver(MX1) as receiver:
        outbound.submit([BOB, FAR, CAROL, HIDDEN], MESSAGE)
        [transaction] = receiver.wait(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == (FAR, HIDDEN)
    assert_no_bcc(transaction.data)
    signature = dkim.DKIM(transaction.data)
    assert signature.verify(dnsfunc=outbound.dkim_dns)
    assert signature.domain == OURS.encode()
    for local in (BOB, CAROL):
        [copy] = outbound.wait_inbox(1, local)
        assert_no_bcc(copy)


def test_the_users_own_copy_saved_by_imap_keeps_its_bcc(outbound: Outbound) -> None:
    """Only what goes out through submission is cleaned: a Sent copy is the user's own record."""
    box = outbound.box
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
        imap.login(ALICE, PASSWORD)
        imap.create("Sent")
        assert imap.append("Sent", "(\\Seen)", None, MESSAGE)[0] == "OK"
        imap.select("Sent")
        status, data = imap.fetch("1", "(BODY.PEEK[])")
    assert status == "OK"
    first = data[0]
    assert isinstance(first, tuple)
    assert first[1] == MESSAGE


def test_submission_keeps_a_message_without_bcc_byte_for_byte(outbound: Outbound) -> None:
    outbound.box.add_user(BOB, PASSWORD)
    plain = MESSAGE.replace(f"Bcc: {CAROL},\r\n {HIDDEN}\r\n".encode(), b"").replace(
        f"resent-bcc : {HIDDEN}\r\nBCC:\r\n".encode(), b"")
    plain = b"Date: Tue, 1 Dec 2026 01:00:00 +0000\r\n" + plain
    with smtplib.SMTP_SSL("127.0.0.1", outbound.box.port("submissions"), timeout=30,
                          context=outbound.box.client_context) as client:
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [BOB], plain) == {}
    [copy] = outbound.wait_inbox(1, BOB)
    assert copy.endswith(b"\r\n" + plain)
