"""appliance/threads.py: the daemon worker threads the queue's SMTP client and the store's writes of
new mail run on (a lighter hand-off than asyncio.to_thread, issue 19)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from appliance.threads import DaemonThreads


def test_results_and_errors_come_back_and_a_cancelled_caller_leaves_the_work_to_finish() -> None:
    async def run() -> None:
        pool = DaemonThreads(2, "test-worker")
        assert await pool.run(lambda a, b: a + b, 2, 3) == 5
        assert await pool.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        release, finished = threading.Event(), threading.Event()

        def slow() -> None:
            release.wait(5)
            finished.set()

        task = asyncio.create_task(pool.run(slow))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await pool.run(lambda: finished.wait(5))  # the thread went on and is free again
        pool.shutdown()

    asyncio.run(run())


def test_calls_handed_in_together_run_at_once_up_to_the_limit() -> None:
    """Writes of new mail wait on fsync: each waiting call gets a thread of its own (up to the limit),
    even when threads were idle a moment before."""
    async def run() -> tuple[int, int]:
        pool = DaemonThreads(3, "test-parallel-worker")
        await pool.run(lambda: None)  # one idle thread now
        lock = threading.Lock()
        running, most = 0, 0
        release = threading.Event()

        def wait() -> None:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            release.wait(5)
            with lock:
                running -= 1

        calls = [asyncio.create_task(pool.run(wait)) for _ in range(5)]
        for _ in range(500):
            if most >= 3:
                break
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*calls)
        threads = sum(1 for t in threading.enumerate() if t.name == "test-parallel-worker")
        pool.shutdown()
        return most, threads

    most, threads = asyncio.run(run())
    assert most == 3
    assert threads == 3


def test_an_idle_thread_keeps_nothing_of_its_last_call() -> None:
    """Not the function, its arguments or the loop: a store write's closure holds the message's octets
    and, through the store, every loaded folder's entries (a test that counted live entries failed
    when another test's store stayed alive behind an idle writer thread)."""
    import gc
    import weakref

    class Payload:
        def work(self, data: bytes) -> int:
            return len(data)

    async def run() -> weakref.ref[Payload]:
        pool = DaemonThreads(1, "test-worker")
        payload = Payload()
        assert await pool.run(payload.work, b"x" * 1000) == 1000
        return weakref.ref(payload)

    ref = asyncio.run(run())
    for _ in range(100):  # the thread drops its references just after it hands the result over
        gc.collect()
        if ref() is None:
            break
        threading.Event().wait(0.01)
    assert ref() is None
