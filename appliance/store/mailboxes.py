"""The mailboxes the store has open: which mailbox an address names (asked of the accounts through
MailboxDirectory), its Maildir++ root, its folders' indexes loaded once and kept in step with the disk
(sync), the moves of messages between indexes, and who is told of a change (the change bus, the
dovecot-uidlist files). mailstore.py (messages) and folders.py (folder administration) work through it;
the rules they keep are in mailstore.py's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TypeVar

import idna

from appliance import caches, waits
from appliance.db import Database
from appliance.heap import release_memory
from appliance.store import index, maildir, subscriptions
from appliance.store.changes import ChangeBus
from appliance.store.dir_watch import DirWatch
from appliance.store.index import Change, FolderIndex
from appliance.store.maildir import Keywords, UidList, WriteJob
from appliance.store.model import (
    INBOX,
    SPECIAL_FOLDERS,
    FolderExists,
    Generation,
    MailboxDirectory,
    NoSuchFolder,
    QuotaExceeded,
    SessionEnd,
    StoreError,
    TooManyFolders,
)

log = logging.getLogger("letterbox.store")
_T = TypeVar("_T")

# Folders one mailbox may have (INBOX included): each is four directories (16 KiB of
# disk and four inodes) and a row outside the quota, and one session's CREATEs made 140 a second, so
# one mailbox's password filled the disk for everyone.
MAX_FOLDERS = 10_000
# Folder indexes nobody has selected are kept in memory up to this many octets together (about
# 9,000 messages, index.ENTRY_MEMORY each); beyond it the least recently used are unloaded and read
# from the db again at their next use (0.6 s per 100,000 messages).
UNWATCHED_INDEX_MEMORY = 8 << 20
TRIM_DELAY = 2.0  # seconds a folder stays loaded after its last use at least
# Addresses whose key and parts are kept (address_key, _mailbox_parts): a few dozen bytes each.
ADDRESSES_KEPT = 4096
# Background work a folder's first listing leaves (its dates, its dovecot-uidlist) waits this long
# first, so that a client's first commands after a cold SELECT go before it: at 100k messages it
# shared the GIL with the UID FETCH FLAGS that follows (issue 19). Stop and flush_uidlists cut it short.
# Not longer: an index stays in memory until its dovecot-uidlist is written (trim), and 5 s kept a 100k
# folder loaded past the side-by-side bench's memory reading 5 s after its sessions closed (+38 MiB RSS).
AFTER_LISTING_DELAY = 2.0
# A dovecot-uidlist that must be rewritten whole (lines of expunged messages go) waits this long, so
# that a burst of expunges is one rewrite: imaptest's stress mode rewrote it after each of its 45
# EXPUNGEs a second (a worker thread's and the loop's time, issue 19). Not fsynced anyway: the index
# is the reference, and writes it again after a crash.
UIDLIST_REWRITE_DELAY = 1.0
# New messages' lines are appended at most this often (seconds) while mail keeps arriving: a burst's
# group commits share a write (issue 19: one per commit was 3 % of the MX's loop and a trip to a
# worker thread); a delivery after a quiet spell is written at once.
UIDLIST_PACE = 0.25
# Files the dating task stats per hold of the folder lock (a few ms: a command on the folder waits
# at most that long), and its pause between two, so that it takes a small share of the CPU.
DATE_CHUNK = 1000
DATE_PAUSE = 0.02
# A chunk also waits for a pause of DATE_QUIET in the FETCHes, cached SEARCHes and SELECTs (MessageCache.quiet), and
# DATE_WAIT at the most (under clients that never pause, a chunk a second). It starts
# AFTER_LISTING_DELAY after a cold SELECT: at 10k messages after Thunderbird's first header list,
# at 100k in the middle of it, where 100 chunks of stats and UPDATEs took the GIL and the database's
# thread from the answer (issue 19: that row cost more per message at 100k than at 10k).
DATE_QUIET = 0.005
DATE_WAIT = 1.0


@dataclass(eq=False)
class OpenMailbox:
    id: int
    key: str  # local@domain as stored
    root: Path
    quota: int  # bytes; 0 = none
    lock: asyncio.Lock = field(default_factory=lambda: waits.lock("mailbox"))
    folders: dict[str, FolderIndex] = field(default_factory=dict)
    inbox_ready: bool = False  # Maildir root and INBOX made
    ready: bool = False  # and the special folders and subscriptions, on first access
    settling: asyncio.Task[None] | None = None  # _settle_later's task
    counted: bool = False  # every folder on disk indexed once, so usage is known
    reserved: int = 0  # bytes of deliveries in flight, counted against the quota
    # Orders the writes of the subscriptions file (the last one written holds the last list read).
    subscriptions_lock: asyncio.Lock = field(default_factory=asyncio.Lock)



# How many times a COPY or MOVE takes a source file another program renamed meanwhile from where a
# listing finds it now (OpenMailboxes.transfer).
TRANSFER_TRIES = 4


class OpenMailboxes:
    def __init__(self, root: Path, db: Database, directory: MailboxDirectory, *,
                 quiet: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.root = root
        self._db = db
        self._quiet = quiet  # waits for a pause in the clients' FETCHes (MessageCache.quiet)
        self._directory = directory  # which mailbox an address names: asked, never read from its tables
        # Keyed by the mailboxes row id, which is never reused (migration 0007); `_current` says which
        # id an address has now, so an entry of a removed mailbox is dropped as soon as it is seen.
        self._mailboxes: dict[int, OpenMailbox] = {}
        self._current: dict[str, int] = {}
        self._generations: dict[str, Generation] = {}  # what wake_gone found last, per watched mailbox
        self.changes = ChangeBus()
        self.changes.on_unwatched.append(self._trim_later)
        self.dir_watch = DirWatch()  # big folders' rechecks answered by inotify (FolderIndex.unchanged_by_others)
        self._uidlist_writes: set[asyncio.Task[None]] = set()
        self._dating: set[asyncio.Task[None]] = set()  # _date_later's tasks
        self._flushing = asyncio.Event()  # set while flush_uidlists runs: no task waits then
        self._trim: asyncio.TimerHandle | None = None
        self.unloads = 0  # indexes unloaded (tests, bench)
        # Told after trim unloaded indexes and gave the memory back: a big folder's work is over.
        self.on_unload: list[Callable[[], None]] = []

    async def get(self, address: str, *, inbox: bool = False) -> OpenMailbox:
        parts = _mailbox_parts(address)
        if parts is None:
            raise StoreError(f"not a mailbox address: {address[:100]!r}")
        local, domain = parts
        record = await self._directory.mailbox_record(domain, local)
        if record is None:
            self.forget_mailbox(f"{local}@{domain}")  # removed, maybe by the CLI in another process
            raise StoreError(f"no such mailbox: {address[:100]}")
        mb = self._mailboxes.get(record.id)
        if mb is None:
            key = f"{record.local}@{record.domain}"
            self.forget_mailbox(key)  # a removed mailbox of the same address: nothing of it is reused
            mb = OpenMailbox(record.id, key, self.root / record.domain / record.local, record.quota_bytes)
            self._mailboxes[mb.id] = mb
            self._current[key] = mb.id
        mb.quota = record.quota_bytes  # the administrator may have changed it
        if not mb.inbox_ready:
            async with mb.lock:
                if not mb.inbox_ready:
                    await self._setup(mb)
        if not mb.ready:
            if inbox:
                self._settle_later(mb)
            else:
                await self._settle(mb)
        return mb

    async def generation(self, address: str) -> Generation | None:
        """Which mailbox `address` names now, and under which password: its row id, never reused, and
        its stored password hash (None: no such mailbox, or one disabled). A session keeps the one it
        logged in to and ends when it changes, so a session opened before the mailbox was removed never
        reads a later mailbox of the same address (issue 10 item 1), and one of a mailbox the
        administrator disabled, or whose password was changed, ends too."""
        local, _, domain = address_key(address).rpartition("@")
        record = await self._directory.mailbox_record(domain, local)
        return Generation(record.id, record.password_hash) if record is not None and record.enabled else None

    async def ended(self, address: str, generation: Generation) -> SessionEnd | None:
        """Why a session logged in to `generation` of `address` must end now, if it must."""
        local, _, domain = address_key(address).rpartition("@")
        record = await self._directory.mailbox_record(domain, local)
        if record is None or record.id != generation.id:
            return "removed"  # maybe made again for someone else
        if not record.enabled:
            return "disabled"
        return "password" if record.password_hash != generation.password_hash else None

    async def wake_gone(self) -> None:
        """Every watched mailbox that is disabled, removed, replaced by another of its address or given
        another password now has its sessions look again (and those logged in to what is gone end): the
        change was made by another process (the CLI), which cannot wake them as the console's does
        (Admin.update_mailbox, Admin.remove_mailbox, Admin.set_mailbox_password). A mailbox first seen
        here is woken too: which password its sessions logged in under is theirs to tell."""
        owners = self.changes.owners()
        for owner in owners:
            generation = await self.generation(owner)
            if (generation is None or self._current.get(owner) != generation.id
                    or self._generations.get(owner) != generation):
                self.changes.mailbox_gone(owner)
            if generation is not None:
                self._generations[owner] = generation
        for owner in self._generations.keys() - owners:  # no session watches it: forget
            del self._generations[owner]

    def forget_mailbox(self, address: str) -> None:
        """Drop what is cached about the mailbox at `address` (it was removed): its folders are marked
        deleted, so an operation still holding one fails instead of writing for the next owner of
        the address. The next access loads the mailbox afresh from the db."""
        key = address_key(address)
        mb_id = self._current.pop(key, None)
        mb = self._mailboxes.pop(mb_id, None) if mb_id is not None else None
        if mb is None:
            return
        for f in mb.folders.values():
            f.deleted = True
        mb.folders.clear()
        self.changes.mailbox_gone(key)  # sessions look again and find the mailbox gone

    async def _setup(self, mb: OpenMailbox) -> None:
        """First access in this process: the Maildir root and INBOX exist (mailbox lock held)."""
        await asyncio.to_thread(maildir.make_maildir, mb.root, folder=False)
        await self.folder_locked(mb, INBOX)
        mb.inbox_ready = True

    async def _settle(self, mb: OpenMailbox) -> None:
        """The rest of a first access: missing special folders are made again at every first access,
        as Dovecot's autocreate does (a Maildir copied in from elsewhere gets its Sent, Drafts, Trash
        and Junk, issue 17), and INBOX and the folders there are subscribed on the mailbox's first
        access ever."""
        async with mb.lock:
            if not mb.ready:
                await asyncio.to_thread(_make_specials, mb.root)
                await subscriptions.fill(self._db, mb)
                mb.ready = True

    def _settle_later(self, mb: OpenMailbox) -> None:
        """_settle in a task of its own: a SELECT of INBOX, the first access of most sessions, does
        not wait for it. Making five folders took 25 directory fsyncs, 76-112 ms of a cold SELECT at
        load 18 (issue 19); they are still made and fsynced before anything else uses the mailbox
        (every other use waits for them in get())."""
        if mb.settling is not None and not mb.settling.done():
            return
        mb.settling = asyncio.get_running_loop().create_task(self._settle(mb))
        mb.settling.add_done_callback(_settled)

    async def folder(self, mb: OpenMailbox, name: str) -> FolderIndex:
        name = existing_name(name)
        f = mb.folders.get(name)
        if f is None:
            async with mb.lock:
                f = await self.folder_locked(mb, name)
        return f

    async def folder_locked(self, mb: OpenMailbox, name: str) -> FolderIndex:
        """The folder's index, loaded from the db (a row made when missing). Mailbox lock held."""
        f = mb.folders.get(name)
        if f is not None:
            return f
        path = maildir.folder_path(mb.root, name)
        row = await index.folder_row(self._db, mb.id, name)
        # One trip to a thread for the directories and, for a folder without a row, Dovecot's UIDs, and
        # one to the database's for the new row: a trip per step made eleven before a first SELECT of a
        # Maildir copied in could list it, each a thread's wake-up and the GIL handed over (issue 19).
        exists, uidlist = await asyncio.to_thread(_open_dir, path, name != INBOX, uidlist=row is None)
        if not exists:
            raise NoSuchFolder(f"no folder named {name}")
        if row is None:
            row = await self._db.write(partial(index.insert_folder, mailbox_id=mb.id, name=name, uidlist=uidlist))
            entries: list[index.Entry] | None = []
        else:
            entries = None  # loaded at the first sync: a delivery needs only the folder's row
        f = FolderIndex(row[0], name, path, row[1], row[2], row[3], bool(row[4]), entries, uidlist, row[5],
                        row[6].split("/") if row[6] else ())
        f.dir_watch = self.dir_watch
        mb.folders[name] = f
        return f

    async def make_folders(self, mb: OpenMailbox, names: Sequence[str], must_create: str | None = None) -> None:
        """Create the folders of `names` that do not exist, with fresh rows. Mailbox lock held."""
        made = await asyncio.to_thread(_make_folder_dirs, mb.root, names)
        if must_create is not None and must_create not in made:
            raise FolderExists(f"{must_create} already exists")
        if made:
            await self._db.write(partial(_insert_folders, mailbox_id=mb.id, names=made))
            for name in made:
                self.forget(mb, name)  # a stale index of an earlier folder of that name
            log.info("store: %s created folder %s", mb.key, ", ".join(made))

    def forget(self, mb: OpenMailbox, name: str) -> None:
        f = mb.folders.pop(name, None)
        if f is not None:
            f.deleted = True

    async def used(self, mb: OpenMailbox) -> int:
        if not mb.counted:
            for name in [INBOX, *await asyncio.to_thread(maildir.discover_folders, mb.root)]:
                try:
                    f = await self.folder(mb, name)
                    if not f.listed:
                        async with f.lock:
                            await self.sync(mb, f)
                except StoreError:
                    continue  # a folder name this layout cannot hold, or gone meanwhile
            mb.counted = True
        return _bytes(mb)

    async def sync(self, mb: OpenMailbox, f: FolderIndex, *, disk: bool = True) -> bool:  # noqa: C901  one reconciliation of Maildir and index; its cases are the states files can be in
        """Bring the index up to the disk (folder lock held); True when the db changed. Without
        `disk`, a folder listed before is taken as the index has it: every change made through
        this process is in the index already, and only other programs' changes need the disk."""
        if f.deleted:
            raise NoSuchFolder(f"no folder named {f.name}")
        f.last_used = time.monotonic()
        if not f.loaded:
            await self.arrived(f)  # else their rows would be read and then added again
            f.load(await index.load_entries(self._db, f.id))
        if f.reload_due:
            await self.settle(mb, f)
        if f.unwritten:
            await index.write_unwritten(self._db, f)
        self._trim_later()
        if not disk and f.stamp is not None:  # listed since it was loaded: its files are located
            return False
        if f.in_flight and f.unchanged_on_disk():
            return False  # (our queued renames and unlinks are in memory already)
        await self.settle(mb, f)  # our own renames and unlinks still queued are made before the disk is read
        try:
            # A small folder is looked at here: a few stats, and when it changed a listing of under a
            # thousand names (about a millisecond). STATUS, NOOP and SELECT of a folder that changes at
            # every command listed it in a worker thread each time (imaptest's stress mode, issue 19).
            found = await self._scan(f)
        except (FileNotFoundError, NotADirectoryError):
            self.forget(mb, f.name)
            raise NoSuchFolder(f"no folder named {f.name}") from None
        if found is None:
            return False
        if found.found or (found.bulk is not None and found.bulk.bases):
            await self.arrived(f)  # files of others get UIDs after those of new messages being committed
        change = Change(f)
        if found.unremoved or found.cleared:
            await self._remove_unremoved(f, found, change)
        remap = found.keywords is not None and found.keywords != f.keywords
        if found.keywords is not None:
            f.keywords = found.keywords
        f.keywords_mtime = found.keywords_mtime
        located = set()
        for entry, sub, filename in found.moved:
            change.locate(entry, sub, filename)
            letters = maildir.split_filename(filename)[1]
            if letters != entry.flags or entry.keywords:  # else unchanged: the common case at a restart
                change.update(entry, *maildir.decode_letters(letters, f.keywords))
            located.add(entry.uid)
        if remap:  # another program changed the keyword letters: read every name again
            for entry in f.by_uid.values():
                letters = maildir.split_filename(entry.filename)[1]
                if entry.uid not in located and any(c.islower() for c in letters):
                    change.update(entry, *maildir.decode_letters(letters, f.keywords))
        for entry in found.vanished:
            change.remove(entry)
        for entry, wire in found.measured:
            change.measure(entry, wire)
        uidlist, f.uidlist = f.uidlist, None
        adopted = uidlist.uids if uidlist is not None and not f.by_uid else {}
        # found.found is in delivery order already; Dovecot's UIDs, when adopted, come first.
        newcomers = (sorted(found.found, key=lambda x: (adopted.get(x.base, 2**32), maildir.delivery_order(x.base)))
                     if adopted else found.found)
        with index.gc_paused(len(newcomers) or len(found.bulk.bases if found.bulk else ())):
            if found.bulk is not None:  # a first listing, as columns (no Dovecot UIDs: scan checked)
                change.add_columns(found.bulk, f.keywords)
            elif adopted:
                for new in newcomers:
                    flags, names = maildir.decode_letters(maildir.split_filename(new.filename)[1], f.keywords)
                    change.add(new.base, new.sub, new.filename, flags, names, new.size, new.mtime,
                               adopted.get(new.base), wire=new.wire)
            else:
                change.add_found(newcomers, f.keywords)
        indexed = change.count
        # Not fsynced when only files were found, unless they took Dovecot's UIDs: those are read from
        # dovecot-uidlist only when the folder's row is made, so a listing after a crash could not
        # find them again (Change.found_only). Many such files (a Maildir copied in): answered
        # without waiting for their rows (commit_queued).
        if change.found_only and not adopted and indexed >= index.BULK:
            written = await index.commit_queued(self._db, change)
            written.add_done_callback(lambda done: self._queued_commit_done(f, change, done))
        else:
            await index.commit(self._db, [change], durable=not change.found_only or bool(adopted))
        f.was_listed(found)
        if f.uidlist_stale:
            self._uidlist_later(f, wait=indexed >= index.BULK)
        if f.undated:
            self._date_later(f)
        if indexed or found.vanished:
            log.info("store: %s %s: %d files indexed, %d gone", mb.key, f.name, indexed, len(found.vanished))
        if found.measured:
            log.info("store: %s %s: wire sizes of %d messages indexed before", mb.key, f.name, len(found.measured))
        return change.writes

    def in_step(self, f: FolderIndex, *, disk: bool = True) -> bool:
        """Whether sync() would find the index in step with no change, known now without the folder
        lock: the folder listed since it was loaded, no failed change to read again, no rows to
        write, and, with `disk`, its directories as memory has them (FolderIndex.seems_unchanged).
        Memory changes only in whole steps on the event loop (a change is applied at once, before or
        after its trip: index.commit, commit_pipelined, commit_arrivals), so what it holds now is
        what a sync under the lock would answer from, and a session's own APPEND, STORE and EXPUNGE
        are in it before their OK. A STATUS, and every command's look at its selected folder,
        queued on the lock behind the folder's other sessions for nothing (imaptest's stress
        mode, issue 19)."""
        if f.deleted or not f.loaded or f.stamp is None or f.reload_due or f.unwritten:
            return False
        try:
            if disk and not f.seems_unchanged():
                return False
        except OSError:  # (the folder gone from the disk: sync says so)
            return False
        f.last_used = time.monotonic()
        self._trim_later()
        return True

    async def settle(self, mb: OpenMailbox, f: FolderIndex) -> None:
        """Wait for the folder's pipelined flag changes and expunges (index.commit_pipelined; folder
        lock held); when one of them failed or missed a file, read the index again from the db,
        which then holds every change that was made, no message's mod-sequence below what memory
        had (index.reload): the next listing (load() asks for one) takes the files as they are. New messages being committed are waited for only then (a listing
        skips their names: index.commit_arrivals)."""
        while f.in_flight:
            await asyncio.wait(list(f.in_flight))
        if f.reload_due:
            await self.arrived(f)  # their rows would be read and then added again
            f.reload_due = False
            log.info("store: %s: a change could not be made as planned; its index is read again", f.path)
            await index.reload(self._db, f)
            # Sessions may have seen the change that was not made: each looks again at its next command.
            self.changes.changed(mb.key, f.name)

    @staticmethod
    async def _remove_unremoved(f: FolderIndex, found: index.DiskChanges, change: Change) -> None:
        """The files of expunged messages that a listing found still there (FolderIndex.unremoved):
        removed now, and their names forgotten once their files are gone (`change` writes it)."""
        cleared = found.cleared
        if found.unremoved:
            gone = await asyncio.to_thread(maildir.unlink_messages, f.path, found.unremoved)
            cleared += [os.path.basename(p).partition(":")[0] for p, ok in zip(found.unremoved, gone, strict=True) if ok]
        if cleared:
            f.unremoved.difference_update(cleared)
            change.cleared = cleared

    @staticmethod
    async def arrived(f: FolderIndex) -> None:
        """Wait for the new messages whose commit is queued to be in memory (index.commit_arrivals;
        folder lock held): a change that adds messages comes after them, UIDs only grow in by_uid."""
        while f.arriving:
            await asyncio.wait(list(f.arriving))

    @staticmethod
    async def _scan(f: FolderIndex) -> index.DiskChanges | None:
        if f.small_on_disk():
            with contextlib.suppress(index.NeedsThread):
                return f.scan(inline=True)
        return await asyncio.to_thread(f.scan)

    @staticmethod
    def _queued_commit_done(f: FolderIndex, change: Change, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is not None:
            change.rows_lost()
            log.warning("store: cannot index %d files of %s now (%s); written at its next use",
                        change.count, f.path, "cancelled" if done.cancelled() else done.exception())

    @staticmethod
    def claim_in_memory(f: FolderIndex) -> frozenset[int] | None:
        """claim() when no file is in new/ (APPENDs and COPYs go to cur/): nothing to rename, no
        thread trip (each one woke a worker thread and gave the GIL up, issue 19), no commit, the
        message list kept; one step on the loop, so no folder lock. None: files must move."""
        if f.in_new:
            return None
        recent = f.recent()
        if recent:
            f.claimed()
        return recent

    async def claim(self, f: FolderIndex) -> tuple[frozenset[int], asyncio.Future[list[index.Entry]] | None]:
        """Make the recent messages this caller's (folder lock held): their new/ files move to cur/,
        in memory at once, the renames queued on the database's thread in order with the folder's
        flag changes and expunges (index.commit_pipelined), and the future of the renames, which
        the caller awaits with the lock let go (None: none to make). The lock was held for a worker
        thread's trip each time, with every session of the folder queued behind it: under imaptest's
        stress mode each APPEND without flags made one at its next look (issue 19)."""
        claimed = self.claim_in_memory(f)
        if claimed is not None:
            return claimed, None
        recent = f.recent()
        fresh = [e for e in f.entries(recent) if e.sub == "new"]
        if not fresh:  # (in_new named a message no longer there)
            f.claimed()
            return recent, None
        change = Change(f)
        moves = []
        for e in fresh:
            target = maildir.cur_filename(e.base, maildir.split_filename(e.filename)[1])
            moves.append((f.file("new", e.filename), f.file("cur", target)))
            change.locate(e, "cur", target)
        # In memory before anything can come between (commit_pipelined applies the change before its
        # first wait): another look that does not wait for the lock finds them claimed.
        f.claimed(recent)  # (not new messages that came into memory meanwhile)
        return recent, await index.commit_pipelined(self._db, change, partial(_claimed_files, moves), fresh)

    @staticmethod
    async def moved(moving: asyncio.Future[list[index.Entry]]) -> None:
        """Wait for a claim's renames (claim); one that failed is the folder's next sync's to mend
        (reload_due): the claim stands, its messages are no longer recent for anyone else."""
        try:
            await asyncio.shield(moving)
        except Exception as exc:  # noqa: BLE001  told, and left to the folder's next sync
            log.info("store: a claim's renames from new/ to cur/ failed: %s", exc)

    async def map_keywords(self, f: FolderIndex, keywords: Iterable[str]) -> Keywords:
        """Letters for these keywords in the folder's dovecot-keywords (folder lock held). The file is
        read afresh before a letter is assigned, so letters another program assigned are never
        reused; keywords that all have letters already need no look at it (Dovecot and we only ever
        add letters to the file, and a scan reads it again when another program rewrote it).
        A STORE or APPEND with keywords read the file in a worker thread each time (issue 19)."""
        if f.keywords.with_keywords(keywords) == f.keywords:
            return f.keywords
        current = await asyncio.to_thread(maildir.read_keywords, f.path)
        wanted = current.with_keywords(keywords)
        if wanted != current:
            await asyncio.to_thread(maildir.write_keywords, f.path, wanted)
        f.keywords = wanted
        return wanted

    async def transfer(self, mb: OpenMailbox, src: FolderIndex, target: FolderIndex, uids: Sequence[int], *,
                       move: bool, disk: bool = True) -> list[tuple[int, int]]:
        """Copy (hard links) or move (renames) messages into another folder; both locks held.
        Without `disk`, the folders as their indexes have them (sync): a MOVE's later slices. A
        source file another program renamed meanwhile (a flag change of its own) is looked for by a
        listing and taken from where it is now, TRANSFER_TRIES times at most: a MOVE answered OK
        left such a message where it was, and a COPY said it was expunged."""
        pairs: list[tuple[int, int]] = []
        for attempt in range(TRANSFER_TRIES):
            done, missed = await self._transfer(mb, src, target, uids, move=move, disk=disk or bool(attempt),
                                                last=attempt == TRANSFER_TRIES - 1)
            pairs += done
            if not missed:
                break
            uids = missed  # (src is dirty: the next sync lists it)
        return sorted(pairs)

    async def _transfer(self, mb: OpenMailbox, src: FolderIndex, target: FolderIndex, uids: Sequence[int], *,
                        move: bool, disk: bool, last: bool) -> tuple[list[tuple[int, int]], list[int]]:
        """transfer() once: the pairs made, and the UIDs whose source file was not where the index said."""
        for f in dict.fromkeys((src, target)):
            await self.settle(mb, f)  # the files are where memory says (a reload is listed by the sync)
            await self.sync(mb, f, disk=disk)
        await self.arrived(target)  # the copies' UIDs come after theirs
        entries = src.entries(uids)
        if not entries:
            return [], []
        size = sum(e.size for e in entries)
        if not move and mb.quota:
            used = _bytes(mb)
            if used + mb.reserved + size > mb.quota:
                raise QuotaExceeded(f"{mb.key} is over quota ({used} of {mb.quota} bytes used)")
        keywords = {k for e in entries for k in e.keywords}
        mapped = await self.map_keywords(target, keywords) if keywords else target.keywords
        jobs = []
        for e in entries:
            base = maildir.unique_name(e.size)
            filename = maildir.cur_filename(base, maildir.encode_letters(e.flags, e.keywords, mapped))
            jobs.append(WriteJob(target.path, base, "cur", filename, None))
        stamps: list[tuple[int, int]] = []  # for _carry_stamps
        changed = [src, target] if move else [target]
        if move:
            # Strings, not a Path per file (FolderIndex.file).
            moves = [(src.file(e.sub, e.filename), target.file("cur", j.filename)) for e, j in zip(entries, jobs, strict=True)]
            done = await asyncio.to_thread(_stamped, changed, stamps, partial(maildir.rename_files, moves))
        else:
            copied = await self._copy_files(mb, src, target, entries, jobs, size, stamps, last=last)
            if copied is None:  # all or nothing: every one again
                return [], [e.uid for e in entries]
            done = copied
        out_change, in_change = Change(src), Change(target)
        pairs = []
        for e, job, ok in zip(entries, jobs, done, strict=True):
            if not ok:
                src.dirty = True
                continue
            new = in_change.add(job.base, "cur", job.filename, e.flags, e.keywords, e.size, e.internaldate,
                                wire=e.wire)
            in_change.carried.append((new, src.id, e.uid))
            pairs.append((e.uid, new.uid))
            if move:
                out_change.remove(e)
        # RFC 3501 2.3.2: copies are \Recent. The target is written first: its message-cache rows are
        # copied from the source's before a move's removal takes those with it.
        await index.commit(self._db, [in_change, out_change])
        target.unclaimed.update(new for _, new in pairs)
        target.invalidate()
        if all(done):
            _carry_stamps(changed, stamps)
        return pairs, [e.uid for e, ok in zip(entries, done, strict=True) if not ok]

    @staticmethod
    async def _copy_files(mb: OpenMailbox, src: FolderIndex, target: FolderIndex, entries: list[index.Entry],
                          jobs: list[WriteJob], size: int, stamps: list[tuple[int, int]], *, last: bool) -> list[bool] | None:
        """A COPY's files (all or none, fsynced); `size` octets reserved against the quota meanwhile;
        the target's stamps around them put in `stamps` (_stamped). None: a source file was not
        where the index said, nothing copied (unless `last`: the COPY's NO)."""
        sources = [src.path / e.sub / e.filename for e in entries]
        mb.reserved += size
        try:
            await asyncio.to_thread(_stamped, [target], stamps, partial(maildir.copy_messages, list(zip(sources, jobs, strict=True))))
        except FileNotFoundError:
            src.dirty = True
            if not last:
                return None
            raise StoreError("a message was expunged meanwhile; nothing copied") from None
        except OSError as exc:
            raise StoreError(f"cannot copy: {exc.strerror or exc}") from None
        finally:
            mb.reserved -= size
        return [True] * len(jobs)

    # --- memory ---------------------------------------------------------------------------------

    def _trim_later(self) -> None:
        """Look at the indexes' memory in TRIM_DELAY seconds (once, however many ask meanwhile)."""
        if self._trim is None:
            with contextlib.suppress(RuntimeError):  # no loop: nothing is kept for long either
                self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self.trim)

    def trim(self) -> None:
        """Unload the least recently used folder indexes that nobody has selected (no watcher) until
        those left take at most UNWATCHED_INDEX_MEMORY: memory then depends on what the sessions have
        open, not on the folder sizes (issue 19). Folders in use right now, or used within the last
        TRIM_DELAY seconds, are looked at again later."""
        self._trim = None
        now = time.monotonic()
        idle = [f for mb in self._mailboxes.values() for f in mb.folders.values()
                if f.loaded and not self.changes.watched(mb.key, f.name)]
        total = sum(f.memory for f in idle)
        again = unloaded = False
        for f in sorted(idle, key=lambda f: f.last_used):
            if total <= UNWATCHED_INDEX_MEMORY:
                break
            if f.busy or now - f.last_used < TRIM_DELAY:
                again = True
                continue
            total -= f.memory
            log.info("store: %d messages of %s unloaded from memory (nobody has the folder open)", len(f.by_uid), f.path)
            f.unload()
            unloaded = True
            self.unloads += 1
        if unloaded:
            caches.empty()
            release_memory()
            for told in self.on_unload:
                told()
        if again:
            self._trim_later()

    def _uidlist_later(self, f: FolderIndex, *, wait: bool = False) -> None:
        """Write the folder's dovecot-uidlist soon, in its own task: changes made meanwhile (a burst
        of deliveries) go into one write, and in a burst at most one per UIDLIST_PACE. `wait`: after
        AFTER_LISTING_DELAY (many files found)."""
        if f.uidlist_queued:
            return  # the write scheduled has not read the state yet: it takes this change too
        f.uidlist_queued = True
        task = asyncio.get_running_loop().create_task(self._write_uidlist(f, wait))
        self._uidlist_writes.add(task)
        task.add_done_callback(self._uidlist_writes.discard)

    async def _write_uidlist(self, f: FolderIndex, wait: bool) -> None:
        if wait or (f.uidlist_whole and f.uidlist_written is not None):  # a first write goes at once
            await self._pause_unless_flushed(AFTER_LISTING_DELAY if wait else UIDLIST_REWRITE_DELAY)
        elif (pace := f.uidlist_at + UIDLIST_PACE - asyncio.get_running_loop().time()) > 0:
            await self._pause_unless_flushed(pace)
        async with f.uidlist_lock:
            f.uidlist_queued = False
            f.uidlist_at = asyncio.get_running_loop().time()
            if f.deleted or not f.uidlist_stale:
                return
            f.uidlist_stale = False
            try:
                await self._uidlist_write_or_append(f)
            except OSError as exc:
                f.uidlist_stale = f.uidlist_whole = True  # written whole after the next change
                log.warning("store: cannot write %s/dovecot-uidlist: %s", f.path, exc)

    async def _uidlist_write_or_append(self, f: FolderIndex) -> None:
        """Only new messages since the last write (the common case: deliveries): their lines are
        appended. Anything else rewrites the file (0.1 s for 100,000 messages). Each write holds one
        consistent state (_uidlist_state)."""
        if not f.uidlist_whole and f.uidlist_written is not None:
            uidnext, fresh = await self._uidlist_state(f, f.uidlist_last_uid)
            last_uid = fresh[-1][0] if fresh else f.uidlist_last_uid
            # A reader of the appended file takes UIDNEXT as the last UID + 1: append only while that is true.
            if uidnext == last_uid + 1:
                stamp = await asyncio.to_thread(maildir.append_uidlist, f.path, fresh, f.uidlist_written)
                if stamp is not None:
                    f.uidlist_written, f.uidlist_last_uid = stamp, last_uid
                    return
            # else changed by someone else: written whole, from now
        f.uidlist_whole = False
        uidnext, names = await self._uidlist_state(f, 0)
        f.uidlist_written = await asyncio.to_thread(maildir.write_uidlist, f.path, f.uidvalidity, uidnext, names)
        f.uidlist_last_uid = names[-1][0] if names else 0

    async def _uidlist_state(self, f: FolderIndex, above: int) -> tuple[int, list[tuple[int, str]]]:
        """(UIDNEXT, the (UID, unique name) of each message above `above`), read without a change in
        between: from memory, or from the db (under the folder lock) when the index is unloaded, so
        mail to a folder nobody has open keeps its dovecot-uidlist current without loading it."""
        if not f.loaded:
            async with f.lock:
                if not f.loaded:
                    rows = await self._db.fetchall(
                        "SELECT uid, basename FROM messages WHERE folder_id = ? AND uid > ? ORDER BY uid", (f.id, above))
                    return f.uidnext, [(r[0], r[1]) for r in rows]
        with index.gc_paused(len(f.by_uid) if above == 0 else 0):
            if above == 0:  # the whole file (a folder indexed first): no test per message
                return f.uidnext, [(e.uid, e.base) for e in f.by_uid.values()]
            fresh = itertools.takewhile(lambda e: e.uid > above, reversed(f.by_uid.values()))
            return f.uidnext, [(e.uid, e.base) for e in reversed(list(fresh))]

    def _date_later(self, f: FolderIndex) -> None:
        """Read the INTERNALDATE (mtime) of the messages indexed without a stat, in the background,
        and keep it in the index: the first SELECT of a Maildir copied in stats no file, and
        SEARCH, SORT or FETCH INTERNALDATE need not stat them later (MessageInfo.internaldate
        reads the file's date itself until then)."""
        if f.dating:
            return
        f.dating = True
        task = asyncio.get_running_loop().create_task(self._date_files(f))
        self._dating.add(task)
        task.add_done_callback(self._dating.discard)

    async def _pause_unless_flushed(self, seconds: float | None = None) -> None:
        """`seconds` (AFTER_LISTING_DELAY by default), or less when flush_uidlists is called meanwhile."""
        if seconds is None:
            seconds = AFTER_LISTING_DELAY
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._flushing.wait(), seconds)

    async def _date_files(self, f: FolderIndex) -> None:
        try:
            await self._pause_unless_flushed()
            todo = sorted(f.undated)
            for at in range(0, len(todo), DATE_CHUNK):
                if at:
                    await asyncio.sleep(DATE_PAUSE)
                if self._quiet is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._quiet(DATE_QUIET), DATE_WAIT)
                async with f.lock:
                    if f.deleted or not f.loaded:
                        return  # unloaded: dated after its next load
                    change = Change(f)
                    change.dated = await asyncio.to_thread(f.read_dates, todo[at:at + DATE_CHUNK])
                    # Not fsynced: dates a crash loses are read again after the next load.
                    await index.commit(self._db, [change], durable=False)
                    if at + DATE_CHUNK >= len(todo):
                        f.invalidate(paths=True)  # one new snapshot, with the dates in it
            if not f.undated:
                f.undated = set()  # an emptied set keeps its table: 4 MB after a 100k folder
        except Exception:
            log.warning("store: cannot keep the dates of %s's messages; read when asked", f.path, exc_info=True)
        finally:
            f.dating = False

    async def flush_uidlists(self) -> None:
        """Wait for the dovecot-uidlist writes under way (at stop, and in tests), and a first
        access's special folders. The dating tasks are stopped: what they did not keep is read again
        after the next load."""
        settling = [mb.settling for mb in self._mailboxes.values() if mb.settling is not None]
        await asyncio.gather(*settling, return_exceptions=True)
        for task in self._dating:
            task.cancel()
        await asyncio.gather(*list(self._dating), return_exceptions=True)
        self._flushing.set()
        try:
            while self._uidlist_writes:
                await asyncio.gather(*list(self._uidlist_writes), return_exceptions=True)
        finally:
            self._flushing.clear()

    def wake(self, mb: OpenMailbox, *names: str) -> None:
        for name in names:
            f = mb.folders.get(name)
            if f is not None and f.uidlist_stale:
                self._uidlist_later(f)
        self.changes.changed(mb.key, *names)


# --- helpers ---------------------------------------------------------------------------------------

def _claimed_files(moves: Sequence[tuple[str, str]]) -> list[bool | None]:
    """A claim's renames from new/ to cur/, not fsynced (after a crash the file is back in new/ and
    simply recent again). A file not there (another program took or moved it) is None: the folder
    is listed at its next look (index._files_first), as a listing finds it wherever it is."""
    return [ok or None for ok in maildir.rename_files(moves, durable=False)]


def _stamped(folders: Sequence[FolderIndex], stamps: list[tuple[int, int]], work: Callable[[], _T]) -> _T:
    """Worker thread: `work` (renames or links into these folders, lock held), with the folders'
    directory stamps just before and just after it put in `stamps` (each folder's before, in
    order, then each one's after), for _carry_stamps."""
    stamps += (maildir.dir_stamp(f.path) for f in folders)
    done = work()
    stamps += (maildir.dir_stamp(f.path) for f in folders)
    return done


def _carry_stamps(folders: Sequence[FolderIndex], stamps: list[tuple[int, int]]) -> None:
    """The folders' stamps move with our own changes that _stamped took them around (each change
    made and its rows committed): FolderIndex.changed_by_us."""
    if len(stamps) == 2 * len(folders):
        for f, before, after in zip(folders, stamps[:len(folders)], stamps[len(folders):], strict=True):
            f.changed_by_us(before, after)


def _settled(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        # The next access that needs the special folders tries again, and fails for itself.
        log.warning("store: cannot make the special folders yet: %s", exc)


@lru_cache(maxsize=ADDRESSES_KEPT)
def address_key(address: str) -> str:
    """local@domain as the db keeps it: lower case, the domain in A-label form; split at the last '@'.
    Kept for the addresses seen last: every store call of every IMAP command asks (issue 19)."""
    local, at, domain = address.rpartition("@")
    domain = domain.rstrip(".").lower()
    if not domain.isascii():
        with contextlib.suppress(idna.IDNAError, UnicodeError):
            domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local.lower()}{at}{domain}"

@lru_cache(maxsize=ADDRESSES_KEPT)
def _mailbox_parts(address: str) -> tuple[str, str] | None:
    """(local, domain) of the mailbox `address` names, as the db keys it; None when one of them
    cannot name a directory. Kept as address_key is: a generator's check at every store call was
    most of OpenMailboxes.get's own time (issue 19)."""
    local, _, domain = address_key(address).rpartition("@")
    if not local or not domain or any(p in (".", "..") or "/" in p or "\0" in p for p in (local, domain)):
        return None
    return local, domain


def existing_name(name: str) -> str:
    """The canonical name of a folder looked up; a name the disk cannot hold names no folder."""
    name = maildir.canonical_name(name)
    if name != INBOX:
        try:
            maildir.name_levels(name)
        except StoreError:
            raise NoSuchFolder(f"no folder named {name[:100]}") from None
    return name

def _bytes(mb: OpenMailbox) -> int:
    return sum(f.bytes for f in mb.folders.values())

@contextlib.asynccontextmanager
async def locked(*folders: FolderIndex) -> AsyncIterator[None]:
    """Hold several folder locks, taken in folder-id order so two callers never wait on each other."""
    async with contextlib.AsyncExitStack() as stack:
        for f in sorted({f.id: f for f in folders}.values(), key=lambda f: f.id):
            await stack.enter_async_context(f.lock)
        yield

def _open_dir(path: Path, folder: bool, *, uidlist: bool) -> tuple[bool, UidList | None]:
    """Does the folder exist? Missing cur/new/tmp of an existing one are made (a foreign copy);
    INBOX always exists. With `uidlist`, its dovecot-uidlist is read too (when it exists)."""
    if folder and not path.is_dir():
        return False, None
    maildir.make_maildir(path, folder=folder)
    return True, maildir.read_uidlist(path) if uidlist else None


def _insert_folders(tx: sqlite3.Connection, *, mailbox_id: int, names: Sequence[str]) -> None:
    for name in names:
        index.insert_folder(tx, mailbox_id, name)


def _make_specials(root: Path) -> None:
    for name in SPECIAL_FOLDERS:
        maildir.make_maildir(maildir.folder_path(root, name), folder=True)


def _make_folder_dirs(root: Path, names: Sequence[str]) -> list[str]:
    """The folders of `names` not on disk, made; none if they would take the mailbox past MAX_FOLDERS
    (counted on disk, INBOX included: rows come with a folder's first use, so there are fewer)."""
    missing = [(name, path) for name in names if not (path := maildir.folder_path(root, name)).is_dir()]
    if missing and 1 + len(maildir.discover_folders(root)) + len(missing) > MAX_FOLDERS:
        raise TooManyFolders(f"A mailbox has at most {MAX_FOLDERS} folders; delete some first")
    for _, path in missing:
        maildir.make_maildir(path, folder=True)
    return [name for name, _ in missing]
