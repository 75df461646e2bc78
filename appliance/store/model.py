"""Values and errors of the mail store; `appliance.store.mailstore` re-exports all of them."""

from __future__ import annotations

import contextlib
import os
import weakref
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from operator import is_not, itemgetter
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

INBOX = "INBOX"
JUNK = "Junk"  # the special-use \Junk folder (RFC 6154): the content filter files spam here
SEPARATOR = "/"  # the IMAP hierarchy separator; '.' on disk (Maildir++)

SPECIAL_FOLDERS = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", JUNK: "\\Junk",
                   "Archive": "\\Archive"}


@dataclass(frozen=True)
class Filed:
    """Messages a user put into a folder: copied or moved from another folder, or appended (source
    None). What the spam learner watches: into Junk is spam, out of it is ham (issue 16)."""

    mailbox: str  # the mailbox's canonical address
    source: str | None  # the folder they came from; None for APPEND
    target: str
    uids: tuple[int, ...]  # their UIDs in `target`
    moved: bool = False


class StoreError(Exception):
    """A store operation that cannot be done; the message is fit for a protocol reply."""


class QuotaExceeded(StoreError): ...


class NoSuchFolder(StoreError): ...


class FolderExists(StoreError): ...


class TooManyFolders(StoreError): ...


# INTERNALDATE of a message whose file was indexed without a stat (a foreign file whose name has
# ',S=' and ',W='): its file's mtime, read when asked (MessageInfo.internaldate) and soon after its
# first listing, in the background, for the index (mailboxes.OpenMailboxes._date_later).
UNKNOWN_DATE = -1


class _MessageFields(NamedTuple):
    uid: int
    flags: frozenset[str]  # IMAP names: \Seen \Answered \Flagged \Deleted \Draft, plus keywords
    size: int  # octets on the wire: every line end CRLF (RFC822.SIZE, POP3 LIST), whatever the file has
    date: int  # INTERNALDATE as the index has it: unix seconds, or UNKNOWN_DATE (use `internaldate`)
    modseq: int
    # The file as it is now (its name changes with flags; re-read after a flag change), kept as its
    # directory (one object shared by the folder's messages) and its name (the index's own string):
    # a Path per message cost 216 bytes and 60 % of a 100k snapshot's time (issue 19).
    directory: Path
    filename: str


class MessageInfo(_MessageFields):
    """One message of a folder snapshot. A named tuple: one is made per message for every changed
    folder state, and a tuple is made in 1 us where a frozen dataclass took 6-13 us (issue 19)."""

    __slots__ = ()

    @property
    def internaldate(self) -> int:
        """Unix seconds (RFC 3501 INTERNALDATE: the file's mtime, as Dovecot keeps it)."""
        return self.date if self.date != UNKNOWN_DATE else file_date(self.directory, self.filename)

    @property
    def path(self) -> Path:
        return self.directory / self.filename

    @property
    def file(self) -> str:
        """The path as a string: what the code that opens or stats many files wants (a Path joined
        and formatted per message was most of building a FETCH's background fill, issue 19). Joined
        by hand: os.path.join was a sixth of the event loop's share of a SEARCH SUBJECT at 10k."""
        return str(self.directory) + "/" + self.filename


def file_date(directory: Path, filename: str) -> int:
    """A message file's mtime; when another program renamed it (a flag change), found by its unique
    name in cur/ or new/; when it is gone, the delivery time its name starts with (or 0)."""
    with contextlib.suppress(OSError):
        return int(os.stat(os.path.join(directory, filename)).st_mtime)
    base = filename.partition(":")[0]
    for sub in ("cur", "new"):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory.parent / sub):
                if name.partition(":")[0] == base:
                    return int(os.stat(directory.parent / sub / name).st_mtime)
    seconds = base.partition(".")[0]
    return int(seconds) if seconds.isascii() and seconds.isdigit() else 0


@dataclass(frozen=True)
class FolderSnapshot:
    """The folder at one moment. Immutable, so the store hands the same object to every caller while
    the folder does not change (FolderIndex.snapshot), and what is derived from the messages (the
    UID list and map, keywords, counts) is worked out once per state, not once per SELECT: SELECT
    of an unchanged 100k folder then costs no per-message work (issue 19)."""

    name: str
    uidvalidity: int
    uidnext: int
    messages: tuple[MessageInfo, ...]  # ordered by UID
    # With claim_recent: the UIDs this snapshot claimed as \Recent (files moved from new/ to cur/).
    # Without: the UIDs that are recent and not yet claimed by any session (nothing is claimed).
    recent: frozenset[int]
    highestmodseq: int = 1

    # Shared by every reader: never mutate them (SelectedFolder copies before it changes its view).
    # Made by map(), zip() and set() over the tuple fields where that is quicker, loops in C: a generator or comprehension
    # per message was a sixth of a cold SELECT at 100k (py-spy, issue 19).
    def knowing(self, uids: tuple[int, ...], keywords: frozenset[str]) -> None:
        """Take `uids` and `keywords` as worked out already by whoever made the messages (the index,
        from a first listing's columns): each the value its property below would compute."""
        self.__dict__.update(uids=uids, keywords=keywords)  # where cached_property keeps them

    @cached_property
    def uids(self) -> tuple[int, ...]:
        return tuple(map(_UID, self.messages))

    def place(self, uid: int) -> int:
        """Where the message with this UID is in `messages`, or -1: by bisection, over the UID tuple
        when some reader made it, else over the messages themselves (a session's look at one message
        of a new state builds neither the tuple nor the map, issue 19)."""
        uids = self.__dict__.get("uids")
        if uids is not None:
            i = bisect_left(uids, uid)
            return i if i < len(uids) and uids[i] == uid else -1
        messages = self.messages
        i = bisect_left(messages, uid, key=_UID)
        return i if i < len(messages) and messages[i][0] == uid else -1

    def replaced_since(self, base: FolderSnapshot) -> list[int]:
        """The places among base's messages where this state holds another object, for a `base` whose
        messages are the first ones of this state's, UID for UID (SelectedFolder._changed checks that).
        Every IDLE session on a folder takes in the same new state from the same old one: the last
        answer is kept (by a weak reference to `base`, so states don't hold their predecessors), and
        the folder's loop over its messages runs once per change, not once per session (issue 19)."""
        kept = self.__dict__.get("_replaced")
        if kept is not None and kept[0]() is base:
            return kept[1]  # type: ignore[no-any-return]
        before = base.messages
        found = list(compress(range(len(before)), map(is_not, self.messages, before)))
        self.__dict__["_replaced"] = (weakref.ref(base), found)
        return found

    def find(self, uid: int) -> MessageInfo | None:
        """The message with this UID, or None (the map when some reader made it, else place())."""
        by_uid = self.__dict__.get("by_uid")
        if by_uid is not None:
            return by_uid.get(uid)  # type: ignore[no-any-return]
        i = self.place(uid)
        return self.messages[i] if i >= 0 else None

    @cached_property
    def by_uid(self) -> dict[int, MessageInfo]:
        return dict(zip(self.uids, self.messages, strict=True))

    @cached_property
    def keywords(self) -> frozenset[str]:
        """The keywords in use (flags not starting with a backslash); flag sets are shared
        frozensets (maildir.imap_flags) that keep their hash, so each distinct one is looked at once."""
        return frozenset(f for flags in set(map(_FLAGS, self.messages)) for f in flags if not f.startswith("\\"))

    @cached_property
    def first_unseen(self) -> int | None:
        """The message number of the first message without \\Seen (RFC 3501 7.1 UNSEEN), or None."""
        return next((i for i, m in enumerate(self.messages, start=1) if "\\Seen" not in m.flags), None)

    @cached_property
    def unseen(self) -> int:
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    @cached_property
    def size(self) -> int:
        """Octets as RFC822.SIZE counts them, summed (RFC 8438 STATUS SIZE)."""
        return sum(map(_SIZE, self.messages))


_UID, _FLAGS, _SIZE = itemgetter(0), itemgetter(1), itemgetter(2)  # MessageInfo's fields


@dataclass(frozen=True)
class FolderInfo:
    name: str  # IMAP name with '/' as separator; 'INBOX' for the root
    special_use: str | None
    subscribed: bool
    has_children: bool


@dataclass(frozen=True)
class MailboxRecord:
    """What the mail store needs of a mailbox: its row id (never reused), quota and canonical parts."""

    id: int
    quota_bytes: int
    local: str
    domain: str
    enabled: bool = True  # a disabled mailbox still gets mail; its sessions end (generation)
    password_hash: str = ""  # the stored one: a session logged in under another ends (generation)


class Generation(NamedTuple):
    """What a session logged in to (MailStore.mailbox_generation): the mailbox's row id, never reused,
    and the password hash stored when it logged in. Either changing ends the session: the mailbox was
    removed and maybe made again for someone else, or its password was changed (a thief's IDLE)."""

    id: int
    password_hash: str


SessionEnd = Literal["removed", "disabled", "password"]  # why a logged-in session ends (OpenMailboxes.ended)


class MailboxDirectory(Protocol):
    """The store's one view of the accounts (appliance.accounts.Accounts provides it): which mailbox an
    address names now. The store keeps no SQL of its own on the accounts tables."""

    async def mailbox_record(self, domain: str, local: str) -> MailboxRecord | None:
        """The mailbox `local`@`domain` (both canonical), or None when there is none."""
        ...
