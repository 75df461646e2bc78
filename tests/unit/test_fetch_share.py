"""A first FETCH ENVELOPE BODYSTRUCTURE shares the rows to describe with the CPU pool's worker, which
goes from the end and stops where the FETCH has got to (fetch_render._learn_later's `reached`): the
FETCH keeps its own rows only at its end, so the worker would otherwise describe them again."""

from __future__ import annotations

import asyncio
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
