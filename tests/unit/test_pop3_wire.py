"""Message files as POP3 multi-line data: CRLF, dot-stuffing, TOP, in pieces of every size."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.pop3.wire import FileBody, WireEncoder


def reference(message: bytes, body_lines: int | None = None) -> bytes:
    """The wire form computed line by line, the slow obvious way (RFC 1939 3 and 7)."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if text.endswith(b"\r") and not text.endswith(b"\r\n"):
        text = text[:-1] + b"\r\n"
    lines = text.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if body_lines is not None:
        try:
            blank = lines.index(b"")
        except ValueError:
            blank = len(lines)
        lines = lines[: blank + 1 + body_lines]
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return out + b".\r\n"


def encode(message: bytes, piece: int, body_lines: int | None = None) -> bytes:
    encoder = WireEncoder(body_lines)
    out = b""
    for i in range(0, len(message), piece):
        out += encoder.feed(message[i : i + piece])
        if encoder.done:
            break
    return out + encoder.finish()


MESSAGE = (
    b"From: a@example.test\r\nSubject: dots\r\n\r\n.starts with a dot\r\n..two\r\nplain\r\n.\r\n"
    b"last line without end"
)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 10_000])
def test_retr_stuffs_dots_and_terminates(piece: int) -> None:
    assert encode(MESSAGE, piece) == (
        b"From: a@example.test\r\nSubject: dots\r\n\r\n..starts with a dot\r\n...two\r\nplain\r\n..\r\n"
        b"last line without end\r\n.\r\n"
    )


@pytest.mark.parametrize("piece", [1, 2, 5, 4096])
def test_bare_lf_becomes_crlf_even_split_between_pieces(piece: int) -> None:
    message = b"Subject: lf\n\n.line one\nline two\r\nthree\n"
    assert encode(message, piece) == b"Subject: lf\r\n\r\n..line one\r\nline two\r\nthree\r\n.\r\n"


@pytest.mark.parametrize("piece", [1, 3, 4096])
def test_top_sends_header_blank_line_and_n_body_lines(piece: int) -> None:
    assert encode(MESSAGE, piece, 0) == b"From: a@example.test\r\nSubject: dots\r\n\r\n.\r\n"
    assert encode(MESSAGE, piece, 2) == (
        b"From: a@example.test\r\nSubject: dots\r\n\r\n..starts with a dot\r\n...two\r\n.\r\n"
    )
    assert encode(MESSAGE, piece, 100) == encode(MESSAGE, piece)


def test_top_of_a_message_without_body_or_blank_line() -> None:
    assert encode(b"Subject: only a header\r\n", 4, 5) == b"Subject: only a header\r\n.\r\n"
    assert encode(b"\r\nbody at once\r\nmore\r\n", 4, 1) == b"\r\nbody at once\r\n.\r\n"


def test_top_stops_reading_once_done() -> None:
    encoder = WireEncoder(1)
    encoder.feed(b"A: b\r\n\r\nfirst\r\n")
    assert encoder.done
    assert encoder.feed(b"second\r\n") == b""


def test_empty_message() -> None:
    assert encode(b"", 1) == b".\r\n"


def test_file_body_streams_in_chunks_and_closes_the_file() -> None:
    data = (b"X: y\r\n\r\n" + b".dot line of some length\r\n" * 5000)
    f = io.BytesIO(data)
    body = FileBody(f, None, 4096)
    chunks = list(body.chunks())
    assert len(chunks) > 10
    assert max(len(c) for c in chunks) <= 4096 * 2
    assert b"".join(chunks) == reference(data)
    assert f.closed


lines = st.lists(
    st.one_of(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"\r", b"a\rb"]), st.binary(max_size=12)),
    max_size=30,
)


@given(lines, st.sampled_from([b"\r\n", b"\n"]), st.integers(min_value=1, max_value=9),
       st.one_of(st.none(), st.integers(min_value=0, max_value=5)), st.booleans())
def test_encoder_matches_the_reference(parts: list[bytes], eol: bytes, piece: int, top: int | None,
                                       final_eol: bool) -> None:
    parts = [p.replace(b"\n", b"") for p in parts]
    message = eol.join(parts) + (eol if final_eol and parts else b"")
    assert encode(message, piece, top) == reference(message, top)
