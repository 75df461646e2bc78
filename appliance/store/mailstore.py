"""The facade the protocols use: messages, flags, UIDs, quotas; folders (folders.py) and change
notification (mailboxes.py) through it.

Mailbox `local@domain` lives in `<root>/<domain>/<local>/`, a Maildir++ root (maildir.py); each
folder's UIDs are kept by an index (index.py). Rules this module keeps:

- Durable delivery: every copy is written to tmp/, fsynced, renamed into new/, the directory
  fsynced, and only then indexed in one transaction; `deliver` returns after all of it.
- Files first, then the db, then memory, then the watchers (DESIGN.md "Storage rules"): a crash
  between steps leaves files the next scan indexes, never an index entry without its file.
- Saved mail is durable before its OK; flag changes and expunges are not (Dovecot's
  mail_fsync=optimized): their renames and unlinks are not followed by a directory fsync and their
  commits not by a WAL fsync. A crash keeps the box consistent: SQLite's WAL recovers to its last
  whole transaction, and the next listing takes the files as they are (a flag change lost on one
  side is read from the file's name; an expunge whose unlink was lost comes back as a new UID).
- Blocking file work runs in a worker thread, one `asyncio.to_thread` per operation; STORE's renames
  and EXPUNGE's unlinks run on the database's thread just before their rows, and a claim's moves
  from new/ to cur/ in order with them, queued with the folder lock let go
  (index.commit_pipelined; the OK waits for them); new mail's durable writes on the
  store's own writer threads (appliance/threads.py: a lighter hand-off).
- Locks: a folder's lock covers its scan and every change to its index, each applied to memory in
  one step on the event loop, so a look at a folder in step with the disk (a STATUS, a session's
  look at its selected folder) reads memory without the lock (OpenMailboxes.in_step); a delivery writes its file
  without it (the unique name is marked pending so no scan adopts the file) and takes it only to
  take its UID and queue its commit (arrivals.py). A STORE or EXPUNGE holds it one slice of index.FILES_IN_TRANSACTION messages at a time
  (_slices), and only to change memory and queue the slice's files and rows, so the folder's other
  sessions and deliveries wait for neither the whole command nor a slice's trip to the database. Several folder locks are taken in folder-id order; the mailbox lock (folder create,
  delete, rename, first load) is taken before any folder lock, never after.
- One process owns the store: other programs may read and write the Maildir (Dovecot, a copy from
  another server) and their changes are picked up at the next scan, but the db is this process's.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from appliance.db import Database
from appliance.store import index, maildir
from appliance.store.arrivals import Arrival, GroupCommit, write_error
from appliance.store.changes import Watcher
from appliance.store.folders import FolderAdmin
from appliance.store.index import Change, FolderIndex
from appliance.store.mailboxes import OpenMailbox, OpenMailboxes, address_key, locked
from appliance.store.maildir import Keywords, WriteJob, open_message
from appliance.store.message_cache import CachedMessage, FileStamp, FolderCache, MessageCache, stamp_of
from appliance.store.model import (
    INBOX,
    SPECIAL_FOLDERS,
    Filed,
    FolderExists,
    FolderInfo,
    FolderSnapshot,
    Generation,
    MailboxDirectory,
    MessageInfo,
    NoSuchFolder,
    QuotaExceeded,
    SessionEnd,
    StoreError,
)
from appliance.threads import DaemonThreads

__all__ = [
    "SPECIAL_FOLDERS", "Filed", "FolderExists", "FolderInfo", "FolderSnapshot", "Generation", "MailStore", "MessageInfo",
    "NoSuchFolder", "QuotaExceeded", "SessionEnd", "StoreError", "Watcher", "open_message",
]


log = logging.getLogger("letterbox.store")

# What the IMAP layer keeps in the message cache for a message in memory (fetch_cache.describe_bytes);
# given by the composition root, as the store does not import the protocols.
Describe = Callable[[bytes | bytearray, FileStamp], CachedMessage]
# Durable writes of new mail at once: as many as asyncio's default executor ran them on (2 cores: 6);
# concurrent fsyncs of different files join one journal commit.
WRITER_THREADS = min(32, (os.cpu_count() or 1) + 4)


class MailStore:
    def __init__(self, root: Path, db: Database, directory: MailboxDirectory, *,
                 describe: Describe | None = None) -> None:
        self.root = root
        self._db = db
        self._describe = describe
        self.message_cache = MessageCache(db)
        self._directory = directory
        self._boxes = OpenMailboxes(root, db, directory, quiet=self.message_cache.quiet)
        self._folders = FolderAdmin(self._boxes, db)
        self._arrivals = GroupCommit(db)  # deliveries and APPENDs: one transaction per burst
        self._writers = DaemonThreads(WRITER_THREADS, "letterbox-store")
        self.changes = self._boxes.changes
        self.on_unload = self._boxes.on_unload  # called after unused indexes were unloaded (trim)
        # Told after each committed COPY, MOVE and APPEND (the spam learner); never delivery.
        self._filed_listeners: list[Callable[[Filed], None]] = []
        self._retries: set[asyncio.Task[None]] = set()  # _written's, kept from the collector

    # --- start and stop -----------------------------------------------------------------------------

    def close(self) -> None:
        """At stop, after flush_uidlists: the message cache's connection and the inotify watches."""
        self.message_cache.close()
        self._boxes.dir_watch.close()

    async def recover(self) -> int:
        """Called once at start, before any delivery: remove tmp/ debris of deliveries a crash cut
        short, and folders half deleted; set right the rows of folder DELETEs and RENAMEs cut short
        (FolderAdmin.repair). Returns how many entries were removed or set right."""
        removed = await asyncio.to_thread(maildir.clean_debris, self.root)
        if removed:
            log.info("store: removed %d leftovers of an unclean stop (files in tmp/, half-deleted folders, temporary files)", removed)
        return removed + await self._folders.repair(self._directory)

    # --- messages ---------------------------------------------------------------------------------

    async def deliver(self, mailboxes: Sequence[str], data: bytes, *, folder: str = "INBOX",
                      flags: frozenset[str] = frozenset(), internaldate: int | None = None
                      ) -> dict[str, int | StoreError]:
        """Durably write one copy per mailbox. Returns per mailbox its new UID or the error (QuotaExceeded).
        Every returned UID is fsynced and indexed before this returns."""
        results: dict[str, int | StoreError] = {}
        done: dict[int, int | StoreError] = {}  # one copy per mailbox, however its address was spelled
        for address in dict.fromkeys(mailboxes):
            try:
                mb = await self._boxes.get(address)
                f = await self._boxes.folder(mb, folder)
            except StoreError as exc:
                results[address] = exc
                continue
            if mb.id not in done:
                done[mb.id] = await self._add(mb, f, data, flags, internaldate)
            results[address] = done[mb.id]
        return results

    @property
    def last_arrival(self) -> float:
        """When the last delivery or APPEND was handed to the group commit (the event loop's clock;
        0 before the first): for background work that should wait for a pause in the mail."""
        return self._arrivals.last_arrival

    async def append(self, mailbox: str, folder: str, data: bytes | bytearray, flags: frozenset[str],
                     internaldate: int | None) -> tuple[int, int]:
        """(uidvalidity, uid) of the new message (RFC 3501 6.3.11, RFC 4315 APPENDUID)."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        outcome = await self._add(mb, f, data, flags, internaldate)
        if isinstance(outcome, StoreError):
            raise outcome
        self._filed(Filed(mb.key, None, f.name, (outcome,)))
        return f.uidvalidity, outcome

    async def snapshot(self, mailbox: str, folder: str, *, claim_recent: bool = False,
                       disk: bool = True) -> FolderSnapshot:
        """The folder as it is now, synced with the disk. With `claim_recent`, the new messages become
        \\Recent for this caller alone (RFC 3501 2.3.2): files move from new/ to cur/. Without
        `disk`, as the index has it (OpenMailboxes.sync): what a session woken by a change made
        through the store asks for, with no listing of the Maildir and no trip to a worker thread."""
        # INBOX, the first folder most sessions open, needs nothing else of the mailbox.
        mb = await self._boxes.get(mailbox, inbox=maildir.canonical_name(folder) == INBOX)
        f = await self._boxes.folder(mb, folder)
        if self._boxes.in_step(f, disk=disk):  # as the lock's holder would find it, without queueing
            recent = self._boxes.claim_in_memory(f) if claim_recent else f.recent()
            if recent is not None:
                return f.snapshot(recent)
        moving = None
        async with f.lock:
            changed = await self._boxes.sync(mb, f, disk=disk)
            recent, moving = await self._boxes.claim(f) if claim_recent else (f.recent(), None)
            snap = f.snapshot(recent)
        if moving is not None:
            await self._boxes.moved(moving)  # the files where the snapshot has them, for the caller's next reads
        if changed:
            self._boxes.wake(mb, f.name)  # another program changed the folder: tell the sessions
        return snap

    async def messages_after(self, mailbox: str, folder: str, uid: int, limit: int) -> tuple[int, int, list[MessageInfo]]:
        """(UIDVALIDITY, UIDNEXT, the first `limit` messages above `uid`) for the full-text indexer.
        A folder whose index is unloaded (nobody has it open) is not loaded for this: its new rows
        are read from the db and found with one listing, so mail to a big folder nobody reads costs
        no index load (a backlog costs one listing per page: 20 for 100k messages, 3 s of CPU against
        the minutes its text extraction takes, and a page's worth of memory)."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        async with f.lock:
            if f.loaded:
                used = f.last_used
                await self._boxes.sync(mb, f)
                f.last_used = used  # the indexer's look keeps no folder in memory
                uids = list(f.by_uid)
                start = bisect.bisect_right(uids, uid)
                return f.uidvalidity, f.uidnext, [f.info(f.by_uid[u]) for u in uids[start:start + limit]]
            rows = await index.load_entries(self._db, f.id, above=uid, limit=limit)
            listing = await asyncio.to_thread(maildir.list_messages, f.path) if rows else {}
            found = []
            for e in rows:
                where = listing.get(e.base)
                if where is not None:  # else gone meanwhile: the next sync drops its row
                    e.sub, e.filename = where
                    found.append(f.info(e))
            return f.uidvalidity, f.uidnext, found

    async def expunged_since(self, mailbox: str, folder: str, modseq: int) -> tuple[list[int], bool]:
        """RFC 7162 3.2.5.2: the UIDs expunged from the folder with a mod-sequence above `modseq`,
        ascending, and whether that list is complete (False when `modseq` predates the record of
        expunges: the caller then treats every missing UID as possibly expunged)."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        async with f.lock:
            await self._boxes.sync(mb, f)
            uids = await index.expunged_since(self._db, f.id, modseq)
            return uids, modseq >= f.expunges_known_since

    async def settled(self, mailbox: str, folder: str) -> None:
        """Wait for the folder's changes queued on the database's thread (flag changes, expunges, a
        claim's moves from new/ to cur/: index.commit_pipelined puts them in memory before their
        renames): then every file is where memory says, unless another program moved it."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        async with f.lock:
            await self._boxes.settle(mb, f)

    async def message_path(self, mailbox: str, folder: str, uid: int) -> Path | None:
        """Where a message's file is now, or None when there is no such message."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        async with f.lock:
            await self._boxes.sync(mb, f)
            entry = f.by_uid.get(uid)
            return f.info(entry).path if entry else None

    async def store_flags(self, mailbox: str, folder: str, uids: Sequence[int], flags: frozenset[str],
                          mode: Literal["set", "add", "remove"]) -> list[MessageInfo]:
        """Change flags (RFC 3501 6.4.6); returns the state of every given message that exists,
        changed or not. Each change renames the file in cur/ (a message in new/ moves to cur/)."""
        result, _ = await self.store_flags_unchanged_since(mailbox, folder, uids, flags, mode, None)
        return result

    async def store_flags_unchanged_since(
        self, mailbox: str, folder: str, uids: Sequence[int], flags: frozenset[str],
        mode: Literal["set", "add", "remove"], unchanged_since: int | None,
    ) -> tuple[list[MessageInfo], list[int]]:
        """store_flags, leaving alone the messages whose mod-sequence is above `unchanged_since`
        (RFC 7162 3.1.3 UNCHANGEDSINCE): the test and the change are one step under the folder
        lock. Returns the state of the other given messages and the UIDs left alone."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        system, keywords = maildir.split_flags(flags)
        changes = _FlagChange(system, (), {k.lower() for k in keywords}, mode, unchanged_since)
        result: list[MessageInfo] = []
        flags_now = partial(self._change_flags, f, changes=changes)
        try:
            for part, last in _slices(uids):
                async with f.lock:
                    # As the index has it: changes through this process are in it, and a file another
                    # program renamed or removed since the last listing is found by a listing when its
                    # rename fails (a listing per STORE cost a worker-thread trip; issue 19).
                    await self._boxes.sync(mb, f, disk=False)
                    if keywords and mode != "remove":
                        await self._boxes.map_keywords(f, keywords)
                    changes.keywords = _spelled(keywords, f.keywords)
                    written = await _queued(self._db, self._flag_change(f, f.entries(part), changes))
                    if last:
                        left = set(changes.modified)
                        result = [f.info(e) for e in f.entries(uids) if e.uid not in left]
                if await self._written(mb, f, written, flags_now) and last:
                    async with f.lock:  # as the retry left them
                        result = [f.info(e) for e in f.entries(uids) if e.uid not in left]
        finally:
            if changes.changed:  # a slice or more is committed, whatever stopped the others
                self._boxes.wake(mb, f.name)
        return result, changes.modified

    async def _written(self, mb: OpenMailbox, f: index.FolderIndex, written: asyncio.Future[list[index.Entry]] | None,
                       act: Callable[[list[index.Entry]], Awaitable[list[index.Entry]]]) -> bool:
        """Wait for a flag change or expunge queued with the folder lock let go (index.commit_pipelined),
        raising its error; whether some of a flag change's files were not where the index said:
        renamed or removed by another program since the last listing (the change was made where the
        file is now, maildir.rename_flagged; an expunge never misses: maildir.unlink_messages). Then,
        in a task of its own that a cancelled command does not stop, the index is read again and the
        folder listed (its sync), and `act` (done at once, the lock held) tried once more on where
        they are now (a file gone has left the index): it finds the change made, unless the other
        program changed the same flag meanwhile."""
        if written is None:
            return False
        retry: list[asyncio.Task[None]] = []

        def missed_some(done: asyncio.Future[list[index.Entry]]) -> None:
            if not done.cancelled() and done.exception() is None and (missed := done.result()):
                task = asyncio.get_running_loop().create_task(self._again(mb, f, missed, act))
                self._retries.add(task)
                task.add_done_callback(self._retried)
                retry.append(task)

        written.add_done_callback(missed_some)  # after the folder's own (commit_pipelined's settle)
        await asyncio.shield(written)
        if not retry:
            return False
        await asyncio.shield(retry[0])
        return True

    def _retried(self, task: asyncio.Task[None]) -> None:
        self._retries.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its command hears it, if still there; else the folder's next sync tries again.
            log.info("store: a change that missed a file could not be made again: %s", exc)

    async def _again(self, mb: OpenMailbox, f: index.FolderIndex, missed: list[index.Entry],
                     act: Callable[[list[index.Entry]], Awaitable[list[index.Entry]]]) -> None:
        async with f.lock:
            await self._boxes.sync(mb, f)  # read again (reload_due) and listed
            if await act(f.entries([e.uid for e in missed])):
                f.dirty = True

    def _flag_change(self, f: index.FolderIndex, entries: list[index.Entry], changes: _FlagChange) -> _FileChange | None:
        """The renames of the files of `entries` to their new flags, and the change of their index
        entries (folder lock held); None when no flag changes."""
        plan = changes.plan(f, entries)
        if not plan:
            return None
        moves = [(f.file(e.sub, e.filename), f.file("cur", filename)) for e, filename, _, _ in plan]
        change = Change(f)
        # Still recent for whoever claims them (a file another program took meanwhile is too: harmless).
        f.unclaimed.update(e.uid for e, _, _, _ in plan if e.sub == "new")
        for e, filename, upper, names in plan:
            change.locate(e, "cur", filename)
            change.update(e, upper, names)
        changes.changed = True
        # Neither the renames nor the commit are fsynced (the module's docstring): both fsyncs were
        # under the folder lock, which every other session of the folder waits for (issue 19).
        return _FileChange(change, partial(maildir.rename_flagged, f.path, moves), [e for e, _, _, _ in plan])

    async def _change_flags(self, f: index.FolderIndex, entries: list[index.Entry], *,
                            changes: _FlagChange) -> list[index.Entry]:
        """_flag_change committed at once (folder lock held); the entries whose file was not where
        the index said."""
        return await _now(self._db, self._flag_change(f, entries, changes))

    async def expunge(self, mailbox: str, folder: str, uids: Sequence[int]) -> list[int]:
        """Remove messages for good; returns the UIDs removed (RFC 3501 6.4.3)."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        removed: list[int] = []
        remove_now = partial(self._remove, f)
        try:
            for part, _ in _slices(uids):
                async with f.lock:
                    await self._boxes.sync(mb, f, disk=False)  # as STORE: a listing only for a file not found
                    doomed = f.entries(part)
                    written = await _queued(self._db, _removal(f, doomed))
                await self._written(mb, f, written, remove_now)
                removed += [e.uid for e in doomed if e.uid not in f.by_uid]
        finally:
            if removed:
                self._boxes.wake(mb, f.name)
        return removed

    async def _remove(self, f: index.FolderIndex, entries: list[index.Entry]) -> list[index.Entry]:
        """Unlink the files of `entries` and drop their rows at once (folder lock held); returns the
        entries whose file was not where the index said (their rows stay)."""
        return await _now(self._db, _removal(f, entries))

    async def copy(self, mailbox: str, folder: str, uids: Sequence[int], dest: str) -> list[tuple[int, int]]:
        """(source UID, new UID) pairs (RFC 4315 COPYUID); all or nothing (RFC 3501 6.4.7)."""
        mb = await self._boxes.get(mailbox)
        src, target = await self._boxes.folder(mb, folder), await self._boxes.folder(mb, dest)
        if mb.quota:
            await self._boxes.used(mb)  # counted before any lock is held
        async with locked(src, target):
            pairs = await self._boxes.transfer(mb, src, target, uids, move=False)
        if pairs:
            # The sources are hard-linked now: their rows are checked by a stat again (file_watch.py).
            self.message_cache.watch.forget(src.id, [old for old, _ in pairs])
            self._boxes.wake(mb, target.name)
            self._filed(Filed(mb.key, src.name, target.name, tuple(new for _, new in pairs)))
        return pairs

    async def move(self, mailbox: str, folder: str, uids: Sequence[int], dest: str) -> list[tuple[int, int]]:
        """RFC 6851: the files are renamed into the target; (source UID, new UID) pairs."""
        mb = await self._boxes.get(mailbox)
        src, target = await self._boxes.folder(mb, folder), await self._boxes.folder(mb, dest)
        if src is target:
            copied = await self.copy(mailbox, folder, uids, dest)
            await self.expunge(mailbox, folder, [old for old, _ in copied])
            return copied
        pairs: list[tuple[int, int]] = []
        try:
            # In slices, as STORE and EXPUNGE (_slices): RFC 6851 3.3 lets a MOVE stop part way, each
            # message moved or not; every slice's files are renamed before its rows are committed.
            for part, _ in _slices(uids):
                async with locked(src, target):
                    pairs += await self._boxes.transfer(mb, src, target, part, move=True, disk=not pairs)
        finally:
            if pairs:
                self._boxes.wake(mb, src.name, target.name)
        if pairs:
            self._filed(Filed(mb.key, src.name, target.name, tuple(new for _, new in pairs), moved=True))
        return pairs

    # --- folders (folders.py) ---------------------------------------------------------------------

    async def folders(self, mailbox: str, *, subscriptions: bool = True) -> list[FolderInfo]:
        return await self._folders.folders(mailbox, subscriptions=subscriptions)

    async def subscriptions(self, mailbox: str) -> list[str]:
        return await self._folders.subscriptions(mailbox)

    async def create_folder(self, mailbox: str, name: str) -> None:
        await self._folders.create_folder(mailbox, name)

    async def delete_folder(self, mailbox: str, name: str) -> None:
        await self._folders.delete_folder(mailbox, name)

    async def rename_folder(self, mailbox: str, old: str, new: str) -> None:
        await self._folders.rename_folder(mailbox, old, new)

    async def subscribe(self, mailbox: str, name: str, subscribed: bool) -> None:
        await self._folders.subscribe(mailbox, name, subscribed)

    # --- mailboxes (mailboxes.py) -----------------------------------------------------------------

    async def usage(self, mailbox: str) -> tuple[int, int]:
        """(bytes used, quota bytes; 0 = none)."""
        mb = await self._boxes.get(mailbox)
        return await self._boxes.used(mb), mb.quota

    def on_filed(self, listener: Callable[[Filed], None]) -> Callable[[], None]:
        """Call `listener` after every committed COPY, MOVE or APPEND (not deliveries); it must not
        block (queue the work); returns the unsubscribe."""
        self._filed_listeners.append(listener)
        return lambda: self._filed_listeners.remove(listener) if listener in self._filed_listeners else None

    def _filed(self, event: Filed) -> None:
        for listener in list(self._filed_listeners):
            try:
                listener(event)
            except Exception:
                # A listener's bug never fails the user's command: the messages are already there.
                log.exception("store: a filed listener failed")

    def watch(self, mailbox: str, folder: str) -> Watcher:
        return self.changes.watch(address_key(mailbox), maildir.canonical_name(folder))

    def watch_mailbox(self, mailbox: str) -> Watcher:
        """Woken only when the mailbox is disabled or removed (ChangeBus.mailbox_gone): no folder has
        the empty name."""
        return self.changes.watch(address_key(mailbox), "")

    # Added for IMAP (issue 4): COPYUID/MOVE need the destination's UIDVALIDITY (RFC 4315 3), and a
    # snapshot of a large destination folder just for that number is wasteful.
    async def uidvalidity(self, mailbox: str, folder: str) -> int:
        mb = await self._boxes.get(mailbox)
        return (await self._boxes.folder(mb, folder)).uidvalidity

    async def folder_key(self, mailbox: str, folder: str) -> tuple[int, int]:
        """(folder id, UIDVALIDITY): what the full-text index (imap/fts.py) keys a folder's rows by."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        return f.id, f.uidvalidity

    async def mailbox_generation(self, address: str) -> Generation | None:
        """Which mailbox `address` names now for its sessions, and under which password: see
        OpenMailboxes.generation."""
        return await self._boxes.generation(address)

    async def session_ended(self, address: str, generation: Generation) -> SessionEnd | None:
        """Why a session logged in to `generation` of `address` must end now (None: it goes on)."""
        return await self._boxes.ended(address, generation)

    def wake_sessions(self, address: str) -> None:
        """Every session of the mailbox at `address` looks again now (its IDLE too): it was disabled,
        or its password changed."""
        self.changes.mailbox_gone(address_key(address))

    async def wake_gone_sessions(self) -> None:
        """The sessions of every mailbox disabled, removed or given another password since they logged
        in look again now (and end): see OpenMailboxes.wake_gone."""
        await self._boxes.wake_gone()

    def forget_mailbox(self, address: str) -> None:
        """Drop what is cached about the mailbox at `address` (it was removed); see OpenMailboxes."""
        self._boxes.forget_mailbox(address)

    async def folder_cache(self, mailbox: str, folder: str, uidvalidity: int) -> FolderCache | None:
        """The message cache of a folder, or None when the folder is no longer the one of that
        UIDVALIDITY (removed and made again)."""
        mb = await self._boxes.get(mailbox)
        f = await self._boxes.folder(mb, folder)
        return FolderCache(self.message_cache, f.id, f.moved_from) if f.uidvalidity == uidvalidity else None

    async def flush_uidlists(self) -> None:
        """Wait for the dovecot-uidlist writes under way (at stop, and in tests), and the retries of
        flag changes and expunges that missed a file (_written)."""
        await asyncio.gather(*list(self._retries), return_exceptions=True)
        await self._boxes.flush_uidlists()

    # --- internals --------------------------------------------------------------------------------

    async def _add(self, mb: OpenMailbox, f: FolderIndex, data: bytes | bytearray, flags: frozenset[str],
                   internaldate: int | None) -> int | StoreError:
        """Write one copy into the folder (fsynced) and index it; its UID, or why not."""
        size = len(data)
        wire = size + maildir.bare_lfs(data)  # RFC822.SIZE and POP3 sizes count CRLF line ends
        date = internaldate if internaldate is not None else int(time.time())
        system, keywords = maildir.split_flags(flags)
        try:
            names: tuple[str, ...] = ()
            letters = system
            if keywords:
                async with f.lock:
                    mapped = await self._boxes.map_keywords(f, keywords)
                names = _spelled(keywords, mapped)
                letters = maildir.encode_letters(system, names, mapped)
            used = await self._boxes.used(mb) if mb.quota else 0
        except StoreError as exc:
            return exc
        if mb.quota and used + mb.reserved + size > mb.quota:
            return QuotaExceeded(f"{mb.key} is over quota ({used} of {mb.quota} bytes used)")
        mb.reserved += size
        base = maildir.unique_name(size)
        f.pending.add(base)  # from here on no scan may adopt this file
        sub, filename = ("cur", maildir.cur_filename(base, letters)) if letters else ("new", base)
        job = WriteJob(f.path, base, sub, filename, internaldate)
        handed = False
        try:
            # The directory fsync and the row are the group commit's (arrivals.py), shared with the
            # deliveries to this folder that arrive meanwhile.
            error, cached = await self._writers.run(self._write, job, data)
            if error is not None:
                log.error("store: writing to %s failed: %s", mb.key, error)
                return write_error(error)
            handed = True  # the group commit unmarks the name once the row is in memory
            outcome = await self._arrivals.index(f, Arrival(job, system, names, size, date, wire, cached))
        finally:
            mb.reserved -= size
            if not handed:
                f.pending.discard(base)
        if isinstance(outcome, int):
            if cached is not None:
                self.message_cache.remember(f.id, outcome, cached)  # (committed with the message)
            self._boxes.wake(mb, f.name)
        return outcome

    def _write(self, job: WriteJob, data: bytes | bytearray) -> tuple[OSError | None, CachedMessage | None]:
        """Worker thread: the durable write into tmp/ (the group commit renames it into place), then
        the message's cache row while its bytes are in memory (so no FETCH ever reads this file for
        a message list; a rename keeps what the row is tied to: size, mtime, inode)."""
        try:
            maildir.write_tmp(job, data)
        except OSError as error:
            return error, None
        if self._describe is None:
            return None, None
        try:
            return None, self._describe(data, stamp_of(os.stat(job.tmp)))
        except Exception:
            # The message is safe on disk; without a row its first FETCH reads the file instead.
            log.exception("store: describing a delivered message for the cache failed")
            return None, None


# --- helpers ---------------------------------------------------------------------------------------

@dataclass
class _FileChange:
    """A change of index entries with what it does to their files: both made on the database's thread."""

    change: Change
    files: Callable[[], Sequence[bool | None]]  # for each of `entries`: maildir.rename_flagged's, unlink_messages'.
    entries: list[index.Entry]


def _removal(f: index.FolderIndex, entries: list[index.Entry]) -> _FileChange | None:
    """The unlinks of the files of `entries` and the removal of their rows (not fsynced, as a flag
    change: the module's docstring); None for no entries."""
    if not entries:
        return None
    change = Change(f)
    for e in entries:
        change.remove(e)
    return _FileChange(change, partial(maildir.unlink_messages, f.path, [f.file(e.sub, e.filename) for e in entries]),
                       entries)


async def _now(db: Database, work: _FileChange | None) -> list[index.Entry]:
    """`work` committed with the folder lock held for the trip; the entries whose file was missed."""
    if work is None:
        return []
    return await index.commit_with_files(db, work.change, work.files, work.entries, durable=False)


async def _queued(db: Database, work: _FileChange | None) -> asyncio.Future[list[index.Entry]] | None:
    """`work` in memory now and queued on the database's thread (index.commit_pipelined)."""
    if work is None:
        return None
    return await index.commit_pipelined(db, work.change, work.files, work.entries)


def _spelled(keywords: Iterable[str], mapped: Keywords) -> tuple[str, ...]:
    """Keywords as the folder's map spells them (keywords match case-insensitively)."""
    names = set()
    for keyword in keywords:
        letter = mapped.letter_of(keyword)
        name = mapped.name_of(letter) if letter else None
        if name:
            names.add(name)
    return tuple(sorted(names))


def _slices(uids: Sequence[int]) -> Iterator[tuple[list[int], bool]]:
    """The UIDs of a STORE or EXPUNGE in ascending slices of index.FILES_IN_TRANSACTION, each with
    whether it is the last (one empty slice for none). Each slice is done under one hold of the
    folder lock, which is let go between slices: another session's NOOP or SELECT, and a delivery's
    commit, wait for one slice, not for the whole command (issue 19). They may see the command half
    done, as RFC 3501 allows (another session's flags and expunges may change at any time; each is
    told at its next command); this session's own answer comes after the last slice."""
    ordered = sorted(set(uids))
    step = index.FILES_IN_TRANSACTION
    starts = range(0, len(ordered), step) if ordered else range(1)
    for start in starts:
        yield ordered[start:start + step], start + step >= len(ordered)


@dataclass
class _FlagChange:
    """What one STORE does to each message's flags (RFC 3501 6.4.6, RFC 7162 3.1.3 UNCHANGEDSINCE)."""

    system: str  # flag letters
    keywords: tuple[str, ...]  # as spelled in the folder's keyword map
    folded: set[str]  # the keywords, lower case
    mode: Literal["set", "add", "remove"]
    unchanged_since: int | None
    modified: list[int] = field(default_factory=list)  # UIDs left alone (mod-sequence above unchanged_since)
    changed: bool = False

    def plan(self, f: index.FolderIndex, entries: list[index.Entry]) -> list[tuple[index.Entry, str, str, tuple[str, ...]]]:
        """(entry, new file name, flag letters, keywords) of each message whose flags change."""
        plan = []
        for e in entries:
            if self.unchanged_since is not None and e.modseq > self.unchanged_since:
                self.modified.append(e.uid)
                continue
            if self.mode == "set":
                upper = maildir.sorted_letters([c for c in e.flags if c not in maildir.FLAG_OF_LETTER] + [*self.system])
                names = self.keywords
            elif self.mode == "add":
                upper = maildir.sorted_letters(e.flags + self.system)
                names = tuple(sorted(set(e.keywords) | set(self.keywords)))
            else:
                upper = maildir.sorted_letters(c for c in e.flags if c not in self.system)
                names = tuple(k for k in e.keywords if k.lower() not in self.folded)
            if (upper, names) == (e.flags, e.keywords):
                continue
            old_letters = maildir.split_filename(e.filename)[1]
            letters = maildir.encode_letters(upper, names, f.keywords, maildir.kept_letters(old_letters, f.keywords))
            plan.append((e, maildir.cur_filename(e.base, letters), upper, names))
        return plan
