"""Where an IMAP command's wall time goes under load (issue 19): a probe, off unless the environment
variable LETTERBOX_WAITS names a file, which then gets a JSON summary every second.

Per command kind, from the command parsed to its tagged reply handed to the transport: the time
spent waiting for a lock (by lock and by the kind of command holding it), in a thread trip (split
into its queue wait, its run, of which its thread's CPU, and the wake-up of the awaiting coroutine
on the event loop), and the rest, on the loop (its own steps plus the steps of others that were
ready before it, the GIL and the machine's run queue). Per connection, the time between a tagged
reply and the client's next command. For the loop thread: its CPU, its run-queue delay (schedstat)
and its time asleep in select(2). The cyclic garbage collector's time by generation, and each full
collection with its start (epoch seconds), length and the command it landed in.

Counters only (time.perf_counter_ns): a few hundred nanoseconds per span. When off, nothing is
wrapped and `lock()` is a plain asyncio.Lock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

OUT = os.environ.get("LETTERBOX_WAITS") or None
ENABLED = OUT is not None


class _Command:
    __slots__ = ("kind", "parts", "start")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.start = time.perf_counter_ns()
        self.parts: dict[str, int] = {}


_current: ContextVar[_Command | None] = ContextVar("letterbox_wait_command", default=None)
# kind -> category -> [ns total]; kind -> "count"/"wall"
_totals: dict[str, dict[str, int]] = {}
_global: dict[str, int] = {}
_dump: asyncio.TimerHandle | None = None
_installed = False
_start: list[int] = []  # at the first command: wall ns, then the loop thread's schedstat


def add(category: str, ns: int) -> None:
    command = _current.get()
    if command is not None:
        command.parts[category] = command.parts.get(category, 0) + ns


def add_global(category: str, ns: int) -> None:
    _global[category] = _global.get(category, 0) + ns


def current_kind() -> str:
    command = _current.get()
    return command.kind if command is not None else "-"


def begin(kind: str) -> object:
    _schedule_dump()
    return _current.set(_Command(kind))


def end(token: object) -> None:
    command = _current.get()
    _current.reset(token)  # type: ignore[arg-type]
    if command is None:
        return
    wall = time.perf_counter_ns() - command.start
    row = _totals.setdefault(command.kind, {})
    row["count"] = row.get("count", 0) + 1
    row["wall"] = row.get("wall", 0) + wall
    waited = 0
    for category, ns in command.parts.items():
        row[category] = row.get(category, 0) + ns
        if not category.endswith(".cpu"):  # a part of its trip's run, already counted
            waited += ns
    row["ready, waiting for the loop (rest)"] = row.get("ready, waiting for the loop (rest)", 0) + wall - waited


@contextlib.contextmanager
def span(category: str, *, whole_box: bool = False) -> Iterator[None]:
    """The block's wall time, into the command's `category` (or, `whole_box`, the box's, counted)."""
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        if whole_box:
            add_global(category, time.perf_counter_ns() - start)
            add_global(category + " (count)", 1)
        else:
            add(category, time.perf_counter_ns() - start)


@contextlib.contextmanager
def loop_span(category: str) -> Iterator[None]:
    """A span of the loop thread's own work: its wall time, and the part of it spent waiting for a CPU
    (the run-queue delay, from schedstat: a send(2) that wakes the client may hand it the CPU)."""
    tid = threading.get_native_id()
    start, queued = time.perf_counter_ns(), _schedstat(tid)[1]
    try:
        yield
    finally:
        add_global(category, time.perf_counter_ns() - start)
        add_global(category + ": run queue", _schedstat(tid)[1] - queued)
        add_global(category + " (count)", 1)


class Steps:
    """Awaits `coro`, counting the wall and CPU time of its steps on the event loop (the command's own
    work there; GIL waits inside a step count as its wall, not its CPU). The rest of the command's
    time on the loop is then its wait in the ready queue behind other sessions' steps."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            start, cpu = time.perf_counter_ns(), time.thread_time_ns()
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as done:
                _step(start, cpu)
                return done.value
            except BaseException:
                _step(start, cpu)
                raise
            _step(start, cpu)
            where, suspended = _where(coro) if WHERE else "", time.perf_counter_ns()
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # noqa: BLE001  handed to the coroutine, as a task would
                value, error = None, exc
            if WHERE:
                add_global(f"suspended at {where} ({current_kind()})", time.perf_counter_ns() - suspended)


WHERE = bool(os.environ.get("LETTERBOX_WAITS_WHERE"))  # also: where each suspension was, in the box's totals


def _where(coro: Any) -> str:
    """The innermost coroutine or generator frame of an await chain: where it is suspended."""
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " < ".join(f"{f.f_code.co_filename.rpartition('/')[2]}:{f.f_code.co_name}:{f.f_lineno}"
                      for f in frames[-3:][::-1]) or "?"


def _step(start: int, cpu: int) -> None:
    add("loop: own steps", time.perf_counter_ns() - start)
    add("loop: own steps.cpu", time.thread_time_ns() - cpu)


class TimedLock:
    """A lock (asyncio.Lock's interface) that counts its waits, by the kind of command waiting and
    the one holding it, and how long it was held, or free while a waiter it woke had not run yet."""

    def __init__(self, name: str, inner: Any) -> None:
        self.name = name
        self.inner = inner
        self.holder = "-"
        self.acquired_at = 0
        self.released_at = 0  # when released with waiters (0: none were waiting)

    def locked(self) -> bool:
        return bool(self.inner.locked())

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def acquire(self) -> Literal[True]:
        # Timed whether or not it is locked now: asyncio.Lock keeps a lock just released for the
        # waiter it woke until that one runs, and a newcomer queues behind.
        holder = self.holder if self.locked() else "(handed over)"
        start = time.perf_counter_ns()
        await self.inner.acquire()
        now = time.perf_counter_ns()
        ns = now - start
        if ns > 20_000:  # waited (a free lock is taken in a microsecond or two)
            add(f"lock {self.name}", ns)
            add_global(f"lock {self.name} held by {holder}", ns)
            if self.released_at:
                add_global(f"lock {self.name}: free while waited for", now - self.released_at)
        self.holder = current_kind()
        self.acquired_at = now
        self.released_at = 0
        return True

    def release(self) -> None:
        now = time.perf_counter_ns()
        add_global(f"lock {self.name}: held", now - self.acquired_at)
        add_global(f"lock {self.name}: held (count)", 1)
        self.released_at = now if self.inner._waiters else 0
        self.inner.release()


def lock(name: str, inner: Any = None) -> Any:
    """`inner` (an asyncio.Lock when None), timed when the probe is on."""
    plain = inner if inner is not None else asyncio.Lock()
    return TimedLock(name, plain) if ENABLED else plain


def _timed_call(stamps: list[int], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    stamps.append(time.perf_counter_ns())
    cpu = time.thread_time_ns()
    try:
        return fn(*args, **kwargs)
    finally:
        stamps.append(time.thread_time_ns() - cpu)
        stamps.append(time.perf_counter_ns())


async def trip(name: str, submit: Callable[[Callable[..., T]], Awaitable[T]], fn: Callable[..., T]) -> T:
    """`submit(wrapped)` hands `wrapped` to a thread and awaits it; the trip's parts are counted."""
    stamps: list[int] = [time.perf_counter_ns()]
    try:
        return await submit(partial(_timed_call, stamps, fn))
    finally:
        now = time.perf_counter_ns()
        if len(stamps) == 4:
            submitted, started, cpu, ended = stamps
            add(f"{name}: queue", started - submitted)
            add(f"{name}: run", ended - started)
            add(f"{name}: run.cpu", cpu)
            add(f"{name}: wake", now - ended)


def install() -> None:
    """Wrap asyncio.to_thread and aiosqlite's trips to its thread (once, when enabled)."""
    global _installed
    if not ENABLED or _installed:
        return
    _installed = True
    import aiosqlite.core

    plain_to_thread = asyncio.to_thread

    async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await trip("to_thread", lambda w: plain_to_thread(w), partial(fn, *args, **kwargs))

    asyncio.to_thread = to_thread
    plain_execute: Callable[..., Awaitable[Any]] = aiosqlite.core.Connection._execute

    async def execute(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trip("db thread", lambda w: plain_execute(self, w), partial(fn, *args, **kwargs))

    aiosqlite.core.Connection._execute = execute  # type: ignore[method-assign]
    gc.callbacks.append(_collection)


_collection_start = [0]
# The full collections: [epoch seconds at its start, ms, command kind, thread, objects freed, objects
# frozen (not walked)], the last 200.
_full: list[list[object]] = []


def _collection(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks: each collection's wall time by generation; the full ones listed with their time,
    to be matched to a bench's rows (their epoch seconds) and to the command they landed in."""
    now = time.perf_counter_ns()
    if phase == "start":
        _collection_start[0] = now
        return
    ns, generation = now - _collection_start[0], info["generation"]
    add_global(f"gc: generation {generation}", ns)
    add_global(f"gc: generation {generation} (count)", 1)
    if generation == 2:
        _full.append([round(time.time() - ns / 1e9, 3), round(ns / 1e6, 1), current_kind(),
                      threading.current_thread().name, info["collected"], gc.get_freeze_count()])
        del _full[:-200]


def _schedule_dump() -> None:
    global _dump
    if _dump is not None or OUT is None:
        return
    loop = asyncio.get_running_loop()
    _watch_select(loop)
    _global["loop tid"] = threading.get_native_id()
    _start.extend([time.perf_counter_ns(), *_schedstat(_global["loop tid"])])
    _dump = loop.call_later(1.0, _write)


def _watch_select(loop: asyncio.AbstractEventLoop) -> None:
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return
    plain = selector.select

    tid = threading.get_native_id()

    def select(timeout: float | None = None) -> Any:
        if timeout == 0:
            add_global("loop: iterations without sleep", 1)
            return plain(timeout)
        # A sleep: its time less the run-queue delay after the wake-up is the loop truly idle.
        start, queued = time.perf_counter_ns(), _schedstat(tid)[1]
        try:
            return plain(timeout)
        finally:
            add_global("loop: asleep in select", time.perf_counter_ns() - start - (_schedstat(tid)[1] - queued))
            add_global("loop: sleeps", 1)

    selector.select = select


def _schedstat(tid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/self/task/{tid}/schedstat").read_text().split()]
    except OSError:
        return [0, 0, 0]


def _write() -> None:
    global _dump
    assert OUT is not None
    tid = _global.get("loop tid", 0)
    now = [time.perf_counter_ns(), *_schedstat(tid)]
    wall, cpu, run_queue, slices = (b - a for a, b in zip(_start, now, strict=True))
    # Since the first command: the loop thread's wall time is its CPU, its wait for a CPU, its sleep
    # in select(2), and the rest: blocked elsewhere (the GIL, mostly; a blocking call on the loop).
    asleep = _global.get("loop: asleep in select", 0)
    loop = {"loop: wall": wall, "loop: cpu": cpu, "loop: run queue": run_queue,
            "loop: blocked elsewhere (GIL)": wall - cpu - run_queue - asleep, "loop: timeslices": slices}
    summary = {"commands": _totals, "global": {**_global, **loop}, "full collections": _full}
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, OUT)
    _dump = asyncio.get_running_loop().call_later(1.0, _write)
