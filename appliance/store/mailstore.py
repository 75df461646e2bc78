"""The facade the protocols use: folders, messages, flags, UIDs, quotas, change notification.

Mailbox `local@domain` lives in `<root>/<domain>/<local>/`, a Maildir++ root (maildir.py); each
folder's UIDs are kept by an index (index.py). Rules this module keeps:

- Durable delivery: every copy is written to tmp/, fsynced, renamed into new/, the directory
  fsynced, and only then indexed in one transaction; `deliver` returns after all of it.
- Files first, then the db, then memory, then the watchers (DESIGN.md "Storage rules"): a crash
  between steps leaves files the next scan indexes, never an index entry without its file.
- Blocking file work runs in a worker thread, one `asyncio.to_thread` per operation.
- Locks: a folder's lock covers its scan and every change to its index; a delivery writes its file
  without it (the unique name is marked pending so no scan adopts the file) and takes it only to
  commit. Several folder locks are taken in folder-id order; the mailbox lock (folder create,
  delete, rename, first load) is taken before any folder lock, never after.
- One process owns the store: other programs may read and write the Maildir (Dovecot, a copy from
  another server) and their changes are picked up at the next scan, but the db is this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import idna

from appliance.db import Database
from appliance.store import index, maildir
from appliance.store.changes import ChangeBus, Watcher
from appliance.store.index import Change, FolderIndex
from appliance.store.maildir import Keywords, WriteJob, open_message
from appliance.store.model import (
    INBOX,
    SEPARATOR,
    SPECIAL_FOLDERS,
    FolderExists,
    FolderInfo,
    FolderSnapshot,
    MailboxDirectory,
    MessageInfo,
    NoSuchFolder,
    QuotaExceeded,
    StoreError,
)

__all__ = [
    "SPECIAL_FOLDERS", "FolderExists", "FolderInfo", "FolderSnapshot", "MailStore", "MessageInfo",
    "NoSuchFolder", "QuotaExceeded", "StoreError", "Watcher", "open_message",
]

log = logging.getLogger("letterbox.store")


@dataclass(eq=False)
class _Mailbox:
    id: int
    key: str  # local@domain as stored
    root: Path
    quota: int  # bytes; 0 = none
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    folders: dict[str, FolderIndex] = field(default_factory=dict)
    ready: bool = False  # Maildir root and INBOX made, special folders on first access
    counted: bool = False  # every folder on disk indexed once, so usage is known
    reserved: int = 0  # bytes of deliveries in flight, counted against the quota
    # Orders the writes of the subscriptions file (the last one written holds the last list read).
    subscriptions_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MailStore:
    def __init__(self, root: Path, db: Database, directory: MailboxDirectory) -> None:
        self.root = root
        self._db = db
        self._directory = directory  # which mailbox an address names: asked, never read from its tables
        # Keyed by the mailboxes row id, which is never reused (migration 0007); `_current` says which
        # id an address has now, so an entry of a removed mailbox is dropped as soon as it is seen.
        self._mailboxes: dict[int, _Mailbox] = {}
        self._current: dict[str, int] = {}
        self.changes = ChangeBus()
        self._uidlist_writes: set[asyncio.Task[None]] = set()

    # --- start ------------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Called once at start, before any delivery: remove tmp/ debris of deliveries a crash cut
        short, and folders half deleted. Returns how many entries were removed."""
        removed = await asyncio.to_thread(maildir.clean_debris, self.root)
        if removed:
            log.info("store: removed %d leftover entries from tmp/ after an unclean stop", removed)
        return removed

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
                mb = await self._mailbox(address)
                f = await self._folder(mb, folder)
            except StoreError as exc:
                results[address] = exc
                continue
            if mb.id not in done:
                done[mb.id] = await self._add(mb, f, data, flags, internaldate)
            results[address] = done[mb.id]
        return results

    async def append(self, mailbox: str, folder: str, data: bytes, flags: frozenset[str],
                     internaldate: int | None) -> tuple[int, int]:
        """(uidvalidity, uid) of the new message (RFC 3501 6.3.11, RFC 4315 APPENDUID)."""
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        outcome = await self._add(mb, f, data, flags, internaldate)
        if isinstance(outcome, StoreError):
            raise outcome
        return f.uidvalidity, outcome

    async def snapshot(self, mailbox: str, folder: str, *, claim_recent: bool = False) -> FolderSnapshot:
        """The folder as it is now, synced with the disk. With `claim_recent`, the new messages become
        \\Recent for this caller alone (RFC 3501 2.3.2): files move from new/ to cur/."""
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        async with f.lock:
            changed = await self._sync(mb, f)
            recent = await self._claim(f) if claim_recent else f.recent()
            snap = FolderSnapshot(f.name, f.uidvalidity, f.uidnext, f.messages(), recent, f.highestmodseq)
        if changed:
            self._wake(mb, f.name)  # another program changed the folder: tell the sessions
        return snap

    async def expunged_since(self, mailbox: str, folder: str, modseq: int) -> tuple[list[int], bool]:
        """RFC 7162 3.2.5.2: the UIDs expunged from the folder with a mod-sequence above `modseq`,
        ascending, and whether that list is complete (False when `modseq` predates the record of
        expunges: the caller then treats every missing UID as possibly expunged)."""
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        async with f.lock:
            await self._sync(mb, f)
            uids = await index.expunged_since(self._db, f.id, modseq)
            return uids, modseq >= f.expunges_known_since

    async def message_path(self, mailbox: str, folder: str, uid: int) -> Path | None:
        """Where a message's file is now, or None when there is no such message."""
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        async with f.lock:
            await self._sync(mb, f)
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
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        system, keywords = maildir.split_flags(flags)
        async with f.lock:
            await self._sync(mb, f)
            if keywords and mode != "remove":
                await self._map_keywords(f, keywords)
            wanted = _spelled(keywords, f.keywords)
            folded = {k.lower() for k in keywords}
            entries = f.entries(uids)
            plan: list[tuple[index.Entry, str, str, tuple[str, ...]]] = []
            modified: list[int] = []
            for e in entries:
                if unchanged_since is not None and e.modseq > unchanged_since:
                    modified.append(e.uid)
                    continue
                if mode == "set":
                    upper = maildir.sorted_letters([c for c in e.flags if c not in maildir.FLAG_OF_LETTER] + [*system])
                    names = wanted
                elif mode == "add":
                    upper = maildir.sorted_letters(e.flags + system)
                    names = tuple(sorted(set(e.keywords) | set(wanted)))
                else:
                    upper = maildir.sorted_letters(c for c in e.flags if c not in system)
                    names = tuple(k for k in e.keywords if k.lower() not in folded)
                if (upper, names) == (e.flags, e.keywords):
                    continue
                old_letters = maildir.split_filename(e.filename)[1]
                letters = maildir.encode_letters(upper, names, f.keywords, maildir.kept_letters(old_letters, f.keywords))
                plan.append((e, maildir.cur_filename(e.base, letters), upper, names))
            if plan:
                moves = [(f.path / e.sub / e.filename, f.path / "cur" / filename) for e, filename, _, _ in plan]
                done = await asyncio.to_thread(maildir.rename_files, moves)
                change = Change(f)
                for (e, filename, upper, names), ok in zip(plan, done, strict=True):
                    if not ok:
                        f.dirty = True  # renamed or removed by someone else: the next scan tells
                        continue
                    if e.sub == "new":
                        f.unclaimed.add(e.uid)  # still recent for whoever claims it
                    change.locate(e, "cur", filename)
                    change.update(e, upper, names)
                await index.commit(self._db, [change])
            left = set(modified)
            result = [f.info(e) for e in f.entries(uids) if e.uid not in left]
        if plan:
            self._wake(mb, f.name)
        return result, modified

    async def expunge(self, mailbox: str, folder: str, uids: Sequence[int]) -> list[int]:
        """Remove messages for good; returns the UIDs removed (RFC 3501 6.4.3)."""
        mb = await self._mailbox(mailbox)
        f = await self._folder(mb, folder)
        async with f.lock:
            await self._sync(mb, f)
            doomed = f.entries(uids)
            if doomed:
                await asyncio.to_thread(maildir.unlink_files, [f.path / e.sub / e.filename for e in doomed])
                change = Change(f)
                for e in doomed:
                    change.remove(e)
                await index.commit(self._db, [change])
        if doomed:
            self._wake(mb, f.name)
        return [e.uid for e in doomed]

    async def copy(self, mailbox: str, folder: str, uids: Sequence[int], dest: str) -> list[tuple[int, int]]:
        """(source UID, new UID) pairs (RFC 4315 COPYUID); all or nothing (RFC 3501 6.4.7)."""
        mb = await self._mailbox(mailbox)
        src, target = await self._folder(mb, folder), await self._folder(mb, dest)
        if mb.quota:
            await self._used(mb)  # counted before any lock is held
        async with _locked(src, target):
            pairs = await self._transfer(mb, src, target, uids, move=False)
        if pairs:
            self._wake(mb, target.name)
        return pairs

    async def move(self, mailbox: str, folder: str, uids: Sequence[int], dest: str) -> list[tuple[int, int]]:
        """RFC 6851: the files are renamed into the target; (source UID, new UID) pairs."""
        mb = await self._mailbox(mailbox)
        src, target = await self._folder(mb, folder), await self._folder(mb, dest)
        if src is target:
            pairs = await self.copy(mailbox, folder, uids, dest)
            await self.expunge(mailbox, folder, [old for old, _ in pairs])
            return pairs
        async with _locked(src, target):
            pairs = await self._transfer(mb, src, target, uids, move=True)
        if pairs:
            self._wake(mb, src.name, target.name)
        return pairs

    # --- folders ----------------------------------------------------------------------------------

    async def folders(self, mailbox: str) -> list[FolderInfo]:
        """INBOX first, then every folder on disk by name."""
        mb = await self._mailbox(mailbox)
        names = [INBOX, *await asyncio.to_thread(maildir.discover_folders, mb.root)]
        subscribed = set(await self.subscriptions(mailbox))
        parents = {SEPARATOR.join(levels[:i]) for levels in (n.split(SEPARATOR) for n in names)
                   for i in range(1, len(levels))}
        return [FolderInfo(name, SPECIAL_FOLDERS.get(name), name in subscribed, name in parents)
                for name in names]

    async def subscriptions(self, mailbox: str) -> list[str]:
        """The subscribed names, existing folders or not (RFC 3501 6.3.6: LSUB lists them all)."""
        mb = await self._mailbox(mailbox)
        rows = await self._db.fetchall("SELECT name FROM subscriptions WHERE mailbox_id = ?", (mb.id,))
        return sorted(row[0] for row in rows)

    async def create_folder(self, mailbox: str, name: str) -> None:
        """RFC 3501 6.3.3; missing superior names are created too."""
        mb = await self._mailbox(mailbox)
        name = maildir.canonical_name(name)
        if name == INBOX:
            raise FolderExists("INBOX always exists")
        maildir.name_levels(name)
        async with mb.lock:
            await self._make_folders(mb, [*_ancestors(name), name], must_create=name)

    async def delete_folder(self, mailbox: str, name: str) -> None:
        """RFC 3501 6.3.4: the folder and its messages go; folders below it stay."""
        mb = await self._mailbox(mailbox)
        name = _existing_name(name)
        if name == INBOX:
            raise StoreError("INBOX cannot be deleted")
        path = maildir.folder_path(mb.root, name)
        async with mb.lock:
            f = mb.folders.get(name)
            async with _locked(*([f] if f is not None else [])):
                try:
                    await asyncio.to_thread(maildir.remove_folder, path)
                except (FileNotFoundError, NotADirectoryError):
                    raise NoSuchFolder(f"no folder named {name}") from None
                await self._db.execute("DELETE FROM folders WHERE mailbox_id = ? AND name = ?", (mb.id, name))
                self._forget(mb, name)
        log.info("store: %s deleted folder %s", mb.key, name)
        self._wake(mb, name)

    async def rename_folder(self, mailbox: str, old: str, new: str) -> None:
        """RFC 3501 6.3.5: folders below move along, UIDs and UIDVALIDITY stay. Renaming INBOX moves
        its messages into a new folder and leaves INBOX empty."""
        mb = await self._mailbox(mailbox)
        old, new = _existing_name(old), maildir.canonical_name(new)
        if new == INBOX:
            raise FolderExists("INBOX already exists")
        maildir.name_levels(new)
        if new == old:
            raise FolderExists(f"{new} already exists")
        if new.startswith(old + SEPARATOR):
            raise StoreError("a folder cannot be moved below itself")
        async with mb.lock:
            existing = set(await asyncio.to_thread(maildir.discover_folders, mb.root))
            if new in existing:
                raise FolderExists(f"{new} already exists")
            if old == INBOX:
                await self._make_folders(mb, [*_ancestors(new), new], must_create=new)
                src, target = await self._folder_locked(mb, INBOX), await self._folder_locked(mb, new)
                async with _locked(src, target):
                    await self._sync(mb, src)
                    await self._transfer(mb, src, target, list(src.by_uid), move=True)
                self._wake(mb, INBOX)
                return
            if old not in existing:
                raise NoSuchFolder(f"no folder named {old}")
            moving = [old, *sorted(n for n in existing if n.startswith(old + SEPARATOR))]
            renames = {n: new + n[len(old):] for n in moving}
            if any(renamed in existing for renamed in renames.values()):
                raise FolderExists("a folder below the new name already exists")
            await self._make_folders(mb, [p for p in _ancestors(new) if p not in existing])
            loaded = [mb.folders[n] for n in moving if n in mb.folders]
            async with _locked(*loaded):
                await asyncio.to_thread(
                    _rename_dirs, mb.root,
                    [(maildir.folder_path(mb.root, n), maildir.folder_path(mb.root, t)) for n, t in renames.items()],
                )
                async with self._db.transaction() as tx:
                    for n, renamed in renames.items():
                        await tx.execute("DELETE FROM folders WHERE mailbox_id = ? AND name = ?", (mb.id, renamed))
                        await tx.execute("UPDATE folders SET name = ? WHERE mailbox_id = ? AND name = ?",
                                         (renamed, mb.id, n))
                        # A subscription follows its folder to the new name, as in Dovecot.
                        await tx.execute("UPDATE OR REPLACE subscriptions SET name = ? WHERE mailbox_id = ? AND name = ?",
                                         (renamed, mb.id, n))
                for f in loaded:
                    del mb.folders[f.name]
                for renamed in renames.values():
                    self._forget(mb, renamed)  # a stale index of a folder of that name gone earlier
                for f in loaded:
                    f.name = renames[f.name]
                    f.path = maildir.folder_path(mb.root, f.name)
                    f.invalidate(paths=True)
                    mb.folders[f.name] = f
        await self._mirror_subscriptions(mb)
        log.info("store: %s renamed folder %s to %s", mb.key, old, new)
        self._wake(mb, *moving)

    async def subscribe(self, mailbox: str, name: str, subscribed: bool) -> None:
        """RFC 3501 6.3.6/6.3.7. Subscribing checks that the folder exists (the RFC allows it, and a
        typo then fails loudly); unsubscribing works for any name, a deleted folder's too."""
        mb = await self._mailbox(mailbox)
        if not subscribed:
            name = maildir.canonical_name(name)
            await self._db.execute("DELETE FROM subscriptions WHERE mailbox_id = ? AND name = ?", (mb.id, name))
        else:
            f = await self._folder(mb, name)
            await self._db.execute("INSERT OR IGNORE INTO subscriptions (mailbox_id, name) VALUES (?, ?)",
                                   (mb.id, f.name))
        await self._mirror_subscriptions(mb)

    async def _mirror_subscriptions(self, mb: _Mailbox) -> None:
        """Write the list to the Maildir root in Dovecot's format too, so a Maildir taken to Dovecot
        keeps its subscriptions (the db stays the reference)."""
        async with mb.subscriptions_lock:
            rows = await self._db.fetchall("SELECT name FROM subscriptions WHERE mailbox_id = ?", (mb.id,))
            await asyncio.to_thread(_write_dovecot_subscriptions, mb.root, sorted(row[0] for row in rows))

    async def usage(self, mailbox: str) -> tuple[int, int]:
        """(bytes used, quota bytes; 0 = none)."""
        mb = await self._mailbox(mailbox)
        return await self._used(mb), mb.quota

    def watch(self, mailbox: str, folder: str) -> Watcher:
        return self.changes.watch(_address_key(mailbox), maildir.canonical_name(folder))

    # Added for IMAP (issue 4): COPYUID/MOVE need the destination's UIDVALIDITY (RFC 4315 3), and a
    # snapshot of a large destination folder just for that number is wasteful.
    async def uidvalidity(self, mailbox: str, folder: str) -> int:
        mb = await self._mailbox(mailbox)
        return (await self._folder(mb, folder)).uidvalidity

    # --- internals: mailboxes and folders ---------------------------------------------------------

    async def _mailbox(self, address: str) -> _Mailbox:
        local, _, domain = _address_key(address).rpartition("@")
        if not local or not domain or any(p in (".", "..") or "/" in p or "\0" in p for p in (local, domain)):
            raise StoreError(f"not a mailbox address: {address[:100]!r}")
        record = await self._directory.mailbox_record(domain, local)
        if record is None:
            self.forget_mailbox(f"{local}@{domain}")  # removed, maybe by the CLI in another process
            raise StoreError(f"no such mailbox: {address[:100]}")
        mb = self._mailboxes.get(record.id)
        if mb is None:
            key = f"{record.local}@{record.domain}"
            self.forget_mailbox(key)  # a removed mailbox of the same address: nothing of it is reused
            mb = _Mailbox(record.id, key, self.root / record.domain / record.local, record.quota_bytes)
            self._mailboxes[mb.id] = mb
            self._current[key] = mb.id
        mb.quota = record.quota_bytes  # the administrator may have changed it
        if not mb.ready:
            async with mb.lock:
                if not mb.ready:
                    await self._setup(mb)
        return mb

    async def mailbox_generation(self, address: str) -> int | None:
        """Which mailbox `address` names now: its row id, never reused (None: no such mailbox). A
        session keeps the one it logged in to and ends when it changes, so a session opened before
        the mailbox was removed never reads a later mailbox of the same address (issue 10 item 1)."""
        local, _, domain = _address_key(address).rpartition("@")
        record = await self._directory.mailbox_record(domain, local)
        return record.id if record is not None else None

    def forget_mailbox(self, address: str) -> None:
        """Drop what is cached about the mailbox at `address` (it was removed): its folders are marked
        deleted, so an operation still holding one fails instead of writing for the next owner of
        the address. The next access loads the mailbox afresh from the db."""
        key = _address_key(address)
        mb_id = self._current.pop(key, None)
        mb = self._mailboxes.pop(mb_id, None) if mb_id is not None else None
        if mb is None:
            return
        for f in mb.folders.values():
            f.deleted = True
        mb.folders.clear()
        self.changes.mailbox_gone(key)  # sessions look again and find the mailbox gone

    async def _setup(self, mb: _Mailbox) -> None:
        """First access in this process: the Maildir root exists; on the mailbox's first access ever
        (no folder rows yet) the special folders are made, as Dovecot's autocreate does."""
        await asyncio.to_thread(maildir.make_maildir, mb.root, folder=False)
        # Missing special folders are made again at every first access, as Dovecot's autocreate
        # does: a Maildir copied in from elsewhere gets its Sent, Drafts, Trash and Junk (issue 17).
        await asyncio.to_thread(_make_specials, mb.root)
        await self._folder_locked(mb, INBOX)
        await self._fill_subscriptions(mb)
        mb.ready = True

    async def _fill_subscriptions(self, mb: _Mailbox) -> None:
        """Once per mailbox: subscribe INBOX and the folders it has (the special folders on a new
        mailbox; all of them on one that predates the subscriptions table, where every folder counted
        as subscribed unless unsubscribed). Folders created later are not subscribed (RFC 3501)."""
        if await self._db.fetchone("SELECT 1 FROM subscriptions_ready WHERE mailbox_id = ?", (mb.id,)):
            return
        names = await asyncio.to_thread(_dovecot_subscriptions, mb.root)
        if names is None:
            names = [INBOX, *await asyncio.to_thread(maildir.discover_folders, mb.root)]
            rows = await self._db.fetchall("SELECT name FROM folders WHERE mailbox_id = ? AND subscribed = 0",
                                           (mb.id,))
            unsubscribed = {row[0] for row in rows}
            names = [n for n in names if n not in unsubscribed]
        async with self._db.transaction() as tx:
            await tx.executemany("INSERT OR IGNORE INTO subscriptions (mailbox_id, name) VALUES (?, ?)",
                                 [(mb.id, n) for n in names])
            await tx.execute("INSERT OR IGNORE INTO subscriptions_ready (mailbox_id) VALUES (?)", (mb.id,))
        await self._mirror_subscriptions(mb)

    async def _folder(self, mb: _Mailbox, name: str) -> FolderIndex:
        name = _existing_name(name)
        f = mb.folders.get(name)
        if f is None:
            async with mb.lock:
                f = await self._folder_locked(mb, name)
        return f

    async def _folder_locked(self, mb: _Mailbox, name: str) -> FolderIndex:
        """The folder's index, loaded from the db (a row made when missing). Mailbox lock held."""
        f = mb.folders.get(name)
        if f is not None:
            return f
        path = maildir.folder_path(mb.root, name)
        if not await asyncio.to_thread(_open_dir, path, name != INBOX):
            raise NoSuchFolder(f"no folder named {name}")
        row = await index.folder_row(self._db, mb.id, name)
        uidlist = None
        if row is None:
            uidlist = await asyncio.to_thread(maildir.read_uidlist, path)
            async with self._db.transaction() as tx:
                await index.insert_folder(tx, mb.id, name, uidlist)
            row = await index.folder_row(self._db, mb.id, name)
            assert row is not None
            entries: list[index.Entry] = []
        else:
            entries = await index.load_entries(self._db, row[0])
        f = FolderIndex(row[0], name, path, row[1], row[2], row[3], bool(row[4]), entries, uidlist, row[5])
        mb.folders[name] = f
        return f

    async def _make_folders(self, mb: _Mailbox, names: Sequence[str], must_create: str | None = None) -> None:
        """Create the folders of `names` that do not exist, with fresh rows. Mailbox lock held."""
        made = await asyncio.to_thread(_make_folder_dirs, mb.root, names)
        if must_create is not None and must_create not in made:
            raise FolderExists(f"{must_create} already exists")
        if made:
            async with self._db.transaction() as tx:
                for name in made:
                    await index.insert_folder(tx, mb.id, name)
            for name in made:
                self._forget(mb, name)  # a stale index of an earlier folder of that name
            log.info("store: %s created folder %s", mb.key, ", ".join(made))

    def _forget(self, mb: _Mailbox, name: str) -> None:
        f = mb.folders.pop(name, None)
        if f is not None:
            f.deleted = True

    async def _used(self, mb: _Mailbox) -> int:
        if not mb.counted:
            for name in [INBOX, *await asyncio.to_thread(maildir.discover_folders, mb.root)]:
                try:
                    f = await self._folder(mb, name)
                    if f.stamp is None:
                        async with f.lock:
                            await self._sync(mb, f)
                except StoreError:
                    continue  # a folder name this layout cannot hold, or gone meanwhile
            mb.counted = True
        return _bytes(mb)

    # --- internals: the index against the disk ----------------------------------------------------

    async def _sync(self, mb: _Mailbox, f: FolderIndex) -> bool:  # noqa: C901  one reconciliation of Maildir and index; its cases are the states files can be in
        """Bring the index up to the disk (folder lock held); True when the db changed."""
        if f.deleted:
            raise NoSuchFolder(f"no folder named {f.name}")
        try:
            found = await asyncio.to_thread(f.scan)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(mb, f.name)
            raise NoSuchFolder(f"no folder named {f.name}") from None
        if found is None:
            return False
        change = Change(f)
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
        newcomers = sorted(found.found, key=lambda x: (adopted.get(x.base, 2**32), x.base))
        for new in newcomers:
            flags, names = maildir.decode_letters(maildir.split_filename(new.filename)[1], f.keywords)
            change.add(new.base, new.sub, new.filename, flags, names, new.size, new.mtime, adopted.get(new.base),
                       wire=new.wire)
        await index.commit(self._db, [change])
        f.stamp, f.dirty = found.stamp, found.dirty
        if f.uidlist_stale:
            self._uidlist_later(f)
        if newcomers or found.vanished:
            log.info("store: %s %s: %d files indexed, %d gone", mb.key, f.name, len(newcomers), len(found.vanished))
        if found.measured:
            log.info("store: %s %s: wire sizes of %d messages indexed before", mb.key, f.name, len(found.measured))
        return change.writes

    async def _claim(self, f: FolderIndex) -> frozenset[int]:
        """Make the recent messages this caller's: new/ files move to cur/ (folder lock held)."""
        recent = f.recent()
        if not recent:
            return recent
        fresh = [e for e in f.entries(recent) if e.sub == "new"]
        targets = [maildir.cur_filename(e.base, maildir.split_filename(e.filename)[1]) for e in fresh]
        # Not fsynced: after a crash the file is back in new/ and simply recent again.
        done = await asyncio.to_thread(
            maildir.rename_files, [(f.path / "new" / e.filename, f.path / "cur" / t) for e, t in zip(fresh, targets, strict=True)],
            durable=False,
        )
        change = Change(f)
        for e, target, ok in zip(fresh, targets, done, strict=True):
            if ok:
                change.locate(e, "cur", target)
            else:
                f.dirty = True
        await index.commit(self._db, [change])
        f.unclaimed.clear()
        f.invalidate()
        return recent

    async def _map_keywords(self, f: FolderIndex, keywords: Iterable[str]) -> Keywords:
        """Letters for these keywords in the folder's dovecot-keywords (folder lock held). The file is
        read afresh, so letters another program assigned are never reused."""
        current = await asyncio.to_thread(maildir.read_keywords, f.path)
        wanted = current.with_keywords(keywords)
        if wanted != current:
            await asyncio.to_thread(maildir.write_keywords, f.path, wanted)
        f.keywords = wanted
        return wanted

    async def _add(self, mb: _Mailbox, f: FolderIndex, data: bytes, flags: frozenset[str],
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
                    mapped = await self._map_keywords(f, keywords)
                names = _spelled(keywords, mapped)
                letters = maildir.encode_letters(system, names, mapped)
            used = await self._used(mb) if mb.quota else 0
        except StoreError as exc:
            return exc
        if mb.quota and used + mb.reserved + size > mb.quota:
            return QuotaExceeded(f"{mb.key} is over quota ({used} of {mb.quota} bytes used)")
        mb.reserved += size
        base = maildir.unique_name(size)
        f.pending.add(base)  # from here on no scan may adopt this file
        sub, filename = ("cur", maildir.cur_filename(base, letters)) if letters else ("new", base)
        job = WriteJob(f.path, base, sub, filename, internaldate)
        try:
            [error] = await asyncio.to_thread(maildir.write_messages, [job], data)
            if error is not None:
                log.error("store: writing to %s failed: %s", mb.key, error)
                return StoreError(f"cannot write the message: {error.strerror or error}")
            async with _locked(f):
                if f.deleted:
                    await asyncio.to_thread(maildir.unlink_files, [_job_path(job)])
                    return NoSuchFolder(f"folder {f.name} was deleted")
                change = Change(f)
                entry = change.add(job.base, job.sub, job.filename, system, names, size, date, wire=wire)
                try:
                    await index.commit(self._db, [change])
                except Exception:
                    log.exception("store: indexing a delivery failed; its file is removed")
                    await asyncio.to_thread(maildir.unlink_files, [_job_path(job)])
                    return StoreError("cannot index the message")
                if entry.sub == "cur":
                    f.unclaimed.add(entry.uid)
                    f.invalidate()
                f.pending.discard(base)
        finally:
            mb.reserved -= size
            f.pending.discard(base)
        self._wake(mb, f.name)
        return entry.uid

    async def _transfer(self, mb: _Mailbox, src: FolderIndex, target: FolderIndex, uids: Sequence[int], *,
                        move: bool) -> list[tuple[int, int]]:
        """Copy (hard links) or move (renames) messages into another folder; both locks held."""
        await self._sync(mb, src)
        if target is not src:
            await self._sync(mb, target)
        entries = src.entries(uids)
        if not entries:
            return []
        size = sum(e.size for e in entries)
        if not move and mb.quota:
            used = _bytes(mb)
            if used + mb.reserved + size > mb.quota:
                raise QuotaExceeded(f"{mb.key} is over quota ({used} of {mb.quota} bytes used)")
        keywords = {k for e in entries for k in e.keywords}
        mapped = await self._map_keywords(target, keywords) if keywords else target.keywords
        jobs = []
        for e in entries:
            base = maildir.unique_name(e.size)
            filename = maildir.cur_filename(base, maildir.encode_letters(e.flags, e.keywords, mapped))
            jobs.append(WriteJob(target.path, base, "cur", filename, None))
        sources = [src.path / e.sub / e.filename for e in entries]
        if move:
            done = await asyncio.to_thread(
                maildir.rename_files, [(s, j.maildir / j.sub / j.filename) for s, j in zip(sources, jobs, strict=True)]
            )
        else:
            mb.reserved += size
            try:
                await asyncio.to_thread(maildir.copy_messages, list(zip(sources, jobs, strict=True)))
            except FileNotFoundError:
                src.dirty = True
                raise StoreError("a message was expunged meanwhile; nothing copied") from None
            except OSError as exc:
                raise StoreError(f"cannot copy: {exc.strerror or exc}") from None
            finally:
                mb.reserved -= size
            done = [True] * len(jobs)
        out_change, in_change = Change(src), Change(target)
        pairs = []
        for e, job, ok in zip(entries, jobs, done, strict=True):
            if not ok:
                src.dirty = True
                continue
            new = in_change.add(job.base, "cur", job.filename, e.flags, e.keywords, e.size, e.internaldate,
                                wire=e.wire)
            pairs.append((e.uid, new.uid))
            if move:
                out_change.remove(e)
        await index.commit(self._db, [out_change, in_change])  # RFC 3501 2.3.2: copies are \Recent
        target.unclaimed.update(new for _, new in pairs)
        target.invalidate()
        return pairs

    def _uidlist_later(self, f: FolderIndex) -> None:
        """Write the folder's dovecot-uidlist soon, in its own task: changes made meanwhile (a burst
        of deliveries) go into one write."""
        if f.uidlist_queued:
            return  # the write scheduled has not read the state yet: it takes this change too
        f.uidlist_queued = True
        task = asyncio.get_running_loop().create_task(self._write_uidlist(f))
        self._uidlist_writes.add(task)
        task.add_done_callback(self._uidlist_writes.discard)

    async def _write_uidlist(self, f: FolderIndex) -> None:
        async with f.uidlist_lock:
            f.uidlist_queued = False
            if f.deleted or not f.uidlist_stale:
                return
            f.uidlist_stale = False
            names = [(e.uid, e.base) for e in f.by_uid.values()]  # read at once: no await in between
            try:
                await asyncio.to_thread(maildir.write_uidlist, f.path, f.uidvalidity, f.uidnext, names)
            except OSError as exc:
                f.uidlist_stale = True  # tried again after the next change
                log.warning("store: cannot write %s/dovecot-uidlist: %s", f.path, exc)

    async def flush_uidlists(self) -> None:
        """Wait for the dovecot-uidlist writes under way (at stop, and in tests)."""
        while self._uidlist_writes:
            await asyncio.gather(*list(self._uidlist_writes), return_exceptions=True)

    def _wake(self, mb: _Mailbox, *names: str) -> None:
        for name in names:
            f = mb.folders.get(name)
            if f is not None and f.uidlist_stale:
                self._uidlist_later(f)
        self.changes.changed(mb.key, *names)


# --- helpers ---------------------------------------------------------------------------------------

def _address_key(address: str) -> str:
    """local@domain as the db keeps it: lower case, the domain in A-label form; split at the last '@'."""
    local, at, domain = address.rpartition("@")
    domain = domain.rstrip(".").lower()
    if not domain.isascii():
        with contextlib.suppress(idna.IDNAError, UnicodeError):
            domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local.lower()}{at}{domain}"


def _existing_name(name: str) -> str:
    """The canonical name of a folder looked up; a name the disk cannot hold names no folder."""
    name = maildir.canonical_name(name)
    if name != INBOX:
        try:
            maildir.name_levels(name)
        except StoreError:
            raise NoSuchFolder(f"no folder named {name[:100]}") from None
    return name


def _bytes(mb: _Mailbox) -> int:
    return sum(f.bytes for f in mb.folders.values())


def _ancestors(name: str) -> list[str]:
    """'A/B/C' -> ['A', 'A/B'] (INBOX, which always exists, left out)."""
    levels = name.split(SEPARATOR)
    return [p for i in range(1, len(levels)) if (p := SEPARATOR.join(levels[:i])) != INBOX]


def _spelled(keywords: Iterable[str], mapped: Keywords) -> tuple[str, ...]:
    """Keywords as the folder's map spells them (keywords match case-insensitively)."""
    names = set()
    for keyword in keywords:
        letter = mapped.letter_of(keyword)
        name = mapped.name_of(letter) if letter else None
        if name:
            names.add(name)
    return tuple(sorted(names))


@contextlib.asynccontextmanager
async def _locked(*folders: FolderIndex) -> AsyncIterator[None]:
    """Hold several folder locks, taken in folder-id order so two callers never wait on each other."""
    async with contextlib.AsyncExitStack() as stack:
        for f in sorted({f.id: f for f in folders}.values(), key=lambda f: f.id):
            await stack.enter_async_context(f.lock)
        yield


def _job_path(job: WriteJob) -> Path:
    return job.maildir / job.sub / job.filename


def _open_dir(path: Path, folder: bool) -> bool:
    """Does the folder exist? Missing cur/new/tmp of an existing one are made (a foreign copy);
    INBOX always exists."""
    if folder and not path.is_dir():
        return False
    maildir.make_maildir(path, folder=folder)
    return True


MAX_SUBSCRIPTIONS_FILE = 1024 * 1024


def _dovecot_subscriptions(root: Path) -> list[str] | None:
    """The names in the `subscriptions` file Dovecot keeps in a Maildir root (a Maildir brought over
    from Dovecot keeps its subscriptions), or None when there is none. Version 2 starts "V\t2" and a
    blank line and separates levels with a tab; version 1 lists one name a line."""
    path = root / "subscriptions"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SUBSCRIPTIONS_FILE)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    lines = data.decode("utf-8", "replace").split("\n")
    if lines and lines[0].startswith("V\t"):
        lines = [line.replace("\t", SEPARATOR) for line in lines[1:]]
    return [maildir.canonical_name(line) for line in lines if line.strip() and "\0" not in line]


def _write_dovecot_subscriptions(root: Path, names: Sequence[str]) -> None:
    """Dovecot's version 2 subscriptions file, replaced atomically (a reader sees old or new)."""
    text = "V\t2\n\n" + "".join(name.replace(SEPARATOR, "\t") + "\n" for name in names)
    tmp = root / f"subscriptions.{os.getpid()}.tmp"  # no leading dot: never read as a folder
    with tmp.open("wb") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "subscriptions")
    maildir.fsync_dir(root)


def _make_specials(root: Path) -> None:
    for name in SPECIAL_FOLDERS:
        maildir.make_maildir(maildir.folder_path(root, name), folder=True)


def _make_folder_dirs(root: Path, names: Sequence[str]) -> list[str]:
    made = []
    for name in names:
        path = maildir.folder_path(root, name)
        if not path.is_dir():
            maildir.make_maildir(path, folder=True)
            made.append(name)
    return made


def _rename_dirs(root: Path, renames: Sequence[tuple[Path, Path]]) -> None:
    for source, target in renames:
        source.rename(target)
    maildir.fsync_dir(root)
