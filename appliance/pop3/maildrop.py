"""The maildrop of one POP3 session: the INBOX as it was at login, numbered, with deletion marks.

RFC 1939 5: messages are numbered from 1 at login and keep their numbers for the session; a message
marked deleted is not counted by STAT or LIST and cannot be retrieved, and only QUIT in the
TRANSACTION state removes it (the UPDATE state). Pure bookkeeping: no store, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.pop3.replies import Pop3Err
from appliance.store.model import MessageInfo

MAX_MESSAGE_NUMBER_DIGITS = 10
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
    def __init__(self, uidvalidity: int, messages: Sequence[MessageInfo]) -> None:
        self.uidvalidity = uidvalidity
        self.messages = tuple(
            DropMessage(n, info.uid, info.size, info.path, unique_id(uidvalidity, info.uid))
            for n, info in enumerate(messages, start=1)
        )
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self.retrieved: set[int] = set()  # message numbers sent whole by RETR

    def message(self, argument: str) -> DropMessage:
        """The live message a command's argument names (RFC 1939 5: deleted ones may not be named)."""
        number = parse_number(argument)
        if not 1 <= number <= len(self.messages):
            raise Pop3Err("No such message")
        if number in self.deleted:
            raise Pop3Err(f"Message {number} already deleted")
        return self.messages[number - 1]

    def live(self) -> list[DropMessage]:
        return [m for m in self.messages if m.number not in self.deleted]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(m.size for m in live)

    def delete(self, message: DropMessage) -> None:
        self.deleted.add(message.number)

    def reset(self) -> None:
        """RFC 1939 5 RSET: every deletion mark is removed."""
        self.deleted.clear()

    def deleted_uids(self) -> list[int]:
        return [self.messages[n - 1].uid for n in sorted(self.deleted)]

    def seen_uids(self) -> list[int]:
        """Retrieved and kept: marked \\Seen at QUIT, so IMAP shows them read (as Dovecot does)."""
        return [self.messages[n - 1].uid for n in sorted(self.retrieved - self.deleted)]


def parse_number(argument: str) -> int:
    """A message number or line count: decimal digits only, bounded."""
    if not argument.isascii() or not argument.isdigit() or len(argument) > MAX_MESSAGE_NUMBER_DIGITS:
        raise Pop3Err(f"Invalid number: {argument[:20]}")
    return int(argument)
