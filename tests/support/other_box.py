"""A valid backup of another box (its own data directory, one domain), and the wizard's restore of a
backup."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import httpx

from appliance import backup
from appliance.accounts import Accounts
from appliance.config import DataLayout
from appliance.db import Database
from tests.support.polling import wait_until
from tests.support.web import setup_code

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


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


def wizard_restore(web: httpx.Client, data_root: Path, file: Path, secret: str, *,
                   seconds: float) -> dict[str, str]:
    """The wizard's "Restore from a backup" by `web` (a client of the box's HTTPS console, before setup):
    the form sent with the box's setup code, then the job as /setup/restore/progress shows it once ended."""
    page = web.get("/setup/restore")
    assert page.status_code == 200, page.text[:300]
    token = CSRF.search(page.text)
    assert token
    with file.open("rb") as upload:
        answer = web.post("/setup/restore",
                          data={"csrf": token.group(1), "code": setup_code(data_root), "secret": secret},
                          files={"backup": (file.name, upload, "application/octet-stream")})
    assert answer.status_code == 303, answer.text[:300]

    def finished() -> dict[str, str]:
        job: dict[str, str] | None = web.get("/setup/restore/progress").json()["job"]
        return job if job is not None and not job["running"] else {}

    return wait_until(finished, seconds=seconds, what="the restore's end")
