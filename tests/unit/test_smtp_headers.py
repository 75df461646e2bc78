"""Trace and submission headers (appliance/smtp/headers.py): pure functions on bytes."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import time
from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from appliance.smtp.headers import (
    ReceivedFacts,
    TlsFacts,
    add_submission_headers,
    body_separated,
    count_received,
    delivered_to,
    header_names,
    header_section_end,
    normalise_line_ends,
    received_header,
    return_path,
    rfc5322_date,
    with_keyword,
)

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))


def test_bare_lf_and_cr_become_crlf() -> None:
    assert normalise_line_ends(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
    # The SMTP smuggling sequences are content; after this no later hop can take them for an end.
    assert normalise_line_ends(b"x\n.\ny") == b"x\r\n.\r\ny"
    assert normalise_line_ends(b"x\r.\ny") == b"x\r\n.\r\ny"
    assert normalise_line_ends(b"no line ends") == b"no line ends"
    assert normalise_line_ends(b"\r\n\r\n") == b"\r\n\r\n"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"]), max_size=30))
def test_line_ends_normalised_as_one_substitution_would(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert normalise_line_ends(data) == re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def test_normalising_many_short_lines_costs_little() -> None:
    # A regex substitution kept each line's text as an object until the join: 8 MB of "ab" lines cost
    # ~3 s of CPU and ~430 MB (36 MiB: 14 s and 1.9 GB), whether their ends were CRLF or bare LF.
    for data in (b"ab\r\n" * 2_000_000, b"ab\n" * 2_000_000):
        started = time.process_time()
        assert len(normalise_line_ends(data)) == 8_000_000
        assert time.process_time() - started < 0.5


@given(st.binary(max_size=300))
def test_normalised_data_has_no_bare_cr_or_lf(data: bytes) -> None:
    out = normalise_line_ends(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(b"\n", b"")


def test_header_section_end() -> None:
    assert header_section_end(b"A: 1\r\nB: 2\r\n\r\nbody") == len(b"A: 1\r\nB: 2\r\n")
    assert header_section_end(b"\r\nbody only") == 0
    assert header_section_end(b"A: 1\r\n") == len(b"A: 1\r\n")
    assert header_names(b"Subject: x\r\nMESSAGE-ID: <a@b>\r\n\r\nDate: not a header\r\n") == {"subject", "message-id"}


def test_an_empty_line_is_put_where_the_fields_end_at_another_line() -> None:
    # As Postfix's cleanup: a line that is neither a field nor empty ends the header section.
    assert body_separated(b"A: 1\r\n folded\r\ntext\r\n") == b"A: 1\r\n folded\r\n\r\ntext\r\n"
    assert body_separated(b"just text\r\n") == b"\r\njust text\r\n"
    for unchanged in (b"A: 1\r\n\r\ntext\r\n", b"A: 1\r\nB: 2\r\n", b"A: 1", b"", b"A: 1\r\ntext"):
        assert body_separated(unchanged) is unchanged
    # Fields past the limit are left to the size check, even when a line that is not one follows.
    assert body_separated(b"A: 1\r\nB: 2\r\ntext\r\n", limit=10) == b"A: 1\r\nB: 2\r\ntext\r\n"
    # A line the limit cuts before its colon is not taken for the end of the fields.
    assert body_separated(b"A: 1\r\nLong-Name: 2\r\n", limit=12) == b"A: 1\r\nLong-Name: 2\r\n"


@given(st.lists(st.sampled_from([b"A: 1", b" folded", b"\tx", b"B :2", b"text", b"no-colon", b"", b"C:"]), max_size=8),
       st.booleans())
def test_the_empty_line_goes_where_header_section_end_says(lines: list[bytes], last_crlf: bool) -> None:
    data = b"\r\n".join(lines) + (b"\r\n" if last_crlf and lines else b"")
    end = header_section_end(data)
    out = body_separated(data)
    if out is data:
        assert end == len(data) or data.startswith(b"\r\n", end) or data.find(b"\r\n", end) < 0
    else:
        assert out == data[:end] + b"\r\n" + data[end:]
        assert header_section_end(out) == end


def test_count_received_only_in_header_section() -> None:
    msg = b"Received: a\r\nreceived : b\r\nSubject: x\r\n\r\nReceived: in the body\r\n"
    assert count_received(msg) == 2


def test_submission_headers_added_only_when_missing() -> None:
    msg = b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n"
    out = add_submission_headers(msg, "mail.example.test", WHEN)
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"body\r\n"
    assert head.startswith(b"From: a@b.test\r\nSubject: hi\r\nDate: Mon, 06 May 2024 07:08:09 +0200\r\nMessage-ID: <")
    assert re.search(rb"Message-ID: <[^>]+@mail\.example\.test>", head)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Date"].datetime == WHEN
    # Present already (any case): untouched, byte for byte.
    full = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nbody\r\n"
    assert add_submission_headers(full, "h", WHEN) is full


def test_submission_headers_on_odd_messages() -> None:
    only_headers = add_submission_headers(b"Subject: x", "h.test", WHEN)
    assert only_headers.startswith(b"Subject: x\r\nDate: ")
    assert only_headers.endswith(b"\r\n\r\n")
    no_headers = add_submission_headers(b"\r\njust a body\r\n", "h.test", WHEN)
    assert no_headers.startswith(b"Date: ")
    assert no_headers.endswith(b"\r\n\r\njust a body\r\n")
    empty = add_submission_headers(b"", "h.test", WHEN)
    assert empty.startswith(b"Date: ")
    assert empty.endswith(b"\r\n\r\n")


@given(st.binary(max_size=200).map(normalise_line_ends))
def test_submission_headers_keep_the_original_text(data: bytes) -> None:
    out = add_submission_headers(data, "h.test", WHEN)
    names = header_names(out)
    assert "date" in names
    assert "message-id" in names
    end = header_section_end(data)
    assert out.endswith(data[end:]) or end == len(data)


def test_received_header_shape() -> None:
    facts = ReceivedFacts(
        helo="client.example", peer_ip="192.0.2.7", hostname="mail.example.test", protocol="ESMTPSA",
        queue_id="ABC123", tls=TlsFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256), auth_user="alice@example.test",
    )
    field = received_header(facts, for_rcpt="bob@example.test", when=WHEN)
    assert field == (
        b"Received: from client.example ([192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\t(Authenticated sender: alice@example.test)\r\n"
        b"\tby mail.example.test (Letterbox) with ESMTPSA id ABC123\r\n"
        b"\tfor <bob@example.test>; Mon, 06 May 2024 07:08:09 +0200\r\n"
    )
    parsed = email.message_from_bytes(field + b"\r\n", policy=email.policy.default)
    assert "ESMTPSA" in str(parsed["Received"])


def test_received_header_neutralises_client_text() -> None:
    facts = ReceivedFacts(helo="evil (x) \\ \r\nInjected: yes", peer_ip="2001:db8::1", hostname="h",
                          protocol="ESMTP", queue_id="Q")
    field = received_header(facts, for_rcpt="a>b\r\n@x", when=WHEN)
    assert field.count(b"\r\n") == 3  # three folded lines, nothing injected
    assert b"(x)" not in field
    assert b"Injected: yes" not in field.replace(b"?", b"")
    assert b"[IPv6:2001:db8::1]" in field
    assert received_header(facts, for_rcpt=None, when=WHEN).endswith(b"\tMon, 06 May 2024 07:08:09 +0200\r\n")


def test_with_keyword_rfc3848() -> None:
    assert with_keyword(lmtp=False, extended=True, tls=False, authenticated=False, utf8=False) == "ESMTP"
    assert with_keyword(lmtp=False, extended=False, tls=False, authenticated=False, utf8=False) == "SMTP"
    assert with_keyword(lmtp=False, extended=True, tls=True, authenticated=False, utf8=False) == "ESMTPS"
    assert with_keyword(lmtp=False, extended=True, tls=True, authenticated=True, utf8=False) == "ESMTPSA"
    assert with_keyword(lmtp=True, extended=True, tls=False, authenticated=False, utf8=False) == "LMTP"
    assert with_keyword(lmtp=False, extended=True, tls=True, authenticated=True, utf8=True) == "UTF8SMTPSA"


def test_return_path_and_delivered_to() -> None:
    assert return_path("") == b"Return-Path: <>\r\n"
    assert return_path("a@b.test") == b"Return-Path: <a@b.test>\r\n"
    assert delivered_to("alice+news@b.test") == b"Delivered-To: alice+news@b.test\r\n"


def test_raw_fields_sees_what_a_mail_client_sees() -> None:
    from appliance.smtp.headers import raw_fields

    data = (b"NoColonHeader\r\nFrom : a@b.test\r\nX-Bad\x01: y\r\n continued junk\r\nSubject: one\r\n two\r\n"
            b"\r\nFrom: body@c.test\r\n")
    assert raw_fields(data) == [("from", "a@b.test"), ("subject", "one two")]
    assert raw_fields(b"From: x@y.test\r\n" * 10, limit=32) == [("from", "x@y.test")] * 2


def test_header_section_too_large() -> None:
    from appliance.smtp.headers import header_section_too_large

    assert not header_section_too_large(b"A: b\r\n\r\n" + b"x" * 1000, limit=100)
    assert header_section_too_large(b"A: " + b"b" * 200 + b"\r\n\r\nbody", limit=100)
    assert not header_section_too_large(b"A: b\r\n", limit=100)  # all header, but short


def test_now_as_a_date_is_the_text_the_standard_library_gives_for_this_second() -> None:
    """rfc5322_date() without a time is made once per second (issue 19): the same text as formatting
    the moment itself (the text shows no fractions of a second)."""
    for _ in range(3):
        before = int(time.time())
        made = rfc5322_date()
        after = int(time.time())
        # Every second the call may have fallen in: a loaded machine can hold the thread past one.
        seconds = range(before, after + 1)
        assert made in [email.utils.format_datetime(datetime.fromtimestamp(s).astimezone()) for s in seconds]
