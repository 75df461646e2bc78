"""A message with no empty line between its header fields and its text (RFC 5322 2.1 makes the body
optional; some programs send a report's text straight after the fields), 345 KB: it was refused with
552 as one header section over 256 KB. SMTP, submission and LMTP now take it as Postfix does, with an
empty line put where the fields end (smtp/headers.body_separated); APPEND keeps what the client sent, and
FETCH answers it, as Dovecot does, with the whole message as its header."""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Callable

import pytest

from tests.conftest import BoxHandle
from tests.support.smtp_wire import hold_outbound, maildir_messages

USER = "alice@example.test"
PASSWORD = "correct horse battery staple 9"
FIELDS = b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: no blank line\r\n"
TEXT = b"".join(b"line %06d of a report sent without an empty line after its fields\r\n" % i for i in range(5000))


def _imap(box: BoxHandle) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30)
    imap.login(USER, PASSWORD)
    return imap


def _sections(imap: imaplib.IMAP4_SSL) -> dict[str, bytes]:
    imap.select("INBOX")
    status, data = imap.fetch("1", "(BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[])")
    assert status == "OK", data
    parts = [part for part in data if isinstance(part, tuple)]
    return {name: next(body for head, body in parts if f"BODY[{name}]".encode() in head)
            for name in ("HEADER", "TEXT", "")}


def _mx(box: BoxHandle) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30)
    client.ehlo("mta.test")
    return client


def _submission(box: BoxHandle) -> smtplib.SMTP:
    client = smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), timeout=30, context=box.client_context)
    client.login(USER, PASSWORD)
    return client


def _lmtp(box: BoxHandle) -> smtplib.SMTP:
    client = smtplib.LMTP("127.0.0.1", box.port("lmtp"), timeout=30)
    client.ehlo_resp = None
    assert client.docmd("LHLO", "mta.test")[0] == 250
    return client


@pytest.mark.parametrize("connect", [_mx, _submission, _lmtp], ids=["mx", "submission", "lmtp"])
def test_smtp_takes_it_with_an_empty_line_where_the_fields_end(
        box: BoxHandle, connect: Callable[[BoxHandle], smtplib.SMTP]) -> None:
    hold_outbound(box)
    box.add_user(USER, PASSWORD)
    with connect(box) as client:
        assert client.mail(USER)[0] == 250
        assert client.rcpt(USER)[0] == 250
        code, text = client.data(FIELDS + TEXT)
        assert code == 250, text
    [stored] = maildir_messages(box.data.mail, USER)
    assert stored.endswith(b"\r\n\r\n" + TEXT)  # the text whole, after the one empty line put in
    with _imap(box) as imap:
        sections = _sections(imap)
    assert sections["TEXT"] == TEXT
    assert b"\r\nSubject: no blank line\r\n" in sections["HEADER"]  # (submission adds Date: and Message-ID:)
    assert sections["HEADER"].endswith(b"\r\n\r\n")
    assert b"line 000000" not in sections["HEADER"]


def test_a_header_section_that_is_all_fields_past_256_kb_is_still_refused(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 900) for i in range(300))
    with _mx(box) as client:
        client.mail("bob@sender.test")
        client.rcpt(USER)
        assert client.data(FIELDS + padding)[0] == 552
    assert maildir_messages(box.data.mail, USER) == []


def test_append_keeps_it_as_sent_and_fetch_answers_it_whole_as_header(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    with _imap(box) as imap:
        status, _ = imap.append("INBOX", None, None, FIELDS + TEXT)
        assert status == "OK"
        sections = _sections(imap)
    assert sections[""] == FIELDS + TEXT
    assert sections["HEADER"] == FIELDS + TEXT
    assert sections["TEXT"] == b""
