"""Removing and creating mailboxes and domains (issue 10 items 1 and 8, issue 11 item 6): row ids never
reused, nothing cached or stored of a removed mailbox reaches the next owner of an id or an address,
removed mail and keys moved aside and purged later, the database files private to the box."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import dkim_keys
from appliance.accounts import Accounts, AlreadyExists, InvalidAddress, mail_domain, new_mail_domain
from appliance.config import DataLayout
from appliance.db import Database, load_migrations
from appliance.passwords import make_hasher
from appliance.store import trash
from appliance.store.mailstore import MailStore, StoreError

FAST = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
PASSWORD = "a long enough password"
DOMAIN = "example.org"
JONH, DAVE = f"jonh@{DOMAIN}", f"dave@{DOMAIN}"
SECRET = b"Subject: for jonh only\r\n\r\njonh's secret\r\n"

Scenario = Callable[[Accounts, MailStore, DataLayout], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    """Accounts and the store on one data directory, as `letterbox serve` builds them."""
    async def main() -> None:
        layout = DataLayout(tmp_path / "data")
        layout.create()
        db = await Database.open(layout.db)
        try:
            accounts = Accounts(db, hasher=FAST, data=layout)
            await accounts.add_domain(DOMAIN)
            await scenario(accounts, MailStore(layout.mail, db, accounts), layout)
        finally:
            await db.close()

    asyncio.run(main())


async def uids(store: MailStore, address: str) -> list[int]:
    return [m.uid for m in (await store.snapshot(address, "INBOX")).messages]


# --- issue 10 item 1: a new mailbox never sees a removed one's mail ------------------------------------

@pytest.mark.parametrize("second", [DAVE, JONH])
def test_removed_mailbox_mail_never_reaches_the_next_mailbox(tmp_path: Path, second: str) -> None:
    """The reported sequence: jonh gets mail, is removed, dave (or jonh again) is created in the same
    running process. Today dave got jonh's id, so the store's cache showed jonh's message, and a
    delivery failed on a foreign key."""
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        await accounts.add_user(JONH, PASSWORD)
        [uid] = (await store.deliver([JONH], SECRET)).values()
        assert uid == 1
        assert await uids(store, JONH) == [1]
        moved = await accounts.remove_user(JONH)
        assert moved is not None
        assert Path(moved).parent == layout.deleted
        await accounts.add_user(second, PASSWORD)
        assert await uids(store, second) == []  # empty, whatever the cache held
        result = await store.deliver([second], b"Subject: welcome\r\n\r\nhi\r\n")
        assert result == {second: 1}, result  # a UID, not a StoreError from a foreign key
        [message] = (await store.snapshot(second, "INBOX")).messages
        assert b"welcome" in message.path.read_bytes()
        if second != JONH:
            with pytest.raises(StoreError, match="no such mailbox"):
                await store.snapshot(JONH, "INBOX")

    run(tmp_path, scenario)


def test_mailbox_ids_are_never_reused(tmp_path: Path) -> None:
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        db = accounts._db
        await accounts.add_user(JONH, PASSWORD)
        await store.deliver([JONH], SECRET)
        row = await db.fetchone("SELECT id FROM mailboxes")
        folder = await db.fetchone("SELECT MAX(id) FROM folders")
        assert row is not None
        assert folder is not None
        await accounts.remove_user(JONH)
        await accounts.add_user(DAVE, PASSWORD)
        await store.deliver([DAVE], SECRET)
        again = await db.fetchone("SELECT id FROM mailboxes")
        new_folder = await db.fetchone("SELECT MIN(id) FROM folders")
        assert again is not None
        assert new_folder is not None
        assert again[0] > row[0]
        assert new_folder[0] > folder[0]
        for table in ("domains", "aliases", "queue_recipients"):  # every table whose ids are held in memory
            sql = await db.fetchone("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
            assert sql is not None, table
            assert "AUTOINCREMENT" in sql[0], table

    run(tmp_path, scenario)


def test_store_drops_what_it_cached_of_a_removed_mailbox(tmp_path: Path) -> None:
    """Removed by another process (the CLI): the serving store notices at the next access, and an
    operation still holding the old folder fails instead of writing for the next owner."""
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        await accounts.add_user(JONH, PASSWORD)
        await store.deliver([JONH], SECRET)
        old = store._boxes._mailboxes[store._boxes._current[JONH]]
        old_inbox = old.folders["INBOX"]
        watcher = store.watch(JONH, "INBOX")
        await accounts.remove_user(JONH)
        with pytest.raises(StoreError, match="no such mailbox"):
            await store.usage(JONH)
        assert JONH not in store._boxes._current
        assert old.id not in store._boxes._mailboxes
        assert old_inbox.deleted
        assert await watcher.wait(0)
        await accounts.add_user(JONH, PASSWORD)
        assert await uids(store, JONH) == []
        watcher.close()

    run(tmp_path, scenario)


def test_removal_that_does_not_commit_puts_the_mail_back(tmp_path: Path) -> None:
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        await accounts.add_user(JONH, PASSWORD)
        await store.deliver([JONH], SECRET)
        home = layout.mail / DOMAIN / "jonh"
        db = accounts._db
        real = db.transaction

        @contextlib.asynccontextmanager
        async def commit_fails(*, durable: bool = True) -> AsyncIterator[Any]:
            async with real(durable=durable) as tx:
                yield tx
                raise sqlite3.OperationalError("disk I/O error")  # as a failed COMMIT: rolled back

        db.transaction = commit_fails  # type: ignore[method-assign]
        try:
            with pytest.raises(sqlite3.OperationalError):
                await accounts.remove_user(JONH)
        finally:
            db.transaction = real  # type: ignore[method-assign]
        assert await accounts.get_user(JONH) is not None
        assert [m.uid for m in (await store.snapshot(JONH, "INBOX")).messages] == [1]
        assert home.is_dir()
        assert list(layout.deleted.iterdir()) == []

    run(tmp_path, scenario)


def test_purge_removes_only_expired_entries(tmp_path: Path) -> None:
    deleted = tmp_path / "deleted"
    source = tmp_path / "mail" / "jonh"
    source.mkdir(parents=True)
    (source / "x").write_text("old mail")
    day = 86400.0
    old = trash.move_aside({"mail": source}, deleted, "mailbox", "jonh@example.org", now=time.time() - 31 * day)
    source.mkdir()
    recent = trash.move_aside({"mail": source}, deleted, "mailbox", "jonh@example.org", now=time.time() - 29 * day)
    (deleted / "kept-by-hand").mkdir()
    assert old is not None
    assert recent is not None
    assert old != recent
    assert trash.purge(deleted) == [old]
    assert sorted(p.name for p in deleted.iterdir()) == sorted([recent.name, "kept-by-hand"])
    assert stat.S_IMODE(deleted.stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        trash.move_aside({"mail": source}, deleted, "mailbox", "../escape")


def test_an_unfinished_removal_is_put_back_unless_its_place_was_taken(tmp_path: Path) -> None:
    """The record move_aside leaves for a removal killed before its commit (files.py recovers it)."""
    deleted = tmp_path / "deleted"
    source = tmp_path / "mail" / "jonh"
    source.mkdir(parents=True)
    (source / "x").write_text("mail")
    entry = trash.move_aside({"mail": source}, deleted, "mailbox", "jonh@example.org", row_id=7)
    assert entry is not None
    [pending] = trash.unfinished(deleted)
    assert (pending.entry, pending.kind, pending.row_id, pending.name) == (entry, "mailbox", 7, "jonh@example.org")
    assert trash.restore(entry, {"mail": source}) == []
    assert (source / "x").read_text() == "mail"
    assert list(deleted.iterdir()) == []

    entry = trash.move_aside({"mail": source}, deleted, "mailbox", "jonh@example.org", row_id=7)
    assert entry is not None
    source.mkdir()  # a new Maildir in its place: the old one stays where it is, with its record
    assert trash.restore(entry, {"mail": source}) == ["mail"]
    assert (entry / "mail" / "x").read_text() == "mail"
    [pending] = trash.unfinished(deleted)
    trash.settled(pending)
    assert trash.unfinished(deleted) == []
    assert (entry / "mail" / "x").exists()


def test_purger_runs_at_start(tmp_path: Path) -> None:
    deleted = tmp_path / "deleted"
    (deleted / "20000101T000000Z-mailbox-old@example.org").mkdir(parents=True)

    async def main() -> None:
        purger = trash.Purger(deleted)
        await purger.start()
        await purger.stop()

    asyncio.run(main())
    assert list(deleted.iterdir()) == []


# --- issue 10 item 8: domains ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["10.0.0.1", "192.168.1.5.", "::1", "2001:db8::1", "[10.0.0.1]", "1.2.3.4.5",
                                  "localhost", "example.123"])
def test_mail_domain_refuses_ip_addresses_and_non_dns_names(name: str) -> None:
    with pytest.raises(InvalidAddress):
        new_mail_domain(name)
    if name != "localhost":  # a host name (a relay on this machine) may have one label
        with pytest.raises(InvalidAddress):
            mail_domain(name)


@pytest.mark.parametrize(("name", "canonical"), [("Example.ORG.", "example.org"), ("bücher.example", "xn--bcher-kva.example"),
                                                 ("10.example", "10.example"), ("mail.1and1.de", "mail.1and1.de")])
def test_mail_domain_accepts_dns_names(name: str, canonical: str) -> None:
    assert mail_domain(name) == canonical == new_mail_domain(name)


def test_domain_removal_moves_dkim_keys_aside(tmp_path: Path) -> None:
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        db = accounts._db
        first = await dkim_keys.ensure_key(db, layout.dkim, DOMAIN)
        await accounts.remove_domain(DOMAIN)
        assert not (layout.dkim / DOMAIN).exists()
        [entry] = layout.deleted.iterdir()
        assert (entry / "dkim" / f"{first.selector}{dkim_keys.KEY_SUFFIX}").is_file()
        assert await db.get_setting(dkim_keys.selector_setting(DOMAIN)) is None
        await accounts.add_domain(DOMAIN)
        second = await dkim_keys.ensure_key(db, layout.dkim, DOMAIN)
        assert second.private_pem != first.private_pem  # a domain added again never signs with the old key

    run(tmp_path, scenario)


def test_a_domain_stored_by_an_earlier_version_can_still_be_removed(tmp_path: Path) -> None:
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        await accounts._db.execute("INSERT INTO domains (name, created_at) VALUES ('10.0.0.1', 0)")
        assert await accounts.is_local_domain("10.0.0.1")
        await accounts.remove_domain("10.0.0.1")
        assert await accounts.list_domains() == [DOMAIN]

    run(tmp_path, scenario)


# --- issue 10 item 10: an alias never hides a mailbox -----------------------------------------------------

def test_alias_named_like_a_mailbox_is_refused_unless_it_keeps_a_copy(tmp_path: Path) -> None:
    async def scenario(accounts: Accounts, store: MailStore, layout: DataLayout) -> None:
        await accounts.add_user(JONH, PASSWORD)
        with pytest.raises(AlreadyExists, match="is a mailbox"):
            await accounts.add_alias("JONH@example.org", [DAVE])
        assert (await accounts.resolve(JONH)).mailboxes == (JONH,)
        await accounts.add_user(DAVE, PASSWORD)
        await accounts.add_alias(JONH, [JONH, DAVE])  # an explicit forward that keeps a copy
        assert set((await accounts.resolve(JONH)).mailboxes) == {JONH, DAVE}
        assert not await accounts.may_send_as(DAVE, JONH)  # the forward never lends jonh's name
        assert await accounts.may_send_as(JONH, JONH)
        with pytest.raises(AlreadyExists, match="is a mailbox"):
            await accounts.set_alias_targets(JONH, [DAVE])  # editing it into a takeover is refused too
        await accounts.add_alias(f"sales@{DOMAIN}", [DAVE])
        with pytest.raises(AlreadyExists, match="already an alias"):
            await accounts.add_user(f"Sales@{DOMAIN}", PASSWORD)

    run(tmp_path, scenario)


# --- issue 11 item 6: file modes -------------------------------------------------------------------------

def test_database_files_and_data_directories_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        layout = DataLayout(tmp_path / "data")
        layout.create()
        for path in (layout.root, layout.mail, layout.spool, layout.tls, layout.dkim, layout.backups, layout.deleted):
            path.chmod(0o755)  # as an earlier version left them
        layout.create()
        for path in (layout.root, layout.mail, layout.spool, layout.tls, layout.dkim, layout.backups, layout.deleted):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path

        async def main() -> None:
            db = await Database.open(layout.db)
            try:
                await db.set_setting("relay_password", "hunter2")
                for suffix in ("", "-wal", "-shm"):
                    path = layout.db.with_name(layout.db.name + suffix)
                    assert path.exists(), path
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            finally:
                await db.close()
            assert os.umask(0o022) == 0o022  # the umask was put back
        asyncio.run(main())

        layout.db.chmod(0o644)  # a database made by an earlier version is fixed at start
        asyncio.run(_open_and_close(layout.db))
        assert stat.S_IMODE(layout.db.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


async def _open_and_close(path: Path) -> None:
    db = await Database.open(path)
    await db.close()


# --- the migration keeps everything -----------------------------------------------------------------------

def test_rebuilding_migration_keeps_rows_ids_and_references(tmp_path: Path) -> None:
    migrations = load_migrations()
    rebuild = next(i for i, (_, name, _) in enumerate(migrations) if name.endswith("ids_never_reused.sql"))

    async def main() -> None:
        db = await Database.open(tmp_path / "x.db", migrate=False)
        await db.migrate(migrations[:rebuild])
        await db.execute("INSERT INTO domains (id, name, created_at) VALUES (7, 'example.org', 1)")
        await db.execute("INSERT INTO mailboxes (id, domain_id, local_part, password_hash, created_at)"
                         " VALUES (5, 7, 'jonh', 'h', 1)")
        await db.execute("INSERT INTO aliases (id, domain_id, local_part, created_at) VALUES (3, 7, 'info', 1)")
        await db.execute("INSERT INTO alias_targets (alias_id, target) VALUES (3, 'jonh@example.org')")
        await db.execute("INSERT INTO folders (id, mailbox_id, name, uidvalidity) VALUES (9, 5, 'INBOX', 1)")
        await db.execute("INSERT INTO messages (folder_id, uid, basename, size, internaldate) VALUES (9, 1, 'b', 1, 1)")
        await db.execute("INSERT INTO queue_messages (id, sender, size, created_at) VALUES ('q1', '', 1, 1)")
        await db.execute("INSERT INTO queue_recipients (id, message_id, recipient, domain, next_attempt, updated_at)"
                         " VALUES (4, 'q1', 'a@b.test', 'b.test', 1, 1)")
        await db.migrate(migrations)
        assert tuple(await db.fetchone("PRAGMA foreign_keys") or ()) == (1,)  # back on after the rebuild
        assert [tuple(r) for r in await db.fetchall("SELECT id, name FROM domains")] == [(7, "example.org")]
        assert [tuple(r) for r in await db.fetchall("SELECT id, domain_id FROM mailboxes")] == [(5, 7)]
        assert [tuple(r) for r in await db.fetchall("SELECT alias_id, target FROM alias_targets")] == [(3, "jonh@example.org")]
        assert [tuple(r) for r in await db.fetchall("SELECT folder_id, uid FROM messages")] == [(9, 1)]
        assert [tuple(r) for r in await db.fetchall("SELECT id, message_id FROM queue_recipients")] == [(4, "q1")]
        # References still cascade into the rebuilt tables.
        await db.execute("DELETE FROM domains WHERE id = 7")
        assert tuple(await db.fetchone("SELECT COUNT(*) FROM messages") or ()) == (0,)
        assert tuple(await db.fetchone("SELECT COUNT(*) FROM alias_targets") or ()) == (0,)
        await db.execute("INSERT INTO domains (name, created_at) VALUES ('example.net', 1)")
        assert tuple(await db.fetchone("SELECT id FROM domains") or ()) == (8,)  # 7 is never handed out again
        await db.close()

    asyncio.run(main())


def test_rebuild_refuses_to_commit_broken_references(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_base.sql").write_text(
        "CREATE TABLE p (id INTEGER PRIMARY KEY);\n"
        "CREATE TABLE c (p_id INTEGER REFERENCES p(id));\n"
        "INSERT INTO p VALUES (1);\nINSERT INTO c VALUES (1);\n"
    )
    (folder / "0002_rebuild.sql").write_text(
        "-- letterbox: foreign-keys-off\nCREATE TABLE p2 (id INTEGER PRIMARY KEY AUTOINCREMENT);\n"
        "DROP TABLE p;\nALTER TABLE p2 RENAME TO p;\n"  # the row of p forgotten: c's reference dangles
    )

    async def main() -> None:
        with pytest.raises(Exception, match="broken reference"):
            await Database.open(tmp_path / "x.db", migrations=folder)
        db = await Database.open(tmp_path / "x.db", migrate=False)
        assert await db.schema_version() == 1
        assert tuple(await db.fetchone("SELECT COUNT(*) FROM p") or ()) == (1,)
        await db.close()

    asyncio.run(main())
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM c").fetchone() == (1,)
