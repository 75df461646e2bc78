"""appliance/collector.py: a big folder's objects are frozen after its bulk step, so the collector's
own full collections do not walk them (issue 19: 400-750 ms full collections inside SEARCH, FETCH and
a client's header fetch at 100k); the box's deliberate collections still free cycles among them."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from appliance import collector
from appliance.heap import HeapWatch
from appliance.store import index


class Held:
    other: object = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (other tests count gc.get_objects())."""
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


def frozen_cycle() -> weakref.ref[Held]:
    with index.gc_paused(index.BULK):
        made = [Held() for _ in range(index.BULK)]
        cycle = Held()
        cycle.other = cycle
    assert gc.get_freeze_count() >= len(made)
    ids = {id(o) for o in gc.get_objects()}
    assert not any(id(o) in ids for o in made)  # frozen: no collection of the collector walks them
    assert id(cycle) not in ids
    return weakref.ref(cycle)


def test_a_bulk_step_freezes_its_objects_and_a_deliberate_collection_frees_their_cycles() -> None:
    gone = frozen_cycle()
    assert gc.isenabled()
    gc.collect()
    assert gone() is not None  # the collector's own full collection does not see it
    collector.collect_all()
    assert gone() is None
    assert gc.get_freeze_count() > 0  # what survived is frozen again


def test_a_small_step_leaves_its_objects_to_the_collector() -> None:
    with index.gc_paused(index.BULK):  # a step that made few objects (a small folder's listing)
        few = Held()
    assert gc.get_freeze_count() == 0
    assert id(few) in {id(o) for o in gc.get_objects()}


def test_the_heap_watch_walks_frozen_objects_only_while_they_are_few(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = frozen_cycle()
    watch = HeapWatch(growth=0)
    monkeypatch.setattr(collector, "WALK_ALL_BELOW", 0)  # as with a 100k folder loaded
    monkeypatch.setattr(collector, "_last_all", time.monotonic())
    watch.check()
    assert gone() is not None
    young = Held()
    young.other = young
    young_gone = weakref.ref(young)
    del young
    watch.check()
    assert young_gone() is None  # what was made since the freeze is collected
    monkeypatch.setattr(collector, "WALK_ALL_EVERY", 0.0)  # long since the last walk of them all
    watch.check()
    assert gone() is None
    gone = frozen_cycle()
    monkeypatch.setattr(collector, "WALK_ALL_EVERY", 600.0)
    monkeypatch.setattr(collector, "WALK_ALL_BELOW", gc.get_freeze_count())  # a small box
    watch.check()
    assert gone() is None
