"""The one SQLite database of the box: aiosqlite in WAL mode, transactions, migrations."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import re
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

# DatabaseError lives in a module of its own (the CLI catches it without importing this one): re-exported.
from appliance import waits
from appliance.db_errors import DatabaseError as DatabaseError

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# A migration that rebuilds a table (SQLite cannot change a column's definition in place) asks for
# this on its first line: foreign keys are off while it runs, so dropping the old table does not
# cascade into the tables that refer to it, and checked before it commits.
FOREIGN_KEYS_OFF = "-- letterbox: foreign-keys-off"
# The database and its -wal/-shm hold password hashes and the relay password: no other local user
# may read them (issue 11 item 6).
DB_FILE_MODE = 0o600


DURABLE_SYNC = "FULL"  # every commit fsyncs the WAL, unless a transaction says it need not
# The size a WAL file is cut back to when it starts over. Without a limit SQLite leaves it at its
# high-water mark: 30-70 MB after the first FETCH of a 100k folder copied in (issue 19).
WAL_SIZE_LIMIT = 16 * 1024 * 1024


T = TypeVar("T")
# A writer riding in other transactions (Database.add_rider): called on the event loop when one is
# about to commit, it returns what to run on the database's thread before the COMMIT, or None.
Rider = Callable[[], "Callable[[sqlite3.Connection], None] | None"]


def migrations_dir() -> Path:
    """The migrations shipped with the code: the source tree, else the installed data files."""
    here = Path(__file__).resolve().parent.parent / "migrations"
    if here.is_dir():
        return here
    installed = Path(sys.prefix) / "share" / "letterbox" / "migrations"
    if installed.is_dir():
        return installed
    raise DatabaseError(f"migrations folder not found (looked in {here} and {installed})")


def load_migrations(folder: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in order; gaps are an error."""
    folder = folder or migrations_dir()
    found: list[tuple[int, str, str]] = []
    for path in sorted(folder.iterdir()):
        m = _MIGRATION_NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path.name, path.read_text(encoding="utf-8")))
    for expected, (version, name, _) in enumerate(found, start=1):
        if version != expected:
            raise DatabaseError(f"migration {name} is out of sequence (expected {expected:04d})")
    return found


class Database:
    """One aiosqlite connection; writes are serialised through `transaction()`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._write_lock = waits.lock("db write")
        # Bumped by every settings write through this connection: SQLite's data_version only sees
        # other connections' commits, and appliance/settings.py checks both before using its cache.
        self.settings_generation = 0
        # Writes that ride along in whatever transaction commits next (the batched logs): they cost
        # no lock, transaction or commit of their own (appliance/batched_log.py).
        self._riders: list[Rider] = []
        self.counters = ChangeCounters(path)
        self._wal_fd: int | None = None  # sync_log's descriptor of the WAL
        self._wal_lock = threading.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True, migrations: Path | None = None) -> Database:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # SQLite creates the db, -wal and -shm with 0644 minus the umask: a umask of 077 around the
        # first statements makes them 0600 from the start; files of an older version are chmodded.
        # The umask is process-wide, so it is set only while the files are being made.
        old_umask = os.umask(0o077)
        try:
            conn = await aiosqlite.connect(str(path), isolation_level=None)
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("SELECT COUNT(*) FROM sqlite_master")  # opens the -wal and -shm
        finally:
            os.umask(old_umask)
        secure_db_files(path)
        await conn.execute(f"PRAGMA synchronous={DURABLE_SYNC}")  # acknowledged mail must survive power loss
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db = cls(conn, path)
        if migrate:
            try:
                await db.migrate(load_migrations(migrations))
            except BaseException:
                await conn.close()
                raise
        return db

    async def close(self) -> None:
        self.counters.close()
        await self._conn.close()
        with self._wal_lock:
            self._closed = True
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    async def sync_log(self) -> None:
        """Every commit made so far durable: an fdatasync of the WAL, what a durable commit does itself
        (synchronous=FULL), but on a worker thread. A commit made with durable=False and then this is
        durable when this returns, and the database's thread went on with the writes queued behind the
        commit meanwhile: a delivery's fsync held up every flag change and expunge queued after it
        (imaptest's stress mode: APPEND 41 % and STORE 24 % of its clients' time, issue 19). In WAL mode
        recovery keeps the frames up to the last commit that reached the disk, in order: a later commit
        synced covers the earlier ones (https://sqlite.org/wal.html)."""
        await asyncio.to_thread(self._sync_wal)

    def _sync_wal(self) -> None:
        wal = f"{self.path}-wal"
        with self._wal_lock:  # (never closed under an fdatasync of another thread)
            if self._closed:  # (a sync after close() would open the WAL again, and keep it open)
                raise OSError(errno.EBADF, "the database is closed")
            fd = self._wal_fd
            if fd is None or os.fstat(fd).st_ino != os.stat(wal).st_ino:  # a WAL made anew: its file
                if fd is not None:
                    os.close(fd)
                    self._wal_fd = None
                fd = self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            os.fdatasync(fd)

    async def schema_version(self) -> int:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL DEFAULT (strftime('%s','now')))"
        )
        async with self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self, migrations: Sequence[tuple[int, str, str]]) -> int:
        """Apply the migrations the db lacks, each in its own transaction; return the new version."""
        current = await self.schema_version()
        known = len(migrations)
        if current > known:
            raise DatabaseError(
                f"database {self.path} is at schema version {current}, newer than this Letterbox "
                f"(knows up to {known}); upgrade Letterbox or restore a matching backup"
            )
        for version, name, sql in migrations[current:]:
            rebuild = sql.lstrip().startswith(FOREIGN_KEYS_OFF)
            if rebuild:  # a no-op inside a transaction, so before BEGIN
                await self._conn.execute("PRAGMA foreign_keys=OFF")
            try:
                async with self.transaction() as tx:
                    # executescript would COMMIT on its own; split statements to stay in our transaction.
                    for statement in _split_sql(sql):
                        await tx.execute(statement)
                    if rebuild:
                        async with tx.execute("PRAGMA foreign_key_check") as cur:
                            broken = list(await cur.fetchall())
                        if broken:
                            raise DatabaseError(
                                f"migration {name} would leave {len(broken)} broken reference(s), e.g. in table"
                                f" {broken[0][0]}; nothing was changed"
                            )
                    await tx.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (version, name))
            finally:
                if rebuild:
                    await self._conn.execute("PRAGMA foreign_keys=ON")
            log.info("migration applied: %s", name)
        return known

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception. Writers queue on one lock.

        `durable=False` is for rows nothing depends on (the delivery log, the spam decisions): the
        commit is not fsynced (synchronous=NORMAL for this one commit). In WAL mode the next durable
        commit's fsync of the WAL carries these frames too, and a crash before it loses only them:
        recovery stops at the first frame that did not reach the disk, after every durable one
        (https://sqlite.org/pragma.html#pragma_synchronous, https://sqlite.org/wal.html)."""
        async with self._write_lock:
            if not durable:
                await self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise
                else:
                    await self._on_db_thread(partial(_ride_and_commit, self._rider_work(), self.counters.committed))
                    self.counters.forget_tick()  # the counters may have moved (ChangeCounters.read_this_tick)
            finally:
                if not durable:
                    await self._conn.execute(f"PRAGMA synchronous={DURABLE_SYNC}")

    async def write(self, work: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """A whole transaction in one trip to the database's thread: BEGIN IMMEDIATE, `work(conn)`
        (plain sqlite3 calls, no await in between), the riders, COMMIT; rolled back on any
        exception. For the hot writers (a group commit of deliveries): each trip is a thread handoff
        and an event-loop wakeup, and `transaction()` makes one per statement (issue 19: seven per
        group commit). `durable` as for transaction()."""
        async with self._write_lock:
            try:
                return await self._on_db_thread(
                    partial(_whole_transaction, work, self._rider_work(), self.counters.committed, durable))
            finally:
                self.counters.forget_tick()  # the counters may have moved (ChangeCounters.read_this_tick)

    async def write_queued(self, work: Callable[[sqlite3.Connection], T], *, durable: bool = True,
                           gate: tuple[threading.Event, float] | None = None,
                           transaction: bool = True) -> asyncio.Future[T]:
        """write() without waiting for the transaction: once this returns it is queued on the
        database's thread ahead of every write and read asked for later, which run after it (the
        thread takes its jobs in order, and each is a whole transaction), and the future gives its
        result or exception. The write lock is held only to queue it, for the transaction() under
        way, if any, to end first: a writer that comes next queues behind it without waiting for it
        (a pipelined STORE's, store/index.py commit_pipelined). For work whose result is not needed
        at once (a first listing's rows, commit_queued; flag changes and expunges, commit_pipelined).
        `gate`: (event, seconds): the thread waits for the event (that many seconds at most) before
        it begins the transaction. Without `transaction`, `work` runs alone, in order with the
        writes (files only: a claim's renames, store/index.py commit_pipelined)."""
        async with self._write_lock:
            # aiosqlite's Connection._execute without its await: putting it on the queue is what orders it.
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            conn = self._conn._conn
            if not self._conn._running or conn is None:  # as aiosqlite's own calls check
                raise ValueError("Connection closed")
            job = (partial(_whole_transaction, work, self._rider_work(), self.counters.committed, durable, conn)
                   if transaction else partial(work, conn))
            self._conn._tx.put_nowait((future, job if gate is None else partial(_after, gate, job)))

        def finished(_: asyncio.Future[T]) -> None:
            self.counters.forget_tick()  # the counters may have moved (ChangeCounters.read_this_tick)

        future.add_done_callback(finished)
        return future

    async def _on_db_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        # aiosqlite's queue to its thread with the sqlite3 connection it owns (aiosqlite >= 0.20 keeps
        # both; its public calls are one statement per trip).
        return await self._conn._execute(work, self._conn._conn)  # type: ignore[no-untyped-call,no-any-return]  # aiosqlite leaves it unannotated

    def _rider_work(self) -> list[Callable[[sqlite3.Connection], None]]:
        """What each rider hands over for the transaction about to commit (taken on the event loop)."""
        return [work for rider in list(self._riders) if (work := rider()) is not None]

    def add_rider(self, rider: Rider) -> None:
        """`rider()` is called on the event loop in every transaction about to commit (with the write
        lock held); the function it returns, if any, runs on the database's thread just before the
        COMMIT. It must never raise: a failure of its own is its to log (a statement that fails is
        rolled back alone; the transaction it rides in commits). What it took is lost if the host
        transaction fails: riders carry rows nothing depends on (the batched logs)."""
        self._riders.append(rider)

    async def writes_done(self) -> None:
        """Returns once the transactions under way or queued (write_queued) have committed or
        rolled back."""
        async with self._write_lock:
            await self._on_db_thread(_nothing)  # the thread's queue is in order: behind every one queued

    def remove_rider(self, rider: Rider) -> None:
        if rider in self._riders:
            self._riders.remove(rider)

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One write statement in its own transaction; returns lastrowid."""
        async with self.transaction() as tx:
            cur = await tx.execute(sql, params)
            return cur.lastrowid or 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        """The first row of a query that has at most one (a key lookup): the whole result is read."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        # One trip to aiosqlite's thread (execute, fetch and close are three): each trip is a
        # thread handoff and a wakeup of the event loop, the cost that counts on a loaded box
        # (issue 19: a delivery made 25 of them).
        return list(await self._conn.execute_fetchall(sql, params))

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """work(connection) on the database's thread, for a read of several statements in one trip,
        or of many rows wanted as plain tuples (a cursor's row_factory = None): no write, no
        transaction left open."""
        return await self._on_db_thread(work)

    async def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = await self.fetchone("SELECT value FROM settings WHERE key = ?", (key,))
        return str(row["value"]) if row else default

    async def set_setting(self, key: str, value: str) -> None:
        await self.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
        self.settings_generation += 1


def _ride_and_commit(riders: list[Callable[[sqlite3.Connection], None]],
                     committed: Callable[[sqlite3.Connection], None], conn: sqlite3.Connection) -> None:
    for work in riders:
        work(conn)
    conn.execute("COMMIT")
    committed(conn)


def _nothing(_: sqlite3.Connection) -> None:
    return None


def _after(gate: tuple[threading.Event, float], job: Callable[[], T]) -> T:
    gate[0].wait(gate[1])
    return job()


def _whole_transaction(work: Callable[[sqlite3.Connection], T], riders: list[Callable[[sqlite3.Connection], None]],
                       committed: Callable[[sqlite3.Connection], None], durable: bool, conn: sqlite3.Connection) -> T:
    """Database.write on the database's thread."""
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            _ride_and_commit(riders, committed, conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
    finally:
        if not durable:
            conn.execute(f"PRAGMA synchronous={DURABLE_SYNC}")


class ChangeCounters:
    """The change counters of migration 0018, read without a trip to aiosqlite's thread: a cache
    on a hot path (the accounts an SMTP RCPT resolves, the settings every message reads) checks its
    counter at each use, so a change committed by any connection is seen at once, at the cost of
    one indexed read of a tiny table (microseconds) instead of a thread handoff and a wakeup of the
    event loop per look-up (issue 19: eight of them per SMTP message).

    The read runs on the caller's thread, on a connection of its own that never writes: in WAL mode
    a reader neither waits for nor blocks the writer (https://sqlite.org/wal.html), and the busy
    timeout is short; None (unknown: the caller reads the database) when the read fails for any
    reason, e.g. a database not yet migrated to 0018.

    Most uses need no statement at all: the first copy of the WAL-index header, at the start of the
    -shm file every connection to the database maps (https://sqlite.org/walformat.html, "The
    WAL-Index Header"), is rewritten by every commit of any connection of any process (its frame
    count, salts and checksum move). The counters read after a copy of it are still current while
    it has not changed, and comparing 48 mapped octets takes no system call and keeps the GIL: a
    statement gave it up and waited to get it back behind the worker threads, ~1.2 times per IMAP
    command under imaptest's stress mode (issue 19)."""

    BUSY_TIMEOUT = 0.05  # seconds; a reader only waits in WAL recovery, and then None is the answer
    WAL_INDEX_HEADER = 48  # octets: the header's first copy (walformat.html, "The WAL-Index Header")

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # the loop thread in the box; a test may call from another
        # The -shm file's start, mapped once this process's reader holds it open (SQLite truncates it
        # only when no connection has it); None where it cannot be (no WAL: then the rule below).
        self._shm: _Mapped | None = None
        # (the WAL-index header, the counters read after it): one value, replaced whole.
        self._known: tuple[bytes, dict[str, int]] | None = None
        # read_this_tick's answers, for the one event loop iteration they were read in (without
        # the header only).
        self._tick: dict[str, int] = {}
        self._tick_loop: asyncio.AbstractEventLoop | None = None

    def read_this_tick(self, name: str) -> int | None:
        """The counter, from memory while no commit was made anywhere since it was read (the
        WAL-index header is unchanged), else read().

        Without the header: read(), asked at most once per iteration of the running event loop: an
        IMAP command read the accounts counter three times (the session's check that its mailbox
        still exists, then each store call's look-up of the mailbox), each a statement that gives up
        the GIL and waits to get it back behind the worker threads (issue 19). A coroutine whose
        commit (on aiosqlite's thread, through any connection of this process) was awaited is
        resumed in an iteration that began after the commit, so what is kept in that iteration was
        read after it; this connection's commits (transaction(), write()) drop what was kept all the
        same. A change another process commits is seen from the next iteration on, as by a read a
        moment earlier."""
        known = self._current()
        if known is not None:
            return known.get(name)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self.read(name)
        if loop is self._tick_loop and self._tick:
            return self._tick.get(name)
        # Every counter in one statement: the accounts and the settings counters are asked for in
        # the same iteration (an SMTP DATA: the checks' settings, the content filter's, the mailbox).
        found = self.read_all()
        if found and self._shm is None:
            self._tick = found
            self._tick_loop = loop
            loop.call_soon(self.forget_tick)
        return found.get(name)

    def committed(self, conn: sqlite3.Connection) -> None:
        """On the database's thread, just after this process's COMMIT on `conn`: the counters as it
        left them, kept under the WAL-index header read first (as _select does), so the event loop
        finds them current instead of making a statement of its own. Under imaptest's stress mode
        every STORE, EXPUNGE and APPEND commits, and the next command's look-up of its mailbox then
        made that statement on the loop, giving the GIL up (issue 19)."""
        with self._lock:  # (close() unmaps it)
            if self._shm is None:  # not mapped yet (the reader's first statement maps it), or no WAL
                return
            header = self._shm.raw
        try:
            rows = conn.execute("SELECT name, n FROM change_counters").fetchall()
        except sqlite3.Error:  # not migrated to 0018 yet: the loop reads as before
            return
        with self._lock:
            if self._shm is not None:  # (not closed meanwhile)
                self._known = (header, {str(name): int(n) for name, n in rows})

    def _current(self) -> dict[str, int] | None:
        """The counters last read, if no commit was made since (None: unknown)."""
        known, shm = self._known, self._shm
        if known is None or shm is None:
            return None
        return known[1] if shm.raw == known[0] else None

    def forget_tick(self) -> None:
        self._tick.clear()

    def read(self, name: str) -> int | None:
        return self._select("SELECT name, n FROM change_counters WHERE name = ?", (name,)).get(name)

    def read_all(self) -> dict[str, int]:
        """Every counter by name; empty when the read fails."""
        return self._select("SELECT name, n FROM change_counters", ())

    def _select(self, sql: str, parameters: tuple[str, ...]) -> dict[str, int]:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = sqlite3.connect(str(self._path), timeout=self.BUSY_TIMEOUT, isolation_level=None,
                                                 check_same_thread=False)
                    self._conn.execute("PRAGMA query_only=ON")
                    self._conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # opens the -shm
                    self._map_shm()
                # The header before the statement: a commit between the two leaves newer counters
                # filed under an older header, which the next look sees moved.
                header = self._shm.raw if self._shm is not None else None
                rows = self._conn.execute(sql, parameters).fetchall()
            except sqlite3.Error:
                return {}
            found = {str(name): int(n) for name, n in rows}
            if header is not None and not parameters:
                self._known = (header, found)
        return found

    def _map_shm(self) -> None:
        """Maps the start of the -shm file once this process's reader has made a statement, through
        the descriptor SQLite holds open for it (found in /proc/self/fd; left unmapped where there
        is none: not a WAL database, not Linux).

        Never through a descriptor of our own: closing any descriptor of a file drops every POSIX
        lock the process holds on it, SQLite's own included, and without its shared lock on the -shm
        another process opening the database takes the file for its first user and truncates it
        (tests/e2e/test_smtp_crash.py caught it). mmap(2) takes no lock and closes nothing; Python's
        mmap would (it closes a duplicate of the descriptor), hence libc's. The reader's connection
        keeps the file open and whole while it is mapped (close() unmaps first)."""
        self._shm = _map_start_of(self._path.with_name(self._path.name + "-shm"), self.WAL_INDEX_HEADER)

    def close(self) -> None:
        with self._lock:
            self._known = None
            if self._shm is not None:  # before the connection: its open -shm keeps the file whole
                _unmap(self._shm)
                self._shm = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_Mapped = ctypes.Array[ctypes.c_char]  # octets of a mapping, read with .raw (a copy, the GIL held)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_start_of(path: Path, octets: int) -> _Mapped | None:
    """The first `octets` of `path` mapped read-only and shared, through a descriptor this process
    already has open for it (none is opened or closed here: ChangeCounters._map_shm says why); None
    when there is none or the file is shorter."""
    try:
        wanted = os.stat(path)
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in descriptors:
        try:
            found = os.fstat(int(name))
        except (OSError, ValueError):
            continue
        if (found.st_dev, found.st_ino) != (wanted.st_dev, wanted.st_ino):
            continue
        if found.st_size < octets:
            return None
        address = _LIBC.mmap(None, octets, mmap.PROT_READ, mmap.MAP_SHARED, int(name), 0)
        if address is None or address == _MAP_FAILED:
            return None
        return (ctypes.c_char * octets).from_address(address)
    return None


def _unmap(mapped: _Mapped) -> None:
    _LIBC.munmap(ctypes.addressof(mapped), ctypes.sizeof(mapped))


def secure_db_files(path: Path) -> None:
    """0600 for the database and its WAL and shared-memory files (made 0644 by an earlier version)."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(DB_FILE_MODE)
        except FileNotFoundError:
            continue


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements with sqlite3.complete_statement (handles quotes, triggers)."""
    statements: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()):
        raise DatabaseError("migration ends with an incomplete statement")
    return statements
