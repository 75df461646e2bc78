"""The per-message cache of what IMAP clients fetch for their message lists (issue 19), kept in the
`message_cache` table next to the message rows (migration 0016). Dovecot's dovecot.index.cache is
the model: a second session, or the box after a restart, answers FETCH ENVELOPE / BODYSTRUCTURE /
BODY.PEEK[HEADER.FIELDS (...)], header SEARCH and SORT without reading the message files.

The store does not know what the values mean (the IMAP layer renders them, appliance/imap/
fetch_cache.py); it keeps them per message and ties each row to the file it was computed from
(size, modification time, inode): a file changed behind the box's back no longer matches and is
described again (checked by a stat, or vouched for by an inotify watch since one: file_watch.py). Rows are written with the message row at delivery and APPEND (one transaction,
index.Change.cache), and after a FETCH that had to read files another program wrote.

Why letterbox.db and not a file per folder: the row goes with its message row through a foreign
key (an expunge or a folder removal needs no second bookkeeping), delivery writes both in the one
transaction it already commits, and the WAL lets the reader connection here work from the worker
threads while the event loop's connection writes. Rows are about 1.1 KB, in a table with rowids
(migration 0022: a WITHOUT ROWID table's page holds at most 1,002 octets of a row, the rest went to
an overflow page of its own, 4.3 KB of database a message against 1.5 KB now); SQLite's page cache
(2 MB per connection) and the newest RECENT_ROWS rows (remember) are the only memory they take,
however large the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from appliance.db import Database
from appliance.store.file_watch import FileWatch, FolderCheck

log = logging.getLogger("letterbox.store")

# Bumped when what the IMAP layer puts in a row changes (a rendering fix): rows of another version
# are described again at their next use.
CACHE_VERSION = 2  # 2: ENVELOPE of '""@b', of a comment inside an addr-spec, of empty route entries
READ_BATCH = 500  # UIDs per SELECT (SQLite allows 32,766 parameters)
KEEP_BATCH = 64  # rows per transaction of a filler (keep)
# Rows per transaction of learn: a transaction of more than SQLite's page cache (2 MB: about 1,800
# rows) spills pages before its commit. Alone, with the box's schema: 50-60 us of CPU a row in one
# transaction of 8,600 rows (a shared FETCH's end), 34-35 in transactions of 64 or 500 (issue 19).
LEARN_WRITE = 500
PREFILL_GROWTH = 20  # messages a folder may gain before its rows are looked at again at a SELECT
# Rows of the newest messages (delivered or APPENDed: described in memory anyway) kept in memory too,
# at about 1.1 KB each: a FETCH of a few of them is answered on the event loop, with no trip to a
# worker thread and no SQL (MessageCache.recent; issue 19, imaptest's stress mode).
RECENT_ROWS = 512

FileStamp = tuple[int, int, int]  # (size, mtime in ns, inode) of a message file


def stamp_of(st: os.stat_result) -> FileStamp:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class CachedMessage(NamedTuple):
    """What the cache holds for one message file (rendered IMAP values, opaque to the store). A
    named tuple: a FETCH of a 10k folder makes 10k of them, and a frozen dataclass's init was a
    tenth of answering it from the cache (issue 19)."""

    stamp: FileStamp
    envelope: bytes
    bodystructure: bytes
    body: bytes
    fields: bytes  # the cached header fields, as BODY[HEADER.FIELDS (...)] renders them
    # Parsing `fields` gives the same values as parsing the whole header (SEARCH and SORT may use
    # them): the header has CRLF line ends, no line that stops the parser, and is not truncated.
    exact: bool = False
    # What SEARCH SUBJECT looks in (migration 0019: the Subject values decoded and casefolded, joined
    # by NUL); None when `fields` are not exact. Not read back with the row: SEARCH reads it alone.
    subject: str | None = None

    def row(self, folder_id: int, uid: int) -> tuple[int | bytes | str | None, ...]:
        return (folder_id, uid, CACHE_VERSION, *self.stamp, self.envelope, self.bodystructure, self.body,
                self.fields, int(self.exact), self.subject)


INSERT_SQL = (
    "INSERT OR REPLACE INTO message_cache (folder_id, uid, version, file_size, file_mtime_ns, file_inode,"
    " envelope, bodystructure, body, fields, fields_exact, search_subject)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# COPY and MOVE: the new message's row is the source's (the file is a hard link or the same file
# renamed; a real copy has another inode, and its row is described again at first use).
CARRY_SQL = (
    "INSERT OR REPLACE INTO message_cache (folder_id, uid, version, file_size, file_mtime_ns, file_inode,"
    " envelope, bodystructure, body, fields, fields_exact, search_subject) SELECT ?, ?, version, file_size,"
    " file_mtime_ns, file_inode, envelope, bodystructure, body, fields, fields_exact, search_subject FROM message_cache"
    " WHERE folder_id = ? AND uid = ?"
)
# A row learned at FETCH time may meet a message expunged meanwhile: only rows whose message is
# still there are written (the foreign key would refuse the others and the whole batch with them).
_LEARN_SQL = (
    "INSERT OR REPLACE INTO message_cache (folder_id, uid, version, file_size, file_mtime_ns, file_inode,"
    " envelope, bodystructure, body, fields, fields_exact, search_subject) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
    " WHERE EXISTS (SELECT 1 FROM messages WHERE folder_id = ?1 AND uid = ?2)"
)
_ALL_COLUMNS = "uid, file_size, file_mtime_ns, file_inode, envelope, bodystructure, body, fields, fields_exact"
_FIELD_COLUMNS = "uid, file_size, file_mtime_ns, file_inode, x'', x'', x'', fields, fields_exact"
_SELECT_SQL = "SELECT {} FROM message_cache WHERE folder_id = ? AND version = ? AND uid IN ({})"
# A chunk of UIDs with few gaps (FETCH 1:*) is read as one range of the primary key, which SQLite
# walks in order, instead of a look-up per UID; the rows of UIDs not asked for are dropped.
_RANGE_SQL = "SELECT {} FROM message_cache WHERE folder_id = ? AND version = ? AND uid BETWEEN ? AND ?"
_SUBJECT_COLUMNS = "uid, file_size, file_mtime_ns, file_inode, search_subject"
# Whether the subject text holds the needle, decided by SQLite (instr: an exact substring of the
# text, as Python's `in`; the needle holds no NUL, so none of the NULs joining the values is in a match).
_SUBJECT_SCAN_SQL = ("SELECT uid, file_size, file_mtime_ns, file_inode, instr(search_subject, ?) > 0 FROM message_cache"
                     " WHERE folder_id = ? AND version = ? AND uid BETWEEN ? AND ? AND search_subject IS NOT NULL")
# Rows of a subject_scan per read (and per hold of the reader connection's lock). Fewer than the
# allocations that start a young garbage collection (700 by default; a row is a tuple the collector
# tracks, freed with its batch): with 4,096, 100k rows made ~47 young and 5 middle collections,
# whose survivors (the batch's rows) went on to the oldest generation and brought on a collection
# of the whole heap (after a 100k FETCH, hundreds of milliseconds in the SEARCH after it); with 256
# none, and the reads cost no more (issue 19).
SCAN_BATCH = 256
_STAMP_COLUMNS = "uid, file_size, file_mtime_ns, file_inode"
_HAS_SUBJECT = " AND search_subject IS NOT NULL"


_HIGHEST_SQL = "SELECT max(uid) FROM message_cache WHERE folder_id = ?"
_STAMPS_SQL = ("SELECT uid, file_size, file_mtime_ns, file_inode FROM message_cache"
               " WHERE folder_id = ? AND version = ? AND uid BETWEEN ? AND ?")


def current_stamps(conn: sqlite3.Connection, folder_id: int, low: int, high: int) -> dict[int, FileStamp]:
    """The stamps of the rows of the current version for the UIDs from `low` to `high`: what a
    filler (appliance/imap/fetch_cache.fill_rows) compares with the files before describing them.
    Blocking, on the caller's own connection (worker_db)."""
    rows = conn.execute(_STAMPS_SQL, (folder_id, CACHE_VERSION, low, high))
    return {uid: (size, mtime, inode) for uid, size, mtime, inode in rows}


def _insert_rows(folder_id: int, rows: Sequence[tuple[int, CachedMessage]], conn: sqlite3.Connection) -> None:
    """MessageCache.learn's statement, on the database's thread (Database.write)."""
    conn.executemany(_LEARN_SQL, [c.row(folder_id, uid) for uid, c in rows])


def keep(conn: sqlite3.Connection, folder_id: int, rows: Sequence[tuple[int, CachedMessage]]) -> int:
    """Write rows computed from the files on the caller's own connection (worker_db), KEEP_BATCH
    to a transaction so the write lock the box's deliveries wait for is held briefly (as the
    full-text indexer does), rows of messages expunged meanwhile left out; returns how many were
    kept."""
    kept = 0
    for start in range(0, len(rows), KEEP_BATCH):
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.executemany(_LEARN_SQL, [c.row(folder_id, uid) for uid, c in rows[start:start + KEEP_BATCH]])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        kept += max(done.rowcount, 0)
    return kept


class CacheUnreadable(Exception):
    """The message cache's database cannot be read (MessageCache.subject_scan): answer from the files."""


class MessageCache:
    """Reads from worker threads on a connection of its own (WAL: readers never wait for the
    writer); writes through the box's Database, on the event loop."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._path: Path = db.path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False
        self._fills: set[asyncio.Task[None]] = set()  # rows being computed in the background
        self._prefilling: dict[int, int] = {}  # folder id -> prefills making its missing rows now
        self._answering = 0  # FETCHes answering from rows now (answering_now)
        self._answered = 0.0  # the event loop's clock when the last of them ended
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.watch = FileWatch()  # which rows need no stat of their files (file_watch.py)
        # Folder id -> (UIDVALIDITY, messages) when its rows were last counted for a prefill.
        self._prefilled: dict[int, tuple[int, int]] = {}
        # (folder id, UID) -> the row as it was written, the oldest first (remember). Used on the
        # event loop only, so it needs no lock (the reader connection's is held by worker threads for
        # whole statements).
        self._recent: dict[tuple[int, int], CachedMessage] = {}

    @property
    def path(self) -> Path:
        """The database file, for fillers that write rows from the CPU pool's worker process."""
        return self._path

    def read(self, folder_id: int, uids: Sequence[int], *, fields_only: bool = False) -> dict[int, CachedMessage]:
        """The rows of these messages that there are (any version mismatch left out). Blocking: call
        it from a worker thread. A database that cannot be read gives no rows (the files are read).
        `fields_only`: ENVELOPE, BODYSTRUCTURE and BODY left empty (SEARCH and SORT)."""
        columns = _FIELD_COLUMNS if fields_only else _ALL_COLUMNS
        return {uid: CachedMessage((size, mtime, inode), env, bs, body, fields, bool(exact))
                for uid, size, mtime, inode, env, bs, body, fields, exact in self._select(folder_id, uids, columns)}

    def remember(self, folder_id: int, uid: int, row: CachedMessage) -> None:
        """A row just committed with its message (delivery, APPEND), kept in memory too, the oldest
        of RECENT_ROWS let go. Event loop only."""
        recent = self._recent
        recent[(folder_id, uid)] = row
        if len(recent) > RECENT_ROWS:
            del recent[next(iter(recent))]

    def recent(self, folder_id: int, uids: Sequence[int]) -> list[CachedMessage] | None:
        """The rows remember() kept for all these messages, in their order, or None when one has
        none. Like a row read back, each is still to be checked against its file. Event loop only."""
        recent = self._recent
        rows = [recent.get((folder_id, uid)) for uid in uids]
        return None if None in rows else rows  # type: ignore[return-value]

    def subjects(self, folder_id: int, uids: Sequence[int]) -> dict[int, tuple[FileStamp, str]]:
        """The SEARCH SUBJECT text of these messages' rows (CachedMessage.subject), with the stamp of
        the file each was computed from, where a row has one. Blocking: worker thread."""
        return {uid: ((size, mtime, inode), subject)
                for uid, size, mtime, inode, subject in self._select(folder_id, uids, _SUBJECT_COLUMNS, _HAS_SUBJECT)}

    def subject_scan(self, folder_id: int, low: int, high: int, needle: str) -> Iterator[list[tuple[int, int, int, int, int]]]:
        """(UID, size, mtime, inode, whether the SEARCH SUBJECT text holds `needle`) of the rows with
        a text for the UIDs from `low` to `high`, in UID order, a batch at a time: one statement
        over the folder's span of the covering index (migration 0021), the test made by SQLite, so
        no text becomes a Python string; the lock is held for each batch's read only. Blocking:
        worker thread. CacheUnreadable: the database cannot be read (then nothing it gave counts).
        (A statement per 500 UIDs, each a dict of rows, cost a 100k SEARCH SUBJECT twice this; issue 19.)"""
        if self._broken:
            raise CacheUnreadable
        try:
            with self._lock:
                rows = self._connection().execute(_SUBJECT_SCAN_SQL, (needle, folder_id, CACHE_VERSION, low, high))
            while True:
                with self._lock:
                    batch = rows.fetchmany(SCAN_BATCH)
                if not batch:
                    return
                yield batch
        except sqlite3.Error as exc:
            with self._lock:
                self._unreadable(exc)
            raise CacheUnreadable from exc

    def stamps(self, folder_id: int, uids: Sequence[int]) -> dict[int, tuple[FileStamp]]:
        """The stamps of these messages' rows (each in a 1-tuple, as rows carry theirs first). Blocking."""
        return {uid: ((size, mtime, inode),) for uid, size, mtime, inode in self._select(folder_id, uids, _STAMP_COLUMNS)}

    def _select(self, folder_id: int, uids: Sequence[int], columns: str, where: str = "",
                column_args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """`columns` (the UID first; `column_args` for their parameters) of the rows of these messages
        of the current version, read in chunks. A database that cannot be read gives none (the files
        are read instead)."""
        out: list[tuple[Any, ...]] = []
        if self._broken or not uids:
            return out
        with self._lock:
            try:
                conn = self._connection()
                for start in range(0, len(uids), READ_BATCH):
                    chunk = list(uids[start:start + READ_BATCH])
                    low, high = min(chunk), max(chunk)
                    if high - low < 2 * len(chunk):
                        rows = conn.execute(_RANGE_SQL.format(columns) + where,
                                            (*column_args, folder_id, CACHE_VERSION, low, high))
                        if high - low + 1 > len(chunk):
                            wanted = set(chunk)
                            out += (row for row in rows if row[0] in wanted)
                            continue
                    else:
                        sql = _SELECT_SQL.format(columns, ",".join("?" * len(chunk))) + where
                        rows = conn.execute(sql, (*column_args, folder_id, CACHE_VERSION, *chunk))
                    out += rows
            except sqlite3.Error as exc:
                self._unreadable(exc)
                return []
        return out

    def _unreadable(self, exc: sqlite3.Error) -> None:
        """Not fatal: every answer can be computed from the files. Said once, then left alone. Under
        self._lock."""
        log.warning("store: the message cache cannot be read (%s); message files are read instead", exc)
        self._broken = True
        self._close()

    async def learn(self, folder_id: int, rows: Sequence[tuple[int, CachedMessage]]) -> None:
        """Keep rows computed from the files (a FETCH that found none, or a stale one): a trip to the
        database's thread per LEARN_WRITE rows, the commits not fsynced, as the CPU pool's fillers write theirs
        (`keep`): derived from the files, a row lost in a power cut is computed again. A durable
        commit per 500 rows put an fsync (5-35 ms here) and four thread handoffs on the path of a
        first FETCH ENVELOPE BODYSTRUCTURE (issue 19)."""
        for start in range(0, len(rows), LEARN_WRITE):
            await self._db.write(partial(_insert_rows, folder_id, rows[start:start + LEARN_WRITE]), durable=False)

    def prefill_due(self, folder_id: int, uidvalidity: int, messages: int) -> bool:
        """Whether a folder of this many messages, just selected, is worth looking at for a prefill
        (imap/fetch_render.py): the first time in this box's life, or once it has grown by more than
        a few messages since (mail the box delivered has its rows: files copied in)."""
        last = self._prefilled.get(folder_id)
        if last is not None and last[0] == uidvalidity and messages <= last[1] + PREFILL_GROWTH:
            return False
        self._prefilled[folder_id] = (uidvalidity, messages)
        return True

    async def highest(self, folder_id: int) -> int:
        """The highest UID of a folder with a row (0: none), through the database's thread (after the
        writes queued before). One step down the primary key: files another program put in a folder
        get UIDs above those the box has described, at the listing that first finds them (a count
        of the rows walked all of them: 50-100 ms at 10k, on the thread every command's writes go
        through)."""
        row = await self._db.fetchone(_HIGHEST_SQL, (folder_id,))
        return int(row[0]) if row is not None and row[0] is not None else 0

    def fill(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` (rows computed in the background) as a task of its own: it outlives the
        session that asked for it, and stops when the box does (close)."""
        task = asyncio.get_running_loop().create_task(work)
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)
        return task

    @contextlib.contextmanager
    def prefilling_now(self, folder_id: int) -> Iterator[None]:
        """Said by a SELECT's prefill (imap/fetch_render.py) while it makes a folder's missing rows."""
        self._prefilling[folder_id] = self._prefilling.get(folder_id, 0) + 1
        try:
            yield
        finally:
            self._prefilling[folder_id] -= 1
            if not self._prefilling[folder_id]:
                del self._prefilling[folder_id]

    def prefilling(self, folder_id: int) -> bool:
        """Whether a SELECT's prefill is making this folder's missing rows now."""
        return folder_id in self._prefilling

    def answering_now(self) -> AbstractContextManager[None]:
        """Said by a FETCH (imap/fetch_render.py) while it lasts: a prefill made in this process
        waits for a pause in them (quiet), as bulk work in the CPU pool's worker does
        (last_answer)."""
        return _Answering(self)

    def answer_began(self) -> None:
        self._answering += 1
        self._quiet.clear()

    def answer_ended(self) -> None:
        self._answering -= 1
        self.touched()
        if not self._answering:
            self._quiet.set()

    def touched(self) -> None:
        """A client's command just used a folder (a SELECT): as the end of a FETCH for quiet."""
        self._answered = asyncio.get_running_loop().time()

    async def quiet(self, pause: float) -> None:
        """Wait until no FETCH is answering (answering_now) and none ended, nor a SELECT came
        (touched), for `pause` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await self._quiet.wait()
            wait = self._answered + pause - loop.time()
            if wait <= 0 and self._quiet.is_set():
                return
            await asyncio.sleep(max(wait, 0))

    def last_answer(self) -> float:
        """The event loop's clock when the last FETCH ended (or a SELECT came); now while one is
        answering (cpu_pool.CpuPool.last_answer). (Not while a prefill waits for a pause itself:
        under clients that never pause, the text index would then go one chunk per 30 s.)"""
        if self._answering:
            return asyncio.get_running_loop().time()
        return self._answered

    def close(self) -> None:
        for task in list(self._fills):
            task.cancel()
        self.watch.close()
        with self._lock:
            self._close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Answering:
    """MessageCache.answering_now's context manager: a class, not a generator's, at every FETCH
    (issue 19)."""

    __slots__ = ("_cache",)

    def __init__(self, cache: MessageCache) -> None:
        self._cache = cache

    def __enter__(self) -> None:
        self._cache.answer_began()

    def __exit__(self, *exc: object) -> None:
        self._cache.answer_ended()


@dataclass(frozen=True)
class FolderCache:
    """The cache of one folder (by its row id, never reused), as the IMAP layer uses it."""

    cache: MessageCache
    folder_id: int
    # The folder's files whose rename is queued, at their names before (index.FolderIndex.moved_from:
    # the store's own, kept current): the event loop's reads only.
    moved_from: Mapping[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.cache.path

    def read(self, uids: Sequence[int], *, fields_only: bool = False) -> dict[int, CachedMessage]:
        return self.cache.read(self.folder_id, uids, fields_only=fields_only)

    def recent(self, uids: Sequence[int]) -> list[CachedMessage] | None:
        return self.cache.recent(self.folder_id, uids)

    def subjects(self, uids: Sequence[int]) -> dict[int, tuple[FileStamp, str]]:
        return self.cache.subjects(self.folder_id, uids)

    def subject_scan(self, low: int, high: int, needle: str) -> Iterator[list[tuple[int, int, int, int, int]]]:
        return self.cache.subject_scan(self.folder_id, low, high, needle)

    async def learn(self, rows: Sequence[tuple[int, CachedMessage]]) -> None:
        await self.cache.learn(self.folder_id, rows)

    def stamps(self, uids: Sequence[int]) -> dict[int, tuple[FileStamp]]:
        return self.cache.stamps(self.folder_id, uids)

    def check(self) -> AbstractContextManager[FolderCheck]:
        """A check of rows against their files (file_watch.FileWatch.check). Blocking: worker thread."""
        return self.cache.watch.check(self.folder_id)

    async def highest(self) -> int:
        return await self.cache.highest(self.folder_id)

    def fill(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.cache.fill(work)

    def prefilling_now(self) -> AbstractContextManager[None]:
        return self.cache.prefilling_now(self.folder_id)

    def prefilling(self) -> bool:
        return self.cache.prefilling(self.folder_id)

    def answering_now(self) -> AbstractContextManager[None]:
        return self.cache.answering_now()

    def touched(self) -> None:
        self.cache.touched()

    async def quiet(self, pause: float) -> None:
        await self.cache.quiet(pause)
