"""The cyclic garbage collector's policy for the objects a big folder keeps (issue 19).

A loaded 100k folder is millions of tracked objects (its entries, names, snapshots). CPython 3.11
runs a full collection by itself once the objects promoted since the last one exceed a quarter of
the long-lived ones, and each walks the whole heap: 400-750 ms that landed inside SEARCH, FETCH and
a client's header fetch, and freed nothing. So after a bulk step (store/index.gc_paused) and after
each of the box's own full collections, what is alive goes into the permanent generation
(gc.freeze): the collector's collections walk only what was made since. Reference counting still
frees a frozen object as soon as nothing refers to it; only cycles among frozen objects wait, for
the next deliberate collection (collect_all: at start, when a big folder leaves memory, the heap
watch's at most every WALK_ALL_EVERY)."""

from __future__ import annotations

import gc
import time

# Frozen objects the heap watch still walks: an idle box tracks about 50k (7 ms a walk), a loaded 100k
# folder about 200k more (a walk of 300-450 ms on the bench machine; 2 ms for the rest).
WALK_ALL_BELOW = 150_000
# Seconds after which the heap watch walks the frozen objects all the same.
WALK_ALL_EVERY = 600.0
_last_all = time.monotonic()


def keep_long_lived() -> None:
    """Every object the collector tracks into the permanent generation, without a collection."""
    gc.freeze()


def collect_all() -> int:
    """A full collection over every object, frozen ones included, then the survivors frozen again;
    the number of unreachable objects found."""
    global _last_all
    gc.unfreeze()
    try:
        return gc.collect()
    finally:
        gc.freeze()
        _last_all = time.monotonic()


def collect() -> int:
    """The heap watch's collection: of every object while few are frozen (a box without a big folder
    loaded: a flood's closed connections, frozen by a bulk step meanwhile, are freed too) or when the
    last such was WALK_ALL_EVERY ago (cycles among frozen objects wait that long at most), else only
    of what is not frozen (made since the last freeze: a closed connection's cycles, for one),
    without walking a loaded folder's millions of objects."""
    if gc.get_freeze_count() <= WALK_ALL_BELOW or time.monotonic() - _last_all >= WALK_ALL_EVERY:
        return collect_all()
    return gc.collect()
