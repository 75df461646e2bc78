"""The outbound spool (appliance/queue/spool.py) on a real SQLite file and directory."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from appliance.db import Database
from appliance.queue.spool import Spool, new_queue_id

T = TypeVar("T")


def run_with_spool(tmp_path: Path, body: Callable[[Spool, Database], Awaitable[T]]) -> T:
    async def main() -> T:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            return await body(Spool(tmp_path / "spool", db), db)
        finally:
            await db.close()

    return asyncio.run(main())


def test_enqueue_writes_file_then_rows(tmp_path: Path) -> None:
    woken: list[str] = []

    async def body(spool: Spool, db: Database) -> str:
        spool.on_enqueue.append(woken.append)
        queue_id = await spool.enqueue("alice@ours.test", ["b@Ext.Test", "c@other.test", "b@Ext.Test"],
                                       b"Subject: x\r\n\r\nhi\r\n", auth_user="alice@ours.test")
        [message] = await spool.messages()
        assert message.id == queue_id
        assert message.sender == "alice@ours.test"
        assert message.size == len(b"Subject: x\r\n\r\nhi\r\n")
        assert message.auth_user == "alice@ours.test"
        assert [(r.recipient, r.domain, r.state) for r in message.recipients] == [
            ("b@Ext.Test", "ext.test", "queued"), ("c@other.test", "other.test", "queued")]
        return queue_id

    queue_id = run_with_spool(tmp_path, body)
    assert (tmp_path / "spool" / f"{queue_id}.eml").read_bytes() == b"Subject: x\r\n\r\nhi\r\n"
    assert oct((tmp_path / "spool" / f"{queue_id}.eml").stat().st_mode & 0o777) == "0o600"
    assert woken == [queue_id]
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [f"{queue_id}.eml"]


def test_null_sender_and_ids_sort_by_time(tmp_path: Path) -> None:
    async def body(spool: Spool, db: Database) -> list[str]:
        ids = [await spool.enqueue("", [f"r{i}@x.test"], b"x") for i in range(3)]
        listed = [m.id for m in await spool.messages()]
        assert listed == ids
        assert all(m.sender == "" for m in await spool.messages())
        return ids

    ids = run_with_spool(tmp_path, body)
    assert ids == sorted(ids)
    assert len({new_queue_id() for _ in range(1000)}) == 1000


def test_an_existing_message_is_never_replaced(tmp_path: Path) -> None:
    async def body(spool: Spool, db: Database) -> None:
        await spool.enqueue("a@b.test", ["c@d.test"], b"one", queue_id="SAME")
        with pytest.raises(FileExistsError):
            await spool.enqueue("a@b.test", ["c@d.test"], b"two", queue_id="SAME")
        assert [m.id for m in await spool.messages()] == ["SAME"]
        assert spool.path("SAME").read_bytes() == b"one"
        assert sorted(p.name for p in spool.directory.iterdir()) == ["SAME.eml"]

    run_with_spool(tmp_path, body)


def test_failed_commit_leaves_no_file(tmp_path: Path) -> None:
    async def body(spool: Spool, db: Database) -> None:
        await db.execute("DROP TABLE queue_recipients")
        with pytest.raises(sqlite3.OperationalError):
            await spool.enqueue("a@b.test", ["c@d.test"], b"x")
        assert list(spool.directory.iterdir()) == []
        assert await db.fetchall("SELECT * FROM queue_messages") == []

    run_with_spool(tmp_path, body)


def test_orphans_are_judged_by_state_not_age(tmp_path: Path) -> None:
    """Issue 11 item 12: debris from a crash is removed at the next start however young it is; a
    file whose enqueue is still under way (rows not yet committed) is never taken."""

    async def body(spool: Spool, db: Database) -> None:
        kept = await spool.enqueue("a@b.test", ["c@d.test"], b"kept")
        (spool.directory / "DEADBEEF.eml").write_bytes(b"no rows, just written")
        (spool.directory / ".X.eml.tmp").write_bytes(b"half")
        assert sorted(p.name for p in await spool.orphans()) == [".X.eml.tmp", "DEADBEEF.eml"]

        # An enqueue whose file is written but whose rows wait for the db: not debris.
        holding = asyncio.Event()
        release = asyncio.Event()

        async def hold_db() -> None:
            async with db.transaction():
                holding.set()
                await release.wait()

        holder = asyncio.create_task(hold_db())
        await holding.wait()
        pending = asyncio.create_task(spool.enqueue("a@b.test", ["c@d.test"], b"in flight", queue_id="INFLIGHT"))
        for _ in range(200):
            if spool.path("INFLIGHT").exists():
                break
            await asyncio.sleep(0.01)
        assert spool.path("INFLIGHT").exists()
        assert sorted(p.name for p in await spool.orphans()) == [".X.eml.tmp", "DEADBEEF.eml"]
        release.set()
        await holder
        assert await pending == "INFLIGHT"
        names = [p.name for p in await spool.orphans()]
        assert "INFLIGHT.eml" not in names
        assert f"{kept}.eml" not in names

    run_with_spool(tmp_path, body)
