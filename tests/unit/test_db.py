from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiosqlite
import pytest

from appliance.db import Database, DatabaseError, _split_sql, load_migrations


def test_migrations_are_numbered_without_gaps() -> None:
    migrations = load_migrations()
    assert [v for v, _, _ in migrations] == list(range(1, len(migrations) + 1))


@pytest.mark.parametrize("start", range(len(load_migrations()) + 1))
def test_migrates_from_every_earlier_version(tmp_path: Path, start: int) -> None:
    migrations = load_migrations()

    async def scenario() -> None:
        old = await Database.open(tmp_path / "x.db", migrate=False)
        await old.migrate(migrations[:start])
        assert await old.schema_version() == start
        await old.close()
        db = await Database.open(tmp_path / "x.db")
        assert await db.schema_version() == len(migrations)
        names = {r["name"] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"domains", "mailboxes", "aliases", "folders", "messages", "queue_messages"} <= names
        mode = await db.fetchone("PRAGMA journal_mode")
        assert mode is not None
        assert mode[0] == "wal"
        await db.close()

    asyncio.run(scenario())


def test_newer_database_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await Database.open(tmp_path / "x.db")
        await db.execute("INSERT INTO schema_migrations (version, name) VALUES (999, '0999_future.sql')")
        await db.close()
        with pytest.raises(DatabaseError, match="newer than this Letterbox") as info:
            await Database.open(tmp_path / "x.db")
        assert "\n" not in str(info.value)

    asyncio.run(scenario())


def test_failed_migration_leaves_nothing_half_applied(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);\n")
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (x INTEGER);\nINSERT INTO nowhere VALUES (1);\n")

    async def scenario() -> None:
        with pytest.raises(sqlite3.OperationalError):
            await Database.open(tmp_path / "x.db", migrations=folder)
        db = await Database.open(tmp_path / "x.db", migrate=False)
        assert await db.schema_version() == 1
        tables = {r["name"] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "a" in tables
        assert "b" not in tables
        await db.close()

    asyncio.run(scenario())


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await Database.open(tmp_path / "x.db")
        with pytest.raises(RuntimeError):  # noqa: PT012  the error must cross the transaction's exit, which rolls back
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
                raise RuntimeError("boom")
        assert await db.get_setting("k") is None
        await db.set_setting("k", "v1")
        await db.set_setting("k", "v2")
        assert await db.get_setting("k") == "v2"
        await db.close()

    asyncio.run(scenario())


def test_split_sql_keeps_semicolons_inside_strings() -> None:
    script = "-- comment\nCREATE TABLE t (x TEXT DEFAULT ';');\nINSERT INTO t VALUES ('a;b');\n"
    assert _split_sql(script) == ["CREATE TABLE t (x TEXT DEFAULT ';');", "INSERT INTO t VALUES ('a;b');"]


FSYNC_SCRIPT = """
import asyncio, sys
from collections.abc import Callable
from pathlib import Path
from appliance.db import Database

async def main() -> None:
    db = await Database.open(Path(sys.argv[1]))
    await db.execute("CREATE TABLE log (n INTEGER)")
    print("start", flush=True)
    for n in range(int(sys.argv[2])):
        async with db.transaction(durable=sys.argv[3] == "durable") as tx:
            await tx.execute("INSERT INTO log VALUES (?)", (n,))
    print("end", flush=True)
    await db.close()

asyncio.run(main())
"""


def fsyncs(tmp_path: Path, mode: str, commits: int) -> int:
    """fsync/fdatasync calls of `commits` transactions in a fresh process, counted by strace between
    the script's two marks (opening and migrating the db has its own)."""
    import subprocess
    import sys

    from tests.conftest import require_program

    strace = require_program("strace")
    trace = tmp_path / f"{mode}.trace"
    subprocess.run([strace, "-f", "-qq", "-e", "trace=fsync,fdatasync,write", "-o", str(trace), sys.executable, "-c",
                    FSYNC_SCRIPT, str(tmp_path / f"{mode}.db"), str(commits), mode], check=True, capture_output=True)
    lines = trace.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if 'write(1, "start' in line or 'write(1, "end' in line]
    assert len(marks) == 2, lines[-20:]
    return sum(1 for line in lines[marks[0]:marks[1]] if "fsync(" in line or "fdatasync(" in line)


def test_a_transaction_that_need_not_be_durable_costs_no_fsync(tmp_path: Path) -> None:
    """The batched logs' commits (durable=False) leave the disk to the next durable commit."""
    assert fsyncs(tmp_path, "durable", 20) >= 20  # synchronous=FULL: the WAL at every commit
    assert fsyncs(tmp_path, "batched", 20) == 0


def test_durability_is_back_after_a_transaction_that_did_not_need_it(tmp_path: Path) -> None:
    async def level(tx: aiosqlite.Connection) -> int:
        async with tx.execute("PRAGMA synchronous") as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def scenario() -> list[int]:
        db = await Database.open(tmp_path / "x.db")
        levels = []
        try:
            async with db.transaction(durable=False) as tx:
                levels.append(await level(tx))
            with pytest.raises(RuntimeError):
                async with db.transaction(durable=False):
                    raise RuntimeError("rolled back")
            async with db.transaction() as tx:
                levels.append(await level(tx))
        finally:
            await db.close()
        return levels

    assert asyncio.run(scenario()) == [1, 2]  # NORMAL inside, FULL again after (even after a rollback)


def test_a_whole_transaction_in_one_trip_with_its_riders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Database.write: BEGIN, the work, the riders' rows and COMMIT in one handoff to aiosqlite's
    thread (issue 19); on an exception nothing of it is written and durability is back."""
    async def scenario() -> None:
        db = await Database.open(tmp_path / "x.db")
        trips = 0
        real = aiosqlite.Connection._execute

        async def counting(self: aiosqlite.Connection, fn: object, *args: object, **kwargs: object) -> object:
            nonlocal trips
            trips += 1
            return await real(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

        waiting = [("ridden", "1")]

        def rider() -> Callable[[sqlite3.Connection], None] | None:
            if not waiting:
                return None
            rows = list(waiting)
            waiting.clear()

            def ride(conn: sqlite3.Connection) -> None:
                conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?)", rows)

            return ride

        db.add_rider(rider)
        try:
            monkeypatch.setattr(aiosqlite.Connection, "_execute", counting)
            written = await db.write(lambda conn: conn.execute(
                "INSERT INTO settings (key, value) VALUES ('k', 'v')").lastrowid)
            assert trips == 1
            assert written
            monkeypatch.undo()
            assert await db.get_setting("k") == "v"
            assert await db.get_setting("ridden") == "1"

            def fails(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO settings (key, value) VALUES ('k2', 'v')")
                raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await db.write(fails, durable=False)
            assert await db.get_setting("k2") is None
            level = await db.fetchone("PRAGMA synchronous")
            assert level is not None
            assert level[0] == 2  # FULL again
            await db.execute("INSERT INTO settings (key, value) VALUES ('after', 'ok')")  # no transaction left open
        finally:
            await db.close()

    asyncio.run(scenario())


def test_a_wal_that_starts_over_is_cut_back_to_its_limit(tmp_path: Path) -> None:
    """After a big transaction (the first FETCH of a folder copied in writes tens of MB of cache rows)
    the WAL file does not stay at its high-water mark once it starts over (issue 19)."""
    from appliance.db import WAL_SIZE_LIMIT

    async def scenario() -> None:
        db = await Database.open(tmp_path / "x.db")
        try:
            await db.execute("CREATE TABLE scratch (b BLOB)")
            await db.executemany("INSERT INTO scratch VALUES (?)", [(bytes(64 * 1024),)] * (WAL_SIZE_LIMIT // 65536 + 64))
            wal = tmp_path / "x.db-wal"
            assert wal.stat().st_size > WAL_SIZE_LIMIT
            await db.fetchall("PRAGMA wal_checkpoint(PASSIVE)")  # as the box's own checkpoints: no truncation
            await db.execute("CREATE TABLE next (x)")  # a small write: the WAL starts over
            assert wal.stat().st_size <= WAL_SIZE_LIMIT
        finally:
            await db.close()

    asyncio.run(scenario())
