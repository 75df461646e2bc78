"""Work tried on the event loop first, handed to a worker thread only when it would wait: for a lock
another thread holds, or for work that is not bounded (a row to compute from its file).

A FETCH of a few messages answered from the message cache is a SQLite read, a few stats and some
formatting: less than the trip to a worker thread it made (a wakeup of the thread and of the event
loop, the GIL handed over twice; under imaptest's stress mode 1.3-3 ms of each such FETCH's wall
time against ~1 ms of work, issue 19). But the cache's locks are also held by worker threads for a
whole read of a big FETCH or SEARCH: the event loop must never wait behind one. Inside `on_loop()`,
`held(lock)` takes a lock only if it is free and raises NeedsThread otherwise; the caller then runs
the same work in a thread, where `held` waits as `with lock` does. Whatever raises NeedsThread must
leave nothing half done (the work is done again from its start)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_here = threading.local()


class NeedsThread(Exception):
    """The work cannot be done here without waiting: do it in a worker thread."""


def trying_here() -> bool:
    """Inside on_loop() on this thread."""
    return bool(getattr(_here, "on", False))


@contextmanager
def on_loop() -> Iterator[None]:
    _here.on = True
    try:
        yield
    finally:
        _here.on = False


@contextmanager
def held(lock: threading.Lock) -> Iterator[None]:
    """`with lock`; inside on_loop(), NeedsThread instead of waiting for it."""
    if trying_here():
        if not lock.acquire(blocking=False):
            raise NeedsThread("a lock another thread holds")
    else:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
