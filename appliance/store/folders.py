"""Folder administration (RFC 3501 6.3.3-6.3.7): list, create, delete, rename, subscribe. The
special folders (Sent, Drafts, Trash, Junk, Archive) are made on a mailbox's first access
(mailboxes.py); their names and special-use attributes are in model.SPECIAL_FOLDERS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.db import Database
from appliance.store import maildir
from appliance.store.mailboxes import OpenMailboxes, existing_name, locked
from appliance.store.model import (
    INBOX,
    SEPARATOR,
    SPECIAL_FOLDERS,
    FolderExists,
    FolderInfo,
    MailboxDirectory,
    NoSuchFolder,
    StoreError,
)
from appliance.store.subscriptions import mirror, subscribed_names

log = logging.getLogger("letterbox.store")


class FolderAdmin:
    def __init__(self, boxes: OpenMailboxes, db: Database) -> None:
        self._boxes = boxes
        self._db = db

    async def folders(self, mailbox: str, *, subscriptions: bool = True) -> list[FolderInfo]:
        """INBOX first, then every folder on disk by name. With `subscriptions=False` the database is
        not asked and every folder says it is not subscribed: for a caller that does not show it (a
        plain LIST; under imaptest's stress mode one LIST in eight commands, each a trip to the
        database's thread for nothing, issue 19)."""
        mb = await self._boxes.get(mailbox)
        # One directory of a few entries per folder, read without a stat (d_type): on the event loop,
        # not in a worker thread (a LIST was two thread trips, issue 19).
        names = [INBOX, *maildir.discover_folders(mb.root)]
        wanted = set(await subscribed_names(self._db, mb.id)) if subscriptions else set()
        parents = {SEPARATOR.join(levels[:i]) for levels in (n.split(SEPARATOR) for n in names)
                   for i in range(1, len(levels))}
        return [FolderInfo(name, SPECIAL_FOLDERS.get(name), name in wanted, name in parents)
                for name in names]

    async def subscriptions(self, mailbox: str) -> list[str]:
        """The subscribed names, existing folders or not (RFC 3501 6.3.6: LSUB lists them all)."""
        mb = await self._boxes.get(mailbox)
        return await subscribed_names(self._db, mb.id)

    async def create_folder(self, mailbox: str, name: str) -> None:
        """RFC 3501 6.3.3; missing superior names are created too."""
        mb = await self._boxes.get(mailbox)
        name = maildir.canonical_name(name)
        if name == INBOX:
            raise FolderExists("INBOX always exists")
        maildir.name_levels(name)
        async with mb.lock:
            await self._boxes.make_folders(mb, [*_ancestors(name), name], must_create=name)

    async def delete_folder(self, mailbox: str, name: str) -> None:
        """RFC 3501 6.3.4: the folder and its messages go; folders below it stay."""
        mb = await self._boxes.get(mailbox)
        name = existing_name(name)
        if name == INBOX:
            raise StoreError("INBOX cannot be deleted")
        path = maildir.folder_path(mb.root, name)
        async with mb.lock:
            f = mb.folders.get(name)
            async with locked(*([f] if f is not None else [])):
                try:
                    await asyncio.to_thread(maildir.remove_folder, path)
                except (FileNotFoundError, NotADirectoryError):
                    raise NoSuchFolder(f"no folder named {name}") from None
                await self._db.execute("DELETE FROM folders WHERE mailbox_id = ? AND name = ?", (mb.id, name))
                self._boxes.forget(mb, name)
        log.info("store: %s deleted folder %s", mb.key, name)
        self._boxes.wake(mb, name)

    async def rename_folder(self, mailbox: str, old: str, new: str) -> None:
        """RFC 3501 6.3.5: folders below move along, UIDs and UIDVALIDITY stay. Renaming INBOX moves
        its messages into a new folder and leaves INBOX empty."""
        mb = await self._boxes.get(mailbox)
        old, new = existing_name(old), maildir.canonical_name(new)
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
                await self._boxes.make_folders(mb, [*_ancestors(new), new], must_create=new)
                src, target = await self._boxes.folder_locked(mb, INBOX), await self._boxes.folder_locked(mb, new)
                async with locked(src, target):
                    await self._boxes.sync(mb, src)
                    await self._boxes.transfer(mb, src, target, list(src.by_uid), move=True)
                self._boxes.wake(mb, INBOX)
                return
            if old not in existing:
                raise NoSuchFolder(f"no folder named {old}")
            moving = [old, *sorted(n for n in existing if n.startswith(old + SEPARATOR))]
            renames = {n: new + n[len(old):] for n in moving}
            if any(renamed in existing for renamed in renames.values()):
                raise FolderExists("a folder below the new name already exists")
            await self._boxes.make_folders(mb, [p for p in _ancestors(new) if p not in existing])
            loaded = [mb.folders[n] for n in moving if n in mb.folders]
            async with locked(*loaded):
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
                    self._boxes.forget(mb, renamed)  # a stale index of a folder of that name gone earlier
                for f in loaded:
                    f.name = renames[f.name]
                    f.path = maildir.folder_path(mb.root, f.name)
                    f.invalidate(paths=True)
                    mb.folders[f.name] = f
        await mirror(self._db, mb)
        log.info("store: %s renamed folder %s to %s", mb.key, old, new)
        self._boxes.wake(mb, *moving)

    async def repair(self, directory: MailboxDirectory) -> int:
        """At start: a folder row whose directory is gone is what a DELETE or RENAME killed between its
        directory step and its commit left (or another program's delete). A row-less directory whose
        dovecot-uidlist names the row's UIDVALIDITY is that folder renamed: the row (its UIDs) and
        its subscription follow the new name, as the RENAME would have done. Any other such row is
        dropped: kept, the text indexer tried its folder every few minutes for ever, with a traceback.
        A mailbox whose Maildir is not there at all is left alone. Returns how many rows changed."""
        changed = 0
        for domain, local, root in await asyncio.to_thread(_mailbox_roots, self._boxes.root):
            record = await directory.mailbox_record(domain, local)
            if record is None:
                continue
            rows = await self._db.fetchall("SELECT id, name, uidvalidity FROM folders WHERE mailbox_id = ?", (record.id,))
            on_disk = set(await asyncio.to_thread(maildir.discover_folders, root))
            stale = [r for r in rows if r["name"] != INBOX and r["name"] not in on_disk]
            if not stale:
                continue
            rowless = on_disk - {r["name"] for r in rows}
            validities = await asyncio.to_thread(_uidvalidities, root, rowless)
            for row in stale:
                old = str(row["name"])
                new = next((n for n, v in validities.items() if v == row["uidvalidity"]), None)
                async with self._db.transaction() as tx:
                    if new is None:
                        await tx.execute("DELETE FROM folders WHERE id = ?", (row["id"],))
                    else:
                        await tx.execute("UPDATE folders SET name = ? WHERE id = ?", (new, row["id"]))
                        await tx.execute("UPDATE OR REPLACE subscriptions SET name = ? WHERE mailbox_id = ? AND name = ?",
                                         (new, record.id, old))
                if new is None:
                    log.warning("store: %s@%s: folder %s is gone from the disk (a DELETE cut short, or another"
                                " program); its index is dropped", local, domain, old)
                else:
                    del validities[new]
                    log.warning("store: %s@%s: folder %s was renamed %s on the disk by a RENAME cut short; its"
                                " index and subscription follow", local, domain, old, new)
                changed += 1
            await mirror(self._db, await self._boxes.get(f"{local}@{domain}"))
        return changed

    async def subscribe(self, mailbox: str, name: str, subscribed: bool) -> None:
        """RFC 3501 6.3.6/6.3.7. Subscribing checks that the folder exists (the RFC allows it, and a
        typo then fails loudly); unsubscribing works for any name, a deleted folder's too."""
        mb = await self._boxes.get(mailbox)
        if not subscribed:
            name = maildir.canonical_name(name)
            await self._db.execute("DELETE FROM subscriptions WHERE mailbox_id = ? AND name = ?", (mb.id, name))
        else:
            f = await self._boxes.folder(mb, name)
            await self._db.execute("INSERT OR IGNORE INTO subscriptions (mailbox_id, name) VALUES (?, ?)",
                                   (mb.id, f.name))
        await mirror(self._db, mb)


def _ancestors(name: str) -> list[str]:
    """'A/B/C' -> ['A', 'A/B'] (INBOX, which always exists, left out)."""
    levels = name.split(SEPARATOR)
    return [p for i in range(1, len(levels)) if (p := SEPARATOR.join(levels[:i])) != INBOX]

def _mailbox_roots(mail: Path) -> list[tuple[str, str, Path]]:
    """(domain, local part, Maildir root) of every mailbox directory under mail/."""
    return [(d.name, m.name, m) for d in sorted(mail.iterdir()) if d.is_dir()
            for m in sorted(d.iterdir()) if m.is_dir() and not m.name.startswith(".")] if mail.is_dir() else []


def _uidvalidities(root: Path, names: Iterable[str]) -> dict[str, int]:
    """The UIDVALIDITY each folder's dovecot-uidlist names (folders without one left out)."""
    found = {}
    for name in sorted(names):
        uidlist = maildir.read_uidlist(maildir.folder_path(root, name))
        if uidlist is not None:
            found[name] = uidlist.uidvalidity
    return found


def _rename_dirs(root: Path, renames: Sequence[tuple[Path, Path]]) -> None:
    for source, target in renames:
        source.rename(target)
    maildir.fsync_dir(root)
