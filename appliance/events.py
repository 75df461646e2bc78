"""Recent events for the console and one log line per event. Never pass secrets here."""

from __future__ import annotations

import logging
import time

from appliance.db import Database

log = logging.getLogger("letterbox.events")

KEEP_EVENTS = 1000


class EventLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, kind: str, text: str) -> None:
        log.info("%s: %s", kind, text)
        async with self._db.transaction() as tx:
            await tx.execute("INSERT INTO events (at, kind, text) VALUES (?, ?, ?)", (int(time.time()), kind, text))
            await tx.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (KEEP_EVENTS,))

    async def recent(self, limit: int = 100) -> list[tuple[int, str, str]]:
        rows = await self._db.fetchall("SELECT at, kind, text FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [(int(r["at"]), str(r["kind"]), str(r["text"])) for r in rows]
