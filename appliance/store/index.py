"""The UID index of one folder: stable UIDs in SQLite, the folder's messages in memory.

The db is the durable truth for UIDs, UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ; the Maildir is the
truth for which messages exist and their flags. `FolderIndex` keeps both in memory and brings them
together: `scan()` compares the files with the index (cheaply: nothing is listed while the new/ and
cur/ mtimes are unchanged) and a `Change` writes what differs in one transaction, then applies it
to memory. Files nobody indexed (copied in from another server, written by Dovecot, or a crash
between rename and commit) get new UIDs in name order; vanished files drop out; flag changes made
on disk by another program are picked up.

Sizes: an entry keeps the size on disk (quota) and the size on the wire, every line end CRLF
(RFC822.SIZE, POP3 LIST), worked out once when the file is indexed (maildir.wire_size) so that
no SELECT reads a file. Rows indexed before the wire size was kept have none: such entries are
measured at the folder's next listing and the value written back.

Dates: a file found whose name carries both sizes (',S=' and ',W=', as Dovecot names them) is
indexed without a stat, as Dovecot does: its INTERNALDATE (the mtime) is UNKNOWN_DATE in its row
until the folder's dating task reads it in the background (OpenMailboxes._date_later), and
MessageInfo.internaldate reads the file's date itself meanwhile. A stat per file was a quarter of
the first SELECT of a Maildir copied in (issue 19).

Rebuild: UIDs are never reused. When the message rows are lost but the folder row is kept, the
files get new UIDs from UIDNEXT on and UIDVALIDITY stays (no UID names two messages). When the
folder row is lost too, the folder gets a new UIDVALIDITY (time-based, never issued before), or
Dovecot's UIDVALIDITY and UIDs when the folder has a `dovecot-uidlist`.

Every method that reads or changes an index runs with the folder's lock held (mailstore.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, islice, repeat
from operator import add, attrgetter, eq, is_, itemgetter, lt, mul
from pathlib import Path
from typing import Any, NamedTuple

from appliance import collector, waits
from appliance.db import Database
from appliance.store import maildir
from appliance.store.dir_watch import DirWatch
from appliance.store.maildir import Keywords, UidList
from appliance.store.message_cache import CARRY_SQL as CACHE_CARRY_SQL
from appliance.store.message_cache import INSERT_SQL as CACHE_INSERT_SQL
from appliance.store.message_cache import CachedMessage
from appliance.store.model import UNKNOWN_DATE, FolderSnapshot, MessageInfo

# A directory changed this recently may change again within the same mtime tick without its mtime
# moving: such a folder is listed again at the next look (Dovecot does the same, for 1 s).
DIRTY_WINDOW_NS = 2_000_000_000
UIDVALIDITY_SETTING = "store_last_uidvalidity"
# Expunge records kept per folder for QRESYNC (RFC 7162 3.2.5.2). Older ones are dropped and the
# folder's `expunges_known_since` raised past them: a client that last synced before that gets every
# UID it may know that is gone (a superset the RFC allows), narrowed by its known UIDs and
# sequence-match data; one that synced since gets the exact list. 10,000 rows are about 200 KB.
EXPUNGES_KEPT = 10_000
# What one message of a loaded index takes in memory with its snapshot (Entry, MessageInfo, the dict
# slots and the strings and numbers they hold): about 750 + 150 octets measured with tracemalloc on a
# 100k folder loaded from the db (tests/unit/test_index.py bounds the parts that do not vary).
ENTRY_MEMORY = 900
RELEASE_ROWS = 1000
# new/ and cur/ together at most this big (their directories' st_size, ~68 octets a name on ext4): the
# folder is listed on the event loop (FolderIndex.small_on_disk), about 950 names at most.
INLINE_LISTING_OCTETS = 64 * 1024
# Messages a STORE or EXPUNGE changes per hold of the folder lock: their files renamed or unlinked on
# the database's thread inside the slice's transaction (commit_with_files), then the lock is let go
# for whoever waits (mailstore.py). With `UID STORE 1:* +FLAGS` over 20k messages in one hold, another
# session's NOOP of the folder waited 1.3 s (11 ms idle); 20k renames in one transaction held every
# other writer back, and SMTP intake on the box fell from 78 to 0.9 msg/s (issue 19).
FILES_IN_TRANSACTION = 256
# Messages a bulk step (indexing files found, loading an index, building a snapshot) must have before
# the cyclic garbage collector is paused for it (gc_paused).
BULK = 1000

_gc_pauses = 0
_gc_lock = threading.Lock()  # pauses are taken on the event loop and in the listing's worker thread


_UNPAUSED = contextlib.nullcontext()  # (reusable: it holds nothing)


def gc_paused(count: int) -> contextlib.AbstractContextManager[None]:
    """_gc_paused(count); for fewer than BULK objects, which it leaves alone, a context manager that
    does nothing: every change of a folder and each of its new states passed through the generator's
    (issue 19: a change per command under imaptest's stress mode)."""
    return _UNPAUSED if count < BULK else _gc_paused(count)


@contextlib.contextmanager
def _gc_paused(count: int) -> Iterator[None]:
    """The cyclic garbage collector off while `count` (>= BULK) objects of a folder are made in one
    synchronous step, on again after it (nested and concurrent pauses counted). The entries, names
    and tuples made there hold no reference cycles, but each allocation counts towards a collection
    and each full collection walks every object the box holds: at 100k messages the collections
    were a third of indexing a folder copied in and of building its snapshot, and grew faster than
    the folder (issue 19: cold SELECT at 100k took 80x the time of 10k). Use it only around code
    without an await, so nothing else runs long without collections. After a step that made BULK
    objects or more (not a small folder's listing), what is alive is frozen (collector.py): neither
    the next young collections nor the collector's full ones walk the folder's entries again."""
    global _gc_pauses
    with _gc_lock:
        if count < BULK or (_gc_pauses == 0 and not gc.isenabled()):
            paused = False  # small, or someone else turned it off (a short-lived process): left as it is
        else:
            paused = True
            _gc_pauses += 1
            gc.disable()
    try:
        yield
    finally:
        if paused:
            with _gc_lock:
                _gc_pauses -= 1
                if _gc_pauses == 0:
                    if gc.get_count()[0] >= BULK:  # the step made many objects (not a small folder's listing)
                        collector.keep_long_lived()
                    gc.enable()


@dataclass(slots=True, eq=False)
class Entry:
    uid: int
    base: str  # the Maildir unique name
    flags: str  # upper-case Maildir letters, sorted
    keywords: tuple[str, ...]
    size: int  # octets on disk
    internaldate: int
    modseq: int
    sub: str = ""  # 'new' or 'cur' once seen on disk
    filename: str = ""
    wire: int | None = None  # octets with CRLF line ends; None until measured
    info: MessageInfo | None = None  # built on demand, dropped on any change


_UID, _BASE, _SIZE, _INFO, _SUB = attrgetter("uid"), attrgetter("base"), attrgetter("size"), attrgetter("info"), attrgetter("sub")
_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)


class Found(NamedTuple):
    """A message file the index does not know yet (a named tuple: 100k of them are made when a
    Maildir is copied in, and a frozen dataclass's init cost more than the file's stat)."""

    base: str
    sub: str
    filename: str
    size: int
    mtime: int  # UNKNOWN_DATE: not stat'ed (its name gave both sizes)
    wire: int | None  # None when the file could not be read: measured at a later listing


class FoundColumns(NamedTuple):
    """Files found, as columns in delivery order (Found's fields): what Change.add_found makes its
    entries of, each column in one C loop (map, zip)."""

    bases: Sequence[str]
    subs: Sequence[str]
    filenames: Sequence[str]
    sizes: Sequence[int]
    mtimes: Sequence[int]
    wires: Sequence[int | None]
    # What follows each file name's first ':' (its Maildir info), each distinct value one shared
    # string; None: Change.add_columns reads it from the file names.
    infos: Sequence[str] | None = None


@dataclass
class DiskChanges:
    stamp: tuple[int, int]
    dirty: bool
    keywords: Keywords | None  # the folder's keyword map, when its file changed
    keywords_mtime: int
    found: list[Found] = field(default_factory=list)
    bulk: FoundColumns | None = None  # instead of `found`: a first listing's files (_found_sized)
    moved: list[tuple[Entry, str, str]] = field(default_factory=list)  # entry, sub, file name
    vanished: list[Entry] = field(default_factory=list)
    measured: list[tuple[Entry, int]] = field(default_factory=list)  # entries that had no wire size
    unremoved: list[str] = field(default_factory=list)  # files of FolderIndex.unremoved found (paths)
    cleared: list[str] = field(default_factory=list)  # FolderIndex.unremoved names whose file is gone


class FolderIndex:
    def __init__(self, folder_id: int, name: str, path: Path, uidvalidity: int, uidnext: int,
                 highestmodseq: int, subscribed: bool, entries: Sequence[Entry] | None, uidlist: UidList | None,
                 expunges_known_since: int = 0, unremoved: Iterable[str] = ()) -> None:
        self.id = folder_id
        self.name = name
        # Answers a due recheck from inotify's events instead of a listing (dir_watch.py); set by
        # whoever opens the index (OpenMailboxes), None: rechecks list the folder.
        self.dir_watch: DirWatch | None = None
        self.path = path  # sets the sub-directory paths too
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.highestmodseq = highestmodseq
        # Expunges with a mod-sequence above this are all in the `expunged` table (migration 0009).
        self.expunges_known_since = expunges_known_since
        self.subscribed = subscribed
        self.lock = waits.lock("folder")
        self._by_uid: dict[int, Entry] = {}  # in UID order: UIDs only grow (by_uid)
        self._by_base: dict[str, Entry] = {}
        # A first listing's Change whose entries are not made yet (Change.entries_later): made at the
        # loop's next turn, after the SELECT that listed the folder has answered, or at the first use
        # of by_uid or by_base before that, whichever comes first (materialize).
        self._deferred: Change | None = None
        self._deferred_lock = threading.Lock()  # (by_uid may first be used in a worker thread)
        self.bytes = 0  # on disk, for the quota (kept while unloaded)
        self.unmeasured: set[int] = set()  # UIDs without a wire size
        self.undated: set[int] = set()  # UIDs whose INTERNALDATE is UNKNOWN_DATE
        # A task is reading those dates (mailboxes.OpenMailboxes._date_later). It does not keep the
        # index in memory: unloaded, the folder is dated again after its next load. Keeping it was
        # 38 MiB more RSS after the 100k IMAP rows (the index stayed loaded through the dating).
        self.dating = False
        # The messages are in memory (by_uid...). An index nobody has selected is unloaded when the
        # box's unwatched indexes take more than their budget (mailboxes.py): its header stays (UIDs
        # go on from uidnext, deliveries are written and counted) and the next sync loads it again.
        self.loaded = False
        self.listed = False  # the files were listed once: `bytes` is the folder's usage
        self.last_used = 0.0  # time.monotonic() of the last sync (the least recently used go first)
        self.keywords = Keywords()
        self.keywords_mtime = -1
        self.stamp: tuple[int, int] | None = None  # dir mtimes at the last listing (or our own last change)
        self.dirty = True  # list at the next look, whatever the stamp (another program changed the folder)
        # Wall-clock ns from which a look lists the folder again though its stamp did not move (0:
        # none): set when the stamp is that of a change made within DIRTY_WINDOW_NS of the look that
        # took it, ours (changed_by_us) or a listing's (was_listed).
        self.recheck_ns = 0
        # Wall-clock ns of the last time the directories were known to be as memory has them (a
        # listing, a look at an unchanged stamp, our own change that moved it): seems_unchanged.
        self.looked_ns = 0
        self.pending: set[str] = set()  # unique names being delivered: not yet ours to index
        # Unique names of expunged messages (their rows gone, sessions told) whose file could not be
        # removed (Change.leave_out): never indexed again, removed by the next listing that finds it
        # (OpenMailboxes.sync); kept in the db's unremoved_files until then, across a restart.
        self.unremoved: set[str] = set(unremoved)
        self.unwritten: set[int] = set()  # UIDs whose rows a failed commit_queued did not write
        # Flag changes and expunges in memory whose files and rows are queued on the database's
        # thread (commit_pipelined), in order; and whether one of them failed or missed a file, so
        # that memory is read again from the db and the disk (OpenMailboxes.settle).
        self.in_flight: list[asyncio.Future[list[Entry]]] = []
        self.reload_due = False
        # A file name memory has while the rename to it is queued there (a flag change, a claim of
        # \Recent) -> the path the file has until then: what a FETCH that checks its cache row
        # against the file with a stat on the event loop (fetch_render._render_recent) stats. A third
        # of imaptest's header FETCHes missed the file and took the worker thread's way (issue 19).
        self.moved_from: dict[str, str] = {}
        # New messages whose commit is queued (commit_arrivals): on disk under names in `pending`,
        # not in memory yet, so a listing meanwhile skips them and need not wait for them.
        self.arriving: list[asyncio.Future[None]] = []
        # The UIDNEXT and mod-sequence taken by new messages whose commit is queued (commit_arrivals):
        # the next change numbers above them, though they are not in memory yet (UIDNEXT, HIGHESTMODSEQ
        # and the messages sessions see are those of the commits that ended).
        self.reserved_uidnext = 0
        self.reserved_modseq = 0
        self.unclaimed: set[int] = set()  # recent messages in cur/ no session has claimed yet
        # The UIDs whose file is in new/ (Entry.sub), kept by every change of it (load, Change.apply):
        # recent() was a pass over every entry at each change (18 ms at 100k messages, issue 19).
        self.in_new: set[int] = set()
        # UIDs whose entry lost its MessageInfo in a change (Change.apply): messages() makes theirs
        # first, and then reads every entry's in one C loop (4 passes over the folder fewer).
        self.uninformed: set[int] = set()
        self.deleted = False
        self.uidlist = uidlist  # Dovecot's UIDs, adopted at the first scan
        # Our dovecot-uidlist needs writing (messages added or removed, or not written since loading).
        self.uidlist_stale = True
        # What the file holds since our last write: its stamp and its highest UID. New messages are
        # appended to it; a removal (or a file we did not write) means writing it whole.
        self.uidlist_written: maildir.UidListStamp | None = None
        self.uidlist_last_uid = 0
        self.uidlist_whole = True
        self.uidlist_lock = asyncio.Lock()  # orders the writes: the last one holds the latest state
        self.uidlist_queued = False  # a write is scheduled that has not read the state yet
        self.uidlist_at = float("-inf")  # when the last write read the state (the event loop's clock)
        self._messages: tuple[MessageInfo, ...] | None = None
        self._known: tuple[tuple[MessageInfo, ...], tuple[int, ...], frozenset[str]] | None = None  # known()
        self._recent: frozenset[int] | None = None
        self._snapshot: FolderSnapshot | None = None  # handed out again while nothing changes
        self.snapshots_built = 0  # how many times a snapshot was made (tests: SELECT reuses them)
        if entries is not None:  # else unloaded: the messages are read at the first sync
            self.load(entries)

    def load(self, entries: Sequence[Entry]) -> None:
        """The messages from the db rows; their files are located by the next listing."""
        self._deferred = None
        with gc_paused(len(entries)):
            self.by_uid = {e.uid: e for e in entries}
            self.by_base = {e.base: e for e in entries}
        self.bytes = sum(e.size for e in entries)
        self.in_new = {e.uid for e in entries if e.sub == "new"}  # (none: files are located by the next listing)
        self.unmeasured = {e.uid for e in entries if e.wire is None}
        self.undated = {e.uid for e in entries if e.internaldate == UNKNOWN_DATE}
        self.stamp, self.dirty, self.loaded = None, True, True
        self.invalidate()

    def unload(self) -> None:
        """Drop the messages from memory (caller: nobody has the folder selected, its lock is free,
        nothing is being delivered or written for it). What stays is what a delivery needs."""
        self._deferred = None
        self.by_uid, self.by_base, self.unmeasured, self.undated, self.in_new = {}, {}, set(), set(), set()
        self.uninformed = set()
        self.stamp, self.dirty, self.loaded = None, True, False
        if self.dir_watch is not None:
            self.dir_watch.forget(self.id)
        self.invalidate()

    @property
    def by_uid(self) -> dict[int, Entry]:
        """The messages' entries by UID, in UID order."""
        if self._deferred is not None:
            self.materialize()
        return self._by_uid

    @by_uid.setter
    def by_uid(self, value: dict[int, Entry]) -> None:
        self._by_uid = value

    @property
    def by_base(self) -> dict[str, Entry]:
        """The messages' entries by Maildir unique name."""
        if self._deferred is not None:
            self.materialize()
        return self._by_base

    @by_base.setter
    def by_base(self, value: dict[str, Entry]) -> None:
        self._by_base = value

    def defer(self, change: Change) -> None:
        """`change` (applied, its rows written from its columns) has its entries made and put in
        by_uid and by_base at their first use (materialize); an earlier one's are made now, in order."""
        self.materialize()
        self._deferred = change

    def materialize(self) -> None:
        """Make the entries of a first listing that were left for later (Change.entries_later)."""
        with self._deferred_lock:
            change = self._deferred
            if change is None:
                return
            if change.columns is not None:
                with gc_paused(len(change.columns.uids)):
                    entries = change.entries()
                    self._by_uid.update(zip(change.columns.uids, entries, strict=True))
                    self._by_base.update(zip(change.columns.bases, entries, strict=True))
            self._deferred = None  # (only now: another thread's by_uid waits for the whole of it)

    @property
    def memory(self) -> int:
        """Octets its messages take in memory, roughly (ENTRY_MEMORY each)."""
        return len(self.by_uid) * ENTRY_MEMORY

    @property
    def busy(self) -> bool:
        """Whether an operation is under way that may use the messages in memory."""
        return (self.lock.locked() or bool(self.pending) or bool(self.unwritten) or self.uidlist_stale or self.uidlist_queued
                or self.uidlist_lock.locked() or bool(self.in_flight) or bool(self.arriving) or self.reload_due)

    @property
    def path(self) -> Path:
        return self._path

    @path.setter
    def path(self, path: Path) -> None:
        if self.dir_watch is not None:
            self.dir_watch.forget(self.id)  # (a folder renamed: watched again from its next listing)
        self._path = path
        # Made once: joining two levels per message costs more than the rest of a snapshot.
        self._dirs = {sub: path / sub for sub in ("new", "cur")}
        self._prefixes = {sub: f"{path}/{sub}/" for sub in ("new", "cur")}

    def file(self, sub: str, filename: str) -> str:
        """The path of a message file in new/ or cur/, as a string: a Path made per file was most of
        a 20k STORE's time on the event loop, longer than its renames (issue 19)."""
        return self._prefixes[sub] + filename

    # --- reading ---------------------------------------------------------------------------------

    def info(self, entry: Entry) -> MessageInfo:
        if entry.info is None:
            entry.info = MessageInfo(entry.uid, maildir.imap_flags(entry.flags, entry.keywords),
                                     entry.size if entry.wire is None else entry.wire, entry.internaldate,
                                     entry.modseq, self._dirs[entry.sub], entry.filename)
        return entry.info

    def messages(self) -> tuple[MessageInfo, ...]:
        if self._messages is None:
            with gc_paused(len(self.by_uid)):
                by_uid = self.by_uid
                for uid in self.uninformed:
                    if (entry := by_uid.get(uid)) is not None and entry.info is None:
                        self.info(entry)
                self.uninformed.clear()
                # After a listing every entry has its MessageInfo (Change.add_columns made them): read
                # them in one C loop; a method call per entry was 2 ms at 10k, 20 at 100k (issue 19).
                known = tuple(map(_INFO, self.by_uid.values()))
                if None in known:  # (entries loaded from the db, or made again all: invalidate(paths=True))
                    # Only the entries a change touched lost their MessageInfo: made again alone, found
                    # by a loop in C, where a method call for every message was most of a new state's
                    # cost in a folder that changes at every command (imaptest's stress mode), and a
                    # generator over every message 7-10 ms per new state at 100k (issue 19).
                    filled = list(known)
                    entries = list(self.by_uid.values())
                    for i in compress(range(len(filled)), map(is_, known, repeat(None))):
                        filled[i] = self.info(entries[i])
                    known = tuple(filled)
                self._messages = known
        return self._messages

    def snapshot(self, recent: frozenset[int]) -> FolderSnapshot:
        """The folder now, with `recent` as its \\Recent set: the same object as last time when the
        folder did not change (every change goes through invalidate()), so what readers derive from
        it (FolderSnapshot's cached UID map, keywords, counts) is shared and not rebuilt."""
        snap = self._snapshot
        if (snap is None or snap.messages is not self.messages() or snap.recent != recent or snap.name != self.name or snap.uidnext != self.uidnext
                or snap.highestmodseq != self.highestmodseq or snap.uidvalidity != self.uidvalidity):
            snap = FolderSnapshot(self.name, self.uidvalidity, self.uidnext, self.messages(), recent,
                                  self.highestmodseq)
            if self._known is not None and self._known[0] is snap.messages:
                snap.knowing(*self._known[1:])
            self._snapshot = snap
            self.snapshots_built += 1
        return snap

    def recent(self) -> frozenset[int]:
        """Recent and unclaimed: files still in new/, and copies/appends that went to cur/."""
        if self._recent is None:
            self._recent = frozenset(self.unclaimed.union(self.in_new))
        return self._recent

    def entries(self, uids: Iterable[int]) -> list[Entry]:
        return [e for uid in sorted(set(uids)) if (e := self.by_uid.get(uid)) is not None]

    def known(self, messages: tuple[MessageInfo, ...], uids: tuple[int, ...], keywords: frozenset[str]) -> None:
        """The folder's messages as a first listing made them (Change.apply, from its columns), with
        their UIDs and the keywords in use: the snapshot takes them as they are, where working them
        out from the entries was three more passes over every message (issue 19)."""
        self._messages = messages
        self._known = (messages, uids, keywords)

    def claimed(self, uids: Iterable[int] | None = None) -> None:
        """The recent messages (or those of `uids`) became a session's: only the recent set changes
        (the message list, and what snapshots derived from it, stay)."""
        if uids is None:
            self.unclaimed.clear()
        else:
            self.unclaimed.difference_update(uids)
        self._recent = None

    def invalidate(self, *, paths: bool = False) -> None:
        self._known = None
        self._messages = None
        self._recent = None
        self._snapshot = None
        if paths:
            for e in self.by_uid.values():
                e.info = None

    # --- disk ------------------------------------------------------------------------------------

    def changed_by_us(self, before: tuple[int, int], after: tuple[int, int]) -> None:
        """Our own renames or unlinks (lock held, their rows committed) moved the directories' stamp
        from `before` to `after`. When `before` is the stamp of the last listing, nobody else changed
        the folder since, and the index holds what a listing would find: the stamp moves with ours,
        so the next look lists nothing. Without this, another session's NOOP listed all of a 20k
        folder after each slice of a big STORE (issue 19). A change another program made within the
        same mtime tick as ours does not move the stamp: the folder is listed again at the first
        look DIRTY_WINDOW_NS after our last change (Dovecot does the same for its own flag changes
        and expunges: maildir-sync.c, "dirty_cur_time")."""
        if before == self.stamp and not self.dirty and after != before:
            self.stamp = after
            self.looked_ns = time.time_ns()
            # The earliest recheck due stands: while our changes go on (deliveries, a STORE loop),
            # another program's change hidden in one of their ticks is found within DIRTY_WINDOW_NS
            # all the same, at the cost of one listing per window at the most.
            self._recheck(max(after) + DIRTY_WINDOW_NS)

    def was_listed(self, changes: DiskChanges) -> None:
        """A listing (scan) read the folder at the directories' stamp `changes.stamp`. When they
        had changed within DIRTY_WINDOW_NS before it, a change in the same mtime tick may have come
        after it without moving the stamp: the folder is listed again at the first look once the
        window is over, as Dovecot does (maildir-sync.c, DIR_DELAYED_REFRESH: a directory whose
        last look was within MAILDIR_SYNC_SECS of its mtime is read again once that look is more
        than MAILDIR_SYNC_SECS old), not at every look meanwhile: with mail arriving more often
        than once per window, every NOOP listed the whole folder, and the next listing found the
        folder changed just before it again, for as long as the mail went on (issue 19)."""
        self.stamp, self.dirty, self.listed, self.recheck_ns = changes.stamp, False, True, 0
        self.looked_ns = time.time_ns()
        if changes.dirty:
            self._recheck(max(changes.stamp) + DIRTY_WINDOW_NS)

    def files_done(self, unremoved: Sequence[Entry], stamps: list[tuple[int, int]]) -> None:
        """A flag change's or expunge's files and rows are done (index._files_first): `stamps`, the
        folder's before and after them, for changed_by_us; none when a file was found where another
        program had moved it (the next look lists the folder). `unremoved`: expunged entries whose
        file is still there (Change.unremoved): the next listing removes them (OpenMailboxes.sync)."""
        self.unremoved.update(e.base for e in unremoved)
        if stamps and not unremoved:
            self.changed_by_us(*stamps)
        else:
            self.dirty = True

    def unchanged_by_others(self) -> bool:
        """Whether the folder's files are where the index has them, as far as the names inotify
        reported since its last listing show (dir_watch.py): every name a file was added by is
        indexed there, and every name a file left is not (its message gone or elsewhere). False
        when that is not known: list the folder. A cost per name changed, where a listing costs
        per message in the folder (issue 19)."""
        watch = self.dir_watch
        seen = watch.changed(self.id, self._dirs) if watch is not None else None
        if watch is None or seen is None:
            return False
        names, seq = seen
        by_base, pending = self.by_base, self.pending
        for (sub, name), there in names.items():
            if name[0] == ".":  # not a message (Maildir readers skip dot files)
                continue
            base = name.partition(":")[0]
            if base in pending:  # ours, being delivered: in memory once its commit ends (commit_arrivals)
                continue
            entry = by_base.get(base)
            if there != (entry is not None and entry.sub == sub and entry.filename == name):
                return False
        watch.consumed(self.id, seq)
        return True

    def _recheck(self, at_ns: int) -> None:
        self.recheck_ns = min(self.recheck_ns, at_ns) if self.recheck_ns else at_ns

    def small_on_disk(self) -> bool:
        """Whether new/ and cur/ are small enough together (INLINE_LISTING_OCTETS, their directories'
        sizes) for scan() to run on the event loop. A directory never shrinks on ext4: a folder that
        once held many files stays with the worker thread. Raises FileNotFoundError as scan() does."""
        return sum(os.stat(d).st_size for d in self._dirs.values()) <= INLINE_LISTING_OCTETS

    def scan(self, *, inline: bool = False) -> DiskChanges | None:
        """Runs in a worker thread (on the event loop for a small folder), lock held: what changed on
        disk, or None when nothing can have.
        Raises FileNotFoundError when the folder's directories are gone. `inline`: on the event loop,
        where no file may be read or stat'ed one by one: raises NeedsThread when a file found has no
        sizes in its name or an entry has no wire size (scan() in a worker thread then)."""
        started = time.time_ns()
        stamp = maildir.dir_stamp(self.path)
        kw_mtime = maildir.keywords_mtime(self.path)
        if stamp == self.stamp and not self.dirty and kw_mtime == self.keywords_mtime:
            if not (self.recheck_ns and started >= self.recheck_ns):
                return None
            if self.unchanged_by_others():  # the recheck, answered by the events since the listing
                self.recheck_ns = 0
                return None
        # Listing a folder makes a tuple or two per file: no collections meanwhile (gc_paused).
        with gc_paused(max(BULK, len(self.by_base))):
            return self._changes(stamp, started, kw_mtime, inline)

    def unchanged_on_disk(self) -> bool:
        """scan()'s first look alone (three stats, on the loop): True when nothing can have changed
        since the last listing or our own last change that ended, and no recheck is due."""
        now = time.time_ns()
        unchanged = (maildir.dir_stamp(self.path) == self.stamp and not self.dirty
                     and maildir.keywords_mtime(self.path) == self.keywords_mtime
                     and not (self.recheck_ns and now >= self.recheck_ns))
        if unchanged:
            self.looked_ns = now
        return unchanged

    def seems_unchanged(self) -> bool:
        """unchanged_on_disk(), or, while our own changes are queued (in_flight, arriving: their
        renames and unlinks move the stamp before memory hears of it), the directories known to be
        as memory has them within DIRTY_WINDOW_NS: the staleness a look already allows for changes
        within one mtime tick (recheck_ns). Under imaptest's stress mode our queued changes were
        nearly always moving the stamp, so a STATUS waited for the folder lock and then for them
        (settle) to find what memory had (issue 19). Another program's change is seen once ours are
        done, or DIRTY_WINDOW_NS after the last look, whichever comes first."""
        if self.unchanged_on_disk():
            return True
        return (bool(self.in_flight or self.arriving) and not self.dirty
                and time.time_ns() - self.looked_ns < DIRTY_WINDOW_NS
                and maildir.keywords_mtime(self.path) == self.keywords_mtime)

    def _changes(self, stamp: tuple[int, int], started: int, kw_mtime: int, inline: bool = False) -> DiskChanges:
        """scan() once the directories have changed: the listing compared with the index."""
        keywords = maildir.read_keywords(self.path) if kw_mtime != self.keywords_mtime else None
        changes = DiskChanges(stamp, started - max(stamp) < DIRTY_WINDOW_NS, keywords, kw_mtime)
        if not inline and self.dir_watch is not None:  # a big folder: its rechecks are answered by events
            self.dir_watch.listing(self.id, self._dirs)
        if not self.by_base and not self.pending and not self.unremoved and self.uidlist is None:  # a Maildir copied in, no Dovecot UIDs
            changes.bulk = _found_sized(self._dirs)
            if changes.bulk is not None:
                return changes
        if inline and self.unmeasured:
            raise NeedsThread
        listing = maildir.list_messages(self.path)
        skipped = self._compare(listing, changes, inline)
        if self.unremoved and not changes.dirty and maildir.dir_stamp(self.path) == stamp:
            # Forgotten only after a listing that nothing changed the directories during (nor within
            # an mtime tick before): one of a directory another program renames in can miss a file,
            # which the next listing would index again, an expunged message back under a new UID.
            changes.cleared = [base for base in self.unremoved if base not in listing]
        by_base = self.by_base
        # (Files skipped, ours being delivered or expunged ones, are not in by_base: were they
        # counted, one of them on disk would hide a message another program removed.)
        if len(listing) - len(changes.found) - skipped != len(by_base):
            # A copy first (one step in C): new messages whose commit ended go into memory on the
            # loop while a big folder is listed in a worker thread (commit_arrivals).
            gone = [e for base, e in list(by_base.items()) if base not in listing]
            if gone:
                # A file another program renamed while we listed may have been missed: look again
                # before calling it expunged.
                again = maildir.list_messages(self.path)
                for e in gone:
                    if e.base in again:
                        sub, filename = again[e.base]
                        changes.moved.append((e, sub, filename))
                    else:
                        changes.vanished.append(e)
        if self.unmeasured:
            self._measure(listing, changes)
        return changes

    def _compare(self, listing: dict[str, tuple[str, str]], changes: DiskChanges, inline: bool = False) -> int:
        """The files of `listing` the index does not know (changes.found, in delivery order) and
        those it has elsewhere (changes.moved); returns how many it skipped (pending, unremoved)."""
        skipped = 0
        by_base, pending, sized, scale = self.by_base, self.pending, maildir.sized_name, maildir.ORDER_SCALE
        unremoved = self.unremoved
        found = changes.found
        # Each found file's delivery order as one number (maildir.sized_name), 0 for names it does
        # not read: a list of distinct ints sorts several times quicker than maildir.delivery_order's tuples.
        order: list[int] = []
        with _DirFds(self._dirs) as fds:
            for base, (sub, filename) in listing.items():
                # `pending` first: a new message goes into memory (commit_arrivals, on the loop, maybe
                # while this runs in a worker thread) before its name leaves `pending`, so a name not
                # pending now is in by_base already, if it is ours.
                if base in pending:
                    skipped += 1
                    continue
                entry = by_base.get(base)
                if entry is None:
                    if base in unremoved:  # expunged: removed now (OpenMailboxes.sync), never indexed again
                        changes.unremoved.append(self.file(sub, filename))
                        skipped += 1
                        continue
                    named = sized(filename)
                    if named is not None:  # _found's first case, and delivery_order, in one match
                        found.append(Found(base, sub, filename, int(named[3]), UNKNOWN_DATE, int(named[4])))
                        order.append(int(named[1]) * scale + int(named[2]))
                    elif inline:
                        raise NeedsThread
                    elif (new := _found(self.path, base, sub, filename, fds[sub])) is not None:
                        found.append(new)
                        order.append(0)
                elif entry.filename != filename or entry.sub != sub:
                    changes.moved.append((entry, sub, filename))
        in_order = dict(zip(order, found, strict=True))
        if len(in_order) == len(found) and 0 not in in_order:
            changes.found = [in_order[k] for k in sorted(in_order)]
        else:  # a name sized_name does not read, or two of the same microsecond
            found.sort(key=lambda f: maildir.delivery_order(f.base))
        return skipped

    def _measure(self, listing: dict[str, tuple[str, str]], changes: DiskChanges) -> None:
        """Wire sizes for entries indexed without one (by an earlier version): read once, kept."""
        for uid in sorted(self.unmeasured):
            entry = self.by_uid.get(uid)
            where = listing.get(entry.base) if entry is not None else None
            if entry is None or where is None:
                continue  # vanished: no size needed
            try:
                wire = maildir.wire_size(self._dirs[where[0]] / where[1])
            except OSError:
                continue  # renamed meanwhile or unreadable: tried again at the next listing
            changes.measured.append((entry, wire))

    def read_dates(self, uids: Iterable[int]) -> list[tuple[Entry, int]]:
        """Runs in a worker thread, lock held: the INTERNALDATE (mtime) of these undated messages
        whose files are where the index has them; the others are left for a later look."""
        dated = []
        for uid in uids:
            entry = self.by_uid.get(uid)
            if entry is None or not entry.sub or entry.internaldate != UNKNOWN_DATE:
                continue
            try:
                st = os.stat(os.path.join(self._dirs[entry.sub], entry.filename))
            except OSError:
                self.dirty = True  # renamed or removed by another program: the next listing finds out
                continue
            dated.append((entry, int(st.st_mtime)))
        return dated


class NeedsThread(Exception):
    """scan(inline=True) met a file it would have to read or stat: scan in a worker thread instead."""


class _DirFds:
    """new/ and cur/ open as directories for one listing: a file found there is stat'ed by its name
    relative to them (os.stat's dir_fd), neither a path joined per file nor a path walked from the
    root by the kernel; joining three parts was a fifth of indexing a Maildir copied in (issue 19)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self._dirs = dirs
        self._fds: dict[str, int] = {}

    def __enter__(self) -> dict[str, int]:
        try:
            for sub, path in self._dirs.items():
                self._fds[sub] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            self.__exit__()
            raise
        return self._fds

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _found(folder: Path, base: str, sub: str, filename: str, dir_fd: int) -> Found | None:
    """A new file with its sizes (the wire size from Dovecot's ',W=' or counted), or None when it
    is gone already (renamed or removed meanwhile: the next listing sees where it went). `dir_fd`:
    its directory (`sub`), open."""
    wire = maildir.name_wire_size(base)
    size = maildir.name_size(base) if wire is not None else None
    if size is not None:
        # Both sizes in its name: no stat now (Dovecot stats none either). Its INTERNALDATE is read
        # when asked or by the folder's dating in the background; a file renamed or removed
        # meanwhile is found so by the next listing.
        return Found(base, sub, filename, size, UNKNOWN_DATE, wire)
    try:
        if wire is None:
            path = os.path.join(folder, sub, filename)  # a string: pathlib costs more than the stat itself
            try:
                st, wire = maildir.measure_file(path)
            except (FileNotFoundError, NotADirectoryError):
                raise
            except OSError:  # unreadable: indexed all the same, measured at a later listing
                st = os.stat(path)
        else:
            st = os.stat(filename, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Found(base, sub, filename, st.st_size, int(st.st_mtime), wire)


def _found_sized(dirs: dict[str, Path]) -> FoundColumns | None:
    """What _compare finds in a folder whose index has no message (its first listing), when every
    name is as Dovecot writes it with both sizes: the same files in the same order, as columns made
    in C (maildir.sized_names' one regex over the joined names, map, zip, a sort) instead of a loop
    of Python per file, which was most of the first SELECT of a Maildir copied in (issue 19). None
    when a name is of another form, is in both new/ and cur/ (moved while listed), or two share a
    microsecond: the general way then (list_messages, _compare), which gives the same."""
    listed = {sub: os.listdir(dirs[sub]) for sub in ("new", "cur")}  # new/ first, as list_messages
    if not (listed["new"] and listed["cur"]):  # the usual case: one directory holds them all
        sub = "new" if listed["new"] else "cur"
        # Sorted as strings, in C: when every name's seconds have as many digits and no two share a
        # second, that is delivery order, and the columns the regex makes of the sorted names are in
        # that order already: no sort of ints, no permutation of six columns (at 100k messages those
        # were a fifth of the listing, each pass missing the CPU's caches at every name).
        names = sorted(listed[sub])
        sized = maildir.sized_names_sorted(names)
        if sized is None:
            return None
        if not sized:
            return FoundColumns((), (), (), (), (), (), ())
        bases, seconds, sizes, wires, infos = zip(*sized, strict=True)
        if len(set(map(len, seconds))) == 1 and all(map(lt, seconds, islice(seconds, 1, None))):
            shared: dict[str, str] = {}
            return FoundColumns(bases, tuple(repeat(sub, len(names))), names, tuple(map(int, sizes)),
                                tuple(repeat(UNKNOWN_DATE, len(names))), tuple(map(int, wires)),
                                tuple(map(shared.setdefault, infos, infos)))
        return _in_delivery_order(list(repeat(sub, len(names))), names,
                                  (bases, seconds, tuple(maildir.sized_micros(bases)), sizes, wires, infos))
    subs: list[str] = []
    fields: list[tuple[str, str, str, str, str, str]] = []
    names = []
    for sub in ("new", "cur"):
        listing = maildir.sized_names(listed[sub])
        if listing is None:
            return None
        subs += repeat(sub, len(listed[sub]))
        fields += listing
        names += listed[sub]
    if not fields:
        return FoundColumns((), (), (), (), (), (), ())
    return _in_delivery_order(subs, names, tuple(zip(*fields, strict=True)))


def _in_delivery_order(subs: list[str], names: list[str], columns: Sequence[Sequence[str]]) -> FoundColumns | None:
    """_found_sized's columns of files listed in any order (`columns`: unique names, seconds,
    microseconds, sizes, wire sizes and infos of the names, as sized_names reads them), put in
    delivery order by a sort of ints and one permutation of every column."""
    bases, seconds, micros, sizes, wires, infos = columns
    order = list(map(add, map(mul, map(int, seconds), repeat(maildir.ORDER_SCALE)), map(int, micros)))
    if len(set(order)) != len(order):  # distinct orders: distinct names too (a name gives its order)
        return None
    # Everything read from the strings the regex made is read before the columns are put in delivery
    # order, while they are in the order they were made in (memory order): at 100k messages, a pass
    # over them in delivery order missed the CPU's caches at every name (each pass took 15x its time
    # at 10k). The infos become a few shared strings (one per distinct value), so the passes over
    # them after the permutation touch a few objects only.
    numbers = tuple(map(int, sizes)), tuple(map(int, wires))
    shared: dict[str, str] = {}
    infos = tuple(map(shared.setdefault, infos, infos))
    if len(order) == 1:
        return FoundColumns(bases, tuple(subs), tuple(names), numbers[0], (UNKNOWN_DATE,), numbers[1], infos)
    pick = itemgetter(*sorted(range(len(order)), key=order.__getitem__))
    return FoundColumns(pick(bases), pick(subs), pick(names), pick(numbers[0]), tuple(repeat(UNKNOWN_DATE, len(order))),
                        pick(numbers[1]), pick(infos))


class _Columns(NamedTuple):
    """Change.added as columns (add_columns), with the keywords in use among them: what apply() puts
    in the folder's dicts and sets, and the snapshot's messages, without a pass over the entries (at
    100k messages each such pass missed the CPU's caches at every entry)."""

    uids: tuple[int, ...]
    bases: Sequence[str]
    sizes: Sequence[int]
    wires: Sequence[int | None]
    mtimes: Sequence[int]
    messages: tuple[MessageInfo, ...]
    keywords: frozenset[str]
    # What else the entries are made of (Change.entries): each file's (letters, keywords, IMAP
    # flags), its sub-directory and its name.
    flagged: Sequence[tuple[str, tuple[str, ...], frozenset[str]]]
    subs: Sequence[str]
    filenames: Sequence[str]


class Change:
    """One batch of changes to a folder's index: written in one transaction, then applied to memory."""

    def __init__(self, folder: FolderIndex) -> None:
        self.folder = folder
        # RFC 7162: one new mod-sequence for the batch, above those of new messages still being committed.
        self.modseq = max(folder.highestmodseq, folder.reserved_modseq) + 1
        self.uidnext = max(folder.uidnext, folder.reserved_uidnext)
        self.last_uid = max(next(reversed(folder.by_uid), 0), folder.reserved_uidnext - 1)
        self._added: list[Entry] = []  # (added: made first when they were left for later)
        self.updated: list[tuple[Entry, str, tuple[str, ...]]] = []  # entry, flags, keywords
        self.located: list[tuple[Entry, str, str]] = []  # entry, sub, file name (no db change)
        self.removed: list[Entry] = []
        self.measured: list[tuple[Entry, int]] = []  # entry, wire size (no modseq: no IMAP change)
        self.dated: list[tuple[Entry, int]] = []  # entry, INTERNALDATE read (no modseq: it never changes)
        self.cached: list[tuple[Entry, CachedMessage]] = []  # message_cache rows of added entries
        self.carried: list[tuple[Entry, int, int]] = []  # added entry, source folder id and UID (COPY, MOVE)
        # Removed entries whose file could not be removed (leave_out): their expunge stands.
        self.unremoved: list[Entry] = []
        self.cleared: list[str] = []  # FolderIndex.unremoved names whose file is gone now
        self.expunges_known_since = folder.expunges_known_since  # raised when old records are pruned
        self.columns: _Columns | None = None  # `added` as add_columns made it, when nothing else was added
        # `later`: the batch's new messages are the columns alone (add_columns), their entries not
        # made yet (entries() makes them); `from_columns`: left so until the folder's first use of
        # them after the commit, the rows written from the columns (entries_later).
        self.from_columns = self.later = False

    def add(self, base: str, sub: str, filename: str, flags: str, keywords: tuple[str, ...], size: int,
            internaldate: int, uid: int | None = None, *, wire: int | None = None) -> Entry:
        """A new message with the next UID, or with `uid` (adopted from Dovecot) when that is above
        every UID in the folder; UIDs only grow (RFC 3501 2.3.1.1). `wire` is its size with CRLF line
        ends; None leaves it to be measured at the next listing."""
        if uid is None or uid <= self.last_uid:
            uid = max(self.uidnext, self.last_uid + 1)
        self.last_uid = uid
        self.uidnext = max(self.uidnext, uid + 1)
        entry = Entry(uid, base, flags, keywords, size, internaldate, self.modseq, sub, filename, wire)
        self.entries()
        self._added.append(entry)
        self.columns = None  # `added` is no longer add_columns' files alone
        return entry

    def add_found(self, found: Sequence[Found], keywords: Keywords) -> None:
        """Files a listing found (in delivery order), with the next UIDs: add() for each, without
        its per-call work (a cold SELECT of a Maildir copied in makes one per file, issue 19): the
        entries are made column by column, in C loops (map, zip), each with its MessageInfo
        (FolderIndex.info), which the snapshot that follows a listing takes as it is."""
        if found:
            self.add_columns(FoundColumns(*zip(*found, strict=True)), keywords)

    def add_columns(self, found: FoundColumns, keywords: Keywords) -> None:
        """add_found of files given as columns."""
        bases, subs, filenames, sizes, mtimes, wires, infos = found
        if not bases:
            return
        first = max(self.uidnext, self.last_uid + 1)
        # One int object per UID, shared by the entry, its MessageInfo and the folder's dicts and sets.
        uids = tuple(range(first, first + len(bases)))
        if infos is None:
            infos = list(map(_THIRD, map(str.partition, filenames, repeat(":"))))  # split_filename's info
        # A folder's names carry few distinct infos (':2,S', ':2,FS'...): each is decoded once, and
        # its letters, keywords and IMAP flags are objects the entries share.
        decoded: dict[str, tuple[str, tuple[str, ...], frozenset[str]]] = {}
        for info in set(infos):
            flags, names = maildir.decode_letters(info[2:] if info.startswith("2,") else "", keywords)
            decoded[info] = (flags, names, maildir.imap_flags(flags, names))
        flagged = list(map(decoded.__getitem__, infos))
        on_wire = wires if None not in wires else [size if wire is None else wire for size, wire in zip(sizes, wires, strict=True)]
        messages = tuple(map(tuple.__new__, repeat(MessageInfo), zip(uids, map(_THIRD, flagged), on_wire, mtimes,
                                                                      repeat(self.modseq), map(self.folder._dirs.__getitem__, subs),
                                                                      filenames)))
        # The batch is these files alone: apply() takes the folder's dicts and sets from the columns.
        in_use = frozenset(k for _, _, flags in decoded.values() for k in flags if not k.startswith("\\"))
        self.entries()
        columns = _Columns(uids, bases, sizes, wires, mtimes, messages, in_use, flagged, subs, filenames)
        if self._added:
            self.columns = None
            self._added += _entries(columns, self.modseq)
        else:
            self.columns, self.later = columns, True
        self.last_uid = uids[-1]
        self.uidnext = max(self.uidnext, uids[-1] + 1)

    def entries_later(self) -> None:
        """Make the entries of the batch's files (add_columns) only when the folder's entries are
        first used after the commit (FolderIndex.materialize): a first listing's SELECT answers
        from the snapshot's messages without them (2.5 ms at 10k messages, and 3.8 ms more to put
        them in the folder's dicts, of a cold SELECT's 40-60, issue 19). Its rows are written from
        the columns."""
        self.from_columns = self.later

    @property
    def added(self) -> list[Entry]:
        """The new messages' entries, in UID order (made now if they were left for later)."""
        return self.entries()

    def entries(self) -> list[Entry]:
        """`added`, made now if they were left for later."""
        if self.later:
            assert self.columns is not None
            self._added = _entries(self.columns, self.modseq)
            self.later = False
        return self._added

    @property
    def count(self) -> int:
        """How many messages the batch adds."""
        return len(self.columns.uids) if self.later and self.columns is not None else len(self._added)

    def measure(self, entry: Entry, wire: int) -> None:
        self.measured.append((entry, wire))

    def update(self, entry: Entry, flags: str, keywords: tuple[str, ...]) -> None:
        if (flags, keywords) != (entry.flags, entry.keywords):
            self.updated.append((entry, flags, keywords))

    def locate(self, entry: Entry, sub: str, filename: str) -> None:
        self.located.append((entry, sub, filename))

    def remove(self, entry: Entry) -> None:
        self.removed.append(entry)

    def leave_out(self, entries: Sequence[Entry]) -> list[Entry]:
        """Drop what the batch would do to these entries (their files were not where the index said);
        returns those whose change was dropped. An expunge stays (`unremoved`): sessions may have been
        told of it (commit_pipelined), and its file was looked for where it is now already
        (maildir.unlink_messages); one still there is removed by the folder's next listing
        (FolderIndex.unremoved)."""
        out = set(entries)
        self.updated = [u for u in self.updated if u[0] not in out]
        self.located = [x for x in self.located if x[0] not in out]
        self.unremoved = [e for e in self.removed if e in out]
        kept = set(self.unremoved)
        return [e for e in entries if e not in kept]

    @property
    def writes(self) -> bool:
        """Whether the folder's messages change (a new mod-sequence; sessions are told)."""
        return bool(self._added or self.later or self.from_columns or self.updated or self.removed)

    @property
    def found_only(self) -> bool:
        """Whether the batch only indexes files a listing found (no flag change, no expunge, no
        cache row): what a crash before its commit reached the disk loses is found again, with
        the same UIDs, by the next listing of the same files (delivery order, from the same
        UIDNEXT). Such a commit need not be fsynced, as Dovecot does not fsync its index: the
        next durable commit of the box (any delivery) carries it to the disk with it (WAL)."""
        return not (self.updated or self.removed or self.cached or self.carried)

    @property
    def pending(self) -> bool:
        """Whether there is anything to write or apply at all."""
        return self.writes or bool(self.located or self.measured or self.dated or self.cleared)

    def write(self, tx: sqlite3.Connection) -> None:
        """The rows, on the database's thread inside the transaction of `commit` (one trip for all)."""
        f = self.folder
        if self.measured:
            tx.executemany("UPDATE messages SET wire_size = ? WHERE folder_id = ? AND uid = ?",
                           [(wire, f.id, e.uid) for e, wire in self.measured])
        if self.dated:
            tx.executemany("UPDATE messages SET internaldate = ? WHERE folder_id = ? AND uid = ?",
                           [(date, f.id, e.uid) for e, date in self.dated])
        if self.cleared:
            tx.executemany("DELETE FROM unremoved_files WHERE folder_id = ? AND basename = ?",
                           [(f.id, base) for base in self.cleared])
        if not self.writes:
            return
        columns = self.columns
        if (self.from_columns or self.later) and columns is not None:  # (immutable: read on the database's thread)
            tx.executemany(INSERT_SQL, zip(repeat(f.id), columns.uids, columns.bases, map(_FIRST, columns.flagged),
                                           map(" ".join, map(_SECOND, columns.flagged)), columns.sizes, columns.wires,
                                           columns.mtimes, repeat(self.modseq)))
        elif self._added:
            insert_rows(tx, f.id, self._added)
            if self.cached:  # in the same transaction: no second commit (and fsync) per delivery
                tx.executemany(CACHE_INSERT_SQL, [c.row(f.id, e.uid) for e, c in self.cached])
            if self.carried:  # the same file (a hard link or a rename): its row still holds
                tx.executemany(CACHE_CARRY_SQL, [(f.id, e.uid, src, uid) for e, src, uid in self.carried])
        if self.updated:
            tx.executemany(
                "UPDATE messages SET flags = ?, keywords = ?, modseq = ? WHERE folder_id = ? AND uid = ?",
                [(flags, " ".join(kw), self.modseq, f.id, e.uid) for e, flags, kw in self.updated],
            )
        if self.removed:
            tx.executemany("DELETE FROM messages WHERE folder_id = ? AND uid = ?",
                           [(f.id, e.uid) for e in self.removed])
            # RFC 7162 3.2.5.2: kept for VANISHED (EARLIER), with the mod-sequence of the expunge.
            tx.executemany("INSERT OR REPLACE INTO expunged (folder_id, uid, modseq) VALUES (?, ?, ?)",
                           [(f.id, e.uid, self.modseq) for e in self.removed])
            self._prune_expunged(tx)
            if self.unremoved:  # (known once files() ran, before the rows in the same trip: _files_first)
                tx.executemany("INSERT OR IGNORE INTO unremoved_files (folder_id, basename) VALUES (?, ?)",
                               [(f.id, e.base) for e in self.unremoved])
        # MAX: a change made in memory before a pipelined expunge's pruning was written (commit_pipelined)
        # knows the older bound, and must not lower it.
        tx.execute("UPDATE folders SET uidnext = ?, highestmodseq = ?, expunges_known_since = MAX(expunges_known_since, ?)"
                   " WHERE id = ?", (self.uidnext, self.modseq, self.expunges_known_since, f.id))

    def rows_lost(self) -> None:
        """After a failed commit_queued: its new entries are in memory but not in the db. The
        folder's next sync writes them (FolderIndex.unwritten) before anything else it does."""
        self.folder.unwritten.update(self.columns.uids if (self.from_columns or self.later) and self.columns is not None else
                                     (e.uid for e in self._added))

    def _prune_expunged(self, tx: sqlite3.Connection) -> None:
        """Keep the newest EXPUNGES_KEPT expunge records of the folder (whole mod-sequences: the
        records above `expunges_known_since` must be every expunge there was)."""
        row = tx.execute("SELECT modseq FROM expunged WHERE folder_id = ? ORDER BY modseq DESC LIMIT 1 OFFSET ?",
                         (self.folder.id, EXPUNGES_KEPT)).fetchone()
        if row is None:
            return
        tx.execute("DELETE FROM expunged WHERE folder_id = ? AND modseq <= ?", (self.folder.id, row[0]))
        self.expunges_known_since = max(self.expunges_known_since, row[0])

    def apply(self) -> None:
        """After the commit: the same changes in memory."""
        with gc_paused(self.count):
            self._apply()

    def _apply_read(self) -> None:
        """What was read from the files (wire sizes, dates): no IMAP change."""
        f = self.folder
        for entry, wire in self.measured:
            entry.wire, entry.info = wire, None
            f.uninformed.add(entry.uid)
            f.unmeasured.discard(entry.uid)
        # Their MessageInfo (and the snapshot) stay: it reads the same date from the file. The
        # dating task renews them once at its end, not each session's view once per chunk.
        for entry, date in self.dated:
            entry.internaldate = date
            f.undated.discard(entry.uid)

    def _apply(self) -> None:
        f = self.folder
        for entry, sub, filename in self.located:
            entry.sub, entry.filename, entry.info = sub, filename, None
            f.uninformed.add(entry.uid)
            if sub == "new":
                f.in_new.add(entry.uid)
            else:
                f.in_new.discard(entry.uid)
        for entry, flags, keywords in self.updated:
            entry.flags, entry.keywords, entry.modseq, entry.info = flags, keywords, self.modseq, None
            f.uninformed.add(entry.uid)
        self._apply_read()
        for entry in self.removed:
            if f.by_uid.pop(entry.uid, None) is not None:
                del f.by_base[entry.base]
                f.bytes -= entry.size
                f.unclaimed.discard(entry.uid)
                f.in_new.discard(entry.uid)
                f.unmeasured.discard(entry.uid)
                f.undated.discard(entry.uid)
        whole = self.columns is not None and f.loaded and not f.by_uid  # the folder is these messages alone
        self._add_entries()
        if self.writes:
            # Each only grows: a change made while new messages' commit was queued numbers above them
            # (Change.__init__), and may be in memory before them (commit_arrivals).
            if self._added or self.later or self.from_columns:
                f.uidnext = max(f.uidnext, self.uidnext)
            f.highestmodseq = max(f.highestmodseq, self.modseq)
            f.expunges_known_since = max(f.expunges_known_since, self.expunges_known_since)
        if self._added or self.later or self.from_columns or self.removed:
            f.uidlist_stale = True
        if self.removed:
            f.uidlist_whole = True  # lines must go: only a rewrite removes them
        if self.writes or self.located or self.measured:
            f.invalidate()
        if whole:
            assert self.columns is not None
            f.known(self.columns.messages, self.columns.uids, self.columns.keywords)

    def _add_entries(self) -> None:
        f, added, columns = self.folder, self._added, self.columns  # (none yet when left for later)
        # A delivery to an unloaded folder: its row is read with the others at the next load.
        if columns is not None:  # a first listing adds every message of the folder: from its columns
            f.bytes += sum(columns.sizes)
            if f.loaded:
                if self.from_columns:
                    f.defer(self)
                else:
                    added = self.entries()
                    f.by_uid.update(zip(columns.uids, added, strict=True))
                    f.by_base.update(zip(columns.bases, added, strict=True))
                f.in_new.update(compress(columns.uids, map(eq, columns.subs, repeat("new"))))
                f.unmeasured.update(compress(columns.uids, map(is_, columns.wires, repeat(None))))
                f.undated.update(compress(columns.uids, map(eq, columns.mtimes, repeat(UNKNOWN_DATE))))
            return
        f.bytes += sum(map(_SIZE, added))
        if added and f.loaded:
            f.by_uid.update(zip(map(_UID, added), added, strict=True))
            f.by_base.update(zip(map(_BASE, added), added, strict=True))
            f.in_new.update([e.uid for e in added if e.sub == "new"])
            f.uninformed.update(map(_UID, added))
            f.unmeasured.update([e.uid for e in added if e.wire is None])
            f.undated.update([e.uid for e in added if e.internaldate == UNKNOWN_DATE])


async def commit(db: Database, changes: Sequence[Change], *, first: Callable[[], None] | None = None,
                 durable: bool = True) -> None:
    """Write several folders' changes in one transaction; memory follows only after the commit.
    `first` runs on the database's thread before the rows are written (the group commit's directory
    fsyncs, store/arrivals.py: one thread trip for both); what it raises rolls everything back.
    `durable=False`: the commit is not fsynced (Database.write), for what a listing found only."""
    changes = [c for c in changes if c.pending]
    if any(c.writes or c.measured or c.dated or c.cleared for c in changes):
        def write_all(tx: sqlite3.Connection) -> None:
            if first is not None:
                first()
            for change in changes:
                change.write(tx)

        await db.write(write_all, durable=durable)  # one trip to the database's thread for the whole transaction
    for change in changes:
        change.apply()


async def commit_pipelined(db: Database, change: Change, files: Callable[[], Sequence[bool | None]],
                           entries: Sequence[Entry]) -> asyncio.Future[list[Entry]]:
    """commit_with_files(durable=False) of a flag change or an expunge, without holding the folder
    lock for its trip: the change goes into memory at once, and its files and rows are queued on the
    database's thread (Database.write_queued), which runs them in the order they were queued, so
    every later change of the folder, planned on this memory, is written after it. The caller lets
    the lock go and awaits the future for its tagged OK: the entries whose file was not where the
    index said (their changes left out of the transaction), or the transaction's error. imaptest's
    stress mode had its sessions queue on the folder lock for the whole round trip of each STORE and
    EXPUNGE (issue 19).

    Either way, memory stays true to the db and the disk: a miss or a failure marks the folder
    (reload_due), and its next sync reads the index again from the db and lists the files, after
    every write still queued for it (OpenMailboxes.settle); whatever reads the files by the names
    in memory (a listing, a COPY's links) waits for those writes first. Sessions may see the change
    before its transaction ends: it is not fsynced anyway (mailstore.py's docstring), so a crash
    could lose it after its OK too. A change that only moves files (a claim's new/ to cur/, whose
    rows do not change) runs its renames in order with the writes, with no transaction."""
    assert change.writes or change.located
    f = change.folder
    stamps: list[tuple[int, int]] = []

    def write(tx: sqlite3.Connection) -> list[Entry]:
        missed = _files_first(change, files, entries, stamps)
        if change.writes:
            change.write(tx)
        return missed

    moves = [(filename, f.file(e.sub, e.filename)) for e, sub, filename in change.located
             if filename != e.filename or sub != e.sub]
    change.apply()  # before it is queued: the database's thread then reads the change, never the loop
    try:
        written = await db.write_queued(write, durable=False, transaction=change.writes)
    except BaseException:
        f.reload_due = True
        raise
    f.moved_from.update(moves)

    def settle(done: asyncio.Future[list[Entry]]) -> None:
        """On the loop once the transaction ended, before anyone awaiting it runs (the first callback)."""
        f.in_flight.remove(done)
        for name, before in moves:
            if f.moved_from.get(name) == before:
                del f.moved_from[name]
        if done.cancelled() or done.exception() is not None or done.result():
            f.reload_due = True
            return
        f.expunges_known_since = max(f.expunges_known_since, change.expunges_known_since)
        f.files_done(change.unremoved, stamps)

    f.in_flight.append(written)
    written.add_done_callback(settle)
    return written


_fixups: set[asyncio.Task[None]] = set()  # commit_arrivals' renumbering writes, kept from the collector


async def commit_arrivals(db: Database, change: Change, first: Callable[[], None],
                          placed: Callable[[], None]) -> asyncio.Future[None]:
    """commit(durable=True, first=first) of new messages (store/arrivals.py) without holding the
    folder lock for the trip: their UIDs and mod-sequence are taken now (reserved_uidnext,
    reserved_modseq: the folder's next changes number above them), the transaction is queued on the
    database's thread (Database.write_queued: in order with the folder's other changes), and the
    messages go into memory when it has committed, fsynced, in the order queued, so in UID order.
    The fsync is the WAL's, on a worker thread once the commit is made (Database.sync_log), so the
    database's thread goes on with the writes queued behind it meanwhile; the files' renames and
    their directories' fsyncs came before the commit (`first`), so no row is durable before its file.
    Another connection (the CLI, the CPU pool's worker) may read the rows before that fsync: what it
    writes from them comes after them in the WAL, so a power cut in between loses both.
    No session sees a UID before its row and file are durable: a crash cannot give it to another
    message (RFC 3501 2.3.1.1). A change made meanwhile (a flag change) is in memory first: the new
    messages then get a mod-sequence above it (memory at once, the rows after), so HIGHESTMODSEQ a
    session saw is below that of every message it sees later. `placed` runs once they are in memory.
    Failed, nothing is in memory, and the UIDs taken are given back unless a later batch took some
    above them."""
    f = change.folder
    assert change.added
    assert not change.updated
    assert not change.removed
    f.reserved_uidnext = max(f.reserved_uidnext, change.uidnext)
    f.reserved_modseq = max(f.reserved_modseq, change.modseq)

    def write_all(tx: sqlite3.Connection) -> None:
        first()
        change.write(tx)

    def give_back() -> None:
        if f.reserved_uidnext == change.uidnext:
            f.reserved_uidnext = 0
        if f.reserved_modseq == change.modseq:
            f.reserved_modseq = 0

    try:
        committed = await db.write_queued(write_all, durable=False)
    except BaseException:
        give_back()
        raise

    async def durable() -> None:
        await committed
        try:
            await db.sync_log()
        except OSError as exc:
            raise _LogNotSynced(exc) from exc

    written: asyncio.Future[None] = asyncio.ensure_future(durable())

    def settle(done: asyncio.Future[None]) -> None:
        """On the loop once the transaction ended, before anyone awaiting it runs (the first callback)."""
        f.arriving.remove(done)
        if not done.cancelled() and isinstance(done.exception(), _LogNotSynced):
            # The rows are committed, not known durable: the folder is read again from the db (its
            # UIDs are not given back to be taken twice); the files go, as for any failed arrival.
            f.reload_due = True
            return
        if done.cancelled() or done.exception() is not None:
            give_back()
            return
        if f.highestmodseq >= change.modseq:
            _renumber(db, change, max(f.highestmodseq, f.reserved_modseq) + 1)
        change.apply()
        placed()

    f.arriving.append(written)
    written.add_done_callback(settle)
    return written


class _LogNotSynced(OSError):
    """New messages' commit made, and the fsync of the WAL after it failed."""


def _renumber(db: Database, change: Change, modseq: int) -> None:
    """New messages committed with a mod-sequence that a change made meanwhile went past: theirs is
    `modseq` in memory now, and in their rows by a write queued after (not fsynced: a crash loses
    only the renumbering). MAX: a later change of theirs, queued first, keeps its own."""
    change.modseq = modseq
    for entry in change.added:
        entry.modseq = modseq
    f, uids = change.folder, [e.uid for e in change.added]

    async def queue() -> None:
        try:
            await (await db.write_queued(partial(_raise_modseqs, f.id, uids, modseq), durable=False))
        except (sqlite3.Error, ValueError) as exc:  # the db's own failure, or closed at stop
            logging.getLogger("letterbox.store").warning("store: cannot renumber the mod-sequence of new messages: %s", exc)

    task = asyncio.get_running_loop().create_task(queue())
    _fixups.add(task)
    task.add_done_callback(_fixups.discard)


def _files_first(change: Change, files: Callable[[], Sequence[bool | None]], entries: Sequence[Entry],
                 stamps: list[tuple[int, int]]) -> list[Entry]:
    """On the database's thread, before the change's rows: `files()` between two stamps of the
    folder's directories (appended to `stamps`, for FolderIndex.changed_by_us); the entries whose
    file it did not find, their changes left out. commit_with_files' and commit_pipelined's."""
    path = change.folder.path
    stamps.append(maildir.dir_stamp(path))
    done = files()
    stamps.append(maildir.dir_stamp(path))
    if None in done:  # a file found where another program had moved it: the folder must be listed
        stamps.clear()
    missed = [e for e, ok in zip(entries, done, strict=True) if ok is False]
    return change.leave_out(missed) if missed else missed


async def commit_with_files(db: Database, change: Change, files: Callable[[], Sequence[bool | None]], entries: Sequence[Entry], *,
                            durable: bool) -> list[Entry]:
    """commit() of a change whose files `files()` renames or unlinks on the database's thread, just
    before the rows in the same trip (files first, then the db): one thread handoff per STORE or
    EXPUNGE instead of a worker thread's and then the database's (each woke a thread and the event
    loop and gave the GIL up, issue 19). `files()` says, for each of `entries` in order, whether its
    file was found; the changes of those it did not find are left out, and they are returned. The
    database's thread is every writer's: give it at most FILES_IN_TRANSACTION files at a time."""
    assert change.writes  # else commit() makes no trip, and `files` would not run
    missed: list[Entry] = []

    f = change.folder
    stamps: list[tuple[int, int]] = []

    def first() -> None:
        missed.extend(_files_first(change, files, entries, stamps))

    await commit(db, [change], first=first, durable=durable)
    if not missed:  # (a file not found: another program changed the folder, a listing is due)
        f.files_done(change.unremoved, stamps)
    return missed


QUEUED_WRITE_GATE = 1.0  # seconds a first listing's rows wait at most for the loop's next iteration (commit_queued)


INSERT_SQL = ("INSERT INTO messages (folder_id, uid, basename, flags, keywords, size, wire_size, internaldate,"
              " modseq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _entries(columns: _Columns, modseq: int) -> list[Entry]:
    """The entries of a batch's files given as columns (Change.add_columns), each with its MessageInfo."""
    return list(map(Entry, columns.uids, columns.bases, map(_FIRST, columns.flagged), map(_SECOND, columns.flagged),
                    columns.sizes, columns.mtimes, repeat(modseq), columns.subs, columns.filenames, columns.wires,
                    columns.messages))


def insert_rows(tx: sqlite3.Connection, folder_id: int, entries: Iterable[Entry], *, verb: str = "INSERT") -> None:
    tx.executemany(
        INSERT_SQL.replace("INSERT", verb, 1),
        # A generator: 100k rows of nine fields were 13 MB at once in a cold SELECT, memory
        # pymalloc keeps afterwards. (A zip of attrgetter maps took 10 % more instructions: the
        # generator's attribute loads are specialised for the slots.)
        ((folder_id, e.uid, e.base, e.flags, " ".join(e.keywords), e.size, e.wire, e.internaldate, e.modseq)
         for e in entries),
    )


async def commit_queued(db: Database, change: Change) -> asyncio.Future[None]:
    """commit() of what a listing found only (Change.found_only), not fsynced, without waiting for
    it: the transaction is queued on the database's thread ahead of every later write and read
    (Database.write_queued), and memory follows at once, so the first SELECT of a Maildir copied in
    answers while SQLite inserts its rows (at 10k messages the INSERT was a third of that SELECT,
    issue 19). Nothing that reads or writes the db can come between, so this is the same as
    commit(durable=False) but for a failure of the write itself: then the rows are written at the
    folder's next sync (Change.rows_lost), or found again with the same UIDs after a restart, as
    after a crash before a commit that was not fsynced."""
    assert change.found_only
    # The rows wait for the event loop's next iteration: the SELECT that listed the folder makes its
    # snapshot and sends its answer in this one. Started at once, the INSERT (35 ms of CPU at 10k
    # messages, with the GIL for each row's fields) ran alongside them, and each hand-off of the GIL
    # to it cost the SELECT up to a switch interval (a cold SELECT of 10k 107 -> 67 ms wall, loaded,
    # issue 19). Its place in the database's queue is taken now all the same: whatever is asked of
    # the db later still runs after it. The wait is bounded, for a loop that stops meanwhile.
    opened = threading.Event()
    change.entries_later()
    done = await db.write_queued(change.write, durable=False, gate=(opened, QUEUED_WRITE_GATE))
    loop = asyncio.get_running_loop()
    change.apply()
    loop.call_soon(change.folder.materialize)  # (after the answer too)
    loop.call_soon(opened.set)
    return done


async def reload(db: Database, f: FolderIndex) -> None:
    """The index read again from the db after a pipelined change failed or missed a file
    (OpenMailboxes.settle). Memory had that change, and sessions may have been told it with its
    mod-sequence, which the row lacks: a message whose row has a lower mod-sequence than memory
    had gets a new one above the folder's highest, in memory and in its row (RFC 7162 3.1: a
    message's mod-sequence only grows, and going back to the row's flags is a change too)."""
    told = {uid: e.modseq for uid, e in f.by_uid.items()}
    f.load(await load_entries(db, f.id))
    behind = [e.uid for uid, e in f.by_uid.items() if e.modseq < told.get(uid, 0)]
    if not behind:
        return
    modseq = max(f.highestmodseq, f.reserved_modseq) + 1  # (load leaves the highest memory had)
    for uid in behind:
        f.by_uid[uid].modseq = modseq
    f.highestmodseq = modseq
    f.invalidate()
    await db.write(partial(_raise_modseqs, f.id, behind, modseq), durable=False)  # (as a flag change: not fsynced)


def _raise_modseqs(folder_id: int, uids: list[int], modseq: int, tx: sqlite3.Connection) -> None:
    """These messages' mod-sequence, and the folder's highest, to `modseq` at least (MAX: a later
    change of theirs, written first, keeps its own)."""
    tx.executemany("UPDATE messages SET modseq = MAX(modseq, ?) WHERE folder_id = ? AND uid = ?",
                   [(modseq, folder_id, uid) for uid in uids])
    tx.execute("UPDATE folders SET highestmodseq = MAX(highestmodseq, ?) WHERE id = ?", (modseq, folder_id))


async def write_unwritten(db: Database, f: FolderIndex) -> None:
    """The rows of entries whose commit_queued failed (those still in the folder, as they are now)."""
    entries = [e for uid in sorted(f.unwritten) if (e := f.by_uid.get(uid)) is not None] if f.loaded else []

    def write(tx: sqlite3.Connection) -> None:
        insert_rows(tx, f.id, entries, verb="INSERT OR IGNORE")
        tx.execute("UPDATE folders SET uidnext = MAX(uidnext, ?), highestmodseq = MAX(highestmodseq, ?) WHERE id = ?",
                   (f.uidnext, f.highestmodseq, f.id))

    await db.write(write)
    f.unwritten.clear()


# --- folder rows ---------------------------------------------------------------------------------

_FOLDER_ROW_SQL = ("SELECT id, uidvalidity, uidnext, highestmodseq, subscribed, expunges_known_since,"
                   " (SELECT group_concat(basename, '/') FROM unremoved_files WHERE folder_id = folders.id) FROM folders"
                   " WHERE mailbox_id = ? AND name = ?")


async def folder_row(db: Database, mailbox_id: int, name: str) -> Any:
    return await db.fetchone(_FOLDER_ROW_SQL, (mailbox_id, name))


def insert_folder(tx: sqlite3.Connection, mailbox_id: int, name: str, uidlist: UidList | None = None) -> Any:
    """A new folder row, returned as folder_row reads it; a name that had a stale row gets a new one
    (and a new UIDVALIDITY). On the database's thread, inside Database.write: one trip there for
    all of it, where a statement per trip made seven, a third of a first SELECT's wait before it
    could list a Maildir copied in (issue 19)."""
    tx.execute("DELETE FROM folders WHERE mailbox_id = ? AND name = ?", (mailbox_id, name))
    if uidlist is not None:
        uidvalidity, uidnext = uidlist.uidvalidity, uidlist.uidnext
        _note_uidvalidity(tx, uidvalidity)
    else:
        uidvalidity, uidnext = new_uidvalidity(tx), 1
    tx.execute(
        "INSERT INTO folders (mailbox_id, name, uidvalidity, uidnext) VALUES (?, ?, ?, ?)",
        (mailbox_id, name, uidvalidity, uidnext),
    )
    return tx.execute(_FOLDER_ROW_SQL, (mailbox_id, name)).fetchone()


def new_uidvalidity(tx: sqlite3.Connection) -> int:
    """RFC 3501 2.3.1.1: a UIDVALIDITY this box never issued: the time, or one more than the last."""
    row = tx.execute("SELECT value FROM settings WHERE key = ?", (UIDVALIDITY_SETTING,)).fetchone()
    last = int(row[0]) if row else 0
    value = max(int(time.time()), last + 1)
    if value >= 2**32:
        value = 1 + last % (2**32 - 1)  # a 32-bit number (RFC 3501 9 nz-number); 2106 problem
    _note_uidvalidity(tx, value)
    return value


def _note_uidvalidity(tx: sqlite3.Connection, value: int) -> None:
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value ="
        " CAST(MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
        (UIDVALIDITY_SETTING, str(value)),
    )


async def load_entries(db: Database, folder_id: int, *, above: int = 0, limit: int = -1) -> list[Entry]:
    """The folder's message rows (the first `limit` with a UID above `above`; -1: all), files not
    yet located."""
    rows = await db.fetchall(
        "SELECT uid, basename, flags, keywords, size, internaldate, modseq, wire_size FROM messages"
        " WHERE folder_id = ? AND uid > ? ORDER BY uid LIMIT ?",
        (folder_id, above, limit),
    )
    if len(rows) > RELEASE_ROWS:
        # aiosqlite's thread keeps its last result until its next call: 100k rows held 45 MB after
        # the index that was made of them had been unloaded. A trivial query lets them go.
        await db.fetchall("SELECT 1")
    return [Entry(r[0], r[1], r[2], tuple(r[3].split()), r[4], r[5], r[6], wire=r[7]) for r in rows]


async def expunged_since(db: Database, folder_id: int, modseq: int) -> list[int]:
    """UIDs expunged from the folder with a mod-sequence above `modseq`, ascending (RFC 7162)."""
    rows = await db.fetchall("SELECT uid FROM expunged WHERE folder_id = ? AND modseq > ? ORDER BY uid",
                             (folder_id, modseq))
    return [r[0] for r in rows]
