"""A first FETCH ENVELOPE BODYSTRUCTURE shares the rows to describe with the CPU pool's worker, which
goes from the end and stops where the FETCH has got to (fetch_render._learn_later's `reached`): the
FETCH keeps its own rows only at its end, so the worker would otherwise describe them again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from appliance.cpu_pool import CpuPool
from appliance.imap import fetch_render
from appliance.store.message_cache import FolderCache, MessageCache


class _Pool:
    """The pool's interface, recording the first UID of each chunk it is given."""

    def __init__(self, progress: list[int]) -> None:
        self.chunks: list[int] = []
        self._progress = progress

    async def run(self, fn: Callable[..., int], db: str, folder_id: int, chunk: list[tuple[int, str]],
                  *args: Any) -> int:
        self.chunks.append(chunk[0][0])
        self._progress[0] += 400  # the FETCH goes on meanwhile
        await asyncio.sleep(0)
        return 0

    run_background = run_light = run


class _Cache:
    path = Path("/nonexistent/letterbox.db")


def test_the_worker_share_stops_where_the_fetch_has_got_to() -> None:
    progress = [0]
    pool = _Pool(progress)
    cache = FolderCache(cast(MessageCache, _Cache()), 1)
    files = [(uid, f"/nonexistent/{uid}") for uid in range(1, 2001)]  # 10 chunks of 200
    asyncio.run(fetch_render._learn_later(cache, files, cast(CpuPool, pool), background=False,
                                          reached=lambda: progress[0]))
    # From the end, one chunk queued ahead of the one in the worker; none starting below the FETCH.
    assert pool.chunks == [1801, 1601, 1401, 1201]


class _Levels:
    """The pool's interface, recording which of its methods each chunk went to."""

    def __init__(self) -> None:
        self.used: list[str] = []

    async def _record(self, name: str) -> int:
        self.used.append(name)
        return 0

    async def run(self, fn: Callable[..., int], *args: Any) -> int:
        return await self._record("run")

    async def run_background(self, fn: Callable[..., int], *args: Any) -> int:
        return await self._record("background")

    async def run_prefill(self, fn: Callable[..., int], *args: Any) -> int:
        return await self._record("prefill")

    async def run_light(self, fn: Callable[..., int], *args: Any) -> int:
        return await self._record("light")


def test_a_big_prefill_runs_at_the_servers_priority_a_small_one_below() -> None:
    """A SELECT's prefill of PREFILL_PROMPT files or more goes to CpuPool.run_prefill (the worker's
    thread at the server's priority); a smaller one stays background work (WORKER_NICE)."""
    cache = FolderCache(cast(MessageCache, _Cache()), 1)
    used = {}
    for count in (fetch_render.PREFILL_PROMPT - 1, fetch_render.PREFILL_PROMPT):
        pool = _Levels()
        files = [(uid, f"/nonexistent/{uid}") for uid in range(1, count + 1)]
        asyncio.run(fetch_render._learn_later(cache, files, cast(CpuPool, pool), background=True, prefill=True))
        used[count] = set(pool.used)
    assert used == {fetch_render.PREFILL_PROMPT - 1: {"background"}, fetch_render.PREFILL_PROMPT: {"prefill"}}


class _Filling:
    path = Path("/nonexistent/letterbox.db")

    def fill(self, work: Any) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(work)


class _Slow:
    """A worker that writes nothing until `release` is set: it is behind."""

    ready = True  # (started: a task came back from it)

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.written: list[int] = []

    async def run(self, fn: Callable[..., int], db: str, folder_id: int, rows: list[tuple[int, Any]]) -> int:
        await self.release.wait()
        self.written += [uid for uid, _ in rows]
        return len(rows)


def test_rows_stay_with_the_fetch_while_the_worker_is_behind() -> None:
    """A shared FETCH hands its rows to the worker to write, batch by batch, but keeps them for its
    own write at its end once KEEP_AHEAD batches wait in the worker."""

    async def run() -> tuple[list[list[int]], list[int]]:
        pool = _Slow()
        cache = FolderCache(cast(MessageCache, _Filling()), 1)
        keeping: list[asyncio.Task[None]] = []
        left = []
        for batch in range(4):
            rows = [(batch * 10 + n, None) for n in range(3)]
            left.append([uid for uid, _ in fetch_render._hand_over(cache, cast(Any, rows), keeping, cast(CpuPool, pool))])
            await asyncio.sleep(0)
        pool.release.set()
        await asyncio.gather(*keeping)
        return left, pool.written

    left, written = asyncio.run(run())
    assert fetch_render.KEEP_AHEAD == 2
    assert left == [[], [], [20, 21, 22], [30, 31, 32]]
    assert written == [0, 1, 2, 10, 11, 12]


def test_rows_stay_with_the_fetch_while_the_worker_is_starting() -> None:
    """Rows are not handed to a worker that has not started yet (no task came back from it): the
    FETCH would wait for its start (0.4-1.2 s) after its last response."""

    async def run() -> list[int]:
        pool = _Slow()
        pool.ready = False
        cache = FolderCache(cast(MessageCache, _Filling()), 1)
        keeping: list[asyncio.Task[None]] = []
        rows = [(n, None) for n in range(3)]
        left = [uid for uid, _ in fetch_render._hand_over(cache, cast(Any, rows), keeping, cast(CpuPool, pool))]
        assert not keeping
        return left

    assert asyncio.run(run()) == [0, 1, 2]


def test_a_prefill_in_this_process_waits_for_a_pause_in_the_fetches() -> None:
    """MessageCache.quiet (what a small prefill made in this process waits for before each chunk):
    no FETCH answering, and none ended (nor a SELECT came) for the pause asked."""

    async def run() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        cache = MessageCache(cast(Any, _Cache()))
        task = loop.create_task(cache.quiet(0.05))
        with cache.answering_now():
            await asyncio.sleep(0.1)
            waited = not task.done()
        ended = loop.time()
        cache.touched()  # a SELECT: the pause starts again
        await task
        return waited, loop.time() - ended

    waited, after = asyncio.run(run())
    assert waited
    assert after >= 0.05


class _Prefilled:
    """A folder's cache whose rows a FETCH has made up to `highest` (every chunk finds its rows)."""

    path = Path("/nonexistent/letterbox.db")
    folder_id = 1

    def __init__(self, highest: int) -> None:
        self._highest = highest

    async def quiet(self, pause: float) -> None:
        return None

    async def highest(self) -> int:
        return self._highest


def test_a_prefill_in_this_process_skips_what_a_fetch_made_but_not_past_new_mail(monkeypatch: Any) -> None:
    """A chunk that finds its rows made (by the FETCH that came) sends the prefill on past the highest
    UID with a row; not when that row is of a message delivered since the SELECT (above every UID
    the prefill has), whose files below it may have none."""
    chunks: list[int] = []

    def fill(cache: Any, conn: Any, chunk: list[tuple[int, str]]) -> int:
        chunks.append(chunk[0][0])
        return 0

    monkeypatch.setattr(fetch_render, "_fill_here", fill)
    monkeypatch.setattr(fetch_render, "_prefill_db", lambda path: sqlite3.connect(":memory:", check_same_thread=False))
    uids = list(range(1, 101))
    files = [(uid, f"/nonexistent/{uid}") for uid in uids]
    size = fetch_render.HERE_CHUNK
    asyncio.run(fetch_render._prefill_here(cast(FolderCache, _Prefilled(60)), uids, files))
    assert chunks == [1, *range(61, 101, size)]
    chunks.clear()
    asyncio.run(fetch_render._prefill_here(cast(FolderCache, _Prefilled(500)), uids, files))
    assert chunks == list(range(1, 101, size))
