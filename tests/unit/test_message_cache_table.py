"""The message cache's table (migration 0022): rows kept across the rebuild, one page of the database
per row no more (issue 19), the rows going with their messages."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import cast

from appliance.db import Database, load_migrations
from appliance.store import message_cache
from appliance.store.message_cache import CachedMessage

ROWS = 300
# About what the bench corpus's messages give: 1.1 KB a row, more than a WITHOUT ROWID table's page
# holds of a row (1,002 octets).
ENVELOPE = b'("Mon, 30 Nov 2026 10:00:00 +0000" "a subject of some length" ' + b"x" * 300 + b")"
BODYSTRUCTURE = b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 1234 20 NIL NIL NIL NIL)' + b"y" * 250 + b")"
FIELDS = b"From: someone@example.org\r\nSubject: a subject of some length\r\n" + b"X-Z: " + b"z" * 300 + b"\r\n\r\n"


def _row(uid: int) -> CachedMessage:
    return CachedMessage((1000 + uid, 7, uid), ENVELOPE, BODYSTRUCTURE, BODYSTRUCTURE[:200], FIELDS, True,
                         f"a subject {uid}")


def _messages(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO domains (id, name, created_at) VALUES (1, 'ex.test', 0)")
    conn.execute("INSERT INTO mailboxes (id, domain_id, local_part, password_hash, created_at)"
                 " VALUES (1, 1, 'a', 'x', 0)")
    conn.execute("INSERT INTO folders (id, mailbox_id, name, uidvalidity) VALUES (1, 1, 'INBOX', 1)")
    conn.executemany("INSERT INTO messages (folder_id, uid, basename, size, internaldate) VALUES (1, ?, ?, 1, 0)",
                     [(uid, f"m{uid}") for uid in range(1, ROWS + 1)])


def test_rows_survive_the_rebuild_and_take_a_page_each_no_more(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    migrations = load_migrations()

    async def at(count: int) -> None:
        db = await Database.open(path, migrate=False)
        await db.migrate(migrations[:count])
        await db.close()

    asyncio.run(at(21))  # the WITHOUT ROWID table
    conn = sqlite3.connect(path, isolation_level=None)
    _messages(conn)
    message_cache.keep(conn, 1, [(uid, _row(uid)) for uid in range(1, ROWS + 1)])
    before = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()

    asyncio.run(at(len(migrations)))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("VACUUM")
        after = conn.execute("PRAGMA page_count").fetchone()[0]
        # Each row had an overflow page of its own; now three rows or so share a page.
        assert before > ROWS
        assert after < before - ROWS // 2
        cache = message_cache.MessageCache(cast(Database, _Path(path)))
        assert cache.read(1, list(range(1, ROWS + 1))) == {uid: _row(uid)._replace(subject=None)
                                                           for uid in range(1, ROWS + 1)}
        assert [row for batch in cache.subject_scan(1, 5, 6, "subject 5") for row in batch] == [
            (5, 1005, 7, 5, 1), (6, 1006, 7, 6, 0)]
        cache.close()
        conn.execute("DELETE FROM messages WHERE folder_id = 1 AND uid <= 100")  # an expunge: rows go too
        assert conn.execute("SELECT min(uid), count(*) FROM message_cache").fetchone() == (101, ROWS - 100)
    finally:
        conn.close()


class _Path:
    """All MessageCache's reads take of the box's Database: its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
