"""Server responses as values that render to bytes (RFC 3501 7), and IMAP data encoding.

A response renders to a list of pieces: bytes, and StreamedLiteral objects whose content the server
copies from a file in chunks (so a 50 MB BODY[] is never built in memory). `to_bytes` joins it all for
tests and small responses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

MAX_QUOTED_OCTETS = 1024  # longer strings go out as literals (easier on clients than huge quoted ones)
_UNQUOTABLE = re.compile(rb"[\x00\r\n\x80-\xff]")  # octets a quoted string cannot carry (RFC 3501 9)


def without_nul(data: bytes) -> bytes:
    """`data` for a literal: a NUL as 0x80, as Dovecot sends it. No IMAP string may carry a NUL (RFC
    3501 4.3 and 9, CHAR8), only a literal8 (BINARY); port 25 and other programs' Maildir files bring
    them, and a client reading C strings stopped at one. The octet count stays (RFC822.SIZE, partials)."""
    return data.replace(b"\0", b"\x80") if b"\0" in data else data


class StreamedLiteral(Protocol):
    """Literal content produced in chunks by blocking reads; the server runs `chunks()` off the loop."""

    @property
    def length(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


class Atom(str):
    """Sent as is: NIL-free keywords, flags, numbers already formatted, pre-rendered data."""

    __slots__ = ()


@dataclass(frozen=True)
class LiteralBytes:
    """Always sent as a literal (message text), even when short and printable."""

    data: bytes


@dataclass(frozen=True)
class Literal8Bytes:
    """RFC 3516 literal8 (~{n}): content that may hold NUL octets (FETCH BINARY)."""

    data: bytes


@dataclass(frozen=True)
class Raw:
    """Pre-rendered IMAP data sent as is (a body structure's run of parts has no spaces in it)."""

    data: bytes


@dataclass(frozen=True)
class Streamed:
    source: StreamedLiteral
    eight: bool = False  # RFC 3516 literal8 (~{n}): content that may hold NUL octets (FETCH BINARY)


Value: TypeAlias = "int | str | bytes | Atom | Raw | LiteralBytes | Literal8Bytes | Streamed | Sequence[Value] | None"
Piece = bytes | StreamedLiteral
Status = Literal["OK", "NO", "BAD", "PREAUTH", "BYE"]


def quote(data: bytes) -> bytes:
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode_string(data: bytes, out: list[Piece]) -> None:
    """RFC 3501 4.3: quoted when short 7-bit text, else a literal."""
    out.append(_string(data))


def encode_astring(text: str) -> bytes:
    """A mailbox name or other astring: an atom when possible (what clients expect in LIST), else quoted."""
    from appliance.imap.parser import ASTRING_CHARS

    data = text.encode("utf-8")
    if data and all(c in ASTRING_CHARS for c in data) and data.upper() != b"NIL":
        return data
    out: list[Piece] = []
    encode_string(data, out)
    return b"".join(p for p in out if isinstance(p, bytes))


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """Runs of bytes joined into one piece, streamed literals kept apart (fewer socket writes)."""
    result: list[Piece] = []
    run: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            run.append(piece)
        else:
            if run:
                result.append(b"".join(run))
                run = []
            result.append(piece)
    if run:
        result.append(b"".join(run))
    return result


def encode_value(value: Value, out: list[Piece]) -> None:
    # The common types first: this runs for every field of every ENVELOPE and BODYSTRUCTURE.
    if isinstance(value, bytes):
        encode_string(value, out)
    elif value is None:
        out.append(b"NIL")
    elif isinstance(value, Atom):
        out.append(value.encode("utf-8"))
    elif isinstance(value, str):
        encode_string(value.encode("utf-8"), out)
    elif isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    elif isinstance(value, int):
        out.append(b"%d" % value)
    elif isinstance(value, Raw):
        out.append(value.data)
    elif isinstance(value, LiteralBytes | Literal8Bytes):
        out += _literal(value)
    elif isinstance(value, Streamed):
        out.append(b"%s{%d}\r\n" % (b"~" if value.eight else b"", value.source.length))
        out.append(value.source)
    else:
        out.append(b"(")
        first = True
        for item in value:
            if not first:
                out.append(b" ")
            first = False
            encode_value(item, out)
        out.append(b")")


def render_value(value: Value) -> bytes:
    """The value as bytes, streamed literals read in. The types ENVELOPE and BODYSTRUCTURE are made
    of (lists, strings, NIL, numbers, pre-rendered runs) are rendered straight to bytes, each list
    one join: building a list of pieces with a type test per piece was a quarter of describing a
    message for the message cache (issue 19)."""
    if type(value) is bytes:  # the usual value (header text as on disk): one type test, not a union's
        return _string(value)
    if value is None:
        return b"NIL"
    if isinstance(value, list | tuple):
        return b"(" + b" ".join([render_value(item) for item in value]) + b")"
    if isinstance(value, bytes):
        return _string(value)
    if isinstance(value, Atom):
        return value.encode("utf-8")
    if isinstance(value, str):
        return _string(value.encode("utf-8"))
    if type(value) is int:  # (not a bool: encode_value refuses those)
        return b"%d" % value
    if isinstance(value, Raw):
        return value.data
    out: list[Piece] = []
    encode_value(value, out)
    return b"".join(p if isinstance(p, bytes) else materialise(p) for p in out)


def _literal(value: LiteralBytes | Literal8Bytes) -> tuple[bytes, bytes]:
    if isinstance(value, Literal8Bytes):
        return b"~{%d}\r\n" % len(value.data), value.data  # RFC 3516 literal8: may carry a NUL
    return b"{%d}\r\n" % len(value.data), without_nul(value.data)


def _string(data: bytes) -> bytes:
    """encode_string's rendering of `data`, as one piece."""
    if len(data) <= MAX_QUOTED_OCTETS and _UNQUOTABLE.search(data) is None:
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n%b" % (len(data), without_nul(data))


def materialise(piece: Piece) -> bytes:
    return piece if isinstance(piece, bytes) else b"".join(piece.chunks())


# --- responses --------------------------------------------------------------------------------------

class Response:
    def render(self) -> list[Piece]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return b"".join(materialise(p) for p in self.render())


def _status_line(prefix: bytes, status: str, code: str | None, text: str) -> bytes:
    line = prefix + b" " + status.encode("ascii")
    if code:
        line += b" [" + code.encode("utf-8") + b"]"
    return line + b" " + _clean(text) + b"\r\n"


def _clean(text: str) -> bytes:
    # Human text never carries CR/LF (it would end the response early) and stays short.
    return text.replace("\r", " ").replace("\n", " ")[:1000].encode("utf-8", errors="replace")


@dataclass(frozen=True)
class Tagged(Response):
    """tag OK/NO/BAD [code] text (RFC 3501 7.1)."""

    tag: str
    status: Status
    text: str
    code: str | None = None

    def render(self) -> list[Piece]:
        return [_status_line(self.tag.encode("ascii"), self.status, self.code, self.text)]


@dataclass(frozen=True)
class UntaggedStatus(Response):
    """* OK/NO/BAD/PREAUTH/BYE [code] text (RFC 3501 7.1)."""

    status: Status
    text: str
    code: str | None = None

    def render(self) -> list[Piece]:
        return [_status_line(b"*", self.status, self.code, self.text)]


def Bye(text: str, code: str | None = None) -> UntaggedStatus:
    return UntaggedStatus("BYE", text, code)


@dataclass(frozen=True)
class Continuation(Response):
    """+ text, or + base64 challenge (RFC 3501 7.5)."""

    text: str = "Ready"

    def render(self) -> list[Piece]:
        return [b"+ " + _clean(self.text) + b"\r\n"]


@dataclass(frozen=True)
class Data(Response):
    """* <keyword> <values...>: EXISTS, RECENT, EXPUNGE, FLAGS, LIST, STATUS, SEARCH, CAPABILITY...

    `head` is sent as is ("12 EXISTS", "SEARCH"); each value follows after a space."""

    head: str
    values: tuple[Value, ...] = ()

    def render(self) -> list[Piece]:
        out: list[Piece] = [b"* " + self.head.encode("utf-8")]
        for value in self.values:
            out.append(b" ")
            encode_value(value, out)
        out.append(b"\r\n")
        return coalesce(out)


@dataclass(frozen=True)
class Preformatted(Response):
    """Responses already rendered (many FETCH lines built in one go for speed)."""

    data: bytes

    def render(self) -> list[Piece]:
        return [self.data]


@dataclass(frozen=True)
class FetchResponse(Response):
    """* n FETCH (name value ...) (RFC 3501 7.4.2)."""

    seq: int
    items: tuple[tuple[str, Value], ...]

    def render(self) -> list[Piece]:
        out: list[Piece] = [b"* %d FETCH (" % self.seq]
        for i, (name, value) in enumerate(self.items):
            out.append((b" " if i else b"") + name.encode("ascii") + b" ")
            encode_value(value, out)
        out.append(b")\r\n")
        return coalesce(out)


def fetch_line(seq: int, items: Sequence[tuple[str, Value]]) -> bytes:
    """FetchResponse(seq, items).to_bytes(), each value rendered by render_value: no response
    object and no list of pieces (a FETCH from the message cache renders one per message: 7 us
    a message that way, 3 this one; issue 19)."""
    return b"* %d FETCH (" % seq + b" ".join([name.encode("ascii") + b" " + render_value(value)
                                              for name, value in items]) + b")\r\n"


def flag_list(flags: Sequence[str]) -> Atom:
    return Atom("(" + " ".join(flags) + ")")
