"""Group commit of deliveries (issue 19): the messages that arrive in a folder together share one
fsync of its directory and one transaction for their index rows.

Each delivery writes and fsyncs its own file into tmp/ in its own worker thread (concurrent fsyncs
of different files join one journal commit of the file system, so they cost about one) and hands it
here. One flush per folder at a time takes every arrival waiting and, in one trip to the database's
thread: renames them into new/ or cur/, fsyncs each directory they were renamed into once, then
indexes them all in one Change (one SQLite transaction; its WAL fsync then on a worker thread,
index.commit_arrivals). Arrivals during a flush wait
for the next one, so the batch grows with the load and a lone delivery is flushed at once (no timer,
no added delay). The folder lock is held only to take the batch's UIDs and queue its trip, in order
with the folder's other changes (index.commit_arrivals); the messages go into memory, where sessions
see them, once their commit is durable (imaptest's stress mode queued its sessions on the lock
behind each APPEND's fsyncs, issue 19).

The renames are queued under the folder lock, with the directories' stamps taken just before and
just after them, so the folder's stamp moves with its own deliveries (FolderIndex.changed_by_us): the
next NOOP of each session on the folder lists nothing. When the files were renamed in the writer
threads, each on its own, every delivery made the next look at the disk list the whole folder
again (35-43 ms at 20k messages, 0.2-0.25 s of CPU at 100k, per delivery; issue 19).

Nothing is acknowledged early: `index` returns a UID only after the file, its directory entry and
its row are durable, the order of DESIGN.md's storage rules (file, rename, directory fsync, commit).
A crash before the renames leaves files in tmp/, removed at the next start (MailStore.recover);
one between the renames and the commit leaves renamed files without rows, which the next process's
first scan indexes (a message that was never acknowledged may appear; none acknowledged is missing).
The names stay in `pending` until the flush ends, so no scan of this process adopts them meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

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
            # The renames are made and durable before any row names them (DESIGN.md: files first,
            # then the db): on the database's thread inside the transaction, before its rows are
            # written and it commits, in the same trip (issue 19: a separate trip to a worker thread
            # was 5-7 ms of each batch's latency under load). The lock is let go for the trip: the
            # messages go into memory once their commit is durable (index.commit_arrivals).
            placing = _Placing(f, batch, entries)
            written = await index.commit_arrivals(self._db, change, placing, placing.placed)
        try:
            await written
        except _SyncFailed as failed:
            log.error("store: placing deliveries into %s failed: %s", f.path, failed.error)
            await _discard(f, batch, write_error(failed.error))
            return
        self.flushes += 1
        self.indexed += len(batch)
        log.debug("store: %d deliveries to %s indexed in one transaction", len(batch), f.path)
        for arrival, entry in zip(batch, entries, strict=True):
            _settle(arrival, entry.uid)


async def _discard(f: FolderIndex, batch: list[Arrival], error: StoreError) -> None:
    """Not indexed: the files go (never acknowledged), wherever they are, then their callers hear why."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(maildir.unlink_files, [p for a in batch for p in (a.job.tmp, a.job.target)], durable=False)
    for arrival in batch:
        f.pending.discard(arrival.job.base)
        _settle(arrival, error)


def write_error(cause: OSError) -> StoreError:
    """A message that could not be written or placed: what its sender is told, its cause kept."""
    error = StoreError(f"cannot write the message: {cause.strerror or cause}")
    error.__cause__ = cause  # a full disk is told apart by what caused it (appliance/disk_full.py)
    return error


def _settle(arrival: Arrival, outcome: int | StoreError) -> None:
    if not arrival.outcome.done():
        arrival.outcome.set_result(outcome)


class _SyncFailed(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Placing:
    """A batch's renames into new/ or cur/ and their directories' fsyncs, run once, on the database's
    thread before the batch's rows (index.commit_arrivals' `first`); then, on the loop once the rows
    are in memory (placed()), the folder's stamp moves with the renames (FolderIndex.changed_by_us)
    and the names are no longer pending. An OSError comes out as _SyncFailed, so a failing disk is
    told from a failing database; it fails the whole batch (the files renamed already are removed
    with the others, none of them acknowledged)."""

    def __init__(self, f: FolderIndex, batch: list[Arrival], entries: list[index.Entry]) -> None:
        self._folder = f
        self._path = f.path
        self._batch = batch
        self._entries = entries
        self.stamps: tuple[tuple[int, int], tuple[int, int]] | None = None

    def __call__(self) -> None:
        try:
            before = maildir.dir_stamp(self._path)
            for arrival in self._batch:
                os.rename(arrival.job.tmp, arrival.job.target)
            for sub in {arrival.job.sub for arrival in self._batch}:
                maildir.fsync_dir(self._path / sub)
            self.stamps = before, maildir.dir_stamp(self._path)
        except OSError as exc:
            raise _SyncFailed(exc) from exc

    def placed(self) -> None:
        f = self._folder
        if self.stamps is not None:
            f.changed_by_us(*self.stamps)  # the next look lists nothing for these files
        for arrival, entry in zip(self._batch, self._entries, strict=True):
            if entry.sub == "cur":
                f.unclaimed.add(entry.uid)  # RFC 3501 2.3.2: recent until a session claims it
            f.pending.discard(arrival.job.base)
        if any(entry.sub == "cur" for entry in self._entries):
            f.invalidate()
