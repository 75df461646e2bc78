"""Caches of per-message values, emptied when a big folder leaves memory (issue 19: RSS after the 100k
run <= 120 MB).

A FETCH of a big folder fills caches such as the rendered address lists (imap/fetch.py), a few
thousand small objects made one by one between the command's short-lived ones, so they end up spread
over many of pymalloc's 1 MiB arenas. An arena goes back to the system only when nothing in it is
alive: after the 100k rows those entries, and the cyclic garbage a full collection would free, kept
about ten arenas the rest of the box did not need. When the store unloads a folder's index nobody
has open (MailStore's trim, 2 s after its last use), the work on it is over: the caches registered
here are emptied, a full collection runs, and malloc_trim gives back what that freed. They fill
again at the next command that needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from appliance import collector


class _Clearable(Protocol):
    def cache_clear(self) -> None: ...


C = TypeVar("C", bound=_Clearable)

_registered: list[_Clearable] = []


def emptied_with_folders(cache: C) -> C:
    """Register an lru_cache-wrapped function (put this decorator above @lru_cache)."""
    _registered.append(cache)
    return cache


def empty() -> None:
    """Empty every registered cache, let go of what the event loop kept of the work, then collect
    cyclic garbage (the caller trims the heap after)."""
    for cache in _registered:
        cache.cache_clear()
    with contextlib.suppress(RuntimeError):  # no running loop: nothing of one to let go
        loop = asyncio.get_running_loop()
        _drop_cancelled_timers(loop)
        _fresh_default_executor(loop)
    collector.collect_all()


def _drop_cancelled_timers(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio leaves a cancelled timer in its heap until its deadline, or until half the heap is
    cancelled: after the 100k rows about 50 of them (aiosmtpd's 300 s timeouts, re-armed at every
    LMTP command) and their Contexts were each alone, or nearly, in one of pymalloc's 1 MiB arenas
    (bench/memory.py --probe). The same purge asyncio's _run_once makes, now."""
    scheduled = getattr(loop, "_scheduled", None)
    if not isinstance(scheduled, list) or not hasattr(loop, "_timer_cancelled_count"):
        return  # another loop implementation: its own bookkeeping stands
    live = [handle for handle in scheduled if not handle.cancelled()]
    if len(live) == len(scheduled):
        return
    for handle in scheduled:
        if handle.cancelled():
            handle._scheduled = False
    heapq.heapify(live)
    scheduled[:] = live
    loop._timer_cancelled_count = 0


def _fresh_default_executor(loop: asyncio.AbstractEventLoop) -> None:
    """A new default executor (asyncio.to_thread) for what comes next; the one the work used lets its
    threads end once their task is done. Its threads, started one by one as the rows needed them (up
    to six), their Thread objects, locks and weakrefs stayed in arenas the work had filled. The
    first to_thread after this starts a thread again (about 0.1 ms)."""
    old = getattr(loop, "_default_executor", None)
    if not isinstance(old, ThreadPoolExecutor):
        return  # none started yet, or another loop implementation
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio"))
    old.shutdown(wait=False)
