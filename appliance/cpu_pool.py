"""A small pool of worker processes for CPU-heavy work (SEARCH BODY scans, full-text indexing).

Work run in `asyncio.to_thread` still holds the server's GIL: a 10k SEARCH BODY in one session made
other sessions' NOOP take 143 ms instead of 1.6 ms and SMTP intake fall from ~110 to 3-6 msg/s
(issue 19). A separate process has its own interpreter, so the event loop only waits for the answer.

One worker by default (a Raspberry Pi has four small cores and little RAM), started on first use and
stopped after IDLE_SECONDS without work, with multiprocessing's resource tracker process (their
memory goes back); background and bulk work, and its start, run at a lower CPU priority than the
server, so intake and interactive commands come first, and work a client waits for (a FETCH's
share, a SEARCH scan) or will read next (a SELECT's prefill) on a thread of its own at the server's
priority; it is replaced after MAX_TASKS tasks, so a
leak in a parser cannot grow it for ever. Callers submit bounded chunks (a few hundred messages),
never a whole folder at once: the queue stays fair between sessions and each result is small.
Work a client waits for goes first: background work (cache rows computed after an answer went
out, or for files first seen at a SELECT) is handed to the worker only when no waited-for task is
queued, and bulk work (the full-text index) only when no background task is either, one task per
worker at a time, so a FETCH never waits behind a backlog of indexing chunks (issue 19: the
full-text index of a folder copied in took the worker while Thunderbird's first FETCH of it waited
for rows, and the rows a second session's FETCH then needed were not made meanwhile).
The "spawn" start method: forking a process that runs threads (aiosqlite's) is unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import popen_spawn_posix, resource_tracker, synchronize
from typing import Any, ParamSpec, TypeVar

from appliance import waits

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

WORKERS = 1
# A worker idle this long is stopped. It holds 28-31 MiB RSS fresh or after indexing a 10k folder, and
# the resource tracker beside it 13 MiB (issue 19: RSS after the 100k run <= 120 MB, all processes);
# starting both again costs about 0.45 s of CPU (0.8-1 s wall at load 16) on this machine.
IDLE_SECONDS = 10.0
RETIRE_IDLE_SECONDS = 1.0  # retire_idle: idle this long when a big folder's work is over
MAX_TASKS = 2000  # tasks per worker process before a fresh one replaces it
WORKER_NICE = 10  # below the server: SMTP intake and NOOPs are served first
# Background work waits for a pause of PAUSE_SECONDS in the mail, MAX_DEFER_SECONDS at the most while
# mail keeps arriving (CpuPool.pause).
PAUSE_SECONDS = 0.5
MAX_DEFER_SECONDS = 30.0
WAITED, BACKGROUND, BULK = 0, 1, 2  # the order in which waiting tasks get a worker (CpuPool._waiting)


# Imported with this module, not when the first worker is spawned (its Popen, its queues' locks):
# their code, strings and types are made once at start, among the objects an idle box keeps, not in
# the middle of a big folder's work, where a few of them were alone in pymalloc arenas that would
# otherwise go back to the system when the work is over (issue 19; about 20 KB of RSS at start).
_SPAWN_MODULES = (popen_spawn_posix, synchronize)

_connections: dict[str, sqlite3.Connection] = {}  # the worker process's own, kept between tasks
# A checkpoint of the WAL made by the worker process's commits waits for two fsyncs (the WAL, then the
# database file). Made by SQLite in whichever commit finds more than 1,000 frames in the WAL, it was
# on the path of the worker's row writes: once readers kept the WAL from starting over, every commit
# past that size made one (issue 19: 10k message cache rows, 64 to a commit, spent 0.5-1.5 s of the
# worker's wall time in commits waiting more than 20 ms, 8-15 ms a commit on average, against 0.1-0.2
# ms of CPU). The worker's connection makes none; a thread of the worker process makes them on a
# connection of its own, at most every CHECKPOINT_SECONDS after a task that wrote, while the worker
# goes on (SQLite gives up the GIL in a checkpoint, and a passive one waits for no reader or writer).
CHECKPOINT_SECONDS = 1.0
# Every pool's executors not yet shut down, in this process (one pool in a box; tests run several):
# the resource tracker they share is stopped only when none is left (_stop_resource_tracker).
_live: set[ProcessPoolExecutor] = set()


@contextlib.contextmanager
def worker_db(db_path: str) -> Iterator[sqlite3.Connection]:
    """A connection to the box's database for a task that writes what it derived from the message
    files itself (the full-text index, message cache rows), so the server's process only waits for
    a count: kept between tasks in the worker process; a new one, closed after, in a thread of the
    server (cpu_pool.run_light)."""
    in_worker = multiprocessing.parent_process() is not None
    conn = _connections.get(db_path) if in_worker else None
    if conn is None:
        conn = open_db(db_path)
        if in_worker:
            conn.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpoints makes them
            _connections[db_path] = conn
    changes = conn.total_changes
    try:
        yield conn
    finally:
        if in_worker:
            if conn.total_changes != changes:
                _checkpoints(db_path).due()
        else:
            conn.close()  # a thread of the server: nothing left open behind it


def open_db(db_path: str) -> sqlite3.Connection:
    """worker_db's connection: a task's own, or one a caller in the server keeps for a series of
    them (and closes)."""
    conn = _connect(db_path)
    # No fsync per commit (WAL: a power cut may lose the last commits, never the database's
    # integrity): what these tasks write is derived from the files, and a lost tail is written
    # again. Every FTS commit of an APPEND or a delivery paid an fsync while holding the write
    # lock the box's own commits wait for (issue 19).
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _connect(db_path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    from appliance.db import WAL_SIZE_LIMIT  # here: the tasks that open a database import it anyway

    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # whichever connection starts the WAL over
    return conn


class _Checkpoints:
    """The worker process's checkpoints of one database, on a thread and a connection of their own
    (CHECKPOINT_SECONDS)."""

    def __init__(self, db_path: str) -> None:
        self._db_path = db_path
        self._due = threading.Event()
        threading.Thread(target=self._run, name="checkpoints", daemon=True).start()

    def due(self) -> None:
        self._due.set()

    def _run(self) -> None:
        conn = _connect(self._db_path)
        while True:
            self._due.wait()
            self._due.clear()
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                log.debug("cpu pool: a checkpoint failed", exc_info=True)
            time.sleep(CHECKPOINT_SECONDS)


_checkpointers: dict[str, _Checkpoints] = {}


def _checkpoints(db_path: str) -> _Checkpoints:
    found = _checkpointers.get(db_path)
    if found is None:
        found = _checkpointers[db_path] = _Checkpoints(db_path)
    return found


# The worker process's thread for work a client waits for, at the server's priority (_init_worker).
_waited: ThreadPoolExecutor | None = None


def _init_worker(nice: int) -> None:
    global _waited
    # Work a client waits for runs on a thread started before the rest of the worker lowers its
    # priority (Linux keeps a nice value per thread, an unprivileged thread cannot take a lower one
    # back, and a thread starts with its creator's): at WORKER_NICE the server's own threads, the
    # client and anything else on the machine took the cores from a FETCH's share (at 10k and load
    # 3.5: 200 messages described in 0.78 s for 38 ms of CPU, the worker runnable but waiting for a
    # core 3.3 s of a 3.7 s FETCH, and its writes of the FETCH's rows 0.53 s after the last
    # response; issue 19). The start-up's imports and background work stay below the server.
    if nice:
        _waited = ThreadPoolExecutor(1, thread_name_prefix="waited")
        _waited.submit(int).result()  # (started now)
    with contextlib.suppress(OSError):
        os.nice(nice)
    # A server killed with SIGKILL (OOM killer, kill -9) never shuts its pool down, and the worker
    # holds its own task queue's write end, so it would wait for work for ever, keeping its memory
    # and the resource tracker alive. Its parent's sentinel turns readable when the parent dies.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


def _call(prompt: bool, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """In the worker process: fn(*args, **kwargs), on the thread at the server's priority when a
    client waits for it (`prompt`), else on this one (one task at a time either way: the database
    connection worker_db keeps is used by one thread at a time)."""
    if prompt and _waited is not None:
        return _waited.submit(fn, *args, **kwargs).result()
    return fn(*args, **kwargs)


class CpuPool:
    def __init__(self, workers: int = WORKERS, idle_seconds: float = IDLE_SECONDS, nice: int = WORKER_NICE) -> None:
        self._workers = workers
        self._idle_seconds = idle_seconds
        self._nice = nice
        self._executor: ProcessPoolExecutor | None = None
        self._ready: ProcessPoolExecutor | None = None  # the executor once a task has come back from it
        self._running = 0
        self._last_used = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # idle executors being shut down
        self._in_flight = 0  # tasks handed to the executor (at most one per worker)
        # Tasks waiting for a worker, by level: those a client waits for, then background ones, then bulk.
        self._waiting: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque(), deque())
        self.tasks = 0  # tasks run since start (tests and the bench read it)
        # When the last delivery or APPEND came (the event loop's clock; MailStore.last_arrival, set
        # by the composition root): background work waits for a pause after it.
        self.last_mail: Callable[[], float] = lambda: 0.0
        # When a client last had a message list answered (the event loop's clock; now while one is:
        # MessageCache.last_answer, set by the composition root): bulk work waits for a pause after it.
        self.last_answer: Callable[[], float] = lambda: 0.0

    @property
    def started(self) -> bool:
        return self._executor is not None

    @property
    def ready(self) -> bool:
        """Whether the worker has started (a task came back from it): until then a task waits for
        its start, 0.3-0.45 s of CPU and 0.4-1.2 s of wall on this machine."""
        return self._executor is not None and self._ready is self._executor

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args) in a worker process. `fn` and its arguments must be picklable (module-level
        functions, plain data). A worker that died (killed for memory) is replaced and the task
        tried once more."""
        return await self._run(WAITED, True, fn, *args, **kwargs)

    async def run_background(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like run, for work nobody waits for: it runs after a pause in the mail (pause), when no
        task of `run` is waiting."""
        await self.pause()
        return await self._run(BACKGROUND, False, fn, *args, **kwargs)

    async def run_prefill(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like run_background (after a pause in the mail, when no task of `run` is waiting), at the
        server's priority: work made ahead for the client's next command in a folder it has open
        (a SELECT's prefill of files first seen, which its FETCH then reads). At WORKER_NICE it got
        a tenth of a core beside a busy machine: at 100k, 4,000-8,400 rows made during Thunderbird's
        8.7-12.5 s header list, and the second session's FETCH described the rest (issue 19)."""
        await self.pause()
        return await self._run(BACKGROUND, True, fn, *args, **kwargs)

    async def run_bulk(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like run_background, for work a client is less likely to want soon (the full-text index
        of a folder copied in): it runs when no task of `run` or `run_background` is waiting."""
        await self.pause(clients=True)
        return await self._run(BULK, False, fn, *args, **kwargs)

    async def pause(self, *, clients: bool = False) -> None:
        """Wait until no delivery or APPEND came for PAUSE_SECONDS (MAX_DEFER_SECONDS at the most).
        Background tasks write what they derived (full-text index rows, message cache rows) in
        transactions of their own, holding the database's write lock that every group commit of
        deliveries then waits for (issue 19, smtp-source bursts: 4-5 ms of a batch's 10-16 ms, and a
        fifth of the box's CPU during the burst; LMTP into a 10k folder 0.63x of Dovecot with a
        backlog of indexing running, APPENDs 0.54x). After the burst the same rows are written then.
        Under mail that never pauses a task still goes every MAX_DEFER_SECONDS. `clients`: and for
        a pause in the clients' message lists (bulk work): the full-text index of a 1k folder
        copied in started the worker process (0.3-0.45 s of CPU) half a second after the SELECT
        that listed the files, in the middle of the next session's FETCH (issue 19)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + MAX_DEFER_SECONDS
        while True:
            # A deadline that moves with the mail, so a sleep rather than an Event.
            last = max(self.last_mail(), self.last_answer()) if clients else self.last_mail()
            wait = min(last + PAUSE_SECONDS, give_up) - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _run(self, level: int, prompt: bool, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args) in the worker, its turn taken at `level`; `prompt`: at the server's priority."""
        with waits.span("cpu pool: turn") if waits.ENABLED else contextlib.nullcontext():
            await self._take_turn(level)
        self._running += 1
        try:
            for attempt in (1, 2):
                executor = self._start()
                try:
                    with waits.span("cpu pool") if waits.ENABLED else contextlib.nullcontext():
                        result = await asyncio.wrap_future(executor.submit(_call, prompt, fn, args, kwargs))
                    self._ready = executor
                    return result
                except BrokenProcessPool:
                    log.warning("cpu pool: a worker process died; starting another")
                    self._discard(executor)
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        finally:
            self._pass_turn()
            self._running -= 1
            self.tasks += 1
            self._last_used = time.monotonic()
            self._arm_idle_timer()

    async def run_light(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like run, for a task the caller knows is small (a few messages: milliseconds of CPU).
        While no worker is running it runs in a thread here: starting a worker process for three
        new messages would cost more (about 0.3 s of CPU and 30 MB) than the work."""
        if self._executor is None:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            finally:
                self.tasks += 1
        return await self.run(fn, *args, **kwargs)

    async def _take_turn(self, level: int) -> None:
        """Wait until a worker is free for this task and no task before it in the order waits."""
        if self._in_flight < self._workers and not any(self._waiting):
            self._in_flight += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting[level]
        queue.append(turn)
        try:
            await turn  # _pass_turn handed its worker over: _in_flight counts this task already
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._pass_turn()  # handed over just as the caller gave up: to the next one
            else:
                queue.remove(turn)
            raise

    def _pass_turn(self) -> None:
        for queue in self._waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._in_flight -= 1

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self._nice,), max_tasks_per_child=MAX_TASKS,
            )
            _live.add(self._executor)
        return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = self._ready = None
        executor.shutdown(wait=False, cancel_futures=True)
        _live.discard(executor)

    def _arm_idle_timer(self, delay: float | None = None) -> None:
        if self._idle_timer is not None or self._executor is None:
            return
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle_seconds if delay is None else delay, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        executor = self._executor
        if executor is None:
            return
        idle = time.monotonic() - self._last_used
        if self._running or idle < self._idle_seconds:
            self._arm_idle_timer(self._idle_seconds - idle if not self._running else None)
            return
        self._retire_soon(executor)

    def retire_idle(self, idle_seconds: float = RETIRE_IDLE_SECONDS) -> None:
        """Stop the worker now if it has had no task for `idle_seconds`, rather than at the end of
        IDLE_SECONDS: the store calls this when it unloads a big folder's index that nobody has open
        (MailStore.on_unload), the moment the big work is over and the rest of its memory goes back
        too (issue 19: RSS after the 100k run, sessions closed; the worker and the resource tracker
        are 45 MiB, and were still there 5 s after the sessions closed when the worker's last task
        ended less than 10 s before)."""
        executor = self._executor
        if executor is None or self._running or any(self._waiting):
            return
        if time.monotonic() - self._last_used >= idle_seconds:
            self._retire_soon(executor)

    def _retire_soon(self, executor: ProcessPoolExecutor) -> None:
        self._executor = self._ready = None
        retire = asyncio.get_running_loop().create_task(self._retire(executor))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)

    async def _retire(self, executor: ProcessPoolExecutor) -> None:
        """Shut an idle executor down (joined off the loop), then the resource tracker if no other
        executor started meanwhile."""
        await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        _live.discard(executor)
        _stop_resource_tracker()

    async def stop(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        executor, self._executor, self._ready = self._executor, None, None
        if executor is not None:
            await self._retire(executor)  # the workers finish the task at hand and exit
        for retire in list(self._retiring):
            await retire
        _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker, a process of its own (13 MiB RSS) that the first
    worker started and that otherwise lives as long as the server, tracking nothing once no executor
    is left; the next executor starts another (multiprocessing's ensure_running). Only with no
    executor left in this process: stopping it unlinks the names of the semaphores still registered,
    which a worker being spawned would open by name."""
    if _live:
        return
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)  # CPython's own (3.8+); absent elsewhere: the tracker stays
    if stop is not None:
        try:
            stop()
        except (OSError, ChildProcessError):
            log.debug("cpu pool: stopping the resource tracker failed", exc_info=True)
