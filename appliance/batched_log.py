"""A log table written in batches: the hot path records rows in memory, one transaction writes them.

Used where a record is kept of what happened (spam decisions, the delivery log) and a commit per
record would cost the SMTP path an fsync of its own. The rows ride in the next transaction the box
commits anyway (Database.add_rider: a delivery's index write, one executemany more before its COMMIT),
so a busy box writes them with no lock, transaction or commit of their own; a quiet one writes them
`flush_delay` seconds later in a transaction of their own, not fsynced either
(Database.transaction(durable=False)): the next durable commit carries it to the disk. `record` is synchronous and never touches the
database; rows are written `flush_delay` seconds after the first of them (at once when `batch` are
waiting). A crash loses at most those few seconds of log, never mail: nothing depends on these rows.
At most `max_pending` rows wait (a flood cannot grow memory); beyond that the oldest are dropped and
counted. Readers call `settle()` first, so they see every row recorded before the call. Rows older
than `keep_days()` (read live: a setting) are deleted at most once an hour, by a flush, and a table
keeps at most `max_rows`, the newest (checked every CAP_EVERY rows written): the network chooses how
many rows come (a flood of greylisted RCPTs wrote 264 spam decisions a second, kept 30 days: hundreds of
millions of rows before any was old enough to go).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from appliance.db import Database
from appliance.every import Every

log = logging.getLogger("letterbox.batched_log")

T = TypeVar("T")

FLUSH_DELAY = 2.0
FLUSH_BATCH = 200
MAX_PENDING = 5000
PRUNE_EVERY = 3600.0
MAX_ROWS = 500_000  # about 100 MB of a log table; a family box writes a few hundred rows a day
CAP_EVERY = 1000  # rows written between two looks at the table's size


def cut(text: str, limit: int) -> str:
    """Bounded text for a log column: the network chooses most of what is logged."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class BatchedLog(Generic[T]):
    """The batched writer of one table: `insert` takes the tuple `to_row(entry)` gives; the table has an
    integer `at` column (Unix seconds) that pruning compares and an integer primary key `id`, in the
    order written, that the cap compares."""

    def __init__(self, db: Database, table: str, insert: str, to_row: Callable[[T], Sequence[object]], *,
                 keep_days: Callable[[], int] = lambda: 30, clock: Callable[[], float] = time.time,
                 flush_delay: float = FLUSH_DELAY, batch: int = FLUSH_BATCH, max_pending: int = MAX_PENDING,
                 max_rows: int = MAX_ROWS) -> None:
        self._db = db
        self._table = table
        self._insert = insert
        self._to_row = to_row
        self._keep_days = keep_days
        self._clock = clock
        self._flush_delay = flush_delay
        self._batch = batch
        self._max_pending = max_pending
        self._max_rows = max_rows
        self._cap_every = Every(CAP_EVERY)  # the first write after a start looks at the table
        self._cap = f"DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - ?"  # noqa: S608  table name is ours
        self._pending: deque[T] = deque()
        self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[int] | None = None
        self._last_prune = 0.0
        self._closed = False
        db.add_rider(self._ride)

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def record(self, entry: T) -> None:
        """Remember one row; written within flush_delay seconds. Never blocks, never raises."""
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(entry)
        self._schedule(now=len(self._pending) >= self._batch)

    def _schedule(self, *, now: bool) -> None:
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next flush() or close() writes it
        if now:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._start_flush()
        elif self._timer is None and (self._flushing is None or self._flushing.done()):
            self._timer = loop.call_later(self._flush_delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self.flush())

    def _values(self, batch: list[T]) -> list[tuple[object, ...]]:
        return [tuple(self._to_row(entry)) for entry in batch]

    def _ride(self) -> Callable[[sqlite3.Connection], None] | None:
        """Write what waits inside a transaction someone else is committing (Database.add_rider): the
        rows are taken here, on the event loop; the returned write runs on the database's thread."""
        if not self._pending:
            return None
        batch = list(self._pending)
        self._pending.clear()
        values = self._values(batch)
        cap = self._cap_every.due(len(values))

        def write(conn: sqlite3.Connection) -> None:
            try:
                conn.executemany(self._insert, values)
                if cap:
                    conn.execute(self._cap, (self._max_rows,))
            except Exception:  # a failed statement is rolled back alone: the host transaction commits
                log.exception("could not write %d rows of %s", len(values), self._table)

        return write

    async def flush(self) -> int:
        """Write every waiting row in one transaction (and prune when due); returns how many."""
        written = 0
        while self._pending or self._clock() - self._last_prune >= PRUNE_EVERY:
            batch: list[T] = []
            try:
                # Not fsynced on its own: the next delivery's commit carries these rows to the disk.
                async with self._db.transaction(durable=False) as tx:
                    # Taken with the lock held: rows a delivery's transaction took meanwhile came first.
                    batch = list(self._pending)
                    self._pending.clear()
                    if batch:
                        await tx.executemany(self._insert, self._values(batch))
                    if self._cap_every.due(len(batch)):
                        await tx.execute(self._cap, (self._max_rows,))
                    now = self._clock()
                    if now - self._last_prune >= PRUNE_EVERY:
                        self._last_prune = now
                        await tx.execute(f"DELETE FROM {self._table} WHERE at < ?", (self._cutoff(now),))  # noqa: S608  table name is ours
            except Exception:
                log.exception("could not write %d rows of %s", len(batch), self._table)
                return written
            written += len(batch)
        if self._pending and not self._closed:
            self._schedule(now=False)
        return written

    def _cutoff(self, now: float) -> int:
        return int(now - max(self._keep_days(), 0) * 86400)

    async def prune(self) -> int:
        """Delete the rows older than the setting now; returns how many."""
        await self.settle()
        async with self._db.transaction() as tx:
            self._last_prune = self._clock()
            cursor = await tx.execute(f"DELETE FROM {self._table} WHERE at < ?", (self._cutoff(self._last_prune),))  # noqa: S608  table name is ours
            return int(cursor.rowcount)

    async def close(self) -> None:
        """Write what waits and stop scheduling (the box is stopping; the db closes next)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.settle()
        self._db.remove_rider(self._ride)

    async def settle(self) -> None:
        """Every row recorded so far is in the database when this returns."""
        if self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)
        await self.flush()
        await self._db.writes_done()  # rows that rode in a delivery's transaction are committed with it
