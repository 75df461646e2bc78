"""The account look-ups kept between messages (issue 19): answered from memory while nothing changed,
and a change made by any connection (the CLI in another process, the console in this one) is seen by
the very next look-up; the settings read the same way."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts import Accounts, Resolution
from appliance.accounts.lookup_cache import LookupCache
from appliance.db import ChangeCounters, Database
from appliance.passwords import make_hasher
from appliance.settings import Settings

FAST = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
PASSWORD = "a long enough password"


async def counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Database, list[None], int]:
    """A database, a list that gets one item per statement reading the change counters from here on,
    and the accounts counter read by the first of them."""
    db = await Database.open(tmp_path / "letterbox.db")
    reads: list[None] = []
    real_read_all = db.counters.read_all

    def counted() -> dict[str, int]:
        reads.append(None)
        return real_read_all()

    monkeypatch.setattr(db.counters, "read_all", counted)
    first = db.counters.read_this_tick("accounts")
    assert first is not None
    return db, reads, first


def no_round_trips(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any query through the box's connection fails the test from here on."""
    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a database round trip: {args[:1]}")

    for name in ("fetchone", "fetchall", "execute"):
        monkeypatch.setattr(db, name, refused)


def test_lookups_come_from_memory_until_another_process_changes_the_accounts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        box = await Database.open(tmp_path / "letterbox.db")
        cli = await Database.open(tmp_path / "letterbox.db")  # `letterbox alias add` while serve runs
        try:
            accounts, other = Accounts(box, hasher=FAST), Accounts(cli, hasher=FAST)
            await other.add_domain("example.org")
            await other.add_user("alice@example.org", PASSWORD)
            assert await accounts.resolve("team@example.org") == Resolution((), ())
            assert await accounts.is_local_domain("example.org")
            record = await accounts.mailbox_record("example.org", "alice")
            assert record is not None

            with monkeypatch.context() as patched:
                no_round_trips(box, patched)  # unchanged: every answer from memory
                assert await accounts.resolve("team@example.org") == Resolution((), ())
                assert await accounts.is_local_domain("example.org")
                assert await accounts.mailbox_record("example.org", "alice") == record
            assert accounts.lookups.hits == 3

            await other.add_alias("team@example.org", ["alice@example.org", "bob@elsewhere.test"])
            assert await accounts.resolve("team@example.org") == Resolution(
                ("alice@example.org",), ("bob@elsewhere.test",))
            await other.update_user("alice@example.org", quota_bytes=1000)
            changed = await accounts.mailbox_record("example.org", "alice")
            assert changed is not None
            assert changed.quota_bytes == 1000
            await other.remove_user("alice@example.org")
            assert await accounts.mailbox_record("example.org", "alice") is None
            await other.remove_alias("team@example.org")
            await other.remove_domain("example.org")
            assert not await accounts.is_local_domain("example.org")
        finally:
            await cli.close()
            await box.close()

    asyncio.run(main())


def test_a_change_through_the_box_itself_is_seen_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            accounts = Accounts(db, hasher=FAST)
            await accounts.add_domain("example.org")
            assert await accounts.resolve("alice@example.org") == Resolution((), ())
            await accounts.add_user("alice@example.org", PASSWORD)
            assert await accounts.resolve("alice@example.org") == Resolution(("alice@example.org",), ())
            assert not await accounts.may_send_as("alice@example.org", "sales@example.org")
            await accounts.add_alias("sales@example.org", ["alice@example.org"])
            assert await accounts.may_send_as("alice@example.org", "sales@example.org")
        finally:
            await db.close()

    asyncio.run(main())


def test_the_settings_are_read_without_a_round_trip_while_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            settings = await Settings.load(db, default_hostname="box.example.org")
            with monkeypatch.context() as patched:
                no_round_trips(db, patched)
                assert not (await settings.fresh()).hold
            with sqlite3.connect(tmp_path / "letterbox.db") as other:  # another process's write
                other.execute("INSERT INTO settings (key, value) VALUES ('queue_hold', '1')")
            # Seen from the next iteration of the event loop on (ChangeCounters.read_this_tick),
            # as the next command or message of any session is.
            await asyncio.sleep(0)
            assert (await settings.fresh()).hold
        finally:
            await db.close()

    asyncio.run(main())


def test_the_cache_is_bounded_and_steps_aside_without_its_counter(tmp_path: Path) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            cache = LookupCache(db.counters, max_bytes=2000)
            loads = 0

            async def load() -> str:
                nonlocal loads
                loads += 1
                return "answer"

            for n in range(50):
                await cache.get("resolve", f"user{n}@example.org", load)
            assert cache._bytes <= 2000
            assert len(cache._entries) < 50
        finally:
            await db.close()
        # A database without migration 0018's table: every look-up asks the database.
        sqlite3.connect(tmp_path / "old.db").close()
        counters = ChangeCounters(tmp_path / "old.db")
        assert counters.read("accounts") is None
        cache = LookupCache(counters)
        before = loads
        await cache.get("domain", "example.org", load)
        await cache.get("domain", "example.org", load)
        assert loads == before + 2
        counters.close()

    asyncio.run(main())


def test_without_the_wal_index_the_accounts_counter_is_read_once_per_loop_iteration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An IMAP command looked the accounts counter up three times (issue 19): where the -shm file
    cannot be mapped, within one iteration of the event loop it is read once; another connection's
    commit is seen from the next iteration on, and a commit through the box's own connection at once."""
    monkeypatch.setattr(ChangeCounters, "_map_shm", lambda self: None)

    async def main() -> None:
        db, reads, first = await counting(tmp_path, monkeypatch)
        try:
            assert db.counters.read_this_tick("accounts") == first
            # Every counter came with the first read: the settings' in the same iteration is free.
            assert db.counters.read_this_tick("settings") is not None
            assert len(reads) == 1
            with sqlite3.connect(tmp_path / "letterbox.db") as other:  # another process's commit
                other.execute("UPDATE change_counters SET n = n + 1 WHERE name = 'accounts'")
            await asyncio.sleep(0)
            assert db.counters.read_this_tick("accounts") == first + 1
            assert len(reads) == 2
            # A reader in every iteration keeps an answer for the iteration each commit returns in.
            done = False

            async def reader() -> None:
                while not done:
                    db.counters.read_this_tick("accounts")
                    await asyncio.sleep(0)

            polling = asyncio.ensure_future(reader())
            for n in range(2, 12):
                await db.execute("UPDATE change_counters SET n = n + 1 WHERE name = 'accounts'")
                assert db.counters.read_this_tick("accounts") == first + n
            done = True
            await polling
        finally:
            await db.close()

    asyncio.run(main())


def test_the_counters_are_not_read_again_until_a_commit_moves_the_wal_index_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While no connection of any process committed, the counters come from memory in every loop
    iteration (the -shm file's header is unchanged: no statement, the GIL kept, issue 19); a commit
    anywhere (this process's, another process's, one that touches no counter) is seen by the very next
    look, within the same iteration."""
    async def main() -> None:
        db, reads, first = await counting(tmp_path, monkeypatch)
        try:
            for _ in range(20):
                await asyncio.sleep(0)
                assert db.counters.read_this_tick("accounts") == first
            assert len(reads) == 1
            with sqlite3.connect(tmp_path / "letterbox.db") as other:  # another process's commit
                other.execute("UPDATE change_counters SET n = n + 1 WHERE name = 'accounts'")
            assert db.counters.read_this_tick("accounts") == first + 1  # no iteration in between
            assert len(reads) == 2
            with sqlite3.connect(tmp_path / "letterbox.db") as other:  # a commit that moves no counter
                other.execute("CREATE TABLE scratch (a)")
            settings = db.counters.read_this_tick("settings")
            assert len(reads) == 3
            await db.execute("UPDATE change_counters SET n = n + 1 WHERE name = 'settings'")
            assert db.counters.read_this_tick("settings") == (settings or 0) + 1
            assert len(reads) == 3  # the box's own commit left them read (ChangeCounters.committed)
            # A checkpoint moves no data: the header may stay, and what was read stays true.
            await db.fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            assert db.counters.read_this_tick("accounts") == first + 1
        finally:
            await db.close()

    asyncio.run(main())


# The byte of the -shm file whose shared lock says "in use" (SQLite's os_unix.c: UNIX_SHM_DMS, after
# the 120-octet header and the 8 lock slots); a process that gets it exclusively resets the file.
SHM_IN_USE_BYTE = 128


def test_mapping_the_wal_index_keeps_the_processs_lock_on_it(tmp_path: Path) -> None:
    """The counters map the -shm through SQLite's own descriptor: opening and closing one of ours
    dropped SQLite's POSIX locks on the file, so another process could take it for its first user
    and truncate it under every connection of the box (tests/e2e/test_smtp_crash.py hung)."""
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            db.counters.read_this_tick("accounts")
            assert db.counters._shm is not None  # mapped
            script = ("import fcntl, sys\n"
                      "with open(sys.argv[1], 'r+b') as f:\n"
                      "    try:\n"
                      f"        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, {SHM_IN_USE_BYTE})\n"
                      "    except OSError:\n"
                      "        sys.exit(0)\n"
                      "sys.exit(1)\n")
            other = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", script, str(tmp_path / "letterbox.db-shm")], check=False)
            assert other.returncode == 0, "another process could take the -shm for its first user"
        finally:
            await db.close()

    asyncio.run(main())


def test_the_counters_a_commit_of_the_box_leaves_are_known_without_a_statement_on_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every STORE, EXPUNGE and APPEND commits, and the next command's mailbox look-up read the
    counters again on the event loop (imaptest's stress mode, issue 19): a commit through the box's
    connection leaves them read on the database's thread, under the WAL-index header it wrote;
    another process's commit after it is still seen."""
    async def main() -> None:
        db, reads, first = await counting(tmp_path, monkeypatch)
        bump = "UPDATE change_counters SET n = n + 1 WHERE name = 'accounts'"
        try:
            await db.write(lambda conn: conn.execute(bump))
            assert db.counters.read_this_tick("accounts") == first + 1
            done = await db.write_queued(lambda conn: conn.execute(bump))
            await done
            await asyncio.sleep(0)
            assert db.counters.read_this_tick("accounts") == first + 2
            async with db.transaction() as conn:
                await conn.execute(bump)
            assert db.counters.read_this_tick("accounts") == first + 3
            # A commit that leaves the counters alone (a flag change) keeps them known too.
            await db.write(lambda conn: conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')"))
            assert db.counters.read_this_tick("accounts") == first + 3
            assert len(reads) == 1  # counting()'s own
            with sqlite3.connect(tmp_path / "letterbox.db") as other:  # another process's commit
                other.execute(bump)
            await asyncio.sleep(0)
            assert db.counters.read_this_tick("accounts") == first + 4
            assert len(reads) == 2
        finally:
            await db.close()

    asyncio.run(main())
