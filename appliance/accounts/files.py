"""Where removals put a mailbox's mail and a domain's keys: moved aside under deleted/
(appliance/store/trash.py, purged later) inside the removal's transaction, and put back when the
removal does not commit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.address import Address
from appliance.config import DataLayout
from appliance.store import trash


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

    async def move_aside(self, kind: str, name: str, files: dict[str, Path]) -> Path | None:
        """Called inside the removal's transaction, so a move that fails rolls the removal back."""
        if self._data is None or not files:
            return None
        return await asyncio.to_thread(trash.move_aside, files, self._data.deleted, kind, name)

    @staticmethod
    async def put_back(entry: Path | None, files: dict[str, Path]) -> None:
        """The files were moved but the removal did not commit: the record is still there, so are they."""
        if entry is not None:
            await asyncio.to_thread(trash.restore, entry, files)
