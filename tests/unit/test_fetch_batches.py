"""A FETCH answered from the message cache goes in batches (fetch_render._send_cached): the next batch
renders in its thread while the event loop writes this one, and the rows a batch computed from the
files are handed to the database's thread while the next one renders, not all after the last
response (issue 19)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from appliance.cpu_pool import CpuPool
from appliance.imap import fetch_render
from appliance.imap.commands import FetchAttribute
from appliance.imap.selected import SelectedFolder
from appliance.store.message_cache import FolderCache
from appliance.store.model import MessageInfo

SEND_SECONDS = 0.05  # each batch's write: long enough for the next batch's thread to have started


class _View:
    """What _send_cached asks of the selected folder."""

    name, uidvalidity = "INBOX", 1

    def __init__(self, count: int) -> None:
        self.infos = {uid: MessageInfo(uid, frozenset(), 100, 1_700_000_000, 1, Path("/nonexistent"), f"{uid}")
                      for uid in range(1, count + 1)}

    def seq_of(self, uid: int) -> int:
        return uid

    def info(self, uid: int) -> MessageInfo:
        return self.infos[uid]

    def flags_of(self, uid: int) -> list[str]:
        return []


class _Cache:
    """A folder's cache with no row: every message is described by the FETCH."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def prefilling(self) -> bool:
        return False

    async def learn(self, rows: list[Any]) -> None:
        self.events.append(f"learn {len(rows)}")


class _Pool:
    started = ready = False


def _run(count: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    events: list[str] = []
    lock = threading.Lock()

    def render(cache: Any, jobs: list[Any], *args: Any) -> fetch_render._Rendered:
        with lock:
            events.append(f"render {jobs[0][0]}")
        return [b"* FETCH\r\n"] * len(jobs), [(info.uid, cast(Any, None)) for _, info, _ in jobs], []

    async def send(*responses: Any) -> None:
        await asyncio.sleep(SEND_SECONDS)
        events.append("sent")

    async def fetch() -> None:
        renderer = fetch_render.FetchRenderer(cast(CpuPool, _Pool()))
        view = _View(count)
        await renderer._send_cached(cast(SelectedFolder, view), list(view.infos), [FetchAttribute("ENVELOPE")], set(),
                                    False, send, cast(FolderCache, _Cache(events)))

    monkeypatch.setattr(fetch_render, "_render_cached", render)
    asyncio.run(fetch())
    return events


def test_the_next_batch_renders_while_this_one_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    first, batch = fetch_render.FIRST_CACHED_BATCH, fetch_render.CACHED_FETCH_BATCH
    events = [e for e in _run(first + batch + 10, monkeypatch) if not e.startswith("learn")]
    assert events == ["render 1", f"render {first + 1}", "sent", f"render {first + batch + 1}", "sent", "sent"]


def test_rows_are_kept_while_the_next_batch_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    first, batch = fetch_render.FIRST_CACHED_BATCH, fetch_render.CACHED_FETCH_BATCH
    events = _run(first + batch + 10, monkeypatch)
    # The first batch's rows before the second batch's response, the second's before the last one's:
    # only the last batch's rows are written after the last response.
    assert events.index(f"learn {first}") < events.index("sent", events.index("sent") + 1)
    assert events.index(f"learn {batch}") < len(events) - 2
    assert events[-1] == "learn 10"
