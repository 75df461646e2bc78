"""Content decoding and sort keys that Dovecot's imaptest found wrong (issue 17): quoted-printable
for BINARY, SORT's first-address mailbox with groups, and binary APPENDs holding NULs."""

from __future__ import annotations

import io
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap import fetch
from appliance.imap.fetch import binary_content, decode_quoted_printable, first_display, first_mailbox
from appliance.imap.mime import Span, base64_for_nul, decode_words, scan

# The body of imaptest's fetch-binary-mime-qp.mbox, line ends as in the file.
QP_BODY = (b"hello  \nbar=\n\nfoo\t=\nbar\nfoo\t \t= \n=62\nfoo = \t\nbar\nfoo =\n=62\nfoo  \nbar=\n\nfoo_bar\n")


def test_quoted_printable_trailing_space_and_soft_breaks() -> None:
    # RFC 2045 6.7: trailing white space is deleted (rule 3); "=" at the end of a line, even with
    # white space after it, is a soft line break (rule 5). imaptest: fetch-binary-mime-qp.
    decoded = decode_quoted_printable(QP_BODY)
    assert decoded == b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\nbar\r\nfoo_bar\r\n"
    assert len(decoded) == 65  # imaptest's BINARY.SIZE[1]


def test_quoted_printable_edge_cases() -> None:
    assert decode_quoted_printable(b"caf=C3=A9 =3d ok\r\n") == "café = ok\r\n".encode()
    assert decode_quoted_printable(b"no end=") == b"no end"
    assert decode_quoted_printable(b"a=ZZb= c\r\n") == b"a=ZZb= c\r\n"  # not escapes: kept as they are
    assert decode_quoted_printable(b"") == b""


def decode_line_by_line(raw: bytes) -> bytes:
    """The decoder as it was, a loop over lines: the reference for the whole-text one."""
    out = bytearray()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        line = line.rstrip(b" \t\r")
        soft = line.endswith(b"=")
        out += re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes((int(m.group(1), 16),)), line[:-1] if soft else line)
        if not soft and i < len(lines) - 1:
            out += b"\r\n"
    return bytes(out)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"=", b"3", b"D", b"d", b"G", b"0", b"A", b" ", b"\t", b"\r", b"\n", b"\r\n",
                                 b"=\r\n", b"=0A", b"==", b"=A=\n", b"\x00", b"_", b"\xff"]), max_size=40).map(b"".join),
       st.sampled_from([1, 2, 5, fetch.QP_SLICE]))
def test_quoted_printable_decodes_as_line_by_line(raw: bytes, piece: int) -> None:
    original, fetch.QP_SLICE = fetch.QP_SLICE, piece  # slices of a few octets: their seams too
    try:
        assert decode_quoted_printable(raw) == decode_line_by_line(raw)
    finally:
        fetch.QP_SLICE = original


@pytest.mark.parametrize("raw", [b"\n" * 20_000_000, b"a \r\n" * 5_000_000, b" " * 20_000_000 + b"x",
                                 b"=\n" * 10_000_000, b"=41" * 7_000_000, b"==" * 10_000_000,
                                 b"=A=\n" * 5_000_000])
def test_quoted_printable_costs_cpu_in_proportion_to_its_octets(raw: bytes) -> None:
    # 20 MB of empty lines took 11 s of the server's CPU for one FETCH BINARY.SIZE (0.4 s now; the
    # slowest here ~1.1 s); CPU time, not wall time: a loaded machine stretches the latter.
    started = time.process_time()
    decode_quoted_printable(raw)
    assert time.process_time() - started < 4


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"QUJD", b"Q", b"U", b"=", b"\r\n", b"\n", b" ", b"!", b"\x00", b"a", b"3", b"D",
                                 b"=A=\n", b"==", b"=\r\n", b"\t"]), max_size=30).map(b"".join),
       st.sampled_from([1, 2, 3, 5, fetch.BINARY_BLOCK]))
def test_binary_decoded_in_blocks_is_the_whole_decoded(raw: bytes, block: int) -> None:
    """FETCH BINARY decodes a part in blocks as it is sent (fetch.Decoded): the same octets as the
    whole part decoded at once, whatever the seams."""
    f = io.BytesIO(b"head" + raw + b"tail")
    span = Span(4, 4 + len(raw), 0, 0)
    original, fetch.BINARY_BLOCK = fetch.BINARY_BLOCK, block
    try:
        assert b"".join(fetch._decoded_blocks(f, span, "base64")) == fetch._unbase64(raw)
        assert b"".join(fetch._decoded_blocks(f, span, "quoted-printable")) == decode_quoted_printable(raw)
    finally:
        fetch.BINARY_BLOCK = original


def test_a_quoted_printable_line_without_end_is_decoded_in_blocks_too() -> None:
    """A crafted part of one long line (no LF: RFC 2045's 76 octets ignored) was decoded only at its
    end, so a slow reader's FETCH BINARY held the whole part, undoing fetch.Decoded's streaming."""
    raw = b"caf=C3=A9 =3d ok\t=41" * 200_000  # 4 MB, no line end
    f = io.BytesIO(raw)
    blocks = list(fetch._decoded_blocks(f, Span(0, len(raw), 0, 0), "quoted-printable"))
    assert max(len(block) for block in blocks) <= 2 * fetch.BINARY_BLOCK, [len(block) for block in blocks]
    assert b"".join(blocks) == decode_quoted_printable(raw)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"=41a", b" \ta", b"=\r\na", b"==xa", b"=A=\na", b"\n", b"=ZZa", b"\r\n",
                                 b"=3a", b"= a", b" \t\n"]), max_size=40).map(b"".join),
       st.sampled_from([1, 2, 3, 5]), st.sampled_from([4, 8, 16]))
def test_a_long_quoted_printable_line_cut_at_a_seam_decodes_as_the_whole(raw: bytes, block: int, carry: int) -> None:
    """A line longer than fetch.QP_LINE_CARRY is cut after an octet the rest of the line cannot change."""
    f = io.BytesIO(raw)
    originals = fetch.BINARY_BLOCK, fetch.QP_LINE_CARRY
    fetch.BINARY_BLOCK, fetch.QP_LINE_CARRY = block, carry
    try:
        assert b"".join(fetch._decoded_blocks(f, Span(0, len(raw), 0, 0), "quoted-printable")) == \
            decode_quoted_printable(raw)
    finally:
        fetch.BINARY_BLOCK, fetch.QP_LINE_CARRY = originals


def test_base64_skips_octets_outside_its_alphabet_in_little_cpu() -> None:
    assert fetch._unbase64(b"QU\r\nJD\x00!\n") == b"ABC"
    started = time.process_time()
    assert fetch._unbase64(b"\n" * 20_000_000 + b"QUJD") == b"ABC"
    assert time.process_time() - started < 1  # 1.8 s by a regex's substitution; 0.01 s now


@pytest.mark.parametrize("charset", ["punycode", "PUNYCODE", "undefined", "idna"])
def test_an_encoded_word_in_a_codec_that_is_no_charset_is_left_as_written(charset: str) -> None:
    # The stdlib tried such a word's codec before it gave up: punycode in quadratic time, 2 s of CPU for
    # a subject of 240 KB (the MX takes 256 KiB of header), at each describe, SORT or SEARCH of it.
    word = f"=?{charset}?q?{'a' * 120_000}-{'9' * 120_000}?="
    started = time.process_time()
    assert decode_words(f"{word} =?iso-8859-1?q?caf=E9?=") == f"{word} =?iso-8859-1?q?caf=E9?="
    assert time.process_time() - started < 0.3
    assert decode_words("=?iso-8859-1?q?caf=E9?= =?utf-8?b?w6k=?=") == "caféé"


def test_sort_address_key_of_a_group_is_its_name() -> None:
    # RFC 5256 3 sorts on the first address as ENVELOPE has it; for a group that is the group start,
    # whose mailbox is the group's name (RFC 3501 7.4.2). imaptest: sort-addresses (Cc).
    assert first_mailbox("user2: blah@domain1.org;") == "user2"
    assert first_mailbox("user2@domain2.org (foo bar)") == "user2"
    assert first_mailbox("foo bar <User1@domain1.org>, x@y") == "User1"
    assert first_mailbox("") == ""


def test_nul_content_is_stored_as_base64() -> None:
    # RFC 3516 4.4 / imaptest append-binary: BODY[1] cannot carry a NUL, BINARY[1] gives it back.
    message = (b"From: user@domain.org\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: binary\r\n\r\n\x00-\xe4\n\r\n\n")
    stored = base64_for_nul(message)
    assert stored == (b"From: user@domain.org\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Transfer-Encoding: base64\r\n\r\nAC3kCg0KCg==")
    f = io.BytesIO(stored)
    assert binary_content(f, scan(io.BytesIO(stored)), (1,)) == b"\x00-\xe4\n\r\n\n"


def test_only_parts_with_nul_are_reencoded() -> None:
    message = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n"
               b"hello\r\n--x\r\nContent-Type: application/x\r\nContent-transfer-encoding:\r\n 8bit\r\n\r\n"
               b"\x00\x01" + b"\xff" * 100 + b"\r\n--x--\r\n")
    stored = base64_for_nul(message)
    assert b"\x00" not in stored
    assert stored.startswith(message[:message.index(b"--x\r\nContent-Type: application")])
    assert b"Content-transfer-encoding" not in stored
    root = scan(io.BytesIO(stored))
    assert binary_content(io.BytesIO(stored), root, (2,)) == b"\x00\x01" + b"\xff" * 100
    assert all(len(line) <= 76 for line in stored.split(b"\r\n"))
    assert base64_for_nul(b"Subject: plain\r\n\r\ntext\r\n") == b"Subject: plain\r\n\r\ntext\r\n"


def test_display_sort_key_is_the_name_else_the_address() -> None:
    # RFC 5957 2 (imaptest sort-display-from/-to): the display name, else mailbox@host; a group's
    # name for a group (as ENVELOPE's group start).
    assert first_display("foo bar <a@b.c>") == ("foo bar", True)
    assert first_display("b@c.d") == ("b@c.d", False)
    assert first_display("d") == ("d", False)
    assert first_display("=?iso-8859-1?q?foo_aar?= <e@f.g>") == ("=?iso-8859-1?q?foo_aar?=", True)
    assert first_display("a: xx@xx.org, yy@yy.org;") == ("a", False)
    assert first_display("empty:;") == ("empty", False)
    assert first_display("") == ("", False)
