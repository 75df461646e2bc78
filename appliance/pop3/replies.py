"""POP3 replies as values that render to bytes, and the error that carries one.

RFC 1939 3: a reply is a status indicator (+OK or -ERR), maybe a text, CRLF; a multi-line reply adds
lines, each dot-stuffed, and ends with "." CRLF. RFC 2449 8: a response code in brackets may follow
the status indicator ("-ERR [IN-USE] ..."); RFC 3206 adds SYS/TEMP, SYS/PERM and AUTH.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

# RFC 2449 8.1 and RFC 3206 4: the response codes this server sends.
IN_USE = "IN-USE"  # too many sessions of this mailbox (as Dovecot past mail_max_userip_connections)
SYS_TEMP = "SYS/TEMP"  # a temporary problem on the server: try again later
SYS_PERM = "SYS/PERM"  # a problem on the server that will not go away by itself
AUTH = "AUTH"  # the credentials were wrong (RFC 3206 5), or not acceptable here

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


def _clean(text: str) -> str:
    """Reply texts never carry line breaks (client input echoed back must not inject a reply)."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def status_line(ok: bool, text: str, code: str | None = None) -> bytes:
    parts = ["+OK" if ok else "-ERR"]
    if code:
        parts.append(f"[{code}]")
    if text:
        parts.append(_clean(text))
    return " ".join(parts).encode("utf-8") + CRLF


def stuff_line(line: bytes) -> bytes:
    """RFC 1939 3: a line starting with the termination octet gets one more."""
    return b"." + line if line.startswith(b".") else line


@dataclass(frozen=True)
class Ok:
    """+OK with an optional multi-line body (CAPA, AUTH): `lines` without line ends."""

    text: str = ""
    lines: tuple[str, ...] | None = None

    def render(self) -> bytes:
        head = status_line(True, self.text)
        if self.lines is None:
            return head
        body = b"".join(stuff_line(_clean(line).encode("utf-8")) + CRLF for line in self.lines)
        return head + body + TERMINATOR


@dataclass(frozen=True)
class Err:
    text: str
    code: str | None = None

    def render(self) -> bytes:
        return status_line(False, self.text, self.code)


@dataclass(frozen=True)
class Continuation:
    """RFC 5034 4: "+" SP and a base64 challenge (empty for PLAIN); the client answers with one line."""

    challenge: str = ""

    def render(self) -> bytes:
        return b"+ " + self.challenge.encode("ascii") + CRLF


class MessageBody(Protocol):
    """A multi-line body made in pieces (already CRLF, stuffed, terminated): a message read from its
    file, or the lines of LIST and UIDL for a big maildrop."""

    def chunks(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Streamed:
    """+OK text, then a body the server streams (RETR, TOP; LIST, UIDL) so a large message never sits in
    memory and a long listing never holds the loop in one step."""

    text: str
    body: MessageBody

    def render(self) -> bytes:
        return status_line(True, self.text)


Reply = Ok | Err | Continuation | Streamed


class Pop3Err(Exception):
    """A command that failed: the handler raises it, the session answers with its reply."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.reply = Err(text, code)
