"""Delivery status notifications (RFC 3464 in RFC 6522 multipart/report) for outbound mail (issue 7)."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import Message

import pytest

from appliance.queue.dsn import MAX_RETURNED_HEADERS, DsnRecipient, build_report, header_section, one_line
from tests.support.outbound import decoded, subparts

ARRIVAL = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
ORIGINAL = b"From: a@ours.test\r\nSubject: hello\r\nMessage-ID: <m1@ours.test>\r\n\r\nsecret body\r\n"


def report(action: str = "failed", **kw: object) -> bytes:
    recipients = kw.pop("recipients", [
        DsnRecipient("x@far.test", "5.1.1", "550 5.1.1 <x@far.test>: no such user", "mx.far.test"),
        DsnRecipient("y@gone.test", "5.1.10", "domain gone.test accepts no mail (null MX, RFC 7505)"),
    ])
    return build_report(hostname="mail.ours.test", sender="a@ours.test", queue_id="Q123", action=action,  # type: ignore[arg-type]
                        recipients=recipients, original=kw.pop("original", ORIGINAL), arrival=ARRIVAL, **kw)  # type: ignore[arg-type]


def parts(raw: bytes) -> tuple[Message, list[Message]]:
    msg = message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    return msg, subparts(msg)


def test_failure_report_structure() -> None:
    raw = report()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg, (text, status, headers) = parts(raw)
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.ours.test>"
    assert msg["To"] == "a@ours.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@ours.test>"
    assert text.get_content_type() == "text/plain"
    assert "<x@far.test> (from mx.far.test): 550 5.1.1" in decoded(text).decode()
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = subparts(status)
    assert per_message["Reporting-MTA"] == "dns; mail.ours.test"
    assert per_message["Arrival-Date"] == "Fri, 20 Nov 2026 08:00:00 +0000"
    assert (first["Final-Recipient"], first["Action"], first["Status"]) == ("rfc822; x@far.test", "failed", "5.1.1")
    assert first["Remote-MTA"] == "dns; mx.far.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <x@far.test>: no such user"
    # Not an SMTP reply: no Diagnostic-Code (RFC 3464 2.3.6 wants a diagnostic type), no Remote-MTA.
    assert second["Status"] == "5.1.10"
    assert second["Diagnostic-Code"] is None
    assert second["Remote-MTA"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = decoded(headers)
    assert b"Subject: hello" in returned
    assert b"secret body" not in returned


def test_delay_report_says_when_we_give_up() -> None:
    until = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    raw = report("delayed", will_retry_until=until,
                 recipients=[DsnRecipient("x@far.test", "4.4.1", "451 4.4.1 try later", "mx.far.test")])
    msg, (text, status, _) = parts(raw)
    assert msg["Subject"].startswith("Delayed Mail")
    assert "You do not need to send it again" in decoded(text).decode()
    _, rcpt = subparts(status)
    assert rcpt["Action"] == "delayed"
    assert rcpt["Will-Retry-Until"] == "Wed, 25 Nov 2026 08:00:00 +0000"


def test_never_to_the_null_sender_and_never_empty() -> None:
    with pytest.raises(ValueError):
        build_report(hostname="h", sender="", queue_id="Q", action="failed",
                     recipients=[DsnRecipient("x@y", "5.0.0", "no")], original=b"", arrival=ARRIVAL)
    with pytest.raises(ValueError):
        report(recipients=[])


def test_multi_line_replies_and_control_characters_stay_on_one_header_line() -> None:
    assert one_line("550-5.1.1 first\r\n550 5.1.1 second") == "550-5.1.1 first 550 5.1.1 second"
    assert len(one_line("x" * 5000)) == 1000
    raw = report(recipients=[DsnRecipient("x@far.test", "5.0.0", "550 bad\r\nInjected: header")])
    _, (_, status, _) = parts(raw)
    _, rcpt = subparts(status)
    assert rcpt["Injected"] is None
    assert rcpt["Diagnostic-Code"] == "smtp; 550 bad Injected: header"


def test_only_a_bounded_header_section_goes_back() -> None:
    big = b"X-Pad: " + b"a" * (MAX_RETURNED_HEADERS * 2) + b"\r\n\r\nbody"
    assert len(header_section(big)) == MAX_RETURNED_HEADERS
    assert header_section(b"A: b\r\n\r\nbody") == b"A: b\r\n"
    raw = report(original=big)
    assert len(raw) < MAX_RETURNED_HEADERS * 2
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998  # RFC 5321 4.5.3.1.6
    msg = message_from_bytes(raw, policy=policy.default)
    returned = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert returned[0].get_content().startswith("X-Pad: aaa")
