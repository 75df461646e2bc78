"""The outbound queue's thread plumbing, apart from its scheduling (appliance/queue/service.py): the
SMTP client is blocking code (smtplib-like, appliance/queue/client.py), run on these threads."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreads:
    """A small pool of daemon threads for blocking SMTP work: like asyncio.to_thread, but a thread
    stuck on a dead server never delays the process's exit, and threads are reused (starting one
    per message stalls the event loop under load)."""

    def __init__(self, max_threads: int) -> None:
        self._max = max_threads
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def job() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001  any outcome of the worker, even a cancel, is handed to the awaiting future
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop may be gone when we stop
                loop.call_soon_threadsafe(settle, result, error)

        with self._lock:
            spawn = self._idle == 0 and self._threads < self._max
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(target=self._serve, name="letterbox-outbound", daemon=True).start()
        self._work.put(job)
        return await future

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._work.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            job()

    def shutdown(self) -> None:
        """Idle threads end; busy ones end after their job (the sockets are cut separately)."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._work.put(None)
