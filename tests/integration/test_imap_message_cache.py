"""The per-message cache (issue 19): message lists are answered without reading message files, in a
second session and after a restart; a file changed behind the box's back is described again; the
answers are the ones the files give."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from appliance.imap import fetch_render
from appliance.store.message_cache import CachedMessage, MessageCache, stamp_of
from tests.conftest import BoxHandle
from tests.support.fetch_paths import threaded_renders
from tests.support.imap_wire import RawImap
from tests.support.polling import wait_until

USER = "carol@example.test"
PASSWORD = "correct horse battery staple"
# FLAGS left out: \Recent differs from one session to the next.
LIST_FETCH = (b"UID FETCH 1:* (UID RFC822.SIZE ENVELOPE BODYSTRUCTURE"
              b" BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID)])")

_opened: list[str] | None = None  # files opened while a test records them


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one does nothing unless a test records


@pytest.fixture
def opened_files() -> Iterator[list[str]]:
    """The paths of the files the process opens during the test (the box runs in it)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def message(n: int, subject: str | None = None) -> bytes:
    return (
        f"From: Sender {n} <s{n}@example.org>\r\nTo: {USER}\r\nSubject: {subject or f'cached {n}'}\r\n"
        f"Date: Mon, 1 Jan 2024 10:00:0{n % 10} +0000\r\nMessage-ID: <c{n}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=bb\r\n\r\n"
        "--bb\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
        "--bb\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n--bb--\r\n"
    ).encode()


def deliver(box: BoxHandle, data: bytes) -> int:
    result = box.run(box.services.store.deliver([USER], data))[USER]
    assert isinstance(result, int)
    return result


def session(box: BoxHandle) -> RawImap:
    raw = RawImap(box.port("imaps"), box.client_context)
    raw.login(USER, PASSWORD)
    raw.command(b"s", b"SELECT INBOX")
    return raw


def fetch(box: BoxHandle, command: bytes = LIST_FETCH) -> bytes:
    raw = session(box)
    try:
        return b"".join(raw.command(b"f", command))
    finally:
        raw.close()


def cache_rows(box: BoxHandle) -> int:
    with sqlite3.connect(box.data.db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM message_cache").fetchone()[0])


def maildir(box: BoxHandle) -> Path:
    return box.data.mail / "example.test" / "carol"


def settle(box: BoxHandle) -> None:
    """Let the full-text indexer read the files it has to (in the background) before opens count."""
    assert box.services.text_index is not None
    box.run(box.services.text_index.catch_up())


def message_files(opened: list[str], box: BoxHandle) -> list[str]:
    """The message files among `opened` (not the index's own files: keywords, dovecot-uidlist)."""
    dirs = tuple(str(maildir(box) / sub) + os.sep for sub in ("cur", "new"))
    return [p for p in opened if p.startswith(dirs)]


def test_delivery_fills_the_cache_and_a_restart_reads_no_file(
        tmp_path: Path, ca: trustme.CA, opened_files: list[str]) -> None:
    root = tmp_path / "data"
    box = BoxHandle(root, ca)
    try:
        box.add_user(USER, PASSWORD)
        for n in range(3):
            deliver(box, message(n))
        assert cache_rows(box) == 3  # written with the message rows
        first = fetch(box)
        assert b'"cached 2"' in first
    finally:
        box.close()
    box = BoxHandle(root, ca)
    try:
        settle(box)
        opened_files.clear()
        again = fetch(box)
        assert message_files(opened_files, box) == []  # no message file opened
        assert again == first  # the same answers as before the restart
    finally:
        box.close()


def test_answers_match_the_files(box: BoxHandle) -> None:
    """The cached answer of a delivered message is the one computed from its file."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(1))
    cached = fetch(box)
    with sqlite3.connect(box.data.db) as conn:
        conn.execute("DELETE FROM message_cache")
    box.services.store.message_cache._recent.clear()  # the rows the box kept in memory too
    computed = fetch(box)  # from the file this time (and the row learned again)
    assert computed == cached
    assert cache_rows(box) == 1


def test_foreign_file_is_learned_at_first_fetch(box: BoxHandle, opened_files: list[str]) -> None:
    box.add_user(USER, PASSWORD)
    deliver(box, message(0))  # makes the Maildir
    cur = maildir(box) / "cur"
    (cur / "1700000000.M1P1.other:2,S").write_bytes(message(7, "written by another program"))
    assert b'"written by another program"' in fetch(box)
    assert cache_rows(box) == 2
    settle(box)
    opened_files.clear()
    assert b'"written by another program"' in fetch(box)
    assert message_files(opened_files, box) == []


def test_file_changed_behind_the_box_is_described_again(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "before the edit"))
    assert b'"before the edit"' in fetch(box)
    [path] = [p for sub in ("new", "cur") for p in (maildir(box) / sub).iterdir()]
    path.write_bytes(message(1, "after an edit in place"))  # same name, same inode
    answer = fetch(box)
    assert b'"after an edit in place"' in answer
    assert b"before the edit" not in answer
    assert b"Subject: after an edit in place\r\n" in fetch(box, b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")


def test_expunge_removes_the_row(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    deliver(box, message(1))
    deliver(box, message(2))
    raw = session(box)
    try:
        raw.command(b"a", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        raw.command(b"b", b"EXPUNGE")
    finally:
        raw.close()
    assert cache_rows(box) == 1


def test_flag_change_keeps_the_row(box: BoxHandle, opened_files: list[str]) -> None:
    """A flag change renames the file (same inode and times): the row stays good."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(1))
    raw = session(box)
    try:
        raw.command(b"a", b"STORE 1 +FLAGS (\\Flagged \\Seen)")
        settle(box)
        opened_files.clear()
        answer = b"".join(raw.command(b"b", b"FETCH 1 (FLAGS ENVELOPE)"))
    finally:
        raw.close()
    assert b"\\Flagged" in answer
    assert b'"cached 1"' in answer
    assert message_files(opened_files, box) == []


def test_header_search_and_sort_read_no_file(box: BoxHandle, opened_files: list[str]) -> None:
    box.add_user(USER, PASSWORD)
    for n, subject in enumerate(["banana split", "apple pie", "cherry tart"]):
        deliver(box, message(n, subject))
    raw = session(box)
    try:
        settle(box)
        opened_files.clear()
        assert raw.command(b"a", b'SEARCH SUBJECT "apple"')[0] == b"* SEARCH 2\r\n"
        assert raw.command(b"b", b"SEARCH FROM s2@example.org")[0] == b"* SEARCH 3\r\n"
        assert raw.command(b"c", b"SORT (SUBJECT) UTF-8 ALL")[0] == b"* SORT 2 1 3\r\n"
        assert raw.command(b"d", b"SEARCH SENTSINCE 1-Jan-2024")[0] == b"* SEARCH 1 2 3\r\n"
        assert raw.command(b"e", b"SEARCH HEADER MIME-Version 1.0")[0] == b"* SEARCH 1 2 3\r\n"
        assert message_files(opened_files, box) == []
        # A field the cache does not keep is read from the files.
        assert raw.command(b"f", b"SEARCH HEADER X-Uncommon x")[0] == b"* SEARCH\r\n"
        assert len(message_files(opened_files, box)) == 3
    finally:
        raw.close()


def test_subject_search_from_the_subject_column(box: BoxHandle, opened_files: list[str]) -> None:
    """SEARCH SUBJECT reads each row's decoded, casefolded subject (migration 0019): encoded words
    and case are matched as the header's values are; a row written before that column (NULL)
    answers from its cached fields; neither opens a message file."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin"))
    deliver(box, message(2, "GRÜSSE, plain"))
    deliver(box, message(3, "nothing here"))
    with sqlite3.connect(box.data.db) as conn:
        assert conn.execute("SELECT search_subject FROM message_cache ORDER BY uid").fetchall() == [
            ("grüsse aus berlin",), ("grüsse, plain",), ("nothing here",)]
        conn.execute("UPDATE message_cache SET search_subject = NULL WHERE uid = 2")  # as an older row
    raw = session(box)
    try:
        settle(box)
        opened_files.clear()
        assert raw.command(b"a", "SEARCH CHARSET UTF-8 SUBJECT Grüsse".encode())[0] == b"* SEARCH 1 2\r\n"
        assert raw.command(b"b", b"SEARCH SUBJECT BERLIN")[0] == b"* SEARCH 1\r\n"
        assert raw.command(b"c", b"SEARCH NOT SUBJECT here")[0] == b"* SEARCH 1 2\r\n"
        assert raw.command(b"d", b'SEARCH OR SUBJECT plain SUBJECT nothing')[0] == b"* SEARCH 2 3\r\n"
        assert message_files(opened_files, box) == []
    finally:
        raw.close()


def test_header_search_sees_a_file_changed_behind_the_box(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "old subject"))
    [path] = [p for sub in ("new", "cur") for p in (maildir(box) / sub).iterdir()]
    path.write_bytes(message(1, "new subject, longer"))
    raw = session(box)
    try:
        assert raw.command(b"a", b'SEARCH SUBJECT "new subject"')[0] == b"* SEARCH 1\r\n"
        assert raw.command(b"b", b'SEARCH SUBJECT "old subject"')[0] == b"* SEARCH\r\n"
    finally:
        raw.close()


def test_copy_and_move_carry_the_rows(box: BoxHandle, opened_files: list[str]) -> None:
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "to be copied"))
    deliver(box, message(2, "to be moved"))
    raw = session(box)
    try:
        raw.command(b"a", b"COPY 1 Archive")
        raw.command(b"b", b"MOVE 2 Archive")
        raw.command(b"c", b"SELECT Archive")
        settle(box)
        opened_files.clear()
        answer = b"".join(raw.command(b"d", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)"))
    finally:
        raw.close()
    assert b'"to be copied"' in answer
    assert b'"to be moved"' in answer
    assert [p for p in opened_files if os.sep + "cur" + os.sep in p or os.sep + "new" + os.sep in p] == []
    assert cache_rows(box) == 3  # the original, its copy, the moved message


def test_header_list_of_foreign_files_is_answered_then_learned(box: BoxHandle) -> None:
    """Thunderbird's list FETCH (no BODYSTRUCTURE) of files nobody described is answered from a header
    scan at once; their rows are computed afterwards, in the background (small and large alike)."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(0))
    cur = maildir(box) / "cur"
    for n in range(1, 4):
        (cur / f"170000000{n}.M{n}P1.other:2,S").write_bytes(message(n, f"foreign {n}"))
    big = message(4, "foreign and large").replace(b"hello\r\n", b"hello\r\n" + b"x" * 76 * 3000)
    (cur / "1700000004.M4P1.other:2,S").write_bytes(big)
    raw = session(box)
    try:
        answer = b"".join(raw.command(b"a", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))
        assert b"Subject: foreign 3\r\n" in answer
        assert b"Subject: foreign and large\r\n" in answer
        raw.command(b"b", b"LOGOUT")
    finally:
        raw.close()
    wait_until(lambda: cache_rows(box) == 5, what="the rows of the foreign files")
    answer = fetch(box, b"FETCH 5 (BODYSTRUCTURE)")
    assert b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit" ' in answer


def copied_in(box: BoxHandle) -> Path:
    """A delivered message, then 30 files another program put in cur/ (which is returned)."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(0))
    cur = maildir(box) / "cur"
    for n in range(1, 31):
        (cur / f"17000000{n:02d}.M{n}P1.other:2,S").write_bytes(message(n, f"copied in {n}"))
    return cur



def rows_learned_here(cache: MessageCache, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the row batches written through this process's connection (MessageCache.learn)
    from now on: rows the CPU pool's worker writes never show here."""
    learned: list[int] = []
    learn = cache.learn

    async def counted(folder_id: int, rows: Sequence[tuple[int, CachedMessage]]) -> None:
        learned.append(len(rows))
        await learn(folder_id, rows)

    monkeypatch.setattr(cache, "learn", counted)
    return learned

def test_rows_of_a_header_list_are_described_and_written_by_the_worker(
        box: BoxHandle, opened_files: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a header list of files nobody described (more than a thread of this process would take:
    LEARN_LIGHT), the rows are computed and written by the CPU pool's worker process: this process
    opens none of the files for them and writes none of the rows, and the ENVELOPE BODYSTRUCTURE
    list after reads no file either."""
    cache = box.services.store.message_cache
    monkeypatch.setattr(cache, "prefill_due", lambda *args: False)  # (a prefill of 30 is made in this process)
    learned = rows_learned_here(cache, monkeypatch)
    copied_in(box)
    raw = session(box)
    try:
        answer = b"".join(raw.command(b"a", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))
        assert b"Subject: copied in 30\r\n" in answer
        opened_files.clear()
        wait_until(lambda: cache_rows(box) == 31, what="the rows of the listed files")
        answer = b"".join(raw.command(b"f", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)"))
    finally:
        raw.close()
    assert b'"copied in 30"' in answer
    assert message_files(opened_files, box) == []
    assert sum(learned) == 0  # no row went through this process's connection


def test_a_first_fetch_shared_with_the_worker_has_every_row_written_when_it_ends(
        box: BoxHandle, opened_files: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A first FETCH ENVELOPE BODYSTRUCTURE of files nobody described shares the describing with the
    CPU pool's worker, which writes this process's rows too (none goes through the event loop's
    connection): when the FETCH's tagged OK comes, every message has its row, and the FETCH after
    reads no file."""
    cache = box.services.store.message_cache
    monkeypatch.setattr(cache, "prefill_due", lambda *args: False)  # the FETCH finds no row made
    monkeypatch.setattr(fetch_render, "KEEP_AHEAD", 100)  # (a worker behind leaves rows to this process)
    # A worker that has started: one still starting, or not worth starting for a FETCH this small
    # (SHARE_START), leaves the rows to this process.
    assert box.run(box.services.cpu.run(os.getpid)) != os.getpid()
    learned = rows_learned_here(cache, monkeypatch)
    box.add_user(USER, PASSWORD)
    deliver(box, message(0))
    count = fetch_render.FIRST_CACHED_BATCH + 2 * fetch_render.CACHED_FETCH_BATCH
    cur = maildir(box) / "cur"
    for n in range(1, count + 1):
        (cur / f"1700{n:06d}.M{n}P1.other:2,S").write_bytes(message(n, f"copied in {n}"))
    raw = session(box)
    try:
        answer = raw.command(b"f", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
        assert cache_rows(box) == count + 1
        opened_files.clear()
        again = raw.command(b"g", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
    finally:
        raw.close()
    assert len(answer) == count + 2
    assert f'"copied in {count}"'.encode() in b"".join(answer)
    assert again[:-1] == answer[:-1]
    assert message_files(opened_files, box) == []
    assert sum(learned) == 0


def test_a_header_list_during_a_prefill_leaves_the_rows_to_it(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a SELECT's prefill makes a folder's missing rows, a header list of the folder answered
    from the files starts no fill of its own for them (nor keeps their paths for one)."""
    cache = box.services.store.message_cache
    monkeypatch.setattr(cache, "prefill_due", lambda *args: False)
    monkeypatch.setattr(cache, "prefilling", lambda folder_id: True)
    copied_in(box)
    raw = session(box)
    try:
        answer = b"".join(raw.command(b"a", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))
    finally:
        raw.close()
    assert b"Subject: copied in 30\r\n" in answer
    assert not cache._fills
    assert cache_rows(box) == 1


def test_files_first_seen_at_a_select_are_described_before_any_fetch(box: BoxHandle, opened_files: list[str]) -> None:
    """A SELECT of a folder whose files nobody described (more than PREFILL_MIN) has their rows made
    in the background, before any FETCH asks: the FETCH ENVELOPE BODYSTRUCTURE after reads no file,
    and a SELECT of the folder again counts its rows no more. So few files (PREFILL_HERE) are
    described in this process: no worker process is started for them."""
    copied_in(box)
    cache = box.services.store.message_cache
    raw = session(box)
    try:
        wait_until(lambda: cache_rows(box) == 31 and not cache._fills, what="the rows of the files copied in")
        assert len(set(message_files(opened_files, box))) == 30  # read here, by the prefill
        opened_files.clear()
        answer = b"".join(raw.command(b"f", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)"))
        raw.command(b"s", b"SELECT INBOX")
        assert not cache._fills  # (prefill_due: nothing new since)
    finally:
        raw.close()
    assert b'"copied in 30"' in answer
    assert message_files(opened_files, box) == []


@pytest.mark.parametrize("how", ["in place", "by rename", "in place, through a COPY's link"])
def test_a_file_changed_after_its_row_was_trusted(box: BoxHandle, how: str) -> None:
    """Rows are used without a stat once one matched them while the box watched the folder
    (appliance/store/file_watch.py); a file changed after that, in place (same name, same inode)
    or replaced by a rename (a new inode), is still answered from its new content by FETCH and
    SEARCH SUBJECT, in the session that trusted the rows and in a new one. A COPY's hard link is
    the same file under another folder's name: a write through it is seen in INBOX too."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "first version"))
    deliver(box, message(2, "the other one"))
    raw = session(box)
    try:
        if how == "in place, through a COPY's link":
            raw.command(b"c", b"UID COPY 1 Archive")
        for tag in (b"a", b"b"):  # the first check stats the files, the second trusts the rows
            assert raw.command(tag, b'SEARCH SUBJECT "first version"')[0] == b"* SEARCH 1\r\n"
            assert b'"first version"' in b"".join(raw.command(tag, LIST_FETCH))
        [path] = [p for sub in ("new", "cur") for p in (maildir(box) / sub).iterdir() if b"c1@" in p.read_bytes()]
        changed = message(1, "second version")
        if how == "in place":
            with open(path, "r+b") as f:  # the same size, the same inode
                f.write(changed.replace(b"second", b"SECOND"))
        elif how == "by rename":
            tmp = maildir(box) / "tmp" / "replacement"
            tmp.write_bytes(changed.replace(b"second", b"SECOND"))
            os.utime(tmp, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))  # all but the inode alike
            os.replace(tmp, path)
        else:
            [copy] = (box.data.mail / "example.test" / "carol" / ".Archive" / "cur").iterdir()
            copy.write_bytes(changed.replace(b"second", b"SECOND"))
        assert raw.command(b"d", b'SEARCH SUBJECT "second version"')[0] == b"* SEARCH 1\r\n"
        assert raw.command(b"e", b'SEARCH SUBJECT "first version"')[0] == b"* SEARCH\r\n"
        answer = b"".join(raw.command(b"f", LIST_FETCH))
        assert b'"SECOND version"' in answer
        assert b"first version" not in answer
        assert b'"the other one"' in answer
    finally:
        raw.close()
    answer = fetch(box)
    assert b'"SECOND version"' in answer
    assert b"first version" not in answer


def counted_stats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, a 1 here for each stat the check of cache rows against files makes (fetch_cache)."""
    stats: list[int] = []

    def counting(st: os.stat_result) -> tuple[int, int, int]:
        stats.append(1)
        return stamp_of(st)

    monkeypatch.setattr("appliance.imap.fetch_cache.stamp_of", counting)
    return stats


@pytest.mark.parametrize("filled_by", ["FETCH", "the worker"])
def test_rows_just_computed_need_no_stat_at_the_next_command(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch, filled_by: str) -> None:
    """Rows a FETCH computed, or the CPU pool's worker wrote after a header list, are checked against
    their files once written (fetch_cache.current_rows): the SEARCH SUBJECT after them stats no file, and
    still sees a file changed since."""
    cur = copied_in(box)
    raw = session(box)
    try:
        if filled_by == "FETCH":
            raw.command(b"a", b"FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
        else:
            raw.command(b"a", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
            cache = box.services.store.message_cache
            wait_until(lambda: cache_rows(box) == 31 and not cache._fills, what="the rows of the listed files")
        stats = counted_stats(monkeypatch)
        assert raw.command(b"b", b'SEARCH SUBJECT "copied in 3"')[0] == b"* SEARCH 4 31\r\n"
        # (the delivered message's row, written at delivery, is stat'ed once)
        assert len(stats) <= 1
        (cur / "1700000030.M30P1.other:2,S").write_bytes(message(30, "changed"))
        assert raw.command(b"c", b'SEARCH SUBJECT "copied in 3"')[0] == b"* SEARCH 4\r\n"
    finally:
        raw.close()


def test_subject_search_of_a_message_with_two_subject_fields(box: BoxHandle, opened_files: list[str]) -> None:
    """The subject column joins a header's Subject values with NUL; SQLite's test finds a word of
    either, and none across the two."""
    box.add_user(USER, PASSWORD)
    deliver(box, message(1, "Grüße zuerst\r\nSubject: und dann"))
    deliver(box, message(2, "nothing here"))
    with sqlite3.connect(box.data.db) as conn:
        assert conn.execute("SELECT search_subject FROM message_cache WHERE uid = 1").fetchone() == (
            "grüsse zuerst\0und dann",)
    raw = session(box)
    try:
        settle(box)
        opened_files.clear()
        assert raw.command(b"a", b"SEARCH SUBJECT dann")[0] == b"* SEARCH 1\r\n"
        assert raw.command(b"b", "SEARCH CHARSET UTF-8 SUBJECT GRÜSSE".encode())[0] == b"* SEARCH 1\r\n"
        assert raw.command(b"c", b'SEARCH SUBJECT "zuerst und"')[0] == b"* SEARCH\r\n"
        assert raw.command(b"d", b"SEARCH SUBJECT here")[0] == b"* SEARCH 2\r\n"
        assert message_files(opened_files, box) == []
    finally:
        raw.close()


@pytest.mark.parametrize("batch", [3, 4096])
def test_subject_search_over_batches_with_messages_the_rows_cannot_answer(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """SEARCH SUBJECT reads the folder's rows in one statement, a batch at a time
    (message_cache.SCAN_BATCH): messages without a row (first, last, between batches and within one),
    with a row but no subject text, or whose file changed, are answered from their files, each once,
    and the answer is the one the files give."""
    monkeypatch.setattr("appliance.store.message_cache.SCAN_BATCH", batch)
    box.add_user(USER, PASSWORD)
    for n in range(1, 15):
        deliver(box, message(n, f"{'apple' if n % 3 else 'pear'} {n}"))
    with sqlite3.connect(box.data.db) as conn:
        conn.execute("DELETE FROM message_cache WHERE uid IN (1, 5, 6, 8, 14)")
        conn.execute("UPDATE message_cache SET search_subject = NULL WHERE uid IN (2, 9)")
    [path] = [p for sub in ("new", "cur") for p in (maildir(box) / sub).iterdir() if b"<c11@" in p.read_bytes()]
    path.write_bytes(message(11, "pear, now"))
    raw = session(box)
    try:
        for tag in (b"a", b"b"):  # the rows stat'ed, then trusted
            assert raw.command(tag, b"SEARCH SUBJECT apple")[0] == b"* SEARCH 1 2 4 5 7 8 10 13 14\r\n"
            assert raw.command(tag, b"SEARCH SUBJECT PEAR")[0] == b"* SEARCH 3 6 9 11 12\r\n"
            assert raw.command(tag, b"UID SEARCH SUBJECT 1")[0] == b"* SEARCH 1 10 12 13 14\r\n"
    finally:
        raw.close()


def test_subject_search_when_the_cache_cannot_be_read(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message cache whose database cannot be read answers nothing (it is then left alone): every
    message of a SEARCH SUBJECT is answered from its file, and FETCH after it too."""
    box.add_user(USER, PASSWORD)
    for n, subject in enumerate(["banana split", "apple pie", "apple tart"], start=1):
        deliver(box, message(n, subject))
    monkeypatch.setattr("appliance.store.message_cache._SUBJECT_SCAN_SQL", "SELECT no_such_column FROM message_cache")
    raw = session(box)
    try:
        assert raw.command(b"a", b"SEARCH SUBJECT apple")[0] == b"* SEARCH 2 3\r\n"
        assert raw.command(b"b", b"SEARCH SUBJECT banana")[0] == b"* SEARCH 1\r\n"
        assert b'"apple tart"' in b"".join(raw.command(b"c", b"FETCH 3 (ENVELOPE)"))
    finally:
        raw.close()
    assert box.services.store.message_cache._broken


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
def test_an_append_bigger_than_a_small_literal_gets_its_row(box: BoxHandle, caplog: pytest.LogCaptureFixture,
                                                            line_end: bytes) -> None:
    """An APPEND's literal over 64 KiB reaches the store as the bytearray it was read into: its
    row is made with the message all the same (its slices were dict keys: TypeError, an ERROR with
    a traceback in the log, and no row, for a multipart message or one with bare LF line ends)."""
    box.add_user(USER, PASSWORD)
    attachment = b"QUJD" * 19 + line_end
    data = message(1, "big attachment").replace(
        b"--bb--\r\n", b"--bb\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + attachment * 1200 + b"--bb--\r\n").replace(b"\r\n", line_end)
    assert len(data) > 64 * 1024
    raw = RawImap(box.port("imaps"), box.client_context)
    try:
        raw.login(USER, PASSWORD)
        raw.send(b"a APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
        assert raw.until_tagged(b"a")[-1].startswith(b"a OK [APPENDUID")
    finally:
        raw.close()
    assert "describing a delivered message for the cache failed" not in caplog.text
    assert cache_rows(box) == 1
    assert b'"big attachment"' in fetch(box, b"FETCH 1 (ENVELOPE)")


def test_a_list_of_mail_just_delivered_is_answered_without_a_worker_thread(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of the newest messages are kept in memory as they are written (MessageCache.recent):
    a FETCH of a few of them is answered on the event loop, a stat per file, with no trip to a
    worker thread and no SQL (issue 19); the same answers as the rows read back give."""
    box.add_user(USER, PASSWORD)
    for n in range(3):
        deliver(box, message(n))
    threaded = threaded_renders(monkeypatch)
    from_memory = fetch(box)
    assert threaded == []
    assert b'"cached 2"' in from_memory
    box.services.store.message_cache._recent.clear()  # as after a restart: the rows from the database
    assert fetch(box) == from_memory
    assert threaded == [3]


def test_a_row_cached_before_nul_was_replaced_sends_none(box: BoxHandle, opened_files: list[str]) -> None:
    """A row rendered before a NUL went out as 0x80 (b6b187f) holds the NUL in its ENVELOPE and
    BODYSTRUCTURE strings; the row still answers (no file read) and no NUL reaches the client."""
    box.add_user(USER, PASSWORD)
    data = message(1, "before\0after").replace(b"charset=utf-8", b"charset=utf-8; name=\"a\0b.txt\"")
    deliver(box, data)
    wanted = fetch(box)
    assert b"before\x80after" in wanted
    assert b"a\x80b.txt" in wanted
    with sqlite3.connect(box.data.db) as conn:  # the row as the box before b6b187f wrote it
        envelope, structure, body = conn.execute("SELECT envelope, bodystructure, body FROM message_cache").fetchone()
        assert all(b"\x80" in value for value in (envelope, structure, body))
        conn.execute("UPDATE message_cache SET envelope = ?, bodystructure = ?, body = ?",
                     tuple(v.replace(b"\x80", b"\0") for v in (envelope, structure, body)))
    box.services.store.message_cache._recent.clear()  # the rows the box kept in memory too
    settle(box)
    opened_files.clear()
    old = fetch(box, LIST_FETCH.replace(b"BODYSTRUCTURE", b"BODYSTRUCTURE BODY"))
    assert message_files(opened_files, box) == []  # answered from the old row
    assert b"\0" not in old
    assert fetch(box) == wanted



def test_appends_flag_changes_and_expunges_keep_the_other_rows_trusted(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The names of files expunged or renamed for a flag leave the watch's list of changed names
    (file_watch.py): they stayed, and at MAX_DIRTY of them every row of the folder was stat'ed again
    (every 20 s under imaptest's APPEND, STORE, EXPUNGE). Here with a list of 40, and 30 rounds of
    three names each."""
    monkeypatch.setattr("appliance.store.file_watch.MAX_DIRTY", 40)
    box.add_user(USER, PASSWORD)
    for n in (1, 2, 3):
        deliver(box, message(n))
    raw = session(box)
    try:
        for tag in (b"a", b"b"):  # the first check stats the files, the second trusts the rows
            assert raw.command(tag, b'SEARCH SUBJECT "cached"')[0] == b"* SEARCH 1 2 3\r\n"
        data = message(9, "churn")
        for _ in range(30):
            raw.send(b"c APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
            assert raw.until_tagged(b"c")[-1].startswith(b"c OK [APPENDUID")
            assert raw.command(b"d", b"FETCH 4 (ENVELOPE)")[-1].startswith(b"d OK")
            assert raw.command(b"e", b"STORE 4 +FLAGS (\\Seen)")[-1].startswith(b"e OK")
            assert raw.command(b"g", b"STORE 4 +FLAGS (\\Deleted)")[-1].startswith(b"g OK")
            assert raw.command(b"h", b"EXPUNGE")[-1].startswith(b"h OK")
        stats = counted_stats(monkeypatch)
        assert raw.command(b"i", b'SEARCH SUBJECT "cached"')[0] == b"* SEARCH 1 2 3\r\n"
        assert stats == []
        watch = box.services.store.message_cache.watch
        assert [len(folder.dirty) <= 2 for folder in watch._folders.values()] == [True]
    finally:
        raw.close()
