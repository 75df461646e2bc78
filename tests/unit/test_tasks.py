"""appliance/tasks.cancel_and_wait: a background loop stops when asked, whatever it was waiting for."""

from __future__ import annotations

import asyncio
import contextlib

from appliance.tasks import cancel_and_wait


async def _woken_and_stopped() -> None:
    wake = asyncio.Event()

    async def loop() -> None:  # a service's loop: a round, then its wake event or the next poll
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), 60)
            wake.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    wake.set()  # new mail nudges it just as the box stops
    started = asyncio.get_running_loop().time()
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait({stopping}, timeout=5)
    assert stopping.done(), "cancel_and_wait still waiting after 5 s"
    assert asyncio.get_running_loop().time() - started < 1
    assert task.cancelled()


def test_a_loop_woken_as_it_is_cancelled_stops_at_once() -> None:
    """Python 3.11's wait_for swallows a cancel that comes as its event is set: the loop went on
    waiting for its next poll (60 s here), and cancel_and_wait with it (a box's stop timed out in a
    test: TextIndex nudged as it stopped)."""
    asyncio.run(_woken_and_stopped())
