"""A message file as POP3 multi-line data, piece by piece: CRLF line ends, dot-stuffed, terminated.

RFC 1939 3: every line of a multi-line response ends with CRLF, a line starting with "." gets another
".", and "." CRLF ends the response. Messages written by Letterbox are CRLF already; one put into the
Maildir by another program may use bare LF, so line ends are normalised on the way out. RFC 1939 7
(TOP): the header, the blank line after it, and at most n lines of the body.

Nothing here does I/O but FileBody.chunks(), which the server runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from appliance.pop3.replies import CRLF, TERMINATOR


class WireEncoder:
    """Feed file bytes in pieces of any size; get wire bytes back; `finish()` ends the response.

    With `body_lines` (TOP) the output stops after that many body lines and `done` turns true, so the
    caller can stop reading the file."""

    def __init__(self, body_lines: int | None = None) -> None:
        self._body_lines_left = body_lines
        self._held_cr = False  # the last piece ended in CR: whether it starts a CRLF is in the next one
        self._at_line_start = True  # of the wire output: a "." here must be stuffed
        self._in_header = True
        self._line_octets = 0  # of the current, unfinished line (TOP: tells the blank line apart)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._held_cr = True
        return self._emit(_to_crlf(data))

    def finish(self) -> bytes:
        out = b""
        if self._held_cr and not self.done:
            # A CR at the very end of the file: taken as the end of the last line.
            self._held_cr = False
            out = self._emit(CRLF)
        if not self._at_line_start:
            out += CRLF  # the last line had no line end; the terminator must start a line
            self._at_line_start = True
        self.done = True
        return out + TERMINATOR

    def _emit(self, text: bytes) -> bytes:
        if self._body_lines_left is not None:
            text = self._top_cut(text)
        if not text:
            return b""
        if b"\n." in text:
            text = text.replace(b"\n.", b"\n..")  # every LF here ends a CRLF: it starts a line
        if self._at_line_start and text.startswith(b"."):
            text = b"." + text
        self._at_line_start = text.endswith(b"\n")
        return text

    def _top_cut(self, text: bytes) -> bytes:
        """The prefix of `text` TOP still sends; sets `done` once the last wanted line is complete."""
        assert self._body_lines_left is not None
        pos, end = 0, len(text)
        while pos < end:
            if not self._in_header and self._body_lines_left <= 0:
                self.done = True
                break
            nl = text.find(b"\n", pos)
            if nl < 0:
                self._line_octets += end - pos
                pos = end
                break
            line_octets = self._line_octets + nl + 1 - pos
            self._line_octets = 0
            pos = nl + 1
            if self._in_header:
                if line_octets == len(CRLF):  # RFC 5322 2.1: an empty line ends the header
                    self._in_header = False
            else:
                self._body_lines_left -= 1
        if not self._in_header and self._body_lines_left <= 0:
            self.done = True
        return text[:pos]


def _to_crlf(data: bytes) -> bytes:
    """Bare LF becomes CRLF; CRLF and lone CR stay. Counting first keeps the common case copy-free."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class FileBody:
    """RETR or TOP of one open message file. Owns the file (a flag change may rename the message's
    path; an open file stays valid) and closes it when read through or on `close()`."""

    def __init__(self, f: BinaryIO, body_lines: int | None, chunk_octets: int) -> None:
        self._f = f
        self._body_lines = body_lines
        self._chunk_octets = chunk_octets

    def chunks(self) -> Iterator[bytes]:
        encoder = WireEncoder(self._body_lines)
        try:
            while not encoder.done:
                data = self._f.read(self._chunk_octets)
                if not data:
                    break
                out = encoder.feed(data)
                if out:
                    yield out
            yield encoder.finish()
        finally:
            self.close()

    def close(self) -> None:
        self._f.close()
