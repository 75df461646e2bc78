"""Folder indexes nobody has open leave memory (issue 19): the store on a real Maildir and SQLite file
unloads them beyond its budget, keeps delivering into them without loading them, and loads them again,
unchanged, at their next use. And a restart's first look at an unchanged folder stats no message file."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.store import index, mailboxes, maildir
from appliance.store.index import Entry
from appliance.store.mailstore import MailStore
from tests.support.tracked import live_objects
from tests.unit.test_mailstore import ALICE, opened

T = TypeVar("T")
COUNT = 60


def message(n: int) -> bytes:
    return f"Subject: message {n}\r\nMessage-ID: <m{n}@ex.test>\r\n\r\nbody {n}\r\n".encode()


def run(tmp_path: Path, body: Callable[[MailStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with opened(tmp_path) as store:
            return await body(store)

    return asyncio.run(main())


async def fill(store: MailStore, count: int, start: int = 0) -> list[int]:
    uids = []
    for n in range(start, start + count):
        outcome = (await store.deliver([ALICE], message(n)))[ALICE]
        assert isinstance(outcome, int)
        uids.append(outcome)
    return uids


def unload_all(store: MailStore, monkeypatch: pytest.MonkeyPatch) -> int:
    """What the trim does once nobody has looked at the folders for a while, with no budget."""
    boxes = store._boxes  # the store's own bookkeeping is what is tested here
    monkeypatch.setattr(mailboxes, "UNWATCHED_INDEX_MEMORY", 0)
    for mb in boxes._mailboxes.values():
        for f in mb.folders.values():
            f.last_used = 0.0
    before = boxes.unloads
    boxes.trim()
    return boxes.unloads - before


def live_entries() -> int:
    return sum(1 for o in live_objects() if type(o) is Entry)


def test_an_unwatched_index_is_unloaded_and_loads_again_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(store: MailStore) -> None:
        await fill(store, COUNT)
        await store.store_flags(ALICE, "INBOX", [2, 5], frozenset({"\\Seen", "$Label"}), "add")
        # The burst's last dovecot-uidlist write is paced (UIDLIST_PACE), and a folder stays loaded
        # until its write is done: done now.
        await store.flush_uidlists()
        before = await store.snapshot(ALICE, "INBOX")
        watcher = store.watch(ALICE, "INBOX")
        assert unload_all(store, monkeypatch) == 0  # selected by a session: kept
        watcher.close()
        assert unload_all(store, monkeypatch) >= 1
        # No index entry is left in memory but what a finished command's frames may hold a moment
        # longer (the snapshot kept holds none).
        assert live_entries() <= 2
        after = await store.snapshot(ALICE, "INBOX")
        assert [(m.uid, m.flags, m.size, m.internaldate, m.modseq, m.path) for m in after.messages] == [
            (m.uid, m.flags, m.size, m.internaldate, m.modseq, m.path) for m in before.messages]
        assert (after.uidnext, after.highestmodseq, after.uidvalidity) == (
            before.uidnext, before.highestmodseq, before.uidvalidity)

    run(tmp_path, body)


def test_deliveries_to_an_unloaded_folder_do_not_load_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(store: MailStore) -> None:
        first = await fill(store, 5)
        await store.snapshot(ALICE, "INBOX")
        await store.flush_uidlists()
        assert unload_all(store, monkeypatch) >= 1
        used_before = (await store.usage(ALICE))[0]
        later = await fill(store, 3, start=5)
        await store.flush_uidlists()
        mb = await store._boxes.get(ALICE)
        inbox = mb.folders["INBOX"]
        assert not inbox.loaded  # delivered without reading the folder's 5 rows
        assert later == [first[-1] + 1, first[-1] + 2, first[-1] + 3]  # UIDs go on from UIDNEXT
        assert (await store.usage(ALICE))[0] == used_before + sum(len(message(n)) for n in range(5, 8))
        # The full-text indexer's page of new messages comes from the db and one listing.
        _, uidnext, page = await store.messages_after(ALICE, "INBOX", first[-1], 2)
        assert not inbox.loaded
        assert [m.uid for m in page] == later[:2]
        assert uidnext == later[-1] + 1
        assert page[0].path.read_bytes() == message(5)
        # Dovecot's UIDs are written for them all the same.
        uidlist = maildir.read_uidlist(inbox.path)
        assert uidlist is not None
        assert sorted(uidlist.uids.values()) == first + later
        snap = await store.snapshot(ALICE, "INBOX")
        assert [m.uid for m in snap.messages] == first + later
        _, _, loaded_page = await store.messages_after(ALICE, "INBOX", first[-1], 2)
        assert [(m.uid, m.path) for m in loaded_page] == [(m.uid, m.path) for m in page]

    run(tmp_path, body)


def test_an_unchanged_folder_after_a_restart_stats_no_message_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def deliver(store: MailStore) -> None:
        await fill(store, COUNT)
        await store.store_flags(ALICE, "INBOX", [1, 2, 3], frozenset({"\\Seen"}), "add")
        await store.snapshot(ALICE, "INBOX")

    run(tmp_path, deliver)
    real_stat = os.stat
    stats: list[str] = []

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    async def select(store: MailStore) -> int:
        monkeypatch.setattr(os, "stat", counting_stat)  # counted, and done by the real call
        try:
            snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        finally:
            monkeypatch.setattr(os, "stat", real_stat)
        return len(snap.messages)

    assert run(tmp_path, select) == COUNT
    message_files = [p for p in stats if os.sep + "cur" + os.sep in p or os.sep + "new" + os.sep in p]
    assert message_files == []  # the listing and the index rows say it all; Dovecot does the same
    assert len(stats) < COUNT, stats  # not one per message: directories only (30 here, 6 folders)


def test_the_trim_keeps_small_indexes_and_busy_ones(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await fill(store, 3)
        await store.snapshot(ALICE, "INBOX")
        mb = await store._boxes.get(ALICE)
        inbox = mb.folders["INBOX"]
        inbox.last_used = 0.0
        store._boxes.trim()
        assert inbox.loaded  # 3 messages are far below the budget
        assert inbox.memory == 3 * index.ENTRY_MEMORY

    run(tmp_path, body)


def test_unloading_a_folder_empties_the_per_message_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big FETCH's cached address lists would keep pymalloc arenas after the work is over (issue 19:
    appliance/caches.py)."""
    from appliance.imap import fetch

    async def body(store: MailStore) -> None:
        await fill(store, 3)
        await store.snapshot(ALICE, "INBOX")
        fetch._address_list("Alice <alice@ex.test>")
        assert fetch._address_list.cache_info().currsize >= 1
        told: list[int] = []
        store.on_unload.append(lambda: told.append(fetch._address_list.cache_info().currsize))
        for _ in range(100):  # the folder may be busy a moment with the work after the deliveries
            if unload_all(store, monkeypatch):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the folder was never unloaded")
        assert fetch._address_list.cache_info().currsize == 0
        assert told == [0]  # those told (the CPU pool's worker) come after the caches are emptied

    run(tmp_path, body)
