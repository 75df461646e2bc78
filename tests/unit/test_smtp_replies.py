"""Reply rendering and connection bookkeeping of the SMTP listener (no sockets)."""

from __future__ import annotations

import pytest

from appliance.smtp.handler import render_ehlo
from appliance.smtp.server import ConnectionTracker, size_refusal, with_enhanced_code


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
        ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"),
        ("553 5.1.3 Error: malformed address", "501 5.5.2 Syntax error in the address"),
        ("250 2.1.5 Recipient ok", "250 2.1.5 Recipient ok"),
        ('502 Could not VRFY "', "501 5.5.2 Syntax error in the address"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("599 odd", "599 5.0.0 odd"),
    ],
)
def test_enhanced_status_codes_added(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


def test_size_refusal_says_the_limit() -> None:
    assert size_refusal(36 * 1024 * 1024) == (
        "552 5.3.4 Message too big: this server takes messages of at most 36 MiB (37748736 octets)")
    assert size_refusal(10_000).endswith("at most 10000 octets")
    assert size_refusal(1536 * 1024).endswith("at most 1.5 MiB (1572864 octets)")


def test_ehlo_reply_rendering() -> None:
    aiosmtpd = ["250-mail.example.test", "250-SIZE 1000", "250-8BITMIME", "250-SMTPUTF8", "250-STARTTLS", "250 HELP"]
    out = render_ehlo(aiosmtpd, ["PIPELINING", "ENHANCEDSTATUSCODES"])
    assert out == [
        "250-mail.example.test", "250-SIZE 1000", "250-8BITMIME", "250-SMTPUTF8", "250-STARTTLS",
        "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP",
    ]


def test_connection_tracker_uses_the_shared_limiter_with_smtp_limits() -> None:
    from appliance.smtp.limits import SmtpLimits

    tracker = ConnectionTracker(SmtpLimits(max_connections_per_client=2, max_connections=3))
    a1, a2 = tracker.limiter.acquire("192.0.2.1"), tracker.limiter.acquire("192.0.2.1")
    assert a1 is not None
    assert a2 is not None
    assert tracker.limiter.acquire("192.0.2.1") is None
    assert tracker.limiter.acquire("198.51.100.1") is not None
    assert tracker.limiter.acquire("203.0.113.1") is None  # total reached
    a1.release()
    assert tracker.limiter.count("192.0.2.1") == 1
