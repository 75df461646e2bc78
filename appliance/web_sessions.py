"""Web console sessions, kept in the database so that they can be ended from the server side.

The browser's signed cookie (web/session.py) carries only a random token; a session is valid while
its row exists. Logging out deletes this session's row; a password change, a disabled or deleted
mailbox and a removed admin delete every row of the account (`end_account_sessions`, called by
appliance/accounts.py inside the transaction that makes the change, so the CLI and the web are alike).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import aiosqlite

from appliance.db import Database

Kind = Literal["admin", "mailbox"]
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 100  # what a cookie may carry; anything longer is not one of ours


@dataclass(frozen=True)
class WebSession:
    kind: Kind
    name: str
    created_at: int


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


async def end_account_sessions(tx: aiosqlite.Connection, kind: Kind, name: str) -> None:
    """Inside the caller's transaction: every web session of this account ends."""
    await tx.execute("DELETE FROM web_sessions WHERE kind = ? AND name = ?", (kind, name))


class WebSessions:
    def __init__(self, db: Database, *, max_age: int) -> None:
        self._db = db
        self.max_age = max_age  # a session older than this is gone whatever the cookie says

    async def open(self, kind: Kind, name: str) -> str:
        """A new session; returns the token for the cookie. Expired rows are swept here (logins are
        rare, so this bounds the table without a timer)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = int(time.time())
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM web_sessions WHERE created_at < ?", (now - self.max_age,))
            await tx.execute(
                "INSERT INTO web_sessions (token_hash, kind, name, created_at) VALUES (?, ?, ?, ?)",
                (_hash(token), kind, name, now),
            )
        return token

    async def get(self, token: str) -> WebSession | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        row = await self._db.fetchone(
            "SELECT kind, name, created_at FROM web_sessions WHERE token_hash = ?", (_hash(token),)
        )
        if row is None or int(row["created_at"]) < time.time() - self.max_age:
            return None
        kind: Kind = "admin" if row["kind"] == "admin" else "mailbox"
        return WebSession(kind, str(row["name"]), int(row["created_at"]))

    async def end(self, token: str) -> None:
        if token and len(token) <= MAX_TOKEN_CHARS:
            await self._db.execute("DELETE FROM web_sessions WHERE token_hash = ?", (_hash(token),))

    async def end_all(self, kind: Kind, name: str) -> None:
        async with self._db.transaction() as tx:
            await end_account_sessions(tx, kind, name)

    async def count(self, kind: Kind, name: str) -> int:
        row = await self._db.fetchone(
            "SELECT COUNT(*) AS n FROM web_sessions WHERE kind = ? AND name = ?", (kind, name)
        )
        return int(row["n"]) if row else 0
