"""Submission mends a field name written with space before its colon (`X-Mailer : ...`, RFC 5322's
obsolete syntax that a sender must not make): dkimpy refused to sign such a message, so it left unsigned
and failed DMARC at its receiver."""

from __future__ import annotations

import dkim

from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    MX1,
    OURS,
    Outbound,
    mx,
    outbound_fixture,
    parse,
    zone_fixture,
)

FAR = "far@example.net"
MESSAGE = (f"From: Alice <{ALICE}>\r\nTo: {FAR}\r\nX-Mailer : an old script\r\nSubject\t: spaced\r\n"
           f"Message-ID: <spaced@{OURS}>\r\n\r\nX-Body : stays as written\r\n").encode()


def test_a_spaced_field_name_is_mended_and_the_message_leaves_signed(outbound: Outbound) -> None:
    outbound.publish_dkim_key()
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    with outbound.receiver(MX1) as receiver:
        outbound.submit([FAR], MESSAGE)
        [transaction] = receiver.wait(1)
        outbound.wait_empty()
    raw = transaction.data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nX-Mailer: an old script\r\n" in head
    assert b"\r\nSubject: spaced\r\n" in head
    assert body == b"X-Body : stays as written\r\n"
    assert parse(raw)["Subject"] == "spaced"
    signature = dkim.DKIM(raw)
    assert signature.verify(dnsfunc=outbound.dkim_dns)
    assert signature.domain == OURS.encode()
