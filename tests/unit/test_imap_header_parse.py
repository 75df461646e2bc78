"""mime.parse_header must give the fields the stdlib's BytesHeaderParser gives (it replaced it on
the FETCH, SEARCH and SORT paths, where answers are compared octet for octet with Dovecot's)."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap.mime import RAW_POLICY, parse_header

CORPUS = Path(__file__).parent.parent / "corpus" / "mime"
_STDLIB = BytesHeaderParser(policy=RAW_POLICY)

# Pieces header blocks are made of, odd ones included: folding, bare CR, NUL, 8-bit octets, "From "
# lines, fields with no name or a space before the colon, lines that end the block.
_PIECES = st.sampled_from([
    b"Subject: hello", b"From: A <a@b.example>", b"From a@b Mon Jan 1", b"To:", b"X-Long:   spaced\t",
    b" continued", b"\tcontinued", b":no name", b"Bad Name: x", b"no colon at all", b"Content-Type: text/plain;",
    b' boundary="x y"', b"Date: Mon, 1 Jan 2024 10:00:00 +0000", b"\xc3\xa9t\xc3\xa9: v", b"Subject: \xff\xfe",
    b"", b"\x00", b"Received: from x\r", b"Cc: c@d", b"x:", b"From  a", b"Content-Type: Multipart/Mixed ; b=1",
    b"content-type: text", b"CONTENT-TYPE: a/b/c", b"Content-Type:  image/png",
])
_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_PIECES, _ENDS), max_size=12))
    block = b"".join(piece + end for piece, end in lines)
    return block + draw(st.binary(max_size=8))


def _same(block: bytes) -> None:
    expected = _STDLIB.parsebytes(block)
    got = parse_header(block)
    assert got.items() == expected.items()
    assert got.get_content_type() == expected.get_content_type()
    assert got.get_param("boundary") == expected.get_param("boundary")
    for name in ("Subject", "from", "TO", "content-type", "x", "Received", "cc", "Bad Name", "missing"):
        assert got.get(name) == expected.get(name)
        assert got.get_all(name) == expected.get_all(name)
    got.set_default_type("message/rfc822")
    expected.set_default_type("message/rfc822")
    assert got.get_content_type() == expected.get_content_type()


@settings(max_examples=200, deadline=None)
@given(header_blocks())
def test_same_fields_as_the_stdlib_parser(block: bytes) -> None:
    _same(block)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_same_fields_for_any_octets(block: bytes) -> None:
    _same(block)


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()) if CORPUS.is_dir() else [], ids=lambda p: p.name)
def test_same_fields_on_the_mime_corpus(path: Path) -> None:
    data = path.read_bytes()
    end = data.find(b"\n\n")
    _same(data if end < 0 else data[:end + 1])
    _same(data)
