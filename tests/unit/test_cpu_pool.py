"""The CPU pool's order (issue 19): work a client waits for goes before queued background work."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from multiprocessing import resource_tracker
from pathlib import Path

from appliance import cpu_pool
from appliance.cpu_pool import CpuPool
from tests.support.polling import async_wait_until


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


def test_background_work_overtakes_queued_bulk_work() -> None:
    """Cache rows for files first seen at a SELECT (run_prefill) and after an answer went out
    (run_background) go before the full-text index's chunks queued earlier (run_bulk), in their
    order, and waited-for work before all."""
    async def main() -> list[str]:
        pool = CpuPool(workers=1)
        done: list[str] = []

        async def task(name: str, level: str) -> None:
            run = {"bulk": pool.run_bulk, "background": pool.run_background, "prefill": pool.run_prefill,
                   "waited": pool.run}[level]
            done.append(await run(_name, name))

        try:
            await pool.run(_name, "start")
            busy = asyncio.create_task(pool.run(_hold, 0.3))
            await asyncio.sleep(0)
            queued = [asyncio.create_task(task(f"bulk {n}", "bulk")) for n in range(2)]
            await asyncio.sleep(0)
            queued.append(asyncio.create_task(task("prefill", "prefill")))
            await asyncio.sleep(0)
            queued.append(asyncio.create_task(task("background", "background")))
            await asyncio.sleep(0)
            queued.append(asyncio.create_task(task("waited for", "waited")))
            await asyncio.gather(busy, *queued)
        finally:
            await pool.stop()
        return done

    assert asyncio.run(main()) == ["waited for", "prefill", "background", "bulk 0", "bulk 1"]


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


def test_background_work_waits_for_a_pause_in_the_mail_and_waited_for_work_does_not() -> None:
    """Both background writers (the full-text index, the message cache's fills) go through
    run_background, which waits for PAUSE_SECONDS without mail; run does not wait."""
    async def main() -> float:
        pool = CpuPool(workers=1)
        loop = asyncio.get_running_loop()
        pool.last_mail = loop.time  # mail that never stops: background work waits MAX_DEFER_SECONDS
        try:
            # Waited-for work goes at once (it would wait 30 s otherwise); in a thread: no process.
            assert await asyncio.wait_for(pool.run_light(_name, "waited for"), 10) == "waited for"
            arrived = loop.time()
            pool.last_mail = lambda: arrived  # one delivery, then none
            assert await pool.run_background(_name, "background") == "background"
            return loop.time() - arrived
        finally:
            await pool.stop()

    assert asyncio.run(main()) >= cpu_pool.PAUSE_SECONDS


def test_bulk_work_waits_for_a_pause_in_the_clients_fetches_and_background_work_does_not() -> None:
    """The full-text index of a folder copied in (run_bulk: pause with `clients`) waits for
    PAUSE_SECONDS after the last FETCH a client had answered (last_answer), not only after the last
    mail: it started the worker process in the middle of the next session's FETCH. The message
    cache's fills (run_background) are what that FETCH wants, and do not wait for it."""
    async def main() -> tuple[float, float]:
        pool = CpuPool(workers=1)
        loop = asyncio.get_running_loop()
        answered = loop.time()
        pool.last_answer = lambda: answered
        await pool.pause()
        background = loop.time() - answered
        answered = loop.time()
        await pool.pause(clients=True)
        return background, loop.time() - answered

    background, bulk = asyncio.run(main())
    assert background < cpu_pool.PAUSE_SECONDS <= bulk


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's


def test_background_work_runs_below_the_server_and_waited_for_work_at_its_priority() -> None:
    """Work a client waits for (a FETCH's share, its rows, a SEARCH scan) at the server's nice
    value: at WORKER_NICE the server's own threads and the machine's other work took the cores from
    it (issue 19); background and bulk work (rows after an answer went out, the full-text index)
    WORKER_NICE below; a SELECT's prefill (run_prefill: the client's next FETCH reads its rows) at
    the server's priority."""
    async def main() -> tuple[int, ...]:
        pool = CpuPool(workers=1)
        try:
            return (await pool.run(_nice), await pool.run_background(_nice), await pool.run_bulk(_nice),
                    await pool.run_prefill(_nice), await pool.run(_nice))
        finally:
            await pool.stop()

    server = _nice()
    low = min(19, server + cpu_pool.WORKER_NICE)
    assert asyncio.run(main()) == (server, low, low, server, server)


def _pid() -> int:
    return os.getpid()


def _tracker_pid() -> int | None:
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    return getattr(tracker, "_pid", None)


def _children() -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                found |= {int(pid) for pid in f.read().split()}
        except FileNotFoundError:  # a thread that ended since the listing (an executor's, asyncio's)
            continue
    return found


def test_an_idle_worker_and_the_resource_tracker_exit_and_come_back_on_demand() -> None:
    """Memory (issue 19): after IDLE_SECONDS without work the worker process stops, and so does the
    resource tracker it brought (13 MiB RSS); the next task starts both again. (A tracker another
    test of this pytest process left running, with an executor of its own still alive, is there
    before and after: then only the worker comes and goes. The fresh-clone CI of 345904c failed on
    that, depending on xdist's order.)"""
    async def main() -> None:
        pool = CpuPool(workers=1, idle_seconds=0.2)
        cpu_pool._stop_resource_tracker()  # (stops nothing while another executor is alive)
        before = _children()
        tracker_before = _tracker_pid() in before
        try:
            worker = await pool.run(_pid)
            started = _children() - before
            assert worker in started
            assert len(started) == (1 if tracker_before else 2), (started, cpu_pool._live)
            await async_wait_until(lambda: not (_children() - before) and not pool.started, what="both gone")
            again = await pool.run(_pid)
            assert again != worker
            assert again in _children()
        finally:
            await pool.stop()
        assert not _children() - before

    asyncio.run(main())


def test_retire_idle_stops_a_worker_idle_long_enough_and_leaves_a_busy_one() -> None:
    """Memory (issue 19): when the store unloads a big folder nobody has open, the worker and the
    resource tracker go at once if the worker has been idle a moment, not IDLE_SECONDS later."""
    async def main() -> None:
        pool = CpuPool(workers=1, idle_seconds=600)
        before = _children()
        try:
            await pool.run(_pid)
            pool.retire_idle(idle_seconds=60)  # used just now: it stays
            assert pool.started
            await asyncio.sleep(0.2)
            pool.retire_idle(idle_seconds=0.1)
            assert not pool.started
            await async_wait_until(lambda: not (_children() - before), what="both gone")
            assert await pool.run(_pid) in _children()  # and the next task starts another
        finally:
            await pool.stop()
        assert not _children() - before

    asyncio.run(main())


def _write_pages(db_path: str, rows: int) -> int:
    """Rows of 3,000 octets written in the worker through worker_db, one a commit; returns the
    database file's size right after (before any checkpoint copied them into it)."""
    with cpu_pool.worker_db(db_path) as conn:
        for n in range(rows):
            conn.execute("INSERT INTO t (v) VALUES (?)", (bytes([n % 256]) * 3000,))
    return os.stat(db_path).st_size


def test_the_workers_commits_make_no_checkpoint_its_thread_does(tmp_path: Path) -> None:
    """Issue 19: a checkpoint waits for two fsyncs, and SQLite makes one in every commit that finds
    more than 1,000 frames in the WAL; the worker's row writes waited for them. Its commits make
    none; a thread of the worker process makes them after the task."""
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v BLOB)")
    empty = db.stat().st_size

    async def main() -> None:
        pool = CpuPool(workers=1)
        try:
            # 1,500 commits of a page or more each: past 1,000 frames a commit would checkpoint.
            assert await pool.run(_write_pages, str(db), 1500) == empty
            await async_wait_until(lambda: db.stat().st_size > 1500 * 3000, what="the rows checkpointed")
        finally:
            await pool.stop()

    try:
        asyncio.run(main())
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1500,)
    finally:
        conn.close()
