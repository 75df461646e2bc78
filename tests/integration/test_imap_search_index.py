"""SEARCH BODY/TEXT with the full-text index (appliance/imap/fts.py): the same answers as the scan of
the files, rows that leave with their messages, foreign files indexed, and the index's size told."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance import cpu_pool
from appliance.imap import fts
from appliance.imap import search as search_module
from appliance.imap.fts import TextIndex
from appliance.imap.search import searched_texts
from appliance.status_checks import check_disk
from appliance.store.mailstore import MailStore
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

T = TypeVar("T")
USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
CORPUS = Path(__file__).parent.parent / "corpus" / "mime"
_WORD = re.compile(r"[^\W_]{4,12}")

EXTRA = [
    # GLOB's wildcards as text: the index looks needles up as GLOB patterns (fts.glob_pattern).
    b"From: g@example.org\r\nSubject: [glob] *stars*\r\n\r\nwhat? a*b [brackets] and a?c\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\nSubject: Stra\xc3\x9fe\r\nContent-Type: text/plain;"
    b" charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe aus der Stra=C3=9Fe,"
    b" \"quoted\" words and 100% of it\r\n",
    b"From: b@example.org\r\nSubject: base64\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nSuwgZXN0IGTpauAgbOA=\r\n",
    b"From: c@example.org\r\nSubject: nothing special\r\n\r\nplain words only\r\n",
]


def index(box: BoxHandle) -> TextIndex:
    text_index = box.services.text_index
    assert text_index is not None
    return text_index


def search(raw: RawImap, tag: str, where: str, needle: str) -> list[int]:
    data = needle.encode()
    raw.send(f"{tag} UID SEARCH CHARSET UTF-8 {where} {{{len(data)}+}}\r\n".encode() + data + b"\r\n")
    lines = raw.until_tagged(tag.encode())
    assert lines[-1].startswith(f"{tag} OK".encode()), lines
    found = [ln for ln in lines if ln.startswith(b"* SEARCH")]
    return [int(n) for n in found[0].split()[2:]] if found else []


def needles(messages: list[bytes]) -> list[str]:
    """Words of each message's searched text, some in other cases, plus the awkward ones."""
    out = {"", "zz", "nosuchwordanywhere", 'd "quoted', "100%", "STRASSE", "jörg", "grüße", "déjà", "ß",
           "[glob]", "*stars*", "what?", "a*b", "[brackets]", "a?c", "axb", "a[*]b", "s*s", "[b"}
    for i, data in enumerate(messages):
        header, body = searched_texts(data)
        words = _WORD.findall(body) or _WORD.findall(header)
        if words:
            out.add(words[-1])
            out.add(words[0].upper()[1:] if i % 2 else words[0])  # some in capitals, some cut
    return sorted(out)


@pytest.fixture
def corpus_box(box: BoxHandle) -> list[bytes]:
    box.add_user(USER, PASSWORD)
    box.run(index(box).stop())  # the test decides when the index catches up
    messages = [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))] + EXTRA
    for data in messages:
        assert isinstance(box.run(box.services.store.deliver([USER], data))[USER], int)
    return messages


def test_index_gives_the_answers_of_the_scan(box: BoxHandle, corpus_box: list[bytes]) -> None:
    raw = RawImap(box.port("imaps"), box.client_context, timeout=60)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")
        terms = [(where, n) for n in needles(corpus_box) for where in ("BODY", "TEXT")]
        scanned = {t: search(raw, f"a{i}", *t) for i, t in enumerate(terms)}
        assert any(scanned.values())
        assert box.run(index(box).catch_up()) == len(corpus_box)
        tasks = box.services.cpu.tasks
        indexed = {t: search(raw, f"b{i}", *t) for i, t in enumerate(terms)}
        assert indexed == scanned
        # Only needles too short for trigrams were read from the files (the empty one needs nothing).
        short = {n for _, n in terms if 0 < len(n.casefold()) < 3}
        assert box.services.cpu.tasks - tasks == 2 * len(short)
        # A BODY key with a header key: the header is read from the file, the body from the index.
        assert search(raw, "c", "FROM b@example.org BODY", "déjà") == [len(corpus_box) - 1]
    finally:
        raw.close()


def test_a_lone_text_key_reads_only_what_the_index_lacks(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SEARCH whose key is one BODY or TEXT key takes the index's rows as the answer for every
    message they cover, without a call of the compiled key for each of them (that call per message
    was most of a SEARCH BODY at 100k, issue 19); the messages not yet indexed are read from their
    files, and the answer is the one the scan gives."""
    box.add_user(USER, PASSWORD)
    text_index = index(box)
    box.run(text_index.stop())
    store = box.services.store
    for n in range(1, 9):  # fts.LIGHT_MESSAGES at most: indexed in a thread, no worker process
        word = "zebrafish" if n % 3 == 0 else "goldfish"
        box.run(store.deliver([USER], f"Subject: fish {n}\r\n\r\na {word} swims\r\n".encode()))
    raw = RawImap(box.port("imaps"), box.client_context, timeout=60)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")
        scanned = [search(raw, "a", "BODY", "zebrafish"), search(raw, "b", "TEXT", "FISH 4")]
        assert scanned == [[3, 6], [4]]
        assert box.run(text_index.catch_up()) == 8
        for n in range(9, 12):  # delivered since: not in the index yet
            box.run(store.deliver([USER], f"Subject: fish {n}\r\n\r\nthe zebrafish {n}\r\n".encode()))
        raw.command(b"n", b"NOOP")
        calls: list[int] = []
        real = search_module.Searcher.matches

        def counted(self: search_module.Searcher, c: search_module.Candidate, *args: Any) -> bool:
            calls.append(c.uid)
            return real(self, c, *args)

        monkeypatch.setattr(search_module.Searcher, "matches", counted)
        assert search(raw, "c", "BODY", "zebrafish") == [3, 6, 9, 10, 11]
        assert sorted(calls) == [9, 10, 11]  # the three files the index lacks, read in a thread
        calls.clear()
        assert search(raw, "d", "TEXT", "FISH 4") == [4]
        assert sorted(calls) == [9, 10, 11]
    finally:
        raw.close()


def rows(box: BoxHandle) -> int:
    """The index's rows; the rowids lookups take as held (FTS5's docsize table, fts._INDEXED) are theirs."""
    db = box.services.db
    held = {r[0] for r in box.run(db.fetchall("SELECT rowid FROM message_text"))}
    assert {r[0] for r in box.run(db.fetchall(fts._INDEXED, (0, 1 << 62)))} == held
    return len(held)


def test_rows_leave_with_their_messages(box: BoxHandle, corpus_box: list[bytes]) -> None:
    store = box.services.store
    box.run(store.create_folder(USER, "Kept"))
    box.run(store.copy(USER, "INBOX", [1, 2, 3], "Kept"))
    box.run(index(box).catch_up())
    assert rows(box) == len(corpus_box) + 3
    box.run(store.store_flags(USER, "INBOX", [1, 2], frozenset({"\\Deleted"}), "add"))
    assert box.run(store.expunge(USER, "INBOX", [1, 2])) == [1, 2]
    assert rows(box) == len(corpus_box) + 1
    box.run(store.move(USER, "INBOX", [3], "Kept"))
    box.run(index(box).catch_up())
    assert rows(box) == len(corpus_box) + 1  # moved: one row out, one in
    box.run(store.delete_folder(USER, "Kept"))
    assert rows(box) == len(corpus_box) - 3
    box.run(box.services.accounts.remove_user(USER))
    assert rows(box) == 0


def test_foreign_files_are_indexed(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    box.run(index(box).stop())
    cur = box.services.config.data.mail / "example.test" / "alice" / "cur"
    cur.mkdir(parents=True, exist_ok=True)
    (cur / "1700000000.M1P1.elsewhere:2,S").write_bytes(
        b"From: x@example.org\r\nSubject: copied in\r\n\r\nwritten by another server\r\n")
    raw = RawImap(box.port("imaps"), box.client_context, timeout=60)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")  # the file is found and given its UID
        assert box.run(index(box).catch_up()) == 1
        tasks = box.services.cpu.tasks
        assert search(raw, "a", "BODY", "ANOTHER SERVER") == [1]
        assert search(raw, "b", "TEXT", "copied in") == [1]
        assert search(raw, "c", "BODY", "copied in") == []
        assert box.services.cpu.tasks == tasks  # all three from the index
    finally:
        raw.close()


def test_background_indexing_after_delivery(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    for n in range(3):
        box.run(box.services.store.deliver([USER], f"Subject: {n}\r\n\r\nbody number {n}\r\n".encode()))
    box.run(_wait_indexed(index(box), 3))
    assert box.run(index(box).size_bytes()) > 0
    # Its size is told on the status page's disk item.
    assert re.search(r"Search index: \d+\.\d MiB\.", box.run(check_disk(box.services)).summary)


def test_indexing_waits_for_a_pause_in_the_mail(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's transactions (index rows, message cache rows) would hold the write lock every
    group commit of deliveries waits for: background work waits until no mail came for
    PAUSE_SECONDS, or MAX_DEFER_SECONDS at most (CpuPool.pause, fed by the store's arrivals)."""
    box.add_user(USER, PASSWORD)
    box.run(index(box).stop())
    monkeypatch.setattr(cpu_pool, "MAX_DEFER_SECONDS", 1.5)
    store, cpu = box.services.store, box.services.cpu

    async def body() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance((await store.deliver([USER], b"Subject: x\r\n\r\nbody\r\n"))[USER], int)
        arrived = store.last_arrival
        assert 0 < arrived <= loop.time()
        await cpu.pause()
        assert loop.time() >= arrived + cpu_pool.PAUSE_SECONDS

        started = loop.time()
        await under_mail_that_never_stops(store, cpu.pause())
        assert loop.time() >= started + cpu_pool.MAX_DEFER_SECONDS

    box.run(body())


def test_a_backlog_gives_way_to_the_mail_between_chunks(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog is indexed in chunks of background work, and each waits for a pause in the mail
    (issue 19: a folder copied in kept the write lock in turns with every delivery of a burst), so
    under mail that never stops a chunk goes every MAX_DEFER_SECONDS, and the backlog still ends."""
    box.add_user(USER, PASSWORD)
    text_index = index(box)
    box.run(text_index.stop())
    monkeypatch.setattr(cpu_pool, "MAX_DEFER_SECONDS", 0.3)
    monkeypatch.setattr(fts, "CHUNK_MESSAGES", 2)
    monkeypatch.setattr(fts, "LIGHT_MESSAGES", 0)  # a backlog: the worker process's background path
    store = box.services.store
    for n in range(6):  # three chunks
        box.run(store.deliver([USER], f"Subject: {n}\r\n\r\nbody number {n}\r\n".encode()))

    async def body() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await under_mail_that_never_stops(store, text_index.catch_up()) == 6
        return loop.time() - started

    assert box.run(body()) >= 3 * cpu_pool.MAX_DEFER_SECONDS
    assert rows(box) == 6


async def under_mail_that_never_stops(store: MailStore, work: Awaitable[T]) -> T:
    """`work`, while the store hears of an arrival every 20 ms."""
    loop = asyncio.get_running_loop()

    async def feed() -> None:
        while True:
            store._arrivals.last_arrival = loop.time()
            await asyncio.sleep(0.02)

    feeder = asyncio.create_task(feed())
    try:
        return await asyncio.wait_for(work, 60)
    finally:
        feeder.cancel()


async def _wait_indexed(text_index: TextIndex, count: int) -> None:
    for _ in range(600):
        if text_index.indexed >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {text_index.indexed} of {count} indexed in 30 s")


def test_a_folder_that_failed_is_tried_again_later(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that fails on a folder (the database locked past the worker's busy timeout) leaves it
    to the scan only for a while: a later round after RETRY_SECONDS indexes it."""
    box.add_user(USER, PASSWORD)
    text_index = index(box)
    box.run(text_index.stop())
    for n in range(3):
        box.run(box.services.store.deliver([USER], f"Subject: {n}\r\n\r\nbody number {n}\r\n".encode()))
    real = fts.index_messages
    calls: list[int] = []

    def fails_once(*args: object, **kwargs: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fts, "index_messages", fails_once)
    assert box.run(text_index.catch_up()) == 0
    assert box.run(text_index.catch_up()) == 0  # not yet: the folder waits RETRY_SECONDS
    assert len(calls) == 1
    (folder, (_, wait)), = text_index._failed.items()
    assert wait == fts.RETRY_SECONDS
    text_index._failed[folder] = (0.0, wait)  # its time has come
    assert box.run(text_index.catch_up()) == 3
    assert not text_index._failed
    assert rows(box) == 3
