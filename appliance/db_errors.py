"""The database's one-line error, in a module of its own so the CLI can catch it without importing the
database code (aiosqlite, asyncio) for commands that never open it. appliance.db re-exports it."""

from __future__ import annotations


class DatabaseError(Exception):
    """A database problem with a message fit for one line on a terminal."""
