"""A valid backup of another box (its own data directory, one domain), to restore into the one under test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from appliance import backup
from appliance.accounts import Accounts
from appliance.config import DataLayout
from appliance.db import Database


def other_box_backup(tmp_path: Path, name: str, prepare: Callable[[DataLayout], object] | None = None
                     ) -> tuple[Path, str]:
    """(the backup file, its key's text) of a box under tmp_path/elsewhere with the domain restored.test;
    `prepare` changes its data before the backup is made."""
    layout = DataLayout(tmp_path / "elsewhere" / "data")
    layout.create()

    async def setup() -> None:
        db = await Database.open(layout.db)
        try:
            await Accounts(db, data=layout).add_domain("restored.test")
        finally:
            await db.close()

    asyncio.run(setup())
    if prepare is not None:
        prepare(layout)
    kit = backup.new_kit("elsewhere")
    made = backup.create_backup(layout, tmp_path / f"{name}{backup.SUFFIX}", recipient=kit.recipient)
    return made.path, kit.text
