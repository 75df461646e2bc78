"""The mail store facade (appliance/store/mailstore.py) on a real Maildir and a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.accounts import Accounts
from appliance.db import Database
from appliance.imap.selected import SelectedFolder
from appliance.store import index, mailboxes, maildir
from appliance.store.index import FolderIndex
from appliance.store.mailstore import (
    SPECIAL_FOLDERS,
    FolderExists,
    MailStore,
    NoSuchFolder,
    QuotaExceeded,
    StoreError,
)
from appliance.store.model import UNKNOWN_DATE
from tests.support.polling import async_wait_until

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
ALICE, BOB, FULL = "alice@ex.test", "bob@ex.test", "full@ex.test"
MAILBOXES = {ALICE: 0, BOB: 0, FULL: 1000}
MSG = b"Subject: hi\r\n\r\nhello\r\n"
LONG_AGO = 1_500_000_000


@asynccontextmanager
async def opened(root: Path) -> AsyncIterator[MailStore]:
    """A store as the app opens one: db, MailStore, recover()."""
    db = await Database.open(root / "letterbox.db")
    try:
        for address, quota in MAILBOXES.items():
            local, domain = address.split("@")
            await db.execute("INSERT OR IGNORE INTO domains (name, created_at) VALUES (?, 0)", (domain,))
            await db.execute(
                "INSERT OR IGNORE INTO mailboxes (domain_id, local_part, password_hash, quota_bytes, created_at)"
                " SELECT id, ?, 'x', ?, 0 FROM domains WHERE name = ?", (local, quota, domain),
            )
        store = MailStore(root / "mail", db, Accounts(db))
        await store.recover()
        yield store
        await store.flush_uidlists()  # as Box.stop does
        store.close()
    finally:
        await db.close()


def run(tmp_path: Path, body: Callable[[MailStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with opened(tmp_path) as store:
            return await body(store)

    return asyncio.run(main())


def home(tmp_path: Path, address: str = ALICE) -> Path:
    local, domain = address.split("@")
    return tmp_path / "mail" / domain / local


def files(folder: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (folder / sub).iterdir())


class Listings:
    """How many times one folder was listed (maildir.list_messages) since `count()` was called."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.monkeypatch, self.listings = folder, monkeypatch, 0

    def count(self) -> None:
        real_list = maildir.list_messages

        def counted(folder: Path) -> dict[str, tuple[str, str]]:
            if folder == self.folder:
                self.listings += 1
            return real_list(folder)

        self.monkeypatch.setattr(maildir, "list_messages", counted)


def age(folder: Path) -> None:
    for sub in ("new", "cur"):
        os.utime(folder / sub, (LONG_AGO, LONG_AGO))


# --- delivery -------------------------------------------------------------------------------------

def test_delivery_is_durable_indexed_and_makes_the_special_folders(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        result = await store.deliver([ALICE, BOB], MSG)
        assert result == {ALICE: 1, BOB: 1}
        snap = await store.snapshot(ALICE, "INBOX")
        [info] = snap.messages
        assert (info.uid, info.size, info.flags) == (1, len(MSG), frozenset())
        assert abs(info.internaldate - time.time()) < 5
        assert info.path.parent.name == "new"
        assert info.path.read_bytes() == MSG
        assert snap.uidnext == 2
        assert snap.recent == {1}
        row = await store._db.fetchone("SELECT basename, size FROM messages")
        assert row is not None
        assert tuple(row) == (info.path.name, len(MSG))

    run(tmp_path, body)
    box = home(tmp_path)
    assert files(box, "tmp") == []
    assert re.fullmatch(rf"\d+\.M\d+P{os.getpid()}Q\d+\.[^/:]+,S={len(MSG)}", files(box, "new")[0])
    for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert (box / f".{name}" / "maildirfolder").exists()
        assert all((box / f".{name}" / sub).is_dir() for sub in ("cur", "new", "tmp"))


def test_each_mailbox_gets_its_own_result(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        big = MSG + b"x" * 2000
        result = await store.deliver([ALICE, "nobody@ex.test", FULL, "Alice@EX.TEST", "not-an-address"], big)
        assert result[ALICE] == 1
        assert result["Alice@EX.TEST"] == 1
        assert isinstance(result[FULL], QuotaExceeded)
        assert isinstance(result["nobody@ex.test"], StoreError)
        assert isinstance(result["not-an-address"], StoreError)
        assert len((await store.snapshot(ALICE, "INBOX")).messages) == 1
        assert (await store.snapshot(FULL, "INBOX")).messages == ()
        assert await store.deliver([FULL], MSG) == {FULL: 1}  # a small one still fits
        assert await store.usage(FULL) == (len(MSG), 1000)
        assert await store.usage(ALICE) == (len(big), 0)

    run(tmp_path, body)
    assert files(home(tmp_path, FULL), "tmp") == []


def test_concurrent_deliveries_do_not_overrun_the_quota(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        results = await asyncio.gather(*[store.deliver([FULL], b"x" * 200) for _ in range(10)])
        delivered = [uid for r in results if isinstance(uid := r[FULL], int)]
        assert len(delivered) == 5
        assert sorted(delivered) == [1, 2, 3, 4, 5]
        assert await store.usage(FULL) == (1000, 1000)
        await store.expunge(FULL, "INBOX", [1, 2])
        assert (await store.deliver([FULL], b"x" * 400))[FULL] == 6  # expunging frees the space

    run(tmp_path, body)


async def held_burst(store: MailStore, count: int, data: bytes = MSG) -> list[int | StoreError]:
    """`count` concurrent deliveries to ALICE's INBOX while its folder lock is held (an IMAP command
    under way), released once every file is written and handed to the group commit."""
    mb = await store._boxes.get(ALICE)
    inbox = await store._boxes.folder(mb, "INBOX")
    before = len(files(inbox.path, "new"))
    async with inbox.lock:
        tasks = [asyncio.create_task(store.deliver([ALICE], data)) for _ in range(count)]
        deadline = time.monotonic() + 30
        while store._arrivals.in_flight < count:
            assert time.monotonic() < deadline, "the deliveries never reached the group commit"
            await asyncio.sleep(0.005)
        # Written and fsynced in tmp/, renamed into place by the group commit under the lock...
        assert (len(files(inbox.path, "tmp")), len(files(inbox.path, "new"))) == (count, before)
        assert len(inbox.pending) == count  # ...and kept from any scan until indexed
    return [r[ALICE] for r in await asyncio.gather(*tasks)]


def test_deliveries_that_arrive_together_share_one_transaction(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)  # the mailbox made and loaded
        flushes, transactions = store._arrivals.flushes, 0
        begin = store._db.transaction

        def counted(**kwargs: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return begin(**kwargs)

        store._db.transaction = counted  # type: ignore[method-assign]
        uids = await held_burst(store, 20)
        assert sorted(uids) == list(range(2, 22))  # type: ignore[type-var]
        # The first flush may have taken only the first arrival before it waited for the lock.
        assert store._arrivals.flushes - flushes <= 2
        assert transactions <= 2
        snap = await store.snapshot(ALICE, "INBOX")
        assert [m.uid for m in snap.messages] == list(range(1, 22))
        assert all(m.path.read_bytes() == MSG for m in snap.messages)
        assert (await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")).pending == set()

    run(tmp_path, body)
    assert files(home(tmp_path), "tmp") == []


def test_a_group_that_cannot_be_indexed_leaves_no_file_and_no_uid(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'full'); END")
        outcomes = await held_burst(store, 5)
        assert all(isinstance(o, StoreError) for o in outcomes)
        assert len(files(home(tmp_path), "new")) == 1  # the burst's files are gone again
        await store._db.execute("DROP TRIGGER refuse")
        assert await store.deliver([ALICE], MSG) == {ALICE: 2}  # no UID was spent on the failure
        assert [m.uid for m in (await store.snapshot(ALICE, "INBOX")).messages] == [1, 2]

    run(tmp_path, body)


def test_a_group_whose_directory_cannot_be_synced_is_not_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory fsync runs inside the group's transaction (store/arrivals.py): when it fails,
    no row is written, the files go and every delivery hears why. The failure is injected (a real
    fsync error needs a failing disk)."""
    real_fsync_dir = maildir.fsync_dir

    def failing(path: Path) -> None:
        raise OSError(5, "Input/output error", str(path))

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        monkeypatch.setattr(maildir, "fsync_dir", failing)
        outcomes = await held_burst(store, 3)
        assert [str(o) for o in outcomes] == ["cannot write the message: Input/output error"] * 3
        assert len(files(home(tmp_path), "new")) == 1
        monkeypatch.setattr(maildir, "fsync_dir", real_fsync_dir)
        assert await store.deliver([ALICE], MSG) == {ALICE: 2}  # no UID was spent on the failure
        assert [m.uid for m in (await store.snapshot(ALICE, "INBOX")).messages] == [1, 2]

    run(tmp_path, body)


def test_a_delivery_lets_the_folder_lock_go_while_its_commit_is_made_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group commit takes its UIDs under the folder lock and lets it go for the trip to the
    database's thread (index.commit_arrivals, issue 19): meanwhile the folder's other sessions look
    at it and change flags, and see no trace of the new message (not its UID, nor UIDNEXT) until its
    file, directory and row are durable. A flag change made meanwhile is in memory first, so the new
    message's mod-sequence goes above it, in memory and in its row."""
    real_fsync_dir = maildir.fsync_dir
    entered, release = threading.Event(), threading.Event()

    def held(path: Path) -> None:
        if Path(path) == home(tmp_path) / "new":  # the delivery's (not a folder made meanwhile)
            entered.set()
            release.wait(10)
        real_fsync_dir(path)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        before = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        monkeypatch.setattr(maildir, "fsync_dir", held)
        delivery = asyncio.ensure_future(store.deliver([ALICE], MSG))
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            during = await asyncio.wait_for(store.snapshot(ALICE, "INBOX", claim_recent=True), 5)
            assert ([m.uid for m in during.messages], during.uidnext) == ([1], 2)
            flagged = asyncio.ensure_future(store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Flagged"}), "add"))
            await async_wait_until(lambda: store._boxes._mailboxes and any(
                f.in_flight for mb in store._boxes._mailboxes.values() for f in mb.folders.values()), what="the STORE queued")
            seen = await asyncio.wait_for(store.snapshot(ALICE, "INBOX"), 5)
            assert [m.uid for m in seen.messages] == [1]
            assert seen.messages[0].flags == {"\\Flagged"}
            assert seen.highestmodseq == before.highestmodseq + 2  # above the delivery's, taken first
        finally:
            release.set()
        assert await delivery == {ALICE: 2}
        await flagged
        after = await store.snapshot(ALICE, "INBOX")
        assert ([m.uid for m in after.messages], after.uidnext) == ([1, 2], 3)
        assert after.messages[1].modseq == after.highestmodseq > seen.highestmodseq
        await asyncio.gather(*index._fixups)
        await store._db.writes_done()
        rows = await store._db.fetchall("SELECT uid, modseq FROM messages ORDER BY uid")
        assert [(r[0], r[1]) for r in rows] == [(1, seen.highestmodseq), (2, after.highestmodseq)]
        [folder] = await store._db.fetchall("SELECT uidnext, highestmodseq FROM folders WHERE name = 'INBOX'")
        assert (folder[0], folder[1]) == (3, after.highestmodseq)

    run(tmp_path, body)


def test_usage_counts_every_folder_after_a_restart(tmp_path: Path) -> None:
    async def first(store: MailStore) -> None:
        await store.deliver([FULL], b"x" * 300)
        await store.append(FULL, "Sent", b"y" * 300, frozenset({"\\Seen"}), None)

    async def second(store: MailStore) -> None:
        assert await store.usage(FULL) == (600, 1000)
        assert isinstance((await store.deliver([FULL], b"z" * 500))[FULL], QuotaExceeded)

    run(tmp_path, first)
    run(tmp_path, second)


def test_uids_survive_a_restart(tmp_path: Path) -> None:
    async def first(store: MailStore) -> tuple[int, list[tuple[int, str]]]:
        for n in range(3):
            await store.deliver([ALICE], MSG + str(n).encode())
        await store.store_flags(ALICE, "INBOX", [2], frozenset({"\\Seen", "Work"}), "add")
        snap = await store.snapshot(ALICE, "INBOX")
        return snap.uidvalidity, [(m.uid, m.path.read_bytes().decode()) for m in snap.messages]

    async def second(store: MailStore) -> tuple[int, list[tuple[int, str]]]:
        snap = await store.snapshot(ALICE, "INBOX")
        assert snap.messages[1].flags == {"\\Seen", "Work"}
        assert (await store.deliver([ALICE], MSG))[ALICE] == 4
        return snap.uidvalidity, [(m.uid, m.path.read_bytes().decode()) for m in snap.messages]

    before = run(tmp_path, first)
    assert run(tmp_path, second) == before


def test_a_rebuild_never_reuses_a_uid(tmp_path: Path) -> None:
    """Lost message rows: the files get new UIDs above the old ones and UIDVALIDITY stays (no UID ever
    names two messages). Lost folder row: a new UIDVALIDITY, UIDs from 1."""

    async def deliver(store: MailStore) -> tuple[int, list[bytes]]:
        for n in range(3):
            await store.deliver([ALICE], MSG + str(n).encode())
        snap = await store.snapshot(ALICE, "INBOX")
        return snap.uidvalidity, [m.path.read_bytes() for m in snap.messages]

    uidvalidity, bodies = run(tmp_path, deliver)

    async def without_messages(store: MailStore) -> None:
        await store._db.execute("DELETE FROM messages")
        snap = await store.snapshot(ALICE, "INBOX")
        assert snap.uidvalidity == uidvalidity
        assert [m.uid for m in snap.messages] == [4, 5, 6]
        assert [m.path.read_bytes() for m in snap.messages] == bodies  # same order

    async def without_folders(store: MailStore) -> None:
        # The dovecot-uidlist the store keeps (issue 17) still names every file: UIDVALIDITY and
        # UIDs come back from it, as for a Maildir brought over from Dovecot.
        await store._db.execute("DELETE FROM folders")
        snap = await store.snapshot(ALICE, "INBOX")
        assert snap.uidvalidity == uidvalidity
        assert [m.uid for m in snap.messages] == [4, 5, 6]
        assert [m.path.read_bytes() for m in snap.messages] == bodies

    async def without_folders_or_uidlist(store: MailStore) -> None:
        await store._db.execute("DELETE FROM folders")
        (home(tmp_path) / "dovecot-uidlist").unlink()
        snap = await store.snapshot(ALICE, "INBOX")
        assert snap.uidvalidity != uidvalidity
        assert [m.uid for m in snap.messages] == [1, 2, 3]
        assert [m.path.read_bytes() for m in snap.messages] == bodies

    run(tmp_path, without_messages)
    run(tmp_path, without_folders)
    run(tmp_path, without_folders_or_uidlist)


# --- a Maildir written by another program -----------------------------------------------------------

def test_a_foreign_maildir_is_picked_up(tmp_path: Path) -> None:
    box = home(tmp_path)
    for folder in (box, box / ".Work"):
        maildir.make_maildir(folder, folder=folder != box)
    (box / "cur" / "1600000001.M1P1.other:2,FS").write_bytes(b"Subject: one\r\n\r\n1\r\n")
    (box / "cur" / "1600000002.M1P1.other:2,Sa").write_bytes(b"Subject: two\r\n\r\n2\r\n")
    (box / "new" / "1600000003.M1P1.other").write_bytes(b"Subject: three\r\n\r\n3\r\n")
    (box / "dovecot-keywords").write_text("0 $Label1\n")
    (box / ".Work" / "cur" / "1600000004.M1P1.other:2,").write_bytes(b"Subject: four\r\n\r\n4\r\n")
    os.utime(box / "cur" / "1600000001.M1P1.other:2,FS", (1600000001, 1600000001))

    async def body(store: MailStore) -> None:
        snap = await store.snapshot(ALICE, "INBOX")
        assert [(m.uid, m.flags) for m in snap.messages] == [
            (1, {"\\Flagged", "\\Seen"}), (2, {"\\Seen", "$Label1"}), (3, frozenset()),
        ]
        assert snap.messages[0].internaldate == 1600000001
        assert [f.name for f in await store.folders(ALICE)][:2] == ["INBOX", "Archive"]
        assert "Work" in [f.name for f in await store.folders(ALICE)]
        assert [m.uid for m in (await store.snapshot(ALICE, "Work")).messages] == [1]

        watcher = store.watch(ALICE, "INBOX")
        # Another program reads message 3, unflags 1 and deletes 2.
        os.rename(box / "new" / "1600000003.M1P1.other", box / "cur" / "1600000003.M1P1.other:2,S")
        os.rename(box / "cur" / "1600000001.M1P1.other:2,FS", box / "cur" / "1600000001.M1P1.other:2,S")
        os.unlink(box / "cur" / "1600000002.M1P1.other:2,Sa")
        later = await store.snapshot(ALICE, "INBOX")
        assert [(m.uid, m.flags) for m in later.messages] == [(1, frozenset({"\\Seen"})), (3, frozenset({"\\Seen"}))]
        assert later.highestmodseq > snap.highestmodseq
        assert all(m.modseq == later.highestmodseq for m in later.messages)
        assert await watcher.wait(0)  # sessions watching the folder hear of it

    run(tmp_path, body)


def test_a_file_named_with_both_sizes_is_indexed_without_a_stat_and_dated_later(tmp_path: Path) -> None:
    """Dovecot's names carry ',S=' and ',W=': the first listing stats no such file (issue 19), its
    INTERNALDATE (the mtime) is read when asked, then kept in the index by the background dating,
    and is right after a restart whether the dating had finished or not."""
    box = home(tmp_path)
    maildir.make_maildir(box, folder=False)
    data = b"Subject: one\n\nbody\n"  # bare LFs: the wire size (W=) differs from the size on disk
    named = [f"1600000001.M1P1.other,S={len(data)},W={len(data) + 3}:2,S",
             f"1600000002.M2P1.other,S={len(data)},W={len(data) + 3}:2,"]
    for name, date in zip(named, (1500000000, 1500000100), strict=True):
        (box / "cur" / name).write_bytes(data)
        os.utime(box / "cur" / name, (date, date))
    (box / "cur" / "1600000003.M3P1.other:2,").write_bytes(data)  # no sizes: stat'ed and counted
    os.utime(box / "cur" / "1600000003.M3P1.other:2,", (1500000200, 1500000200))
    dates = [1500000000, 1500000100, 1500000200]

    def kept() -> list[int]:
        with sqlite3.connect(tmp_path / "letterbox.db") as db:
            return [r[0] for r in db.execute("SELECT internaldate FROM messages ORDER BY uid")]

    async def first_sight(store: MailStore) -> None:
        snap = await store.snapshot(ALICE, "INBOX")
        assert [m.date for m in snap.messages] == [UNKNOWN_DATE, UNKNOWN_DATE, 1500000200]
        assert [m.internaldate for m in snap.messages] == dates
        assert [m.size for m in snap.messages] == [len(data) + 3] * 3
        # Renamed by another program (a flag change) before anyone looked again: still its date.
        os.rename(box / "cur" / named[1], box / "cur" / (named[1] + "F"))
        assert snap.messages[1].internaldate == 1500000100

    run(tmp_path, first_sight)  # stopped at once: the dating did not get to keep anything
    assert kept() == [UNKNOWN_DATE, UNKNOWN_DATE, 1500000200]

    async def after_restart(store: MailStore) -> None:
        snap = await store.snapshot(ALICE, "INBOX")
        assert [m.internaldate for m in snap.messages] == dates

        await async_wait_until(lambda: UNKNOWN_DATE not in kept(), what="the dates kept in the index")
        later = await store.snapshot(ALICE, "INBOX", disk=False)  # after the dating's lock: in memory too
        assert [m.date for m in later.messages] == dates

    run(tmp_path, after_restart)
    assert kept() == dates


def test_dovecot_uids_are_adopted_on_first_sight(tmp_path: Path) -> None:
    box = home(tmp_path)
    maildir.make_maildir(box, folder=False)
    (box / "cur" / "1600000001.M1P1.dove:2,S").write_bytes(b"a")
    (box / "cur" / "1600000002.M1P1.dove:2,").write_bytes(b"b")
    (box / "new" / "1600000003.M1P1.dove").write_bytes(b"c")  # arrived after Dovecot last looked
    (box / "dovecot-uidlist").write_text(
        "3 V1234567 N13 Gabc\n7 :1600000001.M1P1.dove\n12 W1 :1600000002.M1P1.dove\n"
    )

    async def body(store: MailStore) -> None:
        snap = await store.snapshot(ALICE, "INBOX")
        assert snap.uidvalidity == 1234567
        assert [(m.uid, m.path.read_bytes()) for m in snap.messages] == [(7, b"a"), (12, b"b"), (13, b"c")]
        assert snap.uidnext == 14

    run(tmp_path, body)


# --- flags and \Recent ----------------------------------------------------------------------------

def test_flags_round_trip_through_file_names(tmp_path: Path) -> None:
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)

        async def change(flags: set[str], mode: str) -> str:
            [info] = await store.store_flags(ALICE, "INBOX", [1], frozenset(flags), mode)  # type: ignore[arg-type]
            assert info.path.exists()
            return info.path.name.split(":2,")[1]

        assert await change({"\\Seen", "\\Flagged"}, "add") == "FS"
        assert await change({"Work", "\\Answered"}, "add") == "FRSa"
        assert (box / "dovecot-keywords").read_text() == "0 Work\n"
        assert await change({"\\Flagged", "work"}, "remove") == "RS"  # keywords match in any case
        assert await change({"\\Deleted", "\\Draft"}, "set") == "DT"
        # P (passed) is set by other programs and has no IMAP flag: IMAP changes keep it.
        [info] = (await store.snapshot(ALICE, "INBOX")).messages
        os.rename(info.path, info.path.with_name(info.path.name + "P"))
        assert (await store.snapshot(ALICE, "INBOX")).messages[0].flags == {"\\Deleted", "\\Draft"}
        assert await change({"\\Seen"}, "set") == "PS"
        assert await change(set(), "set") == "P"
        [unchanged] = await store.store_flags(ALICE, "INBOX", [1, 99], frozenset(), "remove")
        assert unchanged.uid == 1  # every existing message is reported, changed or not

    run(tmp_path, body)


def test_known_keywords_need_no_read_of_the_keyword_file_new_ones_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A STORE of keywords that already have letters does not read dovecot-keywords (issue 19: two
    worker-thread reads per STORE); a new keyword reads it first, so a letter another program gave
    meanwhile is never handed out twice."""
    box = home(tmp_path)
    reads = 0
    real_read = maildir.read_keywords

    def counted(folder: Path) -> maildir.Keywords:
        nonlocal reads
        reads += 1
        return real_read(folder)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"Work"}), "add")
        await store.snapshot(ALICE, "INBOX")  # the scan reads the file we just wrote, once
        monkeypatch.setattr(maildir, "read_keywords", counted)
        [info] = await store.store_flags(ALICE, "INBOX", [1], frozenset({"work", "\\Seen"}), "set")
        assert info.flags == {"Work", "\\Seen"}
        assert reads == 0
        (box / "dovecot-keywords").write_text("0 Work\n1 Theirs\n")  # another program's letter b
        [info] = await store.store_flags(ALICE, "INBOX", [1], frozenset({"Mine"}), "add")
        assert reads == 1  # before the new letter is given
        assert (box / "dovecot-keywords").read_text() == "0 Work\n1 Theirs\n2 Mine\n"
        assert info.path.name.endswith(":2,Sac")

    run(tmp_path, body)


@pytest.mark.parametrize("in_transaction", [256, 1])
def test_store_and_expunge_find_a_file_another_program_renamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_transaction: int) -> None:
    """STORE and EXPUNGE work from the index without listing the Maildir first (issue 19); a file
    another program renamed since (a Maildir MUA setting a flag) is found by a listing when it is
    not where the index said: the flag change lands on it, the expunge removes it (never left
    behind to come back as a new message). Both ways of changing the files: on the database's thread
    in the transaction (a few), and in a worker thread before it (more than FILES_IN_TRANSACTION)."""
    monkeypatch.setattr(index, "FILES_IN_TRANSACTION", in_transaction)
    box = home(tmp_path)
    scans = 0
    real_scan = FolderIndex.scan

    def counted(self: FolderIndex, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return real_scan(self, **kwargs)

    def rename_behind(info: Any, letters: str) -> None:
        os.rename(info.path, info.path.with_name(info.path.name.partition(":")[0] + ":2," + letters))

    async def body(store: MailStore) -> None:
        for _ in range(2):
            await store.deliver([ALICE], MSG)
        one, _ = (await store.snapshot(ALICE, "INBOX", claim_recent=True)).messages
        monkeypatch.setattr(FolderIndex, "scan", counted)
        [info] = await store.store_flags(ALICE, "INBOX", [2], frozenset({"\\Answered"}), "add")
        assert scans == 0
        assert info.flags == {"\\Answered"}
        rename_behind(one, "S")
        [info] = await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Flagged"}), "add")
        assert info.flags == {"\\Seen", "\\Flagged"}
        assert files(box, "cur") == sorted([info.path.name, (await store.snapshot(ALICE, "INBOX")).messages[1].path.name])
        assert info.path.name.endswith(":2,FS")
        rename_behind(info, "FST")
        assert await store.expunge(ALICE, "INBOX", [1]) == [1]
        assert [m.uid for m in (await store.snapshot(ALICE, "INBOX")).messages] == [2]
        assert len(files(box, "cur")) == 1
        assert files(box, "new") == []

    run(tmp_path, body)


def test_flag_changes_bump_modseq(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.deliver([ALICE], MSG)
        start = (await store.snapshot(ALICE, "INBOX")).highestmodseq
        [one, two] = await store.store_flags(ALICE, "INBOX", [1, 2], frozenset({"\\Seen"}), "add")
        assert one.modseq == two.modseq == start + 1
        [one, two] = await store.store_flags(ALICE, "INBOX", [1, 2], frozenset({"\\Seen"}), "add")
        assert one.modseq == start + 1  # nothing changed, nothing bumped
        assert (await store.snapshot(ALICE, "INBOX")).highestmodseq == start + 1

    run(tmp_path, body)


def test_select_of_an_unchanged_folder_rebuilds_nothing(tmp_path: Path) -> None:
    """Issue 19: while the folder does not change, every SELECT gets the same snapshot and the views
    share its UID list and map (no per-message object built per SELECT); a change makes one new
    snapshot, and a view copies only when it has something to take in."""
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        for _ in range(3):
            await store.deliver([ALICE], MSG)
        await store.store_flags(ALICE, "INBOX", [2], frozenset({"\\Seen", "$Label"}), "add")
        first = await store.snapshot(ALICE, "INBOX", claim_recent=True)  # claims 1-3: a change
        age(box)
        inbox = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        built = inbox.snapshots_built
        again = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        peek = await store.snapshot(ALICE, "INBOX")
        assert again is peek
        assert inbox.snapshots_built == built + 1  # the claim changed \Recent: one new snapshot
        assert await store.snapshot(ALICE, "INBOX", claim_recent=True) is again
        assert inbox.snapshots_built == built + 1
        one, two = SelectedFolder(again, readonly=False), SelectedFolder(again, readonly=True)
        assert one.uids is two.uids is again.uids
        assert one.infos is two.infos is again.by_uid
        assert (one.first_unseen(), one.keywords, again.unseen, again.size) == (1, {"$Label"}, 2, 3 * len(MSG))
        assert first.recent == {1, 2, 3}
        assert again.recent == frozenset()
        assert one.apply(again, allow_expunge=True) == []

        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Seen"}), "add")
        changed = await store.snapshot(ALICE, "INBOX")
        assert changed is not again
        assert inbox.snapshots_built == built + 2
        assert [r.to_bytes() for r in one.apply(changed, allow_expunge=True)] == [
            b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n"]
        assert one.infos is not again.by_uid
        assert one.first_unseen() == 3
        assert "\\Seen" not in two.info(1).flags
        assert two.infos is again.by_uid

    run(tmp_path, body)


def test_too_many_keywords_are_refused(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.store_flags(ALICE, "INBOX", [1], frozenset(f"k{i}" for i in range(26)), "add")
        with pytest.raises(StoreError, match="too many keywords"):
            await store.store_flags(ALICE, "INBOX", [1], frozenset({"one-more"}), "add")
        [info] = (await store.snapshot(ALICE, "INBOX")).messages
        assert len(info.flags) == 26

    run(tmp_path, body)


def test_recent_is_claimed_by_one_session_only(tmp_path: Path) -> None:
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.deliver([ALICE], MSG)
        peek = await store.snapshot(ALICE, "INBOX")
        assert peek.recent == {1, 2}
        assert len(files(box, "new")) == 2
        first = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        assert first.recent == {1, 2}
        assert files(box, "new") == []
        assert all(n.endswith(":2,") for n in files(box, "cur"))
        assert all(m.path.exists() for m in first.messages)
        second = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        assert second.recent == frozenset()
        # An append with flags goes to cur/ and is still recent for the next claimer.
        _, uid = await store.append(ALICE, "INBOX", MSG, frozenset({"\\Seen"}), None)
        await store.deliver([ALICE], MSG)
        third = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        assert third.recent == {uid, uid + 1}
        # A flag change on a message still in new/ moves it to cur/ and keeps it recent.
        await store.deliver([ALICE], MSG)
        await store.store_flags(ALICE, "INBOX", [5], frozenset({"\\Flagged"}), "add")
        assert files(box, "new") == []
        assert (await store.snapshot(ALICE, "INBOX", claim_recent=True)).recent == {5}

    run(tmp_path, body)


def test_a_claim_lets_the_folder_lock_go_while_its_files_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim's renames from new/ to cur/ are queued on the database's thread with the lock let go
    (OpenMailboxes.claim): the folder's other sessions and deliveries do not queue behind a thread's
    trip (issue 19). The messages are claimed at once, once: another look finds none recent, and the
    claimer's snapshot comes back once the files are where it says."""
    box = home(tmp_path)
    real_rename = maildir.rename_files
    entered, release = threading.Event(), threading.Event()

    def held(moves: Any, *, durable: bool = True) -> list[bool]:
        entered.set()
        release.wait(10)
        return real_rename(moves, durable=durable)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        await store.deliver([ALICE], MSG)
        await store.deliver([ALICE], MSG)
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        monkeypatch.setattr(maildir, "rename_files", held)
        claiming = asyncio.ensure_future(store.snapshot(ALICE, "INBOX", claim_recent=True))
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            await asyncio.wait_for(f.lock.acquire(), 5)  # free while the files move
            f.lock.release()
            other = await asyncio.wait_for(store.snapshot(ALICE, "INBOX", claim_recent=True, disk=False), 5)
            assert other.recent == frozenset()
            assert not claiming.done()
        finally:
            release.set()
        first = await asyncio.wait_for(claiming, 5)
        assert first.recent == {2, 3}
        assert files(box, "new") == []
        assert all(m.path.exists() for m in first.messages)
        assert not f.in_flight
        assert not f.dirty  # its own renames: the next look lists nothing

    run(tmp_path, body)


# --- expunge, copy, move, append ------------------------------------------------------------------

def test_expunge_removes_files_and_uids(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        for _ in range(3):
            await store.deliver([ALICE], MSG)
        paths = [m.path for m in (await store.snapshot(ALICE, "INBOX")).messages]
        assert await store.expunge(ALICE, "INBOX", [2, 3, 42]) == [2, 3]
        assert not paths[1].exists()
        assert not paths[2].exists()
        assert paths[0].exists()
        snap = await store.snapshot(ALICE, "INBOX")
        assert [m.uid for m in snap.messages] == [1]
        assert snap.uidnext == 4
        assert await store.expunge(ALICE, "INBOX", [2]) == []
        assert (await store.deliver([ALICE], MSG))[ALICE] == 4  # UIDs are not reused

    run(tmp_path, body)


@pytest.mark.parametrize("slice_size", [256, 1])
def test_copy_and_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    """(A MOVE is done in slices, as STORE and EXPUNGE: one slice, and one per message.)"""
    monkeypatch.setattr(index, "FILES_IN_TRANSACTION", slice_size)
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        for n in range(3):
            await store.deliver([ALICE], MSG + str(n).encode())
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Seen", "Work"}), "set")
        assert await store.copy(ALICE, "INBOX", [1, 2, 7], "Archive") == [(1, 1), (2, 2)]
        archive = await store.snapshot(ALICE, "Archive")
        assert [m.flags for m in archive.messages] == [{"\\Seen", "Work"}, frozenset()]
        assert archive.recent == {1, 2}
        assert (box / ".Archive" / "dovecot-keywords").read_text() == "0 Work\n"
        inbox = await store.snapshot(ALICE, "INBOX")
        assert os.stat(archive.messages[0].path).st_ino == os.stat(inbox.messages[0].path).st_ino
        assert [m.internaldate for m in archive.messages] == [m.internaldate for m in inbox.messages[:2]]

        assert await store.move(ALICE, "INBOX", [2, 3], "Trash") == [(2, 1), (3, 2)]
        assert [m.uid for m in (await store.snapshot(ALICE, "INBOX")).messages] == [1]
        trash = await store.snapshot(ALICE, "Trash")
        assert [m.path.read_bytes() for m in trash.messages] == [MSG + b"1", MSG + b"2"]
        assert files(box, "new") == []

        with pytest.raises(NoSuchFolder):
            await store.copy(ALICE, "INBOX", [1], "Nowhere")
        assert await store.move(ALICE, "Trash", [1], "Trash") == [(1, 3)]  # same folder: new UID
        assert [m.uid for m in (await store.snapshot(ALICE, "Trash")).messages] == [2, 3]
        assert await store.usage(ALICE) == (sum(len(MSG) + 1 for _ in range(5)), 0)

    run(tmp_path, body)


def test_copy_over_quota_copies_nothing(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        await store.deliver([FULL], b"x" * 400)
        await store.deliver([FULL], b"y" * 400)
        with pytest.raises(QuotaExceeded):
            await store.copy(FULL, "INBOX", [1, 2], "Archive")
        assert (await store.snapshot(FULL, "Archive")).messages == ()
        assert await store.move(FULL, "INBOX", [1, 2], "Archive") == [(1, 1), (2, 2)]  # moves use no space

    run(tmp_path, body)


def test_append(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        validity, uid = await store.append(ALICE, "Sent", MSG, frozenset({"\\Seen", "$Forwarded"}), 1_600_000_000)
        snap = await store.snapshot(ALICE, "Sent")
        assert (snap.uidvalidity, snap.messages[0].uid) == (validity, uid) == (validity, 1)
        [info] = snap.messages
        assert info.flags == {"\\Seen", "$Forwarded"}
        assert info.internaldate == 1_600_000_000
        assert info.path.parent.name == "cur"
        assert os.stat(info.path).st_mtime == 1_600_000_000
        assert (await store.append(ALICE, "inbox", MSG, frozenset(), None))[1] == 1  # INBOX in any case
        with pytest.raises(NoSuchFolder):
            await store.append(ALICE, "drafts", MSG, frozenset(), None)  # other names are case-sensitive
        with pytest.raises(QuotaExceeded):
            await store.append(FULL, "INBOX", b"x" * 1001, frozenset(), None)

    run(tmp_path, body)


# --- folders --------------------------------------------------------------------------------------

def test_create_and_delete_folders(tmp_path: Path) -> None:
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        await store.create_folder(ALICE, "Projects/2024/Q1")
        assert (box / ".Projects.2024.Q1" / "maildirfolder").exists()
        infos = {f.name: f for f in await store.folders(ALICE)}
        assert {"Projects", "Projects/2024", "Projects/2024/Q1"} <= set(infos)  # superiors made too
        assert infos["Projects"].has_children
        assert not infos["Projects/2024/Q1"].has_children
        assert infos["Sent"].special_use == "\\Sent"
        assert infos["Projects"].special_use is None
        with pytest.raises(FolderExists):
            await store.create_folder(ALICE, "Projects/2024")
        with pytest.raises(FolderExists):
            await store.create_folder(ALICE, "inbox")
        with pytest.raises(StoreError, match=r"'\.' cannot be used"):
            await store.create_folder(ALICE, "v1.2")
        with pytest.raises(StoreError, match="INBOX cannot be deleted"):
            await store.delete_folder(ALICE, "INBOX")

        await store.append(ALICE, "Projects", MSG, frozenset(), None)
        old = await store.snapshot(ALICE, "Projects")
        watcher = store.watch(ALICE, "Projects")
        await store.delete_folder(ALICE, "Projects")
        assert await watcher.wait(0)
        assert not (box / ".Projects").exists()
        assert (box / ".Projects.2024").exists()
        with pytest.raises(NoSuchFolder):
            await store.snapshot(ALICE, "Projects")
        with pytest.raises(NoSuchFolder):
            await store.delete_folder(ALICE, "Projects")
        await store.create_folder(ALICE, "Projects")
        new = await store.snapshot(ALICE, "Projects")
        assert new.messages == ()
        assert new.uidvalidity != old.uidvalidity

    run(tmp_path, body)


def test_rename_moves_children_and_keeps_uids(tmp_path: Path) -> None:
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        await store.create_folder(ALICE, "A/B")
        await store.append(ALICE, "A/B", MSG, frozenset({"\\Seen"}), None)
        before = await store.snapshot(ALICE, "A/B")
        await store.rename_folder(ALICE, "A", "X/Y")
        names = [f.name for f in await store.folders(ALICE)]
        assert "A" not in names
        assert "A/B" not in names
        assert {"X", "X/Y", "X/Y/B"} <= set(names)
        after = await store.snapshot(ALICE, "X/Y/B")
        assert after.uidvalidity == before.uidvalidity
        assert [(m.uid, m.flags) for m in after.messages] == [(1, frozenset({"\\Seen"}))]
        assert after.messages[0].path.parent.parent == box / ".X.Y.B"
        with pytest.raises(NoSuchFolder):
            await store.rename_folder(ALICE, "A", "C")
        with pytest.raises(FolderExists):
            await store.rename_folder(ALICE, "X/Y", "Sent")
        with pytest.raises(StoreError, match="below itself"):
            await store.rename_folder(ALICE, "X", "X/Z")
        with pytest.raises(StoreError, match=r"'\.' cannot"):
            await store.rename_folder(ALICE, "X", "X.Z")
        with pytest.raises(NoSuchFolder):  # a name the disk cannot hold names no folder
            await store.rename_folder(ALICE, "X.Z", "Z")
        with pytest.raises(NoSuchFolder):
            await store.snapshot(ALICE, "a.b")
        with pytest.raises(NoSuchFolder):
            await store.delete_folder(ALICE, "A//B")

    run(tmp_path, body)


def test_renaming_inbox_moves_its_messages(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        for n in range(2):
            await store.deliver([ALICE], MSG + str(n).encode())
        await store.create_folder(ALICE, "INBOX/Child")
        await store.rename_folder(ALICE, "INBOX", "Old mail")
        inbox = await store.snapshot(ALICE, "INBOX")
        assert inbox.messages == ()
        assert inbox.uidnext == 3
        old = await store.snapshot(ALICE, "Old mail")
        assert [m.path.read_bytes() for m in old.messages] == [MSG + b"0", MSG + b"1"]
        assert "INBOX/Child" in [f.name for f in await store.folders(ALICE)]  # RFC 3501 6.3.5
        assert (await store.deliver([ALICE], MSG))[ALICE] == 3

    run(tmp_path, body)


def test_subscriptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(store: MailStore) -> None:
        await store.subscribe(ALICE, "Junk", False)
        subscribed = {f.name: f.subscribed for f in await store.folders(ALICE)}
        assert subscribed["Junk"] is False
        assert subscribed["INBOX"] is True
        await store.subscribe(ALICE, "Gone", False)  # clients unsubscribe after DELETE
        with pytest.raises(NoSuchFolder):
            await store.subscribe(ALICE, "Gone", True)
        # A plain LIST shows no \Subscribed: its folders come without a trip to the database.
        with monkeypatch.context() as patched:
            patched.setattr(store._db, "fetchall", None)  # any query fails the test
            names = [f.name for f in await store.folders(ALICE, subscriptions=False)]
        assert names == list(subscribed)

    run(tmp_path, body)


def test_subscriptions_are_names_apart_from_folders(tmp_path: Path) -> None:
    # Issue 17, RFC 3501 6.3.6: CREATE subscribes nothing, DELETE keeps the name subscribed; a new
    # mailbox starts with INBOX and its special folders subscribed; RENAME takes the name along.
    async def body(store: MailStore) -> None:
        assert await store.subscriptions(ALICE) == sorted(["INBOX", *SPECIAL_FOLDERS])
        await store.create_folder(ALICE, "Lists/Python")
        assert "Lists/Python" not in await store.subscriptions(ALICE)
        await store.subscribe(ALICE, "Lists/Python", True)
        await store.delete_folder(ALICE, "Lists/Python")
        assert "Lists/Python" in await store.subscriptions(ALICE)
        assert "Lists/Python" not in [f.name for f in await store.folders(ALICE)]
        await store.create_folder(ALICE, "Lists/Python")
        assert {f.name: f.subscribed for f in await store.folders(ALICE)}["Lists/Python"] is True
        await store.rename_folder(ALICE, "Lists", "Groups")
        subscribed = await store.subscriptions(ALICE)
        assert "Groups/Python" in subscribed
        assert "Lists/Python" not in subscribed
        await store.subscribe(ALICE, "Groups/Python", False)
        assert "Groups/Python" not in await store.subscriptions(ALICE)
        # Mirrored in Dovecot's format, so the Maildir can go back to Dovecot with its subscriptions.
        mirrored = (home(tmp_path) / "subscriptions").read_bytes()
        assert mirrored == b"V\t2\n\n" + b"".join(n.replace("/", "\t").encode() + b"\n"
                                                   for n in await store.subscriptions(ALICE))

    run(tmp_path, body)


# --- watchers -------------------------------------------------------------------------------------

def test_watchers_are_woken_after_committed_changes(tmp_path: Path) -> None:
    async def body(store: MailStore) -> None:
        inbox, sent = store.watch(ALICE, "INBOX"), store.watch(ALICE, "Sent")
        assert not await inbox.wait(0)
        assert not await inbox.wait(0.01)
        waiting = asyncio.ensure_future(inbox.wait())
        await asyncio.sleep(0)
        uid = (await store.deliver([ALICE], MSG))[ALICE]
        assert await asyncio.wait_for(waiting, 5)
        # The UID is committed by the time the watcher runs.
        assert uid in [m.uid for m in (await store.snapshot(ALICE, "INBOX")).messages]
        assert not await inbox.wait(0)  # reading the change clears it
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Seen"}), "add")
        assert await inbox.wait(0)
        assert not await sent.wait(0)
        inbox.close()
        await store.expunge(ALICE, "INBOX", [1])
        assert not await inbox.wait(0)
        await store.copy(ALICE, "INBOX", [], "Sent")
        assert not await sent.wait(0)

    run(tmp_path, body)


def test_a_woken_future_is_done_by_a_change_without_a_task_of_its_own(tmp_path: Path) -> None:
    # IDLE waits on woken(), not on a wait() task (a task, wait_for's inner task and a timer per
    # session per delivery: 25-29 against 19 us of the loop per session per wake-up, issue 19).
    async def body(store: MailStore) -> None:
        inbox = store.watch(ALICE, "INBOX")
        tasks = len(asyncio.all_tasks())
        woken = inbox.woken()
        assert len(asyncio.all_tasks()) == tasks
        assert not woken.done()
        await store.deliver([ALICE], MSG)
        await asyncio.wait_for(woken, 5)
        assert await inbox.wait(0)
        assert not await inbox.wait(0)
        stale = inbox.woken()
        stale.cancel()  # (IDLE's client said DONE first)
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Seen"}), "add")
        assert inbox.woken().done()  # a change made meanwhile: done at once
        assert await inbox.wait(0)
        inbox.close()
        assert inbox.woken().done()
        assert not await inbox.wait(0)

    run(tmp_path, body)


# --- durability -----------------------------------------------------------------------------------

def test_a_reader_never_sees_a_partial_message(tmp_path: Path) -> None:
    box = home(tmp_path)
    size = 1 << 20
    stop = threading.Event()
    problems: list[str] = []
    checked = [0]

    def reader() -> None:
        while not stop.is_set():
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(box / sub)
                except FileNotFoundError:
                    continue
                for name in names:
                    try:
                        data = (box / sub / name).read_bytes()
                    except FileNotFoundError:
                        continue
                    checked[0] += 1
                    if len(data) != size or not data.endswith(b"END\r\n"):
                        problems.append(f"{sub}/{name}: {len(data)} bytes")

    async def body(store: MailStore) -> None:
        await store.snapshot(ALICE, "INBOX")
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            data = b"Subject: big\r\n\r\n" + b"x" * (size - 21) + b"END\r\n"
            for _ in range(20):
                assert isinstance((await store.deliver([ALICE], data))[ALICE], int)
        finally:
            stop.set()
            thread.join()

    run(tmp_path, body)
    assert problems == []
    assert checked[0] > 0


CRASH_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from appliance.accounts import Accounts
    from appliance.db import Database
    from appliance.store.mailstore import MailStore

    async def main():
        root = Path(sys.argv[1])
        db = await Database.open(root / "letterbox.db")
        store = MailStore(root / "mail", db, Accounts(db))
        n = 0
        while True:
            n += 1
            data = b"Subject: %d\\r\\n\\r\\n" % n + b"x" * 200_000 + b"\\r\\nEND %d\\r\\n" % n
            uid = (await store.deliver(["alice@ex.test"], data))["alice@ex.test"]
            print(n, uid, flush=True)

    asyncio.run(main())
""")


def crash_body(n: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % n + b"x" * 200_000 + b"\r\nEND %d\r\n" % n


def test_a_crash_while_delivering_leaves_only_tmp_debris(tmp_path: Path) -> None:
    """SIGKILL a process that delivers in a loop, at a random point; reopen like a restart."""
    run(tmp_path, lambda store: store.snapshot(ALICE, "INBOX"))  # accounts and Maildir in place
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    acked: dict[int, int] = {}
    try:
        while len(acked) < 25:
            line = proc.stdout.readline()
            assert line, "the delivering process died on its own"
            n, uid = map(int, line.split())
            acked[n] = uid
        time.sleep(0.003 * (os.getpid() % 7))  # somewhere inside the next delivery
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
    for line in rest.splitlines(keepends=True):  # acknowledged before the kill, read after it
        if line.endswith(b"\n"):
            n, uid = map(int, line.split())
            acked[n] = uid
    box = home(tmp_path)
    # Whatever is in new/ or cur/ is whole; partial files can only be in tmp/.
    for sub in ("new", "cur"):
        for name in files(box, sub):
            data = (box / sub / name).read_bytes()
            n = int(data.split(b" ", 2)[1].split(b"\r\n")[0])
            assert data == crash_body(n), name

    async def reopened(store: MailStore) -> None:
        assert files(box, "tmp") == []  # recover() ran
        snap = await store.snapshot(ALICE, "INBOX")
        by_uid = {m.uid: m.path.read_bytes() for m in snap.messages}
        for n, uid in acked.items():
            assert by_uid[uid] == crash_body(n)  # every acknowledged message, under its UID
        assert len(snap.messages) == len(files(box, "new")) + len(files(box, "cur"))
        assert len(snap.messages) - len(acked) <= 1  # at most the one cut short after its rename

    run(tmp_path, reopened)


def test_recover_removes_tmp_debris_and_half_deleted_folders(tmp_path: Path) -> None:
    run(tmp_path, lambda store: store.deliver([ALICE], MSG))
    box = home(tmp_path)
    (box / "tmp" / "1.M1P1Q1.host,S=99").write_bytes(b"Subject: cut")
    (box / ".Sent" / "tmp" / "2.M1P1Q1.host,S=99").write_bytes(b"Subject: cut")
    (box / ".DOVECOT-TRASHED" / "cur").mkdir(parents=True)

    async def body(store: MailStore) -> None:
        assert await store.recover() == 0  # opened() already ran it
        assert len((await store.snapshot(ALICE, "INBOX")).messages) == 1

    run(tmp_path, body)
    assert files(box, "tmp") == []
    assert files(box / ".Sent", "tmp") == []
    assert not (box / ".DOVECOT-TRASHED").exists()


# --- the unchanged-folder shortcut (its speed is measured by bench/imap.py) ------------------------

def test_an_unchanged_10k_folder_is_not_listed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SELECT of a big folder stays cheap because nothing is listed while new/ and cur/ are unchanged."""
    box = home(tmp_path)
    maildir.make_maildir(box, folder=False)
    for n in range(10_000):
        (box / "cur" / f"1600000000.M{n:06d}P1Q1.other,S=3:2,S").write_bytes(b"x\r\n")
    age(box)
    listings: list[Path] = []
    real_list_messages = maildir.list_messages

    def counting_list_messages(path: Path) -> dict[str, tuple[str, str]]:
        listings.append(path)
        return real_list_messages(path)

    monkeypatch.setattr(maildir, "list_messages", counting_list_messages)

    async def body(store: MailStore) -> tuple[int, int]:
        first = await store.snapshot(ALICE, "INBOX")
        assert len(first.messages) == 10_000
        age(box)
        await store.snapshot(ALICE, "INBOX")  # the first listing is taken as "recent": list again
        listed = len(listings)
        for _ in range(5):
            snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)
            assert len(snap.messages) == 10_000
        unchanged = len(listings) - listed
        os.utime(box / "cur", None)  # a change: a full listing
        await store.snapshot(ALICE, "INBOX")
        return unchanged, len(listings) - listed - unchanged

    assert run(tmp_path, body) == (0, 1)


def copied_in(tmp_path: Path, count: int) -> list[str]:
    """A Maildir copied in: `count` files named as Dovecot names them (both sizes), every other \\Seen."""
    box = home(tmp_path)
    maildir.make_maildir(box, folder=False)
    names = [f"1600000000.M{n}P1Q1.other,S=3,W=3:2,{'S' if n % 2 else ''}" for n in range(count)]
    for name in names:
        (box / "cur" / name).write_bytes(b"x\r\n")
    return names


def test_a_first_listing_answers_before_its_rows_are_written_and_nothing_comes_between(tmp_path: Path) -> None:
    """The first SELECT of many files copied in answers without waiting for their rows
    (index.commit_queued); every read and write asked for after it runs after them, and a restart
    gives the same UIDs."""
    names = copied_in(tmp_path, index.BULK + 10)

    async def first(store: MailStore) -> list[tuple[int, str]]:
        snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        rows = await store._db.fetchall("SELECT uid, basename, flags FROM messages ORDER BY uid")
        assert [(r[0], r[1], r[2]) for r in rows] == [
            (m.uid, m.filename.partition(":")[0], "S" if "\\Seen" in m.flags else "") for m in snap.messages]
        assert (await store.deliver([ALICE], MSG))[ALICE] == len(names) + 1  # after them, durable
        return [(m.uid, m.filename) for m in snap.messages]

    async def second(store: MailStore) -> list[tuple[int, str]]:
        snap = await store.snapshot(ALICE, "INBOX")
        return [(m.uid, m.filename) for m in snap.messages[:-1]]

    before = run(tmp_path, first)
    assert [uid for uid, _ in before] == list(range(1, len(names) + 1))
    assert sorted(name for _, name in before) == sorted(names)
    assert run(tmp_path, second) == before


def test_a_first_listing_writes_its_rows_only_after_the_select_had_its_turn_of_the_loop(tmp_path: Path) -> None:
    """The queued rows of a first listing wait for the event loop's next iteration, where the SELECT
    has answered: SQLite's INSERT no longer shares the GIL with the snapshot and the answer (issue 19).
    Seen from another connection: no row while the loop has not turned, all of them once it has."""
    names = copied_in(tmp_path, index.BULK + 10)

    def rows() -> int:
        other = sqlite3.connect(tmp_path / "letterbox.db")
        try:
            return int(other.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            other.close()

    async def body(store: MailStore) -> tuple[int, int]:
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        time.sleep(0.3)  # noqa: ASYNC251  the loop does not turn: an INSERT started at once would be done by now
        before = rows()
        await store._db.writes_done()
        return before, rows()

    assert run(tmp_path, body) == (0, len(names))


def test_a_first_listing_makes_its_entries_after_the_select_had_its_turn_of_the_loop(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The first SELECT of many files copied in answers from the snapshot's messages alone: the
    index's entries and its maps by UID and by name are made at the loop's next turn (2.5 + 3.8 ms
    of a 10k cold SELECT, issue 19), or at their first use before that, the same as they were."""
    names = copied_in(tmp_path, index.BULK + 10)
    made: list[int] = []
    real = index._entries

    def counted(columns: Any, modseq: int) -> list[index.Entry]:
        made.append(len(columns.uids))
        return real(columns, modseq)

    monkeypatch.setattr(index, "_entries", counted)

    async def body(store: MailStore) -> None:
        snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        assert made == []
        await asyncio.sleep(0)
        assert made == [len(names)]
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        assert [(e.uid, e.filename, f.info(e)) for e in f.by_uid.values()] == [(m.uid, m.filename, m) for m in snap.messages]
        assert all(f.by_base[e.base] is e for e in f.by_uid.values())
        made.clear()
        copied_in(tmp_path / "again", index.BULK)
        for name in os.listdir(home(tmp_path / "again") / "cur"):
            os.rename(home(tmp_path / "again") / "cur" / name, home(tmp_path) / "cur" / name.replace("1600000000.", "1600000001."))
        f.unload()
        snap = await store.snapshot(ALICE, "INBOX")  # loaded from the rows, then listed: the others' entries at once
        assert made == [index.BULK]
        assert len(snap.messages) == len(names) + index.BULK
        assert await store.deliver([ALICE], MSG) == {ALICE: len(names) + index.BULK + 1}

    run(tmp_path, body)


def test_the_dates_of_files_copied_in_are_read_in_the_pauses_of_the_fetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background dating of a folder copied in waits for a pause in the FETCHes (at most
    DATE_WAIT a chunk): at 100k messages it ran in the middle of Thunderbird's first header list
    (issue 19)."""
    monkeypatch.setattr(mailboxes, "AFTER_LISTING_DELAY", 0.0)
    monkeypatch.setattr(mailboxes, "DATE_WAIT", 60.0)
    names = copied_in(tmp_path, index.BULK + 10)

    async def body(store: MailStore) -> tuple[int, int]:
        mb = await store._boxes.get(ALICE)
        with store.message_cache.answering_now():  # a FETCH that goes on
            await store.snapshot(ALICE, "INBOX", claim_recent=True)
            f = await store._boxes.folder(mb, "INBOX")
            await asyncio.sleep(0.5)
            during = len(f.undated)
        await async_wait_until(lambda: not f.undated, what="dated once the FETCH is over")
        return during, sum(1 for e in f.by_uid.values() if e.internaldate != UNKNOWN_DATE)

    assert run(tmp_path, body) == (len(names), len(names))


def test_rows_a_queued_commit_could_not_write_are_written_at_the_next_use(tmp_path: Path) -> None:
    names = copied_in(tmp_path, index.BULK)

    async def body(store: MailStore) -> None:
        # A real failure of SQLite's (what a full disk would raise), on the store's own connection.
        await store._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON messages"
                                " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        snap = await store.snapshot(ALICE, "INBOX")
        assert len(snap.messages) == len(names)
        await store._db.writes_done()
        assert await store._db.fetchall("SELECT uid FROM messages") == []
        with pytest.raises(sqlite3.IntegrityError):  # the next use tries again: still refused
            await store.snapshot(ALICE, "INBOX")
        await store._db.execute("DROP TRIGGER refuse")
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Flagged"}), "add")
        again = await store.snapshot(ALICE, "INBOX")
        assert [m.uid for m in again.messages] == [m.uid for m in snap.messages]
        rows = await store._db.fetchall("SELECT uid, flags FROM messages ORDER BY uid")
        assert [r[0] for r in rows] == [m.uid for m in snap.messages]
        assert rows[0][1] == "F"  # as the entry is now

    run(tmp_path, body)


def test_subscriptions_of_a_dovecot_maildir_are_taken_over(tmp_path: Path) -> None:
    # A Maildir brought over from Dovecot keeps its subscriptions file (v2: levels separated by a tab).
    root = home(tmp_path)
    maildir.make_maildir(root, folder=False)
    for name in ("Archive/2024", "Work"):
        maildir.make_maildir(maildir.folder_path(root, name), folder=True)
    (root / "subscriptions").write_bytes(b"V\t2\n\nArchive\t2024\nINBOX\n")

    async def body(store: MailStore) -> None:
        assert await store.subscriptions(ALICE) == ["Archive/2024", "INBOX"]
        assert {f.name: f.subscribed for f in await store.folders(ALICE)}["Work"] is False

    run(tmp_path, body)


def test_missing_special_folders_are_made_again(tmp_path: Path) -> None:
    """A Maildir copied into a mailbox that was used before gets Sent/Drafts/Trash/Junk back at the
    next start, as Dovecot's autocreate does (issue 17)."""

    async def first(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)

    run(tmp_path, first)
    for name in (".Junk", ".Sent"):
        shutil.rmtree(home(tmp_path) / name)

    async def second(store: MailStore) -> set[str]:
        return {f.name for f in await store.folders(ALICE)}

    assert {"Sent", "Drafts", "Trash", "Junk"} <= run(tmp_path, second)


def test_a_first_select_of_inbox_leaves_the_special_folders_to_a_task_others_wait_for(tmp_path: Path) -> None:
    """SELECT of INBOX, a session's usual first access, does not wait for the special folders and
    the subscriptions (25 directory fsyncs, issue 19); every other use of the mailbox does."""
    copied_in(tmp_path, 3)

    async def body(store: MailStore) -> tuple[set[str], list[str]]:
        mb = await store._boxes.get(ALICE, inbox=True)
        assert mb.inbox_ready
        assert mb.settling is not None
        assert len((await store.snapshot(ALICE, "INBOX")).messages) == 3
        return {f.name for f in await store.folders(ALICE)}, await store.subscriptions(ALICE)

    names, subscribed = run(tmp_path, body)
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= names
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk"} <= set(subscribed)
    for name in (".Sent", ".Trash"):
        assert (home(tmp_path) / name / "cur").is_dir()


# --- records kept for other programs and for QRESYNC ------------------------------------------------

def test_a_burst_of_deliveries_shares_its_uidlist_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first delivery after a quiet spell is in dovecot-uidlist at once; the rest of a burst is
    written at most once per UIDLIST_PACE (not once per group commit), and all of it by the stop."""
    monkeypatch.setattr(mailboxes, "UIDLIST_PACE", 60.0)  # the whole test is one burst
    folder = home(tmp_path)
    writes: list[str] = []
    for name in ("append_uidlist", "write_uidlist"):
        def counted(*args: Any, _name: str = name, _real: Any = getattr(maildir, name)) -> Any:
            if Path(args[0]) == folder:  # the INBOX's (the special folders are made meanwhile)
                writes.append(_name)
            return _real(*args)

        monkeypatch.setattr(maildir, name, counted)

    def listed() -> int:
        found = maildir.read_uidlist(folder)
        return 0 if found is None else len(found.uids)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await async_wait_until(lambda: listed() == 1, seconds=20)  # at once, not after 60 s
        for n in range(20):
            await store.deliver([ALICE], MSG + str(n).encode())
        assert len(writes) == 1, writes
        assert listed() == 1
        await store.flush_uidlists()
        assert len(writes) == 2
        assert listed() == 21

    run(tmp_path, body)


def test_uidlist_grows_by_appending_and_is_rewritten_after_an_expunge(tmp_path: Path) -> None:
    """New messages only: their lines are appended to dovecot-uidlist (same file, earlier bytes
    untouched). An expunge rewrites it without the removed lines; a file changed by someone else is
    written whole, never appended to."""
    uidlist = home(tmp_path) / "dovecot-uidlist"

    async def body(store: MailStore) -> None:
        for n in range(3):
            await store.deliver([ALICE], MSG + str(n).encode())
        await store.flush_uidlists()
        first = uidlist.read_bytes()
        inode = uidlist.stat().st_ino
        for n in range(3, 5):
            await store.deliver([ALICE], MSG + str(n).encode())
        await store.flush_uidlists()
        grown = uidlist.read_bytes()
        assert uidlist.stat().st_ino == inode  # appended, not replaced
        assert grown.startswith(first)
        snap = await store.snapshot(ALICE, "INBOX")
        names = [m.path.name.split(":")[0] for m in snap.messages]
        assert grown[len(first):].decode() == f"4 :{names[3]}\n5 :{names[4]}\n"
        # Dovecot's reader (ours follows it): UIDNEXT is the larger of N and the last UID + 1.
        read = maildir.read_uidlist(uidlist.parent)
        assert read is not None
        assert (read.uidvalidity, read.uidnext, dict(read.uids)) == (snap.uidvalidity, 6, dict(zip(names, range(1, 6), strict=True)))

        await store.expunge(ALICE, "INBOX", [2])
        await store.flush_uidlists()
        assert uidlist.stat().st_ino != inode
        lines = uidlist.read_text().splitlines()
        assert lines[0].startswith(f"3 V{snap.uidvalidity} N6 G")
        assert lines[1:] == [f"{uid} :{names[uid - 1]}" for uid in (1, 3, 4, 5)]

        uidlist.write_text(uidlist.read_text() + "99 :stranger\n")  # another program's change
        await store.deliver([ALICE], MSG + b"6")
        await store.flush_uidlists()
        assert "stranger" not in uidlist.read_text()
        assert uidlist.read_text().splitlines()[0].startswith(f"3 V{snap.uidvalidity} N7 G")

    run(tmp_path, body)


def test_old_expunge_records_are_pruned_and_answered_conservatively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most EXPUNGES_KEPT records per folder: a client whose mod-sequence is newer than the
    pruned ones gets the exact list; an older one is told the list is incomplete (the session then
    reports every UID it may know that is gone, RFC 7162 3.2.5.2). Kept across a restart."""
    from appliance.store import index

    monkeypatch.setattr(index, "EXPUNGES_KEPT", 3)

    async def body(store: MailStore) -> list[int]:
        for n in range(6):
            await store.deliver([ALICE], MSG + str(n).encode())
        modseqs = []
        for uid in range(1, 6):  # one expunge per mod-sequence
            modseqs.append((await store.snapshot(ALICE, "INBOX")).highestmodseq)
            await store.expunge(ALICE, "INBOX", [uid])
        rows = await store._db.fetchall("SELECT uid FROM expunged ORDER BY uid")
        assert [r[0] for r in rows] == [3, 4, 5]
        assert await store.expunged_since(ALICE, "INBOX", modseqs[2]) == ([3, 4, 5], True)
        assert await store.expunged_since(ALICE, "INBOX", modseqs[3]) == ([4, 5], True)
        assert (await store.expunged_since(ALICE, "INBOX", modseqs[1]))[1] is False
        return modseqs

    modseqs = run(tmp_path, body)

    async def after_restart(store: MailStore) -> None:
        assert (await store.expunged_since(ALICE, "INBOX", modseqs[1]))[1] is False
        assert await store.expunged_since(ALICE, "INBOX", modseqs[2]) == ([3, 4, 5], True)

    run(tmp_path, after_restart)


def test_the_folder_stamp_moves_with_its_own_store_and_expunge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a STORE's or EXPUNGE's own renames and unlinks the next look at the disk lists nothing:
    another session's NOOP listed all of a 20k folder after each slice of a big STORE (issue 19).
    Another program's change still moves the stamp and is listed; one the stamp cannot show (made
    within the same mtime tick as ours) is found by the listing DIRTY_WINDOW_NS after our change."""
    box = home(tmp_path)
    listings = 0
    real_list = maildir.list_messages

    def counted(folder: Path) -> dict[str, tuple[str, str]]:
        nonlocal listings
        listings += 1
        return real_list(folder)

    async def body(store: MailStore) -> None:
        nonlocal listings
        for _ in range(3):
            await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        age(box)
        monkeypatch.setattr(maildir, "list_messages", counted)
        await store.snapshot(ALICE, "INBOX")
        assert listings == 1  # the stamp moved (age): listed, long unchanged: not dirty
        await store.store_flags(ALICE, "INBOX", [1, 2], frozenset({"\\Seen"}), "add")
        assert await store.expunge(ALICE, "INBOX", [2]) == [2]
        snap = await store.snapshot(ALICE, "INBOX")
        assert listings == 1
        assert [(m.uid, m.flags) for m in snap.messages] == [(1, frozenset({"\\Seen"})), (3, frozenset())]
        three = snap.messages[1].path
        os.rename(three, three.with_name(three.name.partition(":")[0] + ":2,F"))  # another program's
        age(box)  # (a moved stamp, whatever the tick)
        snap = await store.snapshot(ALICE, "INBOX")
        assert listings == 2
        assert snap.messages[1].flags == {"\\Flagged"}
        monkeypatch.setattr(index, "DIRTY_WINDOW_NS", 0)  # the window after our change is over at once
        await store.store_flags(ALICE, "INBOX", [3], frozenset({"\\Seen"}), "add")
        await store.snapshot(ALICE, "INBOX")
        assert listings == 3
        await store.snapshot(ALICE, "INBOX")
        assert listings == 3  # listed once: the recheck is spent

    run(tmp_path, body)


def test_a_look_at_a_folder_in_step_does_not_wait_for_its_lock(tmp_path: Path) -> None:
    """A STATUS, and a session's look at its selected folder, answer from memory while another
    command holds the folder lock, when the folder is as memory has it (OpenMailboxes.in_step): the
    caller's own changes are in it before their OK. imaptest's stress mode queued its STATUSes on the
    lock (issue 19). A change on the disk by another program is waited for: the lock, then a listing."""
    box = home(tmp_path)

    async def body(store: MailStore) -> None:
        for _ in range(3):
            await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        age(box)
        await store.snapshot(ALICE, "INBOX")  # listed: in step with the disk
        await store.store_flags(ALICE, "INBOX", [1], frozenset({"\\Seen"}), "add")
        assert await store.expunge(ALICE, "INBOX", [2]) == [2]
        await store.append(ALICE, "INBOX", MSG, frozenset({"\\Flagged"}), None)  # (into cur/: recent)
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        async with f.lock:  # another session's command
            for disk, claim in ((True, False), (False, False), (False, True), (False, True)):
                snap = await asyncio.wait_for(store.snapshot(ALICE, "INBOX", disk=disk, claim_recent=claim), 5)
                assert [m.uid for m in snap.messages] == [1, 3, 4]
                assert (snap.uidnext, snap.unseen, snap.messages[0].flags) == (5, 2, frozenset({"\\Seen"}))
            assert snap.recent == frozenset()  # claimed by the look before, once
            (box / "new" / f"1700000000.M1P1.other,S={len(MSG)},W={len(MSG)}").write_bytes(MSG)  # another program's
            looking = asyncio.ensure_future(store.snapshot(ALICE, "INBOX"))
            await asyncio.sleep(0.1)
            assert not looking.done()
        snap = await asyncio.wait_for(looking, 5)
        assert [m.uid for m in snap.messages] == [1, 3, 4, 5]

    run(tmp_path, body)


def test_a_look_answers_from_memory_while_our_own_queued_change_moves_the_stamp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A STORE's renames are made on the database's thread before the loop hears of them: meanwhile the
    folder's stamp has moved by our own hand. A look with the disk (a STATUS) answers from memory,
    which has the change, without the lock, within DIRTY_WINDOW_NS of the last look at the disk
    (FolderIndex.seems_unchanged); after that it waits for the lock and for our change, and looks."""
    home(tmp_path)
    real_rename = maildir.rename_flagged
    entered, release = threading.Event(), threading.Event()

    def held(folder: str | Path, moves: Any) -> list[bool]:
        done = real_rename(folder, moves)
        entered.set()
        release.wait(10)
        return done

    async def body(store: MailStore) -> None:
        for _ in range(2):
            await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        monkeypatch.setattr(maildir, "rename_flagged", held)
        flagged = asyncio.ensure_future(store.store_flags(ALICE, "INBOX", [2], frozenset({"\\Seen"}), "add"))
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            assert f.in_flight
            assert not f.unchanged_on_disk()
            async with f.lock:  # another session's command
                snap = await asyncio.wait_for(store.snapshot(ALICE, "INBOX"), 5)
                assert [m.flags for m in snap.messages] == [frozenset(), {"\\Seen"}]
                monkeypatch.setattr(index, "DIRTY_WINDOW_NS", 0)  # the last look is too old now
                looking = asyncio.ensure_future(store.snapshot(ALICE, "INBOX"))
                await asyncio.sleep(0.1)
                assert not looking.done()
        finally:
            release.set()
        assert [m.flags for m in (await asyncio.wait_for(looking, 5)).messages] == [frozenset(), {"\\Seen"}]
        await flagged
        assert not f.in_flight

    run(tmp_path, body)


def test_the_folder_stamp_moves_with_its_own_deliveries_claims_and_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New mail put into a folder through the store (a delivery, a burst of them sharing a group
    commit, an APPEND with flags into cur/, a COPY), and the claim that moves it from new/ to cur/
    for a session, leave the next look at the disk with nothing to list: every NOOP of every
    session on a 20k folder listed it after each delivery, 35-43 ms each (issue 19). Another
    program's file is found all the same: at once when it moves the stamp, and a listing made
    right after a change (whose mtime tick may hide another) is made again once the window is
    over, not at every look meanwhile."""
    box = home(tmp_path)
    listed = Listings(box, monkeypatch)

    async def body(store: MailStore) -> None:
        await store.deliver([ALICE], MSG)
        await store.append(ALICE, "Archive", MSG, frozenset(), None)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        await store.snapshot(ALICE, "Archive", claim_recent=True)
        age(box)
        listed.count()
        await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 1  # the stamp moved (age): listed, long unchanged: no recheck due
        await store.deliver([ALICE], MSG)
        assert sorted(await held_burst(store, 3)) == [3, 4, 5]  # type: ignore[type-var]
        await store.append(ALICE, "INBOX", MSG, frozenset({"\\Seen"}), None)  # (into cur/)
        assert [new for _, new in await store.copy(ALICE, "Archive", [1], "INBOX")] == [7]
        snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)  # (new/ to cur/)
        assert (len(snap.messages), snap.recent) == (7, frozenset(range(2, 8)))
        assert files(box, "new") == []
        snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)
        assert (len(snap.messages), snap.recent) == (7, frozenset())
        assert listed.listings == 1

        (box / "new" / f"1700000000.M1P1.other,S={len(MSG)},W={len(MSG)}").write_bytes(MSG)  # another program's delivery
        snap = await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 2
        assert len(snap.messages) == 8
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        assert f.recheck_ns > time.time_ns()  # listed right after new/ changed: its tick may hide another
        await store.deliver([ALICE], MSG)
        snap = await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 2  # not listed again at every look meanwhile...
        assert len(snap.messages) == 9
        await asyncio.sleep(max(0, f.recheck_ns - time.time_ns()) / 1e9 + 0.01)
        await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 3  # ...but once the window is over
        age(box)
        await store.snapshot(ALICE, "INBOX")
        await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 4  # (the stamp moved): listed once, long unchanged: the recheck is spent

    run(tmp_path, body)


def test_steady_mail_into_a_big_folder_is_rechecked_by_its_events_not_listed(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Mail arriving steadily into a big folder that sessions have selected: the recheck due after
    each of our changes (DIRTY_WINDOW_NS) is answered from the inotify events since the folder's
    last listing (dir_watch.py), a cost per message changed, where a 100k folder was listed in full
    about every 2 s for as long as the mail came (issue 19). Another program's change is found all
    the same, even one hidden in the mtime tick of ours (the directory's mtime put back)."""
    monkeypatch.setattr(index, "INLINE_LISTING_OCTETS", 0)  # listed in a worker thread, as a big folder is
    monkeypatch.setattr(index, "DIRTY_WINDOW_NS", 0)  # a recheck is due at every look after our change
    box = home(tmp_path)
    listed = Listings(box, monkeypatch)

    async def body(store: MailStore) -> None:
        for _ in range(3):
            await store.deliver([ALICE], MSG)
        await store.snapshot(ALICE, "INBOX", claim_recent=True)
        age(box)
        listed.count()
        await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 1  # the stamp moved (age): listed, and watched from then on
        for n in range(4, 9):
            await store.deliver([ALICE], MSG)
            snap = await store.snapshot(ALICE, "INBOX", claim_recent=True)  # (new/ to cur/)
            assert (len(snap.messages), snap.recent) == (n, frozenset({n}))
            await store.store_flags(ALICE, "INBOX", [n], frozenset({"\\Seen"}), "add")
            if n == 8:
                assert await store.expunge(ALICE, "INBOX", [5]) == [5]
            snap = await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 1
        assert [m.uid for m in snap.messages] == [1, 2, 3, 4, 6, 7, 8]
        f = await store._boxes.folder(await store._boxes.get(ALICE), "INBOX")
        await store.store_flags(ALICE, "INBOX", [8], frozenset({"\\Flagged"}), "add")  # ours: a recheck is due
        stamp = f.stamp
        assert stamp is not None
        assert f.recheck_ns
        one = snap.messages[0].path
        os.rename(one, one.with_name(one.name.partition(":")[0] + ":2,F"))  # another program's...
        os.utime(box / "cur", ns=(stamp[1], stamp[1]))  # ...in the same tick as ours: the stamp did not move
        snap = await store.snapshot(ALICE, "INBOX")
        assert listed.listings == 2
        assert snap.messages[0].flags == {"\\Flagged"}
        (box / "new" / f"1700000000.M1P1.other,S={len(MSG)},W={len(MSG)}").write_bytes(MSG)
        snap = await store.snapshot(ALICE, "INBOX")  # (the stamp moved)
        assert listed.listings == 3
        assert len(snap.messages) == 8

    run(tmp_path, body)
