"""Daemon worker threads for blocking calls from the event loop, with less machinery per call than
asyncio.to_thread (no context copy, no concurrent.futures.Future with its Condition, no chained
futures): the queue's SMTP client (appliance/queue/service.py) and the store's durable writes of
new mail (appliance/store/mailstore.py), where to_thread's hand-off was 9 % of the MX's event loop
under smtp-source (issue 19).

Daemon threads: one stuck on a dead server never delays the process's exit. A write cut off by the
exit was never acknowledged (the store answers only after its file, directory entry and row are
durable), and what it left is cleaned up or indexed at the next start, as after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from appliance import waits

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: the work was done all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DaemonThreads:
    """A pool of up to `max_threads` daemon threads, started as the work needs them and reused
    (starting one per call stalls the event loop under load)."""

    def __init__(self, max_threads: int, name: str = "letterbox-worker") -> None:
        self._max = max_threads
        self._name = name
        self._work: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0
        self._queued = 0  # jobs put and not yet taken: a thread more when they outnumber the idle ones
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if waits.ENABLED:
            return await waits.trip(self._name, self._run, partial(fn, *args))
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queued += 1
            spawn = self._queued > self._idle and self._threads < self._max
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        self._work.put((loop, future, fn, args))
        return await future

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._work.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads -= 1
                    return
                self._queued -= 1
            loop, future, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001  any outcome of the worker, even a cancel, is handed to the awaiting future
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop may be gone when we stop
                loop.call_soon_threadsafe(_settle, future, result, error)
            # Nothing of the call kept while the thread waits: the function and its arguments too
            # (a store write's closure holds its batch's entries, which outlived their folder's unload).
            del job, loop, future, fn, args, result, error

    def shutdown(self) -> None:
        """Idle threads end; busy ones end after their job (the sockets are cut separately)."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._work.put(None)
