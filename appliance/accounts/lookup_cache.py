"""Answers of the account look-ups every message makes (is the domain ours, where does an address go,
which mailbox row is it), kept while nothing in the accounts changed (issue 19).

An SMTP message made eight database round trips for them (three of `SELECT id FROM domains`, two of
the mailbox row, the alias and mailbox probes of resolve()), each a handoff to aiosqlite's thread
and a wakeup of the event loop: on a loaded box the wakeups, not the queries, are the cost.

Correctness rests on migration 0018's `accounts` counter, raised by a trigger in the transaction of
every change to domains, mailboxes, aliases and alias targets, by whatever connection made it (the
console in this process, `letterbox user add` in another): the counter is read at every look-up
(appliance/db.py ChangeCounters, no round trip), and when it moved everything kept is dropped. An
answer is kept under the counter read before its query, and only while no newer counter has been
seen, so a kept answer is never older than the counter it is filed under. When the counter cannot
be read, every look-up goes to the database as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from appliance.db import ChangeCounters

T = TypeVar("T")

ACCOUNTS_COUNTER = "accounts"
MAX_BYTES = 1 << 20  # a bound on what is kept (estimated): a flood of unknown recipients empties it
_ENTRY_OVERHEAD = 200  # dict slot, tuple key, the value object: roughly, per entry
_MISSING = object()


class LookupCache:
    def __init__(self, counters: ChangeCounters, *, max_bytes: int = MAX_BYTES) -> None:
        self._counters = counters
        self._max_bytes = max_bytes
        self._counter: int | None = None  # the counter the kept answers belong to
        self._entries: dict[tuple[str, str], object] = {}
        self._bytes = 0
        self.hits = 0  # for tests and benchmarks
        self.misses = 0

    async def get(self, kind: str, key: str, load: Callable[[], Awaitable[T]]) -> T:
        """The answer of `load()` for (kind, key), from memory while the accounts are unchanged.
        `load` must return an immutable value (it is shared by every caller)."""
        counter = self._counters.read_this_tick(ACCOUNTS_COUNTER)
        if counter is None:
            return await load()
        if counter != self._counter:
            self._clear()
            self._counter = counter
        found = self._entries.get((kind, key), _MISSING)
        if found is not _MISSING:
            self.hits += 1
            return cast(T, found)
        self.misses += 1
        value = await load()
        if self._counter == counter:  # else a change was seen meanwhile: the answer may be older than it
            size = len(kind) + len(key) + len(repr(value)) + _ENTRY_OVERHEAD
            if self._bytes + size > self._max_bytes:
                self._clear()
            self._entries[(kind, key)] = value
            self._bytes += size
        return value

    def _clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
