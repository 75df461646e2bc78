"""The commands a client can send, as values: what the parser produces and the session consumes.

Every command is a frozen dataclass with the client's `tag` and the upper-case command `name`; UID
variants (RFC 3501 6.4.8) carry `uid=True` and the name of the command they wrap.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

# RFC 3501 2.3.2: the system flags, in the spelling we answer with (clients may send any case).
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
RECENT = "\\Recent"
_CANONICAL_FLAGS = {flag.lower(): flag for flag in (*SYSTEM_FLAGS, RECENT)}


def canonical_flag(flag: str) -> str:
    """System flags in their standard spelling; keywords as sent (RFC 3501 2.3.2)."""
    return _CANONICAL_FLAGS.get(flag.lower(), flag)


# --- sequence sets ----------------------------------------------------------------------------------

STAR = 0  # "*" in a sequence set (0 is never a valid message number or UID)
MAX_UINT = 2**32 - 1  # RFC 3501 9: the largest number


@dataclass(frozen=True)
class SequenceSet:
    """RFC 3501 9 sequence-set: ranges of message numbers or UIDs, `*` meaning the largest in use.

    A range's ends may come in either order (RFC 3501 9: "2:4" and "4:2" are the same)."""

    ranges: tuple[tuple[int, int], ...]

    def bounds(self, largest: int) -> Iterator[tuple[int, int]]:
        """Each range as (low, high) with `*` replaced by `largest`."""
        for start, end in self.ranges:
            a = largest if start == STAR else start
            b = largest if end == STAR else end
            yield (a, b) if a <= b else (b, a)

    def merged(self, largest: int) -> list[tuple[int, int]]:
        """The ranges sorted and joined where they overlap or touch: a client may send thousands of
        ranges ("1,3,5,..."), and testing every range for every message would take minutes."""
        out: list[tuple[int, int]] = []
        for low, high in sorted(self.bounds(largest)):
            if out and low <= out[-1][1] + 1:
                if high > out[-1][1]:
                    out[-1] = (out[-1][0], high)
            else:
                out.append((low, high))
        return out

    def contains(self, number: int, largest: int) -> bool:
        return in_ranges(number, self.merged(largest))

    def numbers(self, largest: int) -> list[int]:
        """Every number the set names, in ascending order, bounded by `largest` (message numbers)."""
        found: list[int] = []
        for low, high in self.merged(largest):
            found.extend(range(max(low, 1), min(high, largest) + 1))
        return found

    def mentions_beyond(self, largest: int) -> bool:
        """True if a number (not `*`) exceeds `largest`: RFC 3501 6.4.8 says that is an error for
        message sequence numbers."""
        return any(n > largest for r in self.ranges for n in r if n != STAR)

    def select(self, items: Iterable[int], largest: int) -> list[int]:
        """The members of `items` (sorted ascending) the set contains: one pass over both."""
        ranges = self.merged(largest)
        out: list[int] = []
        i = 0
        for n in items:
            while i < len(ranges) and ranges[i][1] < n:
                i += 1
            if i == len(ranges):
                break
            if n >= ranges[i][0]:
                out.append(n)
        return out

    def __str__(self) -> str:
        def one(n: int) -> str:
            return "*" if n == STAR else str(n)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        """A compact set naming exactly `numbers` (for COPYUID and friends)."""
        ranges: list[tuple[int, int]] = []
        for n in sorted(set(numbers)):
            if ranges and ranges[-1][1] == n - 1:
                ranges[-1] = (ranges[-1][0], n)
            else:
                ranges.append((n, n))
        return cls(tuple(ranges))


def in_ranges(number: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether `number` lies in one of `ranges` (sorted, disjoint, as SequenceSet.merged gives)."""
    i = bisect.bisect_right(ranges, (number, MAX_UINT)) - 1
    return i >= 0 and ranges[i][0] <= number <= ranges[i][1]


def compact(numbers: Iterable[int]) -> str:
    """Numbers in the order given, as an IMAP set ("3:5,9"); for UIDPLUS responses order matters."""
    parts: list[str] = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = n
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


# --- FETCH items (RFC 3501 6.4.5) -------------------------------------------------------------------

SectionText = Literal["", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"]


@dataclass(frozen=True)
class Section:
    """BODY[section]: a part path (1.2.3) and what of it (RFC 3501 6.4.5)."""

    part: tuple[int, ...] = ()
    text: SectionText = ""
    fields: tuple[str, ...] = ()  # for HEADER.FIELDS (.NOT), upper-cased as sent back

    def spec(self) -> str:
        parts = [".".join(str(p) for p in self.part)] if self.part else []
        if self.text:
            parts.append(self.text)
        spec = ".".join(parts)
        if self.text.startswith("HEADER.FIELDS"):
            spec += " (" + " ".join(self.fields) + ")"
        return spec


@dataclass(frozen=True)
class FetchAttribute:
    """A FETCH item without a section: FLAGS, UID, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY,
    BODYSTRUCTURE, RFC822, RFC822.HEADER, RFC822.TEXT."""

    name: str


@dataclass(frozen=True)
class BodySection:
    """BODY[section]<partial> or BODY.PEEK[...] (RFC 3501 6.4.5)."""

    section: Section
    peek: bool = False
    partial: tuple[int, int] | None = None  # (origin octet, count)

    def response_name(self) -> str:
        """The name in the FETCH response: no PEEK, and the partial shows only its origin. Made once
        per item (asked again for each message a FETCH answers, issue 19)."""
        name: str | None = self.__dict__.get("_response_name")
        if name is None:
            name = f"BODY[{self.section.spec()}]"
            if self.partial is not None:
                name += f"<{self.partial[0]}>"
            self.__dict__["_response_name"] = name  # (frozen: not a field, no setattr)
        return name


@dataclass(frozen=True)
class BinarySection:
    """BINARY[part]<partial>, BINARY.PEEK[...] and BINARY.SIZE[part] (RFC 3516 4.2): a part's
    content with its Content-Transfer-Encoding undone."""

    part: tuple[int, ...]
    peek: bool = False
    partial: tuple[int, int] | None = None
    size: bool = False

    def response_name(self) -> str:
        spec = ".".join(str(p) for p in self.part)
        if self.size:
            return f"BINARY.SIZE[{spec}]"
        return f"BINARY[{spec}]" + (f"<{self.partial[0]}>" if self.partial is not None else "")


FetchItem = FetchAttribute | BodySection | BinarySection

# RFC 3501 6.4.5 macros.
FETCH_MACROS: dict[str, tuple[str, ...]] = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SIMPLE_FETCH_ATTRIBUTES = frozenset(
    {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822",
     "RFC822.HEADER", "RFC822.TEXT", "MODSEQ"}  # MODSEQ: RFC 7162 3.1.4.1
)


# --- SEARCH keys (RFC 3501 6.4.4) -------------------------------------------------------------------

@dataclass(frozen=True)
class SearchAll:
    pass


@dataclass(frozen=True)
class FlagKey:
    """ANSWERED/UNANSWERED, DELETED, DRAFT, FLAGGED, SEEN, KEYWORD x, RECENT and their opposites."""

    flag: str
    present: bool = True


@dataclass(frozen=True)
class NewKey:
    """NEW is RECENT UNSEEN (RFC 3501 6.4.4)."""


@dataclass(frozen=True)
class HeaderKey:
    """FROM, TO, CC, BCC, SUBJECT, HEADER name value: substring of the decoded header field."""

    field: str
    value: str


@dataclass(frozen=True)
class TextKey:
    """BODY (body only) or TEXT (headers and body)."""

    where: Literal["BODY", "TEXT"]
    value: str


@dataclass(frozen=True)
class DateKey:
    """BEFORE/ON/SINCE (internal date) and SENTBEFORE/SENTON/SENTSINCE (Date: header)."""

    sent: bool
    relation: Literal["BEFORE", "ON", "SINCE"]
    date: dt.date


@dataclass(frozen=True)
class SizeKey:
    relation: Literal["LARGER", "SMALLER"]
    size: int


@dataclass(frozen=True)
class SetKey:
    """A sequence set of message numbers, or UID set."""

    uid: bool
    set: SequenceSet


@dataclass(frozen=True)
class ModSeqKey:
    """RFC 7162 3.1.5 MODSEQ: messages whose mod-sequence is at least `modseq`."""

    modseq: int


@dataclass(frozen=True)
class NotKey:
    key: SearchKey


@dataclass(frozen=True)
class OrKey:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class AndKey:
    keys: tuple[SearchKey, ...]


SearchKey = (SearchAll | FlagKey | NewKey | HeaderKey | TextKey | DateKey | SizeKey | SetKey | NotKey | OrKey | AndKey
             | ModSeqKey)


# --- commands ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    tag: str
    name: str  # upper case; "FETCH" for both FETCH and UID FETCH


@dataclass(frozen=True)
class Login(Command):
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Authenticate(Command):
    mechanism: str
    initial: str | None = field(default=None, repr=False)  # SASL-IR (RFC 4959), base64 or "="


@dataclass(frozen=True)
class FolderCommand(Command):
    """SELECT, EXAMINE, CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE, GETQUOTAROOT: one folder name (what
    RFC 3501 calls a mailbox name; here a mailbox is a user's account)."""

    folder: str


@dataclass(frozen=True)
class Qresync:
    """RFC 7162 3.2.5: what a resyncing client last knew of the folder."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None  # known message numbers, their UIDs


@dataclass(frozen=True)
class Select(FolderCommand):
    """SELECT / EXAMINE with the RFC 7162 parameters CONDSTORE and QRESYNC."""

    condstore: bool = False
    qresync: Qresync | None = None


@dataclass(frozen=True)
class Rename(Command):
    old: str
    new: str


@dataclass(frozen=True)
class ListCommand(Command):
    """LIST / LSUB (RFC 3501 6.3.8-9), with the RFC 5258 selection and return options clients use
    to ask for SPECIAL-USE (RFC 6154) and CHILDREN."""

    reference: str
    patterns: tuple[str, ...]
    select: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    extended: bool = False
    status_items: tuple[str, ...] = ()  # RFC 5819 RETURN (STATUS (...))


@dataclass(frozen=True)
class Status(Command):
    folder: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Append(Command):
    folder: str
    flags: tuple[str, ...]
    date: int | None  # unix seconds
    message: AppendContent = field(repr=False, compare=False)
    # RFC 3502 MULTIAPPEND: the messages after the first, each with its flags and date.
    more: tuple[tuple[tuple[str, ...], int | None, AppendContent], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class CatenateUrl:
    """RFC 4469 CATENATE URL part: an IMAP URL (RFC 5092) naming a message or a part of one."""

    url: str


# The message of an APPEND: its octets, or RFC 4469 CATENATE parts (TEXT octets and URLs) to join.
# A message (or CATENATE text) over 64 KiB is the bytearray its literal was read into (imap/protocol.py).
AppendContent = bytes | bytearray | tuple[bytes | bytearray | CatenateUrl, ...]


@dataclass(frozen=True)
class Fetch(Command):
    uid: bool
    set: SequenceSet
    items: tuple[FetchItem, ...]
    changedsince: int | None = None  # RFC 7162 3.1.4.1
    vanished: bool = False  # RFC 7162 3.2.6 (UID FETCH, QRESYNC enabled)


@dataclass(frozen=True)
class Store(Command):
    uid: bool
    set: SequenceSet
    mode: Literal["set", "add", "remove"]
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None  # RFC 7162 3.1.3


@dataclass(frozen=True)
class CopyMove(Command):
    """COPY, MOVE (RFC 6851) and their UID forms."""

    uid: bool
    set: SequenceSet
    folder: str  # the target


@dataclass(frozen=True)
class Search(Command):
    uid: bool
    charset: str | None
    key: SearchKey
    returns: tuple[str, ...] | None = None  # RFC 4731 RETURN (...): an ESEARCH answer; () means ALL
    partial: tuple[int, int] | None = None  # RFC 5267 4.4 RETURN (PARTIAL low:high)


@dataclass(frozen=True)
class NotifyFilter:
    """RFC 5465 6 one event group: which mailboxes (SELECTED, SELECTED-DELAYED, INBOXES, PERSONAL,
    SUBSCRIBED, SUBTREE or MAILBOXES with their names) and the events wanted there (() for NONE)."""

    kind: str
    folders: tuple[str, ...]
    events: tuple[str, ...]


@dataclass(frozen=True)
class Notify(Command):
    """RFC 5465 3: NOTIFY NONE (no filters) or NOTIFY SET [STATUS] filters."""

    status: bool
    filters: tuple[NotifyFilter, ...]


@dataclass(frozen=True)
class CancelUpdate(Command):
    """RFC 5267 4.3 CANCELUPDATE: stop the updates of the searches with these tags."""

    tags: tuple[str, ...]


@dataclass(frozen=True)
class Sort(Command):
    """SORT / UID SORT (RFC 5256 3): (key, reversed) criteria, then a charset and a search."""

    uid: bool
    criteria: tuple[tuple[str, bool], ...]
    charset: str
    key: SearchKey
    returns: tuple[str, ...] | None = None  # RFC 5267 ESORT RETURN (...): an ESEARCH answer


@dataclass(frozen=True)
class Thread(Command):
    """THREAD / UID THREAD algorithm charset search (RFC 5256 4); REFERENCES and ORDEREDSUBJECT."""

    uid: bool
    algorithm: str
    charset: str
    key: SearchKey


@dataclass(frozen=True)
class Compress(Command):
    """COMPRESS mechanism (RFC 4978 3); DEFLATE is the one defined."""

    mechanism: str


@dataclass(frozen=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE set (RFC 4315 2.1) when `uids` is given."""

    uids: SequenceSet | None = None


@dataclass(frozen=True)
class Id(Command):
    """RFC 2971: the client's identification, or None for NIL."""

    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True)
class Enable(Command):
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class QuotaCommand(Command):
    """GETQUOTA root, or SETQUOTA root (resources) (RFC 2087)."""

    root: str
    limits: tuple[tuple[str, int], ...] = ()


# Commands that take no arguments at all (RFC 3501 6.1, 6.2.1, 6.3.10-, 6.4.1-3, RFC 2177, 3691, 2342).
NO_ARGUMENT_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "NAMESPACE", "IDLE"}
)
