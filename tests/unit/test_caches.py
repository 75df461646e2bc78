"""appliance/caches.py: what the event loop kept of a big folder's work goes when the folder leaves
memory (issue 19: pymalloc arenas kept by a few objects made during the 100k rows)."""

from __future__ import annotations

import asyncio
import threading

from appliance import caches


def test_emptying_drops_cancelled_timers_and_keeps_the_others() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[int] = []
        cancelled = [loop.call_later(300, fired.append, n) for n in range(50)]
        kept = loop.call_later(0.05, fired.append, -1)
        for handle in cancelled:
            handle.cancel()
        caches.empty()
        assert loop._scheduled == [kept]  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        assert fired == [-1]
        late = loop.call_later(0.01, fired.append, -2)  # the heap still works after the purge
        await asyncio.sleep(0.05)
        assert fired == [-1, -2]
        assert late not in loop._scheduled  # type: ignore[attr-defined]

    asyncio.run(main())


def test_emptying_gives_the_loop_a_fresh_default_executor_and_the_old_threads_end() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = threading.Event()
        release = threading.Event()

        def busy() -> str:
            started.set()
            release.wait(5)
            return threading.current_thread().name

        running = asyncio.ensure_future(asyncio.to_thread(busy))
        await asyncio.to_thread(started.wait, 5)
        old = loop._default_executor  # type: ignore[attr-defined]
        caches.empty()
        assert loop._default_executor is not old  # type: ignore[attr-defined]
        assert await asyncio.to_thread(lambda: 42) == 42  # new work goes to the fresh executor
        release.set()
        assert (await running).startswith("asyncio")  # the task at hand finished where it was
        for thread in list(old._threads):
            await asyncio.to_thread(thread.join, 5)
            assert not thread.is_alive()

    asyncio.run(main())
