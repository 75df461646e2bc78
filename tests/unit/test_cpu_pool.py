"""The CPU pool's order (issue 19): work a client waits for goes before queued background work."""

from __future__ import annotations

import asyncio
import time

from appliance.cpu_pool import CpuPool


def _hold(seconds: float) -> float:
    time.sleep(seconds)  # keeps the one worker busy while the other tasks queue up
    return seconds


def _name(name: str) -> str:
    return name


def test_waited_for_work_overtakes_queued_background_work() -> None:
    async def main() -> list[str]:
        pool = CpuPool(workers=1)
        done: list[str] = []

        async def task(name: str, background: bool) -> None:
            run = pool.run_background if background else pool.run
            done.append(await run(_name, name))

        try:
            await pool.run(_name, "start")  # the worker is up
            busy = asyncio.create_task(pool.run(_hold, 0.3))
            await asyncio.sleep(0)  # the worker takes it
            queued = [asyncio.create_task(task(f"background {n}", True)) for n in range(3)]
            await asyncio.sleep(0)
            queued.append(asyncio.create_task(task("waited for", False)))
            await asyncio.gather(busy, *queued)
        finally:
            await pool.stop()
        return done

    assert asyncio.run(main()) == ["waited for", "background 0", "background 1", "background 2"]


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def main() -> str:
        pool = CpuPool(workers=1)
        try:
            busy = asyncio.create_task(pool.run(_hold, 0.2))
            await asyncio.sleep(0)
            gone = asyncio.create_task(pool.run(_name, "gone"))
            await asyncio.sleep(0)
            gone.cancel()
            later = await pool.run_background(_name, "later")  # not stuck behind the cancelled one
            await busy
            return later
        finally:
            await pool.stop()

    assert asyncio.run(main()) == "later"
