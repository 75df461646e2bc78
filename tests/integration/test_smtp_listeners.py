"""The SMTP listeners over real sockets: what EHLO offers, STARTTLS, implicit TLS, AUTH, the relay rule."""

from __future__ import annotations

import base64
import smtplib

import pytest

from tests.conftest import BoxHandle
from tests.support.smtp_wire import Wire, hold_outbound

PASSWORD = "correct horse battery staple 9"
OURS = "ourdomain.test"

# Issue 3's open-relay battery plus more found along the way.
RELAY_ATTEMPTS = [
    "user@external.test",
    f"user%external.test@{OURS}",
    f'"user@external.test"@{OURS}',
    f"@{OURS}:user@external.test",
    f"@{OURS},@relay.test:user@external.test",
    f"user@external.test@{OURS}",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@external.test.",
    "USER@EXTERNAL.TEST",
    "uSeR@ExTeRnAl.TeSt",
    f"external.test!user@{OURS}",
    f"external.test!user@{OURS.upper()}",
    f'"user%external.test"@{OURS}',
    f"user@external.test%{OURS}",
    f"user@{OURS}.external.test",
    f"user@{OURS}@external.test",
    "user@localhost",
    "postmaster@external.test",
    "user@xn--bcher-kva.example",
]


@pytest.fixture
def mx(box: BoxHandle) -> BoxHandle:
    hold_outbound(box)
    box.add_user(f"alice@{OURS}", PASSWORD)
    return box


def spool_rows(box: BoxHandle) -> list[str]:
    async def rows() -> list[str]:
        return [str(r["recipient"]) for r in await box.services.db.fetchall("SELECT recipient FROM queue_recipients")]

    return box.run(rows())


def test_mx_ehlo_offers_the_extensions_and_no_auth(mx: BoxHandle) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=10) as client:
        code, _banner = client.ehlo("client.test")
        assert code == 250
        features = client.esmtp_features
        for keyword in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "starttls"):
            assert keyword in features, keyword
        assert int(features["size"]) > 10_000_000
        assert "auth" not in features
        client.starttls(context=mx.client_context)
        client.ehlo("client.test")
        assert "auth" not in client.esmtp_features
        assert "starttls" not in client.esmtp_features
        # Asked anyway, AUTH is refused with a pointer to the submission ports.
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@x\0pw").decode())
        assert code == 502
        assert b"5.5.1" in text


def test_greeting_names_the_host(mx: BoxHandle) -> None:
    with Wire(mx.port("smtp")) as wire:
        code, text = wire.reply()
        assert code == 220
        assert text.startswith("mail.example.test ESMTP")


def test_submission_offers_auth_only_after_starttls(mx: BoxHandle) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port("submission"), timeout=10) as client:
        client.ehlo("client.test")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0alice@{OURS}\0{PASSWORD}".encode()).decode())
        assert code == 530  # never a password over cleartext
        code, text = client.docmd("MAIL", f"FROM:<alice@{OURS}>")
        assert code == 530
        assert b"5.7.0" in text
        client.starttls(context=mx.client_context)
        client.ehlo("client.test")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        # TLS but no AUTH yet: still no mail.
        code, text = client.docmd("MAIL", f"FROM:<alice@{OURS}>")
        assert code == 530
        assert b"5.7.0" in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submission_login_over_starttls(mx: BoxHandle, mechanism: str) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port("submission"), timeout=10) as client:
        client.starttls(context=mx.client_context)
        client.ehlo("client.test")
        client.user, client.password = f"alice@{OURS}", PASSWORD
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert code == 235
        assert text.startswith(b"2.7.0")
        code, text = client.docmd("AUTH", "PLAIN x")
        assert code == 503


def test_submissions_is_tls_from_the_first_byte(mx: BoxHandle) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=10, context=mx.client_context) as client:
        client.ehlo("client.test")
        assert "starttls" not in client.esmtp_features
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        code, _ = client.login(f"alice@{OURS}", PASSWORD)
        assert code == 235


def test_wrong_password_is_535(mx: BoxHandle) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=30, context=mx.client_context) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login(f"alice@{OURS}", "wrong password")
        assert err.value.smtp_code == 535
        assert err.value.smtp_error.startswith(b"5.7.8")  # type: ignore[arg-type]  # typeshed says str; smtplib gives bytes
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody@nowhere.test", PASSWORD)


def test_auth_plain_with_another_authzid_is_refused(mx: BoxHandle) -> None:
    with Wire(mx.port("submissions"), tls=mx.client_context) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        blob = base64.b64encode(f"bob@{OURS}\0alice@{OURS}\0{PASSWORD}".encode()).decode()
        assert wire.cmd(f"AUTH PLAIN {blob}")[0] == 535
        assert wire.cmd("AUTH PLAIN not-base64!")[0] == 501
        assert wire.cmd("AUTH PLAIN")[0] == 334
        assert wire.cmd("*")[0] == 501  # RFC 4954 4: the client cancels


def test_sender_must_be_owned_on_submission(mx: BoxHandle) -> None:
    mx.add_user(f"bob@{OURS}", PASSWORD)
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=10, context=mx.client_context) as client:
        client.login(f"alice@{OURS}", PASSWORD)
        for sender in (f"bob@{OURS}", "alice@external.test", ""):
            code, text = client.docmd("MAIL", f"FROM:<{sender}>")
            assert (code, text[:5]) == (553, b"5.7.1"), sender
        code, _ = client.docmd("MAIL", f"FROM:<Alice@{OURS.upper()}>")
        assert code == 250


def relay_attempt(box: BoxHandle, service: str, target: str) -> tuple[int, str]:
    """One fresh unauthenticated session (the error budget would end a long one): RCPT's reply."""
    with Wire(box.port(service)) as wire:
        wire.reply()
        wire.cmd("EHLO attacker.test")
        if service == "submission":
            assert wire.cmd("STARTTLS")[0] == 220
            wire.sock = box.client_context.wrap_socket(wire.sock, server_hostname="localhost")
            wire.cmd("EHLO attacker.test")
        code, _ = wire.cmd("MAIL FROM:<spammer@external.test>")
        assert code == (250 if service == "smtp" else 530)
        return wire.cmd(f"RCPT TO:<{target}>")


@pytest.mark.parametrize("service", ["smtp", "submission"])
def test_open_relay_battery(mx: BoxHandle, service: str) -> None:
    """Unauthenticated, none of these gets a 2xx at RCPT, and nothing reaches the spool."""
    for target in RELAY_ATTEMPTS:
        code, text = relay_attempt(mx, service, target)
        if service == "smtp":
            assert code in (501, 550, 553, 554), f"{target}: {code} {text}"
        else:
            assert code == 530, f"{target}: {code} {text}"
    assert spool_rows(mx) == []


def test_relay_denied_text(mx: BoxHandle) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@external.test")
        code, text = client.rcpt("user@external.test")
        assert (code, text) == (554, b"5.7.1 <user@external.test>: Relay access denied")
        code, text = client.rcpt(f"nobody@{OURS}")
        assert (code, text[:5]) == (550, b"5.1.1")


def test_authenticated_user_still_cannot_use_literals(mx: BoxHandle) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=10, context=mx.client_context) as client:
        client.login(f"alice@{OURS}", PASSWORD)
        client.mail(f"alice@{OURS}")
        assert client.rcpt("user@[127.0.0.1]")[0] == 550
        assert client.rcpt(f"nobody@{OURS}")[0] == 550


def test_lmtp_speaks_lhlo_only(box: BoxHandle) -> None:
    with Wire(box.port("lmtp")) as wire:
        code, text = wire.reply()
        assert code == 220
        assert "LMTP" in text
        assert wire.cmd("EHLO client.test")[0] == 500
        assert wire.cmd("HELO client.test")[0] == 500
        code, text = wire.cmd("LHLO client.test")
        assert code == 250
        assert "PIPELINING" in text
        assert "ENHANCEDSTATUSCODES" in text
        assert "AUTH" not in text
        assert "STARTTLS" not in text


def test_commands_pipelined_with_starttls_are_discarded(mx: BoxHandle) -> None:
    """RFC 3207 4.2 / CVE-2011-0411: plaintext sent after STARTTLS must not run inside TLS."""
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.send(b"STARTTLS\r\nBOGUS injected\r\n")
        assert wire.reply()[0] == 220
        wire.sock = mx.client_context.wrap_socket(wire.sock, server_hostname="localhost")
        assert wire.cmd("NOOP")[0] == 250  # the injected BOGUS would have drawn a 500 first
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 503  # the session restarted: EHLO again


def test_a_second_starttls_is_refused_and_the_session_goes_on(mx: BoxHandle) -> None:
    """aiosmtpd answered 220 to STARTTLS inside TLS, then asyncio could not layer TLS on TLS: a traceback
    in the log and a session that answered nothing more. On 465 it answered 454, a temporary failure."""
    with Wire(mx.port("submission")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd("STARTTLS")[0] == 220
        wire.sock = mx.client_context.wrap_socket(wire.sock, server_hostname="localhost")
        assert "STARTTLS" not in wire.cmd("EHLO client.test")[1]
        code, text = wire.cmd("STARTTLS")
        assert (code, text) == (554, "5.5.1 Error: TLS already active")
        assert wire.cmd("NOOP")[0] == 250
    with Wire(mx.port("submissions"), tls=mx.client_context) as wire:  # it said 454, "try later"
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd("STARTTLS") == (554, "5.5.1 Error: TLS already active")
        assert wire.cmd("NOOP")[0] == 250
