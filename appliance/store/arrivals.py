"""Group commit of deliveries (issue 19): the messages that arrive in a folder together share one
fsync of its directory and one transaction for their index rows.

Each delivery writes and fsyncs its own file in its own worker thread (concurrent fsyncs of
different files join one journal commit of the file system, so they cost about one), renames it
into new/ or cur/ and hands it here. One flush per folder at a time takes every arrival waiting
and, under the folder lock, in one trip to the database's thread: fsyncs each directory they were
renamed into once, then indexes them all in one Change (one SQLite transaction, one WAL fsync). Arrivals during a flush wait for the next one,
so the batch grows with the load and a lone delivery is flushed at once (no timer, no added delay).

Nothing is acknowledged early: `index` returns a UID only after the file, its directory entry and
its row are durable, the order of DESIGN.md's storage rules (file, rename, directory fsync, commit).
A crash before the commit leaves renamed files without rows; the names stay in `pending` until the
flush ends, so no scan of this process adopts them meanwhile, and the next process's first scan
indexes them (a message that was never acknowledged may appear; none acknowledged is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from appliance.db import Database
from appliance.store import index, maildir
from appliance.store.index import Change, FolderIndex
from appliance.store.maildir import WriteJob
from appliance.store.message_cache import CachedMessage
from appliance.store.model import NoSuchFolder, StoreError

log = logging.getLogger("letterbox.store")


@dataclass(eq=False)
class Arrival:
    """A delivered file (fsynced, renamed into place) waiting for its directory fsync and its row."""
    job: WriteJob
    flags: str  # Maildir letters of the system flags
    keywords: tuple[str, ...]
    size: int
    internaldate: int
    wire: int
    cached: CachedMessage | None  # its message cache row, written in the same transaction
    outcome: asyncio.Future[int | StoreError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def path(self) -> Path:
        return self.job.maildir / self.job.sub / self.job.filename


class GroupCommit:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: dict[FolderIndex, list[Arrival]] = {}
        self._flushes: dict[FolderIndex, asyncio.Task[None]] = {}
        self.flushes = 0  # transactions written (for tests)
        self.indexed = 0  # arrivals indexed by them
        self.in_flight = 0  # arrivals handed in and not yet answered
        # When the last arrival was handed in (the loop's clock; 0: none yet): background writers
        # of the same database wait for a pause in the deliveries (imap/fts.py).
        self.last_arrival = 0.0

    async def index(self, f: FolderIndex, arrival: Arrival) -> int | StoreError:
        """The arrival's UID once it is durable, or why not (its file is then removed). The caller
        marked `arrival.job.base` pending in `f`; the flush unmarks it when the row is in memory.
        Shielded: a cancelled caller leaves the flush to finish (the file is indexed all the same)."""
        self._waiting.setdefault(f, []).append(arrival)
        self.in_flight += 1
        self.last_arrival = asyncio.get_running_loop().time()
        arrival.outcome.add_done_callback(self._answered)
        if f not in self._flushes:
            self._flushes[f] = asyncio.get_running_loop().create_task(self._flush(f))
        return await asyncio.shield(arrival.outcome)

    def _answered(self, _: object) -> None:
        self.in_flight -= 1

    async def _flush(self, f: FolderIndex) -> None:
        try:
            while batch := self._waiting.pop(f, None):
                try:
                    await self._commit(f, batch)
                except Exception:
                    log.exception("store: indexing %d deliveries failed; their files are removed", len(batch))
                    await _discard(f, batch, StoreError("cannot index the message"))
        finally:
            del self._flushes[f]

    async def _commit(self, f: FolderIndex, batch: list[Arrival]) -> None:
        async with f.lock:
            if f.deleted:
                await _discard(f, batch, NoSuchFolder(f"folder {f.name} was deleted"))
                return
            change = Change(f)
            entries = [change.add(a.job.base, a.job.sub, a.job.filename, a.flags, a.keywords, a.size,
                                  a.internaldate, wire=a.wire) for a in batch]
            change.cached.extend((e, a.cached) for a, e in zip(batch, entries, strict=True) if a.cached is not None)
            # The renames are durable before any row names them (DESIGN.md: files first, then the
            # db): the directories are fsynced on the database's thread inside the transaction,
            # before its rows are written and it commits, in the same trip (issue 19: a separate
            # trip to a worker thread was 5-7 ms of each batch's latency under load).
            synced = _DirectorySync({a.path.parent for a in batch})
            try:
                await index.commit(self._db, [change], first=synced)
                if not synced.done:  # nothing was written (cannot happen with arrivals): sync anyway
                    await asyncio.to_thread(synced)
            except _SyncFailed as failed:
                log.error("store: syncing %s failed: %s", f.path, failed.error)
                error = StoreError(f"cannot write the message: {failed.error.strerror or failed.error}")
                error.__cause__ = failed.error  # a full disk is told apart by what caused it
                await _discard(f, batch, error)
                return
            self.flushes += 1
            self.indexed += len(batch)
            log.debug("store: %d deliveries to %s indexed in one transaction", len(batch), f.path)
            for arrival, entry in zip(batch, entries, strict=True):
                if entry.sub == "cur":
                    f.unclaimed.add(entry.uid)  # RFC 3501 2.3.2: recent until a session claims it
                f.pending.discard(arrival.job.base)
            if any(entry.sub == "cur" for entry in entries):
                f.invalidate()
        for arrival, entry in zip(batch, entries, strict=True):
            _settle(arrival, entry.uid)


async def _discard(f: FolderIndex, batch: list[Arrival], error: StoreError) -> None:
    """Not indexed: the files go (never acknowledged), then their callers hear why."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(maildir.unlink_files, [a.path for a in batch])
    for arrival in batch:
        f.pending.discard(arrival.job.base)
        _settle(arrival, error)


def _settle(arrival: Arrival, outcome: int | StoreError) -> None:
    if not arrival.outcome.done():
        arrival.outcome.set_result(outcome)


class _SyncFailed(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _DirectorySync:
    """The batch's directory fsyncs, run once (on whichever thread calls it); an OSError comes out
    as _SyncFailed, so a failing disk is told from a failing database."""

    def __init__(self, directories: set[Path]) -> None:
        self._directories = directories
        self.done = False

    def __call__(self) -> None:
        try:
            for directory in self._directories:
                maildir.fsync_dir(directory)
        except OSError as exc:
            raise _SyncFailed(exc) from exc
        self.done = True
