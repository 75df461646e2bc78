"""The maildrop of one POP3 session: the INBOX as it was at login, numbered, with deletion marks.

RFC 1939 5: messages are numbered from 1 at login and keep their numbers for the session; a message
marked deleted is not counted by STAT or LIST and cannot be retrieved, and only QUIT in the
TRANSACTION state removes it (the UPDATE state). Pure bookkeeping: no store, no I/O.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.pop3.replies import TERMINATOR, Pop3Err
from appliance.store.model import MessageInfo

MAX_MESSAGE_NUMBER_DIGITS = 10
MAX_LINE_COUNT_DIGITS = 20  # TOP's: 2**64 and a little more, as a client may send "as many as there are"
# Messages per piece of a LIST or UIDL answer: about 2 ms of the loop, 20-40 KB.
LISTING_CHUNK = 1_000
_SIZE = operator.attrgetter("size")
# Dovecot's Maildir names may carry ',W=<n>': the size with CRLF line ends (the size on the wire).


@dataclass(frozen=True)
class DropMessage:
    number: int
    uid: int
    size: int  # octets on the wire, CRLF line ends, before dot-stuffing (RFC 1939 11): the store's size
    path: Path
    unique_id: str  # RFC 1939 7 UIDL


def unique_id(uidvalidity: int, uid: int) -> str:
    """RFC 1939 7: up to 70 octets in 0x21-0x7E, never reused for another message of this maildrop.
    The IMAP UID and UIDVALIDITY in Dovecot's default form (pop3_uidl_format = %08Xu%08Xv), so a
    POP3 client that leaves mail on the server keeps its list when the Maildir moves between Dovecot
    and Letterbox, either way (issue 17). A new UIDVALIDITY gives every message a new unique-id, as
    it must. Earlier versions said "<uidvalidity>.<uid>": a client that kept those downloads the
    messages it left on the server once more, once."""
    return f"{uid:08X}{uidvalidity:08X}"


class Maildrop:
    """Over the snapshot's own tuple of messages (shared with the store and every other reader): no
    object per message, so a 100k INBOX costs its session no memory and its login no loop time
    (a DropMessage and a Path each made 33 MB and 0.9 s of the loop per login at 100k)."""

    def __init__(self, uidvalidity: int, messages: Sequence[MessageInfo]) -> None:
        self.uidvalidity = uidvalidity
        self.messages = messages
        self._octets = sum(map(_SIZE, messages))
        self.deleted: dict[int, int] = {}  # message numbers marked by DELE, each with its size
        self._deleted_octets = 0  # their sum: STAT, pipelined, costs no loop over the marks
        self.retrieved: set[int] = set()  # message numbers sent whole by RETR

    def __len__(self) -> int:
        return len(self.messages)

    def at(self, number: int) -> DropMessage:
        info = self.messages[number - 1]
        return DropMessage(number, info.uid, info.size, info.path, unique_id(self.uidvalidity, info.uid))

    def message(self, argument: str) -> DropMessage:
        """The live message a command's argument names (RFC 1939 5: deleted ones may not be named)."""
        number = parse_number(argument)
        if not 1 <= number <= len(self.messages):
            raise Pop3Err("No such message")
        if number in self.deleted:
            raise Pop3Err(f"Message {number} already deleted")
        return self.at(number)

    def stat(self) -> tuple[int, int]:
        return len(self.messages) - len(self.deleted), self._octets - self._deleted_octets

    def delete(self, message: DropMessage) -> None:
        if message.number not in self.deleted:
            self.deleted[message.number] = message.size
            self._deleted_octets += message.size

    def reset(self) -> None:
        """RFC 1939 5 RSET: every deletion mark is removed."""
        self.deleted.clear()
        self._deleted_octets = 0

    def deleted_uids(self) -> list[int]:
        return [self.messages[n - 1].uid for n in sorted(self.deleted)]

    def seen_uids(self) -> list[int]:
        """Retrieved and kept: marked \\Seen at QUIT, so IMAP shows them read (as Dovecot does)."""
        return [self.messages[n - 1].uid for n in sorted(self.retrieved - self.deleted.keys())]

    def listing(self, unique_ids: bool) -> Listing:
        """LIST's or UIDL's lines for every live message, to stream."""
        return Listing(self, unique_ids)


class Listing:
    """The multi-line body of LIST or UIDL, made LISTING_CHUNK messages at a time as the server sends
    it (a MessageBody, as RETR's): made whole, UIDL of a 100k drop held the loop for 0.5 s in one step
    and 2.4 MB in one string."""

    def __init__(self, drop: Maildrop, unique_ids: bool) -> None:
        self._messages = drop.messages
        self._deleted = frozenset(drop.deleted)  # as at the command: nothing changes it meanwhile
        self._column: Callable[[MessageInfo], bytes] = (
            _unique_id_column(drop.uidvalidity) if unique_ids else _size_column)

    def chunks(self) -> Iterator[bytes]:
        messages, deleted, column = self._messages, self._deleted, self._column
        for start in range(0, len(messages), LISTING_CHUNK):
            lines = [b"%d %b\r\n" % (n, column(info))
                     for n, info in enumerate(messages[start:start + LISTING_CHUNK], start + 1)
                     if n not in deleted]
            if lines:
                yield b"".join(lines)
        yield TERMINATOR

    def close(self) -> None:
        pass


def _size_column(info: MessageInfo) -> bytes:
    return b"%d" % info.size


def _unique_id_column(uidvalidity: int) -> Callable[[MessageInfo], bytes]:
    suffix = b"%08X" % uidvalidity  # unique_id's form, in bytes

    def column(info: MessageInfo) -> bytes:
        return b"%08X%b" % (info.uid, suffix)

    return column


def parse_number(argument: str) -> int:
    """A message number or line count: decimal digits only, bounded."""
    if not argument.isascii() or not argument.isdigit() or len(argument) > MAX_MESSAGE_NUMBER_DIGITS:
        raise Pop3Err(f"Invalid number: {argument[:20]}")
    return int(argument)


def parse_line_count(argument: str) -> int:
    """TOP's line count: RFC 1939 7 takes any non-negative number, and Dovecot sends the whole message
    for 'TOP 1 99999999999'; more digits than a message number may have are fine, within a bound."""
    digits = argument.lstrip("0")
    if not (argument.isascii() and argument.isdigit()) or len(digits) > MAX_LINE_COUNT_DIGITS:
        raise Pop3Err(f"Invalid number: {argument[:20]}")
    return int(digits or "0")
