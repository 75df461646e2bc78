"""Folder subscriptions (RFC 3501 6.3.6, 6.3.7): kept in the db (the reference) and mirrored to the
Maildir root in Dovecot's `subscriptions` format, so a Maildir taken to Dovecot, or brought from it,
keeps them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.db import Database
from appliance.durable import replace_file
from appliance.store import maildir
from appliance.store.model import INBOX, SEPARATOR

if TYPE_CHECKING:
    from appliance.store.mailboxes import OpenMailbox


async def subscribed_names(db: Database, mailbox_id: int) -> list[str]:
    """The subscribed names, existing folders or not (RFC 3501 6.3.6: LSUB lists them all)."""
    rows = await db.fetchall("SELECT name FROM subscriptions WHERE mailbox_id = ?", (mailbox_id,))
    return sorted(row[0] for row in rows)


async def fill(db: Database, mb: OpenMailbox) -> None:
    """Once per mailbox: subscribe INBOX and the folders it has (the special folders on a new
    mailbox; all of them on one that predates the subscriptions table, where every folder counted
    as subscribed unless unsubscribed). Folders created later are not subscribed (RFC 3501)."""
    if await db.fetchone("SELECT 1 FROM subscriptions_ready WHERE mailbox_id = ?", (mb.id,)):
        return
    names = await asyncio.to_thread(_dovecot_subscriptions, mb.root)
    if names is None:
        names = [INBOX, *await asyncio.to_thread(maildir.discover_folders, mb.root)]
        rows = await db.fetchall("SELECT name FROM folders WHERE mailbox_id = ? AND subscribed = 0", (mb.id,))
        unsubscribed = {row[0] for row in rows}
        names = [n for n in names if n not in unsubscribed]
    async with db.transaction() as tx:
        await tx.executemany("INSERT OR IGNORE INTO subscriptions (mailbox_id, name) VALUES (?, ?)",
                             [(mb.id, n) for n in names])
        await tx.execute("INSERT OR IGNORE INTO subscriptions_ready (mailbox_id) VALUES (?)", (mb.id,))
    await mirror(db, mb)


async def mirror(db: Database, mb: OpenMailbox) -> None:
    """Write the list to the Maildir root in Dovecot's format too, so a Maildir taken to Dovecot
    keeps its subscriptions (the db stays the reference)."""
    async with mb.subscriptions_lock:
        await asyncio.to_thread(_write_dovecot_subscriptions, mb.root, await subscribed_names(db, mb.id))


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
    # The temporary file has no leading dot: it is never read as a folder.
    replace_file(root / "subscriptions", text.encode("utf-8"), tmp=root / f"subscriptions.{os.getpid()}.tmp")
