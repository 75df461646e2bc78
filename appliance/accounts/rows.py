"""What the modules of the accounts package share on the database."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import aiosqlite


def now() -> int:
    """Unix seconds, as the created_at columns keep them."""
    return int(time.time())


async def one(
    tx: aiosqlite.Connection, sql: str, params: Sequence[Any] | dict[str, Any] = ()
) -> sqlite3.Row | None:
    """The first row of a query inside a transaction, or None."""
    async with tx.execute(sql, params) as cur:
        return await cur.fetchone()
