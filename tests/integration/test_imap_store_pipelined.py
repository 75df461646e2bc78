"""STORE and EXPUNGE let the folder lock go before their files and rows are written (issue 19:
store/index.py commit_pipelined): the change is made in memory under the lock, its renames or unlinks
and its transaction are queued on the database's thread, and the tagged reply waits for them. When
that write finds a file elsewhere (another program renamed it) or fails (the database refuses), memory
is read again from the db and the disk: every session then sees what the files and rows say, and an
expunge is never taken back. Over real IMAP, with a second session watching (a failed transaction:
test_disk_full.py's test_a_store_and_an_expunge_the_full_disk_failed_are_seen_as_the_files_say)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
MESSAGE = b"Subject: hello\r\n\r\nhello\r\n"
READ_AGAIN = "its index is read again"


@pytest.fixture
def opened(box: BoxHandle) -> Iterator[Callable[[], RawImap]]:
    """Logged-in sessions of the user, closed after the test."""
    box.add_user(USER, PASSWORD)
    sessions: list[RawImap] = []

    def session() -> RawImap:
        raw = RawImap(box.port("imaps"), box.client_context, timeout=30)
        sessions.append(raw)
        raw.login(USER, PASSWORD)
        return raw

    try:
        yield session
    finally:
        for raw in sessions:
            raw.close()


def _append(raw: RawImap, flags: str = "") -> None:
    raw.send(b"a APPEND INBOX (" + flags.encode() + b") {%d}\r\n" % len(MESSAGE))
    assert raw.line().startswith(b"+")
    raw.send(MESSAGE + b"\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")


def _inbox(box: BoxHandle) -> Path:
    return box.data.mail / "example.test" / USER.split("@")[0]


def _file(box: BoxHandle, uid: int) -> Path:
    """The file of the message with `uid`, by its unique name in the index's row."""
    rows = box.run(box.services.store._db.fetchall("SELECT basename FROM messages WHERE uid = ?", (uid,)))
    [base] = [r[0] for r in rows]
    [path] = [p for sub in ("cur", "new") for p in (_inbox(box) / sub).iterdir() if p.name.split(":")[0] == base]
    return path


def _rename_behind(path: Path, letters: str) -> Path:
    """Another program's flag change (a Maildir MUA's), the box not told."""
    target = path.parent.parent / "cur" / (path.name.split(":")[0] + ":2," + letters)
    os.rename(path, target)
    return target


def _rows(box: BoxHandle) -> dict[int, str]:
    rows = box.run(box.services.store._db.fetchall("SELECT uid, flags FROM messages ORDER BY uid"))
    return {r[0]: r[1] for r in rows}


def _flags(lines: list[bytes]) -> dict[int, set[str]]:
    """UID -> flags of the FETCH responses among `lines`."""
    found = {}
    for line in lines:
        m = re.search(rb"FETCH \((?=.*UID (\d+))(?=.*FLAGS \(([^)]*)\))", line)
        if m:
            found[int(m.group(1))] = set(m.group(2).decode().split()) - {"\\Recent"}
    return found


def test_store_and_expunge_find_files_another_program_renamed_meanwhile(
        box: BoxHandle, opened: Callable[[], RawImap], caplog: pytest.LogCaptureFixture) -> None:
    """The flag change lands on the file where it is now, and every session sees the flags the file
    and the row have; the expunge removes the file wherever it went, its row too, and it never comes
    back (a later SELECT, the other session)."""
    caplog.set_level(logging.INFO, logger="letterbox.store")
    busy, other = opened(), opened()
    for _ in range(3):
        _append(busy)
    for raw in (busy, other):
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")

    _rename_behind(_file(box, 1), "S")
    reply = busy.command(b"f", b"UID STORE 1 +FLAGS (\\Flagged)")
    assert reply[-1].startswith(b"f OK"), reply
    assert _flags(reply) == {1: {"\\Seen", "\\Flagged"}}
    assert READ_AGAIN in caplog.text  # the write missed the file: memory read again, then the flag set
    assert _file(box, 1).name.endswith(":2,FS")
    assert _rows(box)[1] == "FS"
    noop = other.command(b"n", b"UID FETCH 1 (FLAGS)")
    assert _flags(noop)[1] == {"\\Seen", "\\Flagged"}, noop

    caplog.clear()
    assert busy.command(b"d", b"UID STORE 2 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"d OK")
    _rename_behind(_file(box, 2), "ST")
    reply = busy.command(b"x", b"EXPUNGE")
    assert reply[-1].startswith(b"x OK"), reply
    assert b"* 2 EXPUNGE\r\n" in reply
    assert READ_AGAIN in caplog.text
    assert sorted(_rows(box)) == [1, 3]
    assert len(list((_inbox(box) / "cur").iterdir())) + len(list((_inbox(box) / "new").iterdir())) == 2
    assert b"* 2 EXPUNGE\r\n" in other.command(b"n", b"NOOP")
    assert b"* 2 EXISTS\r\n" in opened().command(b"s", b"SELECT INBOX")
    assert set(_flags(other.command(b"u", b"UID FETCH 1:* (FLAGS)"))) == {1, 3}


_MODSEQ = re.compile(rb"FETCH \(.*MODSEQ \((\d+)\)")


def _modseqs(lines: list[bytes]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := _MODSEQ.search(line))]


def test_a_session_that_saw_a_pipelined_flag_change_never_sees_its_mod_sequence_go_down(
        box: BoxHandle, opened: Callable[[], RawImap]) -> None:
    """A STORE is in memory, and told to the other sessions, before its rename and row are written.
    When the rename then misses the file (another program moved it, its flags kept), the index is
    read again from the db, whose row has the message's older mod-sequence: a session that saw the
    change must not be told that older one (RFC 7162 3.1: a message's mod-sequence only grows; its
    flags went back, which is a change too). Here the other session's NOOP is the one that reads
    the index again (it waited for the write, folder lock held), before the STORE's retry."""
    busy, other = opened(), opened()
    _append(busy)
    for raw in (busy, other):
        assert raw.command(b"e", b"ENABLE CONDSTORE")[-1].startswith(b"e OK")
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    [before] = _modseqs(other.command(b"f", b"UID FETCH 1 (FLAGS MODSEQ)"))
    path = _file(box, 1)

    gate = threading.Event()  # the database's thread waits for it: the STORE's write waits behind
    db = box.services.store._db

    def nothing(_: sqlite3.Connection) -> None:
        return None

    blocker = box.run(_queued_behind(db.write_queued(nothing, gate=(gate, 30))))
    try:
        busy.send(b"st UID STORE 1 +FLAGS.SILENT (\\Flagged)\r\n")
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # the change is in memory: the other session is told
            seen = _modseqs(other.command(b"n", b"NOOP"))
        assert seen, "the STORE was not told to the other session"
        assert seen[-1] > before, seen
        # Another program moves the file, its flags as they were (the row's).
        os.rename(path, path.parent.parent / "new" / path.name.split(":")[0])
        other.send(b"n2 NOOP\r\n")  # waits for the STORE's write, the folder lock held
        time.sleep(0.5)
    finally:
        gate.set()
    box.run(_ended(blocker))
    after = other.until_tagged(b"n2")
    assert all(m >= seen[-1] for m in _modseqs(after)), (seen, after)
    assert busy.until_tagged(b"st")[-1].startswith(b"st OK")
    final = other.command(b"f2", b"UID FETCH 1 (FLAGS MODSEQ)")
    assert _flags(final)[1] == {"\\Flagged"}, final
    assert all(m > seen[-1] for m in _modseqs(final)), (seen, final)


async def _queued_behind(queued: Coroutine[Any, Any, asyncio.Future[None]]) -> asyncio.Future[None]:
    return await queued


async def _ended(future: asyncio.Future[None]) -> None:
    await future
