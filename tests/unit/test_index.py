"""The UID index (appliance/store/index.py) against a real SQLite file and a real Maildir on tmp_path."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import tracemalloc
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.db import Database
from appliance.imap.selected import SelectedFolder
from appliance.store import index, maildir
from appliance.store.index import Change, Entry, FolderIndex

T = TypeVar("T")
LONG_AGO = 1_500_000_000  # dir mtimes set here are outside the dirty window


def run(tmp_path: Path, body: Callable[[Database], Awaitable[T]]) -> T:
    async def main() -> T:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            await db.execute("INSERT INTO domains (id, name, created_at) VALUES (1, 'ex.test', 0)")
            await db.execute("INSERT INTO mailboxes (id, domain_id, local_part, password_hash, created_at)"
                             " VALUES (1, 1, 'alice', 'x', 0)")
            return await body(db)
        finally:
            await db.close()

    return asyncio.run(main())


async def open_folder(db: Database, path: Path, name: str = "INBOX") -> FolderIndex:
    row = await index.folder_row(db, 1, name)
    if row is None:
        row = await db.write(partial(index.insert_folder, mailbox_id=1, name=name))
    assert row is not None
    entries = await index.load_entries(db, row[0])
    return FolderIndex(row[0], name, path, row[1], row[2], row[3], bool(row[4]), entries, None)


def drop(path: Path, filename: str, sub: str = "cur", data: bytes = b"Subject: x\r\n\r\nx\r\n") -> None:
    (path / sub / filename).write_bytes(data)


def age(path: Path) -> None:
    for sub in ("new", "cur"):
        os.utime(path / sub, (LONG_AGO, LONG_AGO))


async def sync(db: Database, f: FolderIndex) -> Change:
    """What mailstore._sync does, minus keyword remapping: enough to drive the index alone."""
    found = await asyncio.to_thread(f.scan)
    change = Change(f)
    if found is None:
        return change
    if found.keywords is not None:
        f.keywords = found.keywords
    f.keywords_mtime = found.keywords_mtime
    for entry, sub, filename in found.moved:
        change.locate(entry, sub, filename)
        change.update(entry, *maildir.decode_letters(maildir.split_filename(filename)[1], f.keywords))
    for entry in found.vanished:
        change.remove(entry)
    for entry, wire in found.measured:
        change.measure(entry, wire)
    if found.bulk is not None:  # a first listing of Dovecot's names, as columns
        change.add_columns(found.bulk, f.keywords)
    for new in found.found:
        flags, names = maildir.decode_letters(maildir.split_filename(new.filename)[1], f.keywords)
        change.add(new.base, new.sub, new.filename, flags, names, new.size, new.mtime, wire=new.wire)
    await index.commit(db, [change])
    f.stamp, f.dirty = found.stamp, found.dirty
    return change


def test_uidvalidity_is_never_issued_twice(tmp_path: Path) -> None:
    async def body(db: Database) -> list[int]:
        values = []
        for _ in range(50):  # far more than one per second
            values.append(await db.write(index.new_uidvalidity))
        return values

    values = run(tmp_path, body)
    assert values == sorted(set(values))
    assert 0 < values[0] < 2**32


def test_files_get_uids_in_name_order_and_keep_them(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1700000002.b.host", sub="new")
    drop(folder, "1700000001.a.host:2,S")
    drop(folder, "1700000003.c.host:2,FPT")

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        change = await sync(db, f)
        assert [(e.uid, e.base, e.flags) for e in change.added] == [
            (1, "1700000001.a.host", "S"), (2, "1700000002.b.host", ""), (3, "1700000003.c.host", "FPT"),
        ]
        assert (f.uidnext, f.highestmodseq) == (4, 2)
        assert [m.uid for m in f.messages()] == [1, 2, 3]
        assert f.recent() == {2}  # still in new/
        # A second index over the same db and files: the same UIDs, nothing written.
        again = await open_folder(db, folder)
        second = await sync(db, again)
        assert not second.writes
        assert len(second.located) == 3
        assert [(m.uid, m.flags, m.path.name) for m in again.messages()] == [
            (m.uid, m.flags, m.path.name) for m in f.messages()
        ]

    run(tmp_path, body)


@pytest.mark.parametrize("extra", [[], ["1700000000.M5P1.host"], ["1700000000.M100000P9Q1.host,S=1,W=1"],
                                   ["999999999.M1P1.host,S=1,W=1"], ["1700000002.M1P1.host,S=1,W=1"]],
                         ids=["sized names", "with a name without sizes", "two of the same microsecond",
                              "a second of fewer digits", "seconds in the names' order"])
def test_found_files_are_in_delivery_order(tmp_path: Path, extra: list[str]) -> None:
    # A listing reads Dovecot's names (sizes in them) as one number each (maildir.sized_name); any
    # other name, or two of one microsecond, sort the general way: the same order in every case.
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    names = ["1700000000.M100000P7Q2.host,S=1,W=1:2,S", "1700000000.M99999P7Q1.host,S=1,W=1",
             "1699999999.M999999P7Q9.host,S=1,W=1", "1700000001.M0P1.host,S=1,W=1:2,F", *extra]
    for name in names:
        drop(folder, name)

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        change = await sync(db, f)
        bases = [name.partition(":")[0] for name in names]
        assert [e.base for e in change.added] == sorted(bases, key=maildir.delivery_order)
        assert [e.uid for e in change.added] == list(range(1, len(names) + 1))

    run(tmp_path, body)


_NAME = st.sampled_from(["1700000000.M5P1.h,S=3,W=3", "1700000000.M50P1.h,S=3,W=4", "1699999999.M999999P2.h,S=3,W=3",
                          "1700000001.M0P1Q2.h,S=10,W=12,X=1", "1700000000.M5P2.h,S=3,W=3", ".hidden", "courier.name",
                          "1700000002.M7P1.h,S=3", "1700000003.M1234567890P1.h,S=3,W=3", "999999999.M9P1.h,S=3,W=3",
                          "1700000004.M9P1.h,S=5,W=6", "1700000005.M10P1.h,S=5,W=6"])
_INFO = st.sampled_from(["", ":2,", ":2,S", ":2,FS", ":2,aS", ":1,x", ":2,S:odd"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_NAME, _INFO, st.sampled_from(["new", "cur"])), max_size=8))
def test_a_first_listing_in_columns_finds_what_the_general_listing_finds(tmp_path_factory: pytest.TempPathFactory,
                                                                       files: list[tuple[str, str, str]]) -> None:
    # index._found_sized (the first listing of a Maildir copied in, in C loops) must give the same
    # files, fields and order as list_messages + _compare, or decline (None) and leave it to them.
    folder = tmp_path_factory.mktemp("m")
    maildir.make_maildir(folder, folder=False)
    for name, info, sub in files:
        drop(folder, name + info, sub)
    f = FolderIndex(1, "INBOX", folder, 1, 1, 1, False, [], None)
    columns = index._found_sized(f._dirs)
    general = index.DiskChanges((0, 0), False, None, 0)
    f._compare(maildir.list_messages(folder), general)
    if columns is not None:
        assert list(zip(*columns[:6], strict=True)) == [tuple(found) for found in general.found]
        assert list(columns.infos or ()) == [found.filename.partition(":")[2] for found in general.found]
    elif files and all(maildir.sized_name(name) for name, _, _ in files):  # declined: for a reason only
        names = [name for name, _, _ in files]
        assert len(set(names)) < len(names) or any(".M5P" in name for name in names)


def test_changes_made_by_another_program_are_seen(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host", sub="new")
    drop(folder, "2.b.host:2,")

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        await sync(db, f)
        os.rename(folder / "new" / "1.a.host", folder / "cur" / "1.a.host:2,RS")  # read and answered
        os.unlink(folder / "cur" / "2.b.host:2,")
        drop(folder, "3.c.host:2,D")
        change = await sync(db, f)
        assert [e.uid for e in change.removed] == [2]
        assert [e.uid for e in change.added] == [3]
        [m1, m3] = f.messages()
        assert m1.flags == {"\\Seen", "\\Answered"}
        assert m1.modseq == 3
        assert m1.path.parent.name == "cur"
        assert m3.flags == {"\\Draft"}
        assert f.uidnext == 4
        rows = await db.fetchall("SELECT uid, flags, modseq FROM messages ORDER BY uid")
        assert [tuple(r) for r in rows] == [(1, "RS", 3), (3, "D", 3)]

    run(tmp_path, body)


def test_an_unchanged_folder_is_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "Just now" must not depend on how fast a loaded machine gets from drop() to the scan.
    monkeypatch.setattr(index, "DIRTY_WINDOW_NS", 3600 * 10**9)
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host:2,")

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        await sync(db, f)
        assert f.dirty  # the directories changed just now: their mtime may not move again
        assert await asyncio.to_thread(f.scan) is not None
        age(folder)
        await sync(db, f)
        assert not f.dirty
        assert await asyncio.to_thread(f.scan) is None
        drop(folder, "2.b.host", sub="new")  # any change moves the mtime
        change = await sync(db, f)
        assert [e.base for e in change.added] == ["2.b.host"]

    run(tmp_path, body)


def test_pending_deliveries_are_not_adopted(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        f.pending.add("9.z.host")
        drop(folder, "9.z.host", sub="new")  # renamed into new/, not yet committed by its delivery
        assert not (await sync(db, f)).added
        f.pending.clear()
        assert [e.base for e in (await sync(db, f)).added] == ["9.z.host"]

    run(tmp_path, body)


def test_a_file_removed_by_another_program_is_seen_beside_a_pending_delivery(tmp_path: Path) -> None:
    """The listing's vanished check compared counts: a delivery's file on disk before its commit (which
    the listing skips) made up for a file another program removed, and the removed one stayed indexed."""
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        drop(folder, "1.a.host:2,S")
        assert [e.base for e in (await sync(db, f)).added] == ["1.a.host"]
        (folder / "cur" / "1.a.host:2,S").unlink()
        f.pending.add("9.z.host")
        drop(folder, "9.z.host", sub="new")
        change = await sync(db, f)
        assert [e.base for e in change.removed] == ["1.a.host"]
        assert not change.added

    run(tmp_path, body)


def test_adopted_uids_must_grow(tmp_path: Path) -> None:
    async def body(db: Database) -> None:
        f = await open_folder(db, tmp_path)
        change = Change(f)
        a = change.add("a", "cur", "a:2,", "", (), 1, 0, uid=5)
        b = change.add("b", "cur", "b:2,", "", (), 1, 0, uid=3)  # below one given: renumbered
        c = change.add("c", "cur", "c:2,", "", (), 1, 0)
        assert (a.uid, b.uid, c.uid, change.uidnext) == (5, 6, 7, 8)
        await index.commit(db, [change])
        assert list(f.by_uid) == [5, 6, 7]
        assert f.bytes == 3
        row = await index.folder_row(db, 1, "INBOX")
        assert row is not None
        assert (row[2], row[3]) == (8, 2)

    run(tmp_path, body)


def test_a_failed_commit_leaves_memory_alone(tmp_path: Path) -> None:
    async def body(db: Database) -> None:
        f = await open_folder(db, tmp_path)
        first = Change(f)
        first.add("a", "cur", "a:2,", "", (), 1, 0)
        await index.commit(db, [first])
        clash = Change(f)
        clash.add("a", "cur", "a:2,S", "", (), 1, 0)  # the same unique name twice: UNIQUE fails
        try:
            await index.commit(db, [clash])
        except Exception:  # noqa: BLE001, S110  whichever error the clash raises, memory must stay
            pass
        else:
            raise AssertionError("duplicate unique name accepted")
        assert list(f.by_uid) == [1]
        assert f.uidnext == 2
        assert (await db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 1  # type: ignore[index]

    run(tmp_path, body)


def test_a_new_row_for_a_stale_name_gets_a_new_uidvalidity(tmp_path: Path) -> None:
    async def body(db: Database) -> None:
        f = await open_folder(db, tmp_path, "Old")
        made = await db.write(partial(index.insert_folder, mailbox_id=1, name="Old"))
        row = await index.folder_row(db, 1, "Old")
        assert row is not None
        assert tuple(row) == tuple(made)
        assert row[1] != f.uidvalidity

    run(tmp_path, body)


# --- wire sizes (RFC822.SIZE, POP3 LIST: every line end CRLF) ------------------------------------

LF_ONLY = b"Subject: lf\n\nline one\nline two\n"
MIXED = b"Subject: mixed\r\n\r\ncrlf\r\nlf\n\nlone cr\rend\r\n"


def test_files_found_get_their_wire_size(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host", sub="new", data=LF_ONLY)
    drop(folder, "2.b.host:2,S", data=MIXED)
    drop(folder, "3.c.host:2,", data=b"Subject: crlf\r\n\r\nbody\r\n")
    # Dovecot's W= is believed without reading the file (here it does not even match the content).
    drop(folder, f"4.d.host,S={len(LF_ONLY)},W=1000:2,S", data=LF_ONLY)

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        await sync(db, f)
        sizes = [m.size for m in f.messages()]
        assert sizes == [len(LF_ONLY) + 4, len(MIXED) + 2, 23, 1000]
        assert f.bytes == sum(os.stat(m.path).st_size for m in f.messages())  # the quota counts the disk
        rows = await db.fetchall("SELECT size, wire_size FROM messages ORDER BY uid")
        assert [tuple(r) for r in rows] == [(len(LF_ONLY), sizes[0]), (len(MIXED), sizes[1]), (23, 23),
                                            (len(LF_ONLY), 1000)]
        again = await open_folder(db, folder)  # after a restart: from the db, no file read
        assert not again.unmeasured
        await sync(db, again)
        assert [m.size for m in again.messages()] == sizes

    run(tmp_path, body)


def test_rows_indexed_without_a_wire_size_are_measured_once(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host:2,S", data=LF_ONLY)
    drop(folder, "2.b.host:2,", data=MIXED)
    drop(folder, "3.c.host", sub="new", data=b"x\r\n")

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        await sync(db, f)
        await db.execute("UPDATE messages SET wire_size = NULL")  # as an earlier version left them
        os.unlink(folder / "new" / "3.c.host")  # one of them gone meanwhile
        old = await open_folder(db, folder)
        assert old.unmeasured == {1, 2, 3}
        modseq = old.highestmodseq
        change = await sync(db, old)
        assert sorted((e.uid, w) for e, w in change.measured) == [(1, len(LF_ONLY) + 4), (2, len(MIXED) + 2)]
        assert [e.uid for e in change.removed] == [3]
        assert [m.size for m in old.messages()] == [len(LF_ONLY) + 4, len(MIXED) + 2]
        assert not old.unmeasured
        assert old.highestmodseq == modseq + 1
        rows = await db.fetchall("SELECT uid, wire_size FROM messages ORDER BY uid")
        assert [tuple(r) for r in rows] == [(1, len(LF_ONLY) + 4), (2, len(MIXED) + 2)]
        age(folder)
        quiet = await sync(db, old)
        assert not quiet.measured
        assert not quiet.pending

    run(tmp_path, body)


def test_measuring_alone_writes_no_new_modseq(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host:2,S", data=LF_ONLY)

    async def body(db: Database) -> None:
        await sync(db, await open_folder(db, folder))
        await db.execute("UPDATE messages SET wire_size = NULL")
        f = await open_folder(db, folder)
        change = await sync(db, f)
        assert change.measured
        assert not change.writes
        row = await index.folder_row(db, 1, "INBOX")
        assert row is not None
        assert row[3] == f.highestmodseq == 2
        assert f.messages()[0].modseq == 2
        assert f.messages()[0].size == len(LF_ONLY) + 4

    run(tmp_path, body)


def test_a_new_entry_without_a_wire_size_is_measured_at_the_next_listing(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        await sync(db, f)
        drop(folder, "1.a.host:2,", data=LF_ONLY)
        change = Change(f)
        change.add("1.a.host", "cur", "1.a.host:2,", "", (), len(LF_ONLY), 0)  # a copy of an unmeasured one
        await index.commit(db, [change])
        assert f.unmeasured == {1}
        f.dirty = True
        await sync(db, f)
        assert not f.unmeasured
        assert f.messages()[0].size == len(LF_ONLY) + 4

    run(tmp_path, body)


def test_an_unreadable_file_is_indexed_and_measured_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    maildir.make_maildir(folder, folder=False)
    drop(folder, "1.a.host:2,", data=LF_ONLY)

    def unreadable(path: Path) -> tuple[os.stat_result, int]:
        raise PermissionError(13, "Permission denied", str(path))

    async def body(db: Database) -> None:
        f = await open_folder(db, folder)
        with monkeypatch.context() as m:
            m.setattr(maildir, "measure_file", unreadable)
            change = await sync(db, f)
        assert [e.uid for e in change.added] == [1]
        assert f.unmeasured == {1}
        assert f.messages()[0].size == len(LF_ONLY)  # the disk size until it can be read
        f.dirty = True
        change = await sync(db, f)
        assert [(e.uid, w) for e, w in change.measured] == [(1, len(LF_ONLY) + 4)]
        assert f.messages()[0].size == len(LF_ONLY) + 4

    run(tmp_path, body)


def test_memory_per_message_is_bounded() -> None:
    """Issue 19: a folder's memory is a bounded number of bytes per message (the index and one
    snapshot, measured with tracemalloc over 10k messages), and SELECT adds nothing per message:
    the sessions' views share the snapshot's UID list and map."""
    count = 10_000

    def entry(uid: int) -> Entry:
        base = f"{1_700_000_000 + uid}.M{uid}P1.bench"
        flags = "S" if uid % 3 == 0 else ""
        return Entry(uid, base, flags, (), 2000, 1_700_000_000, 1, "cur", f"{base},S=2000,W=2000:2,{flags}", 2000)

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        folder = FolderIndex(1, "INBOX", Path("/m/INBOX"), 1, count + 1, 1, True, [entry(u) for u in range(1, count + 1)], None)
        indexed = tracemalloc.get_traced_memory()[0]
        snapshot = folder.snapshot(frozenset())
        views = [SelectedFolder(folder.snapshot(frozenset()), readonly=False) for _ in range(10)]
        viewed = tracemalloc.get_traced_memory()[0]
        assert views[0].first_unseen() == 1
        assert snapshot.uids[-1] == count
    finally:
        tracemalloc.stop()
    per_message = (indexed - start) / count, (viewed - indexed) / count
    assert per_message[0] < 500, per_message  # 365 here: Entry, its two names, the UID and name maps
    # One snapshot (a MessageInfo per message sharing the index's file name, the UID tuple and map:
    # 151 here; 311 when each held a Path); ten views add none (each copied the list and map before:
    # about 50 more per message and view).
    assert per_message[1] < 250, per_message


def test_gc_paused_restores_the_collector() -> None:
    """index.gc_paused: off for a bulk step (nested and concurrent pauses counted), on again after it
    even when the step raises; a small step and a collector someone else turned off are left alone."""
    assert gc.isenabled()
    with index.gc_paused(index.BULK - 1):
        assert gc.isenabled()
    with index.gc_paused(index.BULK):
        assert not gc.isenabled()
        with index.gc_paused(index.BULK * 10):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(RuntimeError), index.gc_paused(index.BULK):
        raise RuntimeError("a step that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with index.gc_paused(index.BULK):
            pass
        assert not gc.isenabled()  # not ours to turn on
    finally:
        gc.enable()


def test_a_listing_leaves_the_collector_on(tmp_path: Path) -> None:
    path = tmp_path / "INBOX"
    maildir.make_maildir(path, folder=False)
    for n in range(index.BULK + 5):
        drop(path, f"{1_600_000_000 + n}.M{n}P1.host,S=17:2,S")

    async def body(db: Database) -> None:
        f = await open_folder(db, path)
        change = await sync(db, f)
        assert len(change.added) == index.BULK + 5
        assert change.found_only
        assert len(f.snapshot(frozenset()).messages) == index.BULK + 5

    run(tmp_path, body)
    assert gc.isenabled()


def test_a_first_listing_hands_its_columns_to_the_snapshot(tmp_path: Path) -> None:
    """The snapshot after a first listing in columns takes its messages, UIDs and keywords from the
    listing (Change.add_columns, FolderIndex.known): the same values the snapshot would work out,
    the same UIDs after a restart, and worked out afresh after the next change."""
    path = tmp_path / "INBOX"
    maildir.make_maildir(path, folder=False)
    maildir.write_keywords(path, maildir.Keywords(("$Label1", "Work")))
    infos = [":2,S", ":2,", ":2,Fa", ":2,bS", ":2,"]
    for n in range(index.BULK + 5):
        drop(path, f"{1_600_000_000 + n}.M{n}P1.host,S=17,W=18{infos[n % len(infos)]}")
    age(path)

    def worked_out(snap: object) -> tuple[tuple[int, ...], frozenset[str], int | None]:
        # The FolderSnapshot properties computed from its messages, on a copy that knows nothing.
        from appliance.store.model import FolderSnapshot

        assert isinstance(snap, FolderSnapshot)
        fresh = FolderSnapshot(snap.name, snap.uidvalidity, snap.uidnext, snap.messages, snap.recent, snap.highestmodseq)
        return fresh.uids, fresh.keywords, fresh.first_unseen

    async def body(db: Database) -> None:
        f = await open_folder(db, path)
        change = await sync(db, f)
        assert change.columns is not None
        assert len(change.added) == index.BULK + 5
        snap = f.snapshot(frozenset())
        assert snap.messages is change.columns.messages
        assert "uids" in snap.__dict__
        assert "keywords" in snap.__dict__
        assert (snap.uids, snap.keywords, snap.first_unseen) == worked_out(snap)
        assert snap.keywords == {"$Label1", "Work"}
        assert [m.uid for m in snap.messages] == list(f.by_uid) == list(range(1, index.BULK + 6))
        assert all(f.by_uid[m.uid].info is m for m in snap.messages)
        assert f.undated == set(f.by_uid)
        assert not f.unmeasured
        assert f.bytes == 17 * (index.BULK + 5)
        await db.writes_done()
        # A restart: the rows give the same UIDs and keywords.
        again = await open_folder(db, path)
        await sync(db, again)
        other = again.snapshot(frozenset())
        assert [(m.uid, m.flags, m.filename) for m in other.messages] == [(m.uid, m.flags, m.filename) for m in snap.messages]
        assert other.keywords == snap.keywords
        # The next change: worked out afresh.
        entry = f.by_uid[1]
        flagged = Change(f)
        flagged.update(entry, "FS", ("Work",))
        await index.commit(db, [flagged])
        later = f.snapshot(frozenset())
        assert later is not snap
        assert "uids" not in later.__dict__
        assert later.uids == snap.uids
        assert later.keywords == snap.keywords

    run(tmp_path, body)


def test_a_change_with_columns_and_single_files_adds_them_all(tmp_path: Path) -> None:
    """Change.columns stands for `added` only while add_columns made all of it."""
    path = tmp_path / "INBOX"
    maildir.make_maildir(path, folder=False)

    async def body(db: Database) -> None:
        f = await open_folder(db, path)
        change = Change(f)
        found = [index.Found(f"{1_600_000_000 + n}.M{n}P1.host,S=3,W=3", "cur", f"{1_600_000_000 + n}.M{n}P1.host,S=3,W=3:2,",
                             3, 1_600_000_000, 3) for n in range(3)]
        change.add_found(found, f.keywords)
        assert change.columns is not None
        change.add("1600000009.M9P1.host", "new", "1600000009.M9P1.host", "", (), 5, 1_600_000_009, wire=6)
        assert change.columns is None
        await index.commit(db, [change])
        assert list(f.by_uid) == [1, 2, 3, 4]
        assert f.bytes == 14
        assert f.recent() == {4}
        assert [m.uid for m in f.snapshot(f.recent()).messages] == [1, 2, 3, 4]

    run(tmp_path, body)


def test_a_small_folder_is_scanned_inline_unless_a_file_must_be_read(tmp_path: Path) -> None:
    """scan(inline=True), what the store runs on the event loop for a small folder (issue 19), finds
    what scan() finds from the names alone; a file whose name lacks its sizes would have to be read
    (or an entry's wire size measured): NeedsThread, and the worker thread's scan() does it."""
    async def body(db: Database) -> None:
        path = tmp_path / "mail"
        maildir.make_maildir(path, folder=False)
        f = await open_folder(db, path)
        assert f.small_on_disk()
        drop(path, "1700000000.M1P1Q1.host,S=17,W=18:2,S")
        found = f.scan(inline=True)
        assert found is not None
        assert found.bulk is not None  # a first listing, as columns
        assert list(found.bulk.bases) == ["1700000000.M1P1Q1.host,S=17,W=18"]
        drop(path, "1700000001.M1P1Q2.host:2,")  # no sizes in its name: read to measure it
        f.dirty = True
        with pytest.raises(index.NeedsThread):
            f.scan(inline=True)
        found = await asyncio.to_thread(f.scan)
        assert found is not None
        assert len(found.found) == 2

    run(tmp_path, body)


def test_an_unremoved_name_is_kept_while_another_program_renames_in_the_folder(tmp_path: Path) -> None:
    """FolderIndex.unremoved names an expunged message's file that may still be there; a listing that
    did not show it forgot the name (Change.cleared). A listing of a directory another program renames
    in can miss a file (about 7 listings in 100 in a folder of 3,000 with one file renamed as fast as
    can be): the next listing then indexed the expunged message again. Names are now forgotten only
    after a listing nothing changed the directories during, and then they are."""
    maildir.make_maildir(tmp_path, folder=False)
    for i in range(3000):
        (tmp_path / "cur" / f"{1_700_000_000 + i}.M{i}P1.other,S=10,W=12:2,S").touch()  # sized: no stat per scan
    base = "1700009999.M1P2.other"
    first = tmp_path / "cur" / f"{base}:2,S"
    first.touch()
    f = FolderIndex(1, "INBOX", tmp_path, 1, 1, 1, False, [], None, 0, [base])
    stop = threading.Event()

    def rename_on(name: Path = first) -> None:
        flags = "RS"
        while not stop.is_set():
            other = name.with_name(f"{base}:2,{flags}")
            os.rename(name, other)
            name, flags = other, "S" if flags == "RS" else "RS"

    renamer = threading.Thread(target=rename_on)
    renamer.start()
    try:
        for _ in range(40):
            changes = f.scan()
            assert changes is not None
            assert base not in changes.cleared
    finally:
        stop.set()
        renamer.join()
    for leftover in (tmp_path / "cur").glob(f"{base}:*"):
        leftover.unlink()
    age(tmp_path)
    changes = f.scan()
    assert changes is not None
    assert changes.cleared == [base]
