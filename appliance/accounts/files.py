"""Where removals put a mailbox's mail and a domain's keys: moved aside under deleted/
(appliance/store/trash.py, purged later) inside the removal's transaction, and put back when the
removal does not commit: at once when it fails, at the next start when the process was killed
between the move and the commit (the entry names the row; a row still there did not go).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from appliance.accounts.checks import mailbox_address
from appliance.address import Address
from appliance.config import DataLayout
from appliance.db import Database
from appliance.store import trash

log = logging.getLogger("letterbox.accounts")


class AccountFiles:
    def __init__(self, data: DataLayout | None) -> None:
        # None (unit tests of the db alone) leaves files be.
        self._data = data

    def domain_files(self, domain: str) -> dict[str, Path]:
        if self._data is None:
            return {}
        return {"dkim": self._data.dkim / domain, "mail": self._data.mail / domain}

    def mailbox_files(self, addr: Address) -> dict[str, Path]:
        return {"mail": self._data.mail / addr.domain / addr.local} if self._data else {}

    async def move_aside(self, kind: str, name: str, files: dict[str, Path], row_id: int) -> Path | None:
        """Called inside the removal's transaction, so a move that fails rolls the removal back."""
        if self._data is None or not files:
            return None
        return await asyncio.to_thread(trash.move_aside, files, self._data.deleted, kind, name, row_id=row_id)

    async def recover(self, db: Database) -> None:
        """At start, before any service uses the accounts: the files of a removal that did not commit
        (killed between its move and its commit: the row is still there, its mail or keys were not)
        go back to their place, each said in one line."""
        if self._data is None:
            return
        for pending in await asyncio.to_thread(trash.unfinished, self._data.deleted):
            table = {"mailbox": "mailboxes", "domain": "domains"}.get(pending.kind)
            if table is None:
                continue
            row = await db.fetchone(f"SELECT 1 FROM {table} WHERE id = ?", (pending.row_id,))  # noqa: S608  names from this code only
            if row is None:
                await asyncio.to_thread(trash.settled, pending)
                continue
            files = (self.mailbox_files(mailbox_address(pending.name)) if pending.kind == "mailbox"
                     else self.domain_files(pending.name))
            left = await asyncio.to_thread(trash.restore, pending.entry, files)
            if left == ["mail"] and pending.kind == "mailbox":
                # The box ran on meanwhile (the removal was another process's: `letterbox user remove`
                # killed while the box served) and made the mailbox anew at a login or a delivery: the
                # old mail joins it, or it stayed in deleted/ unseen, to be purged with the entry.
                moved = await asyncio.to_thread(trash.merge_maildir, pending.entry / "mail", files["mail"])
                await asyncio.to_thread(trash.settled, pending)
                log.warning("deleted/: put back %s's mail (%d entries) beside the mail it received since its removal"
                            " was cut short before it committed; what is left is in %s", pending.name, moved,
                            pending.entry.name)
            elif left:
                log.warning("deleted/: %s was not removed (its removal was cut short), but its %s could not be put"
                            " back: a new one is in its place; the old is in %s", pending.name, ", ".join(left),
                            pending.entry)
            else:
                log.warning("deleted/: put back %s's files from %s: its removal was cut short before it"
                            " committed", pending.name, pending.entry.name)

    @staticmethod
    async def put_back(entry: Path | None, files: dict[str, Path]) -> None:
        """The files were moved but the removal did not commit: the record is still there, so are they."""
        if entry is not None:
            await asyncio.to_thread(trash.restore, entry, files)
