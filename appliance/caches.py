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

import gc
from typing import Protocol, TypeVar


class _Clearable(Protocol):
    def cache_clear(self) -> None: ...


C = TypeVar("C", bound=_Clearable)

_registered: list[_Clearable] = []


def emptied_with_folders(cache: C) -> C:
    """Register an lru_cache-wrapped function (put this decorator above @lru_cache)."""
    _registered.append(cache)
    return cache


def empty() -> None:
    """Empty every registered cache, then collect cyclic garbage (the caller trims the heap after)."""
    for cache in _registered:
        cache.cache_clear()
    gc.collect()
