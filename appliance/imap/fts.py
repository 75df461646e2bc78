"""The full-text index of message text (SQLite FTS5, trigram tokenizer) behind SEARCH BODY and TEXT.

Without it, SEARCH BODY opens and decodes every message of the folder (528 s for 100k messages,
issue 19). With it, each BODY/TEXT term is one FTS5 query over the folder's rowid range, and only
the messages not yet indexed are scanned.

Exactness: the index stores, per message, the very strings the scan searches (search.searched_texts:
decoded header lines and decoded text parts, casefolded), and `column GLOB '*needle*'` finds the rows
where the needle's characters occur consecutively: FTS5 narrows to the rows holding every trigram of
the needle (detail=none: which rows, not where in them, migrations/0020) and SQLite checks the pattern
against each one's stored text: substring matching, as RFC 3501 6.4.4 asks. A
needle shorter than three characters has no trigram, so it is scanned. A message too large to be
decoded in memory, or whose text SQLite cannot hold as it is, gets no row and is scanned too.

Filling: a background task (TextIndex.run) looks every POLL_SECONDS, or when nudged, for folders
whose UIDs went past what was indexed (message_text_folders), and hands the new messages to the CPU
pool's worker process in chunks: the worker reads the files, extracts the text and writes the rows
in one short transaction of its own. So delivery never waits for it (the 250 is already sent), and
foreign files (a Maildir copied in) are indexed like delivered ones. Rows leave with their message
through a trigger (migrations/0017_message_text.sql).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cpu_pool import worker_db
from appliance.imap.limits import MAX_DECODED_SEARCH_OCTETS
from appliance.imap.search import Term, TextHits, answerable, searched_texts
from appliance.store.maildir import read_message
from appliance.store.model import MessageInfo
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.cpu_pool import CpuPool
    from appliance.db import Database
    from appliance.services import Services
    from appliance.store.mailstore import MailStore

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
SETTLE_SECONDS = 0.5  # a burst of deliveries is indexed together
RETRY_SECONDS = 60.0
MAX_RETRY_SECONDS = 3600.0
CHUNK_MESSAGES = 64  # messages per worker task and per transaction: the write lock is held briefly
CHUNK_OCTETS = 1024 * 1024
PAGE_MESSAGES = 5000  # messages asked of the store at a time (a listing each when the folder is unloaded)
LIGHT_MESSAGES = 8  # new messages indexed in a thread of the server rather than the worker process
FTS_TABLES = ("message_text_data", "message_text_idx", "message_text_content", "message_text_docsize",
              "message_text_config")
UID_BITS = 32
UID_MASK = (1 << UID_BITS) - 1


def rowid(folder_id: int, uid: int) -> int:
    return (folder_id << UID_BITS) | uid


def folder_range(folder_id: int) -> tuple[int, int]:
    return folder_id << UID_BITS, (folder_id << UID_BITS) | UID_MASK


_GLOB_SPECIAL = str.maketrans({"*": "[*]", "?": "[?]", "[": "[[]"})


def glob_pattern(needle: str) -> str:
    """The GLOB pattern matching any text that holds `needle`: its wildcard characters each in a
    bracket expression of its own (SQLite's GLOB has no escape character)."""
    return "*" + needle.translate(_GLOB_SPECIAL) + "*"


# Per term: BODY looks in the body column, TEXT in either. One GLOB per statement: FTS5 answers a
# single column's GLOB from the trigram index, while an OR of two is a scan of every row.
_LOOKUPS = {
    "BODY": "SELECT rowid FROM message_text WHERE body GLOB ?1 AND rowid BETWEEN ?2 AND ?3",
    "TEXT": "SELECT rowid FROM message_text WHERE header GLOB ?1 AND rowid BETWEEN ?2 AND ?3"
            " UNION SELECT rowid FROM message_text WHERE body GLOB ?1 AND rowid BETWEEN ?2 AND ?3",
}


class TextIndex:
    def __init__(self, db: Database, store: MailStore, cpu: CpuPool, db_path: Path) -> None:
        self._db = db
        self._store = store
        self._cpu = cpu
        self._db_path = db_path
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Folders a round failed on: folder id -> (when to try again, the wait after that). A failure
        # may pass (the database locked past the worker's busy timeout by a long commit under load),
        # so the folder is tried again, after RETRY_SECONDS doubling up to MAX_RETRY_SECONDS; the
        # rows and the mark written before the failure stay, so a retry goes on from there.
        self._failed: dict[int, tuple[float, float]] = {}
        self.indexed = 0  # messages indexed since start

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="text-index")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def nudge(self) -> None:
        """New mail: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.catch_up()
            except Exception:
                log.exception("text index: a round failed; trying again later")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            await asyncio.sleep(SETTLE_SECONDS)  # a burst of deliveries is indexed together
            await self._cpu.pause()  # and after it (cpu_pool: the worker's rows hold the write lock)
            self._wake.clear()

    async def catch_up(self) -> int:
        """Index every message not yet looked at; returns how many were indexed."""
        async with self._lock:
            done = 0
            loop = asyncio.get_running_loop()
            for row in await self._db.fetchall(_BEHIND):
                retry_at, wait = self._failed.get(row["id"], (0.0, RETRY_SECONDS / 2))
                if loop.time() < retry_at:
                    continue
                try:
                    done += await self._folder(row)
                except Exception:
                    wait = min(wait * 2, MAX_RETRY_SECONDS)
                    self._failed[row["id"]] = (loop.time() + wait, wait)
                    log.warning("text index: folder %s of %s@%s left to the scan; trying again in %.0f s", row["name"],
                                row["local_part"], row["domain"], wait, exc_info=True)
                else:
                    self._failed.pop(row["id"], None)
            self.indexed += done
            return done

    async def _folder(self, row: sqlite3.Row) -> int:
        folder_id = row["id"]
        mailbox = f"{row['local_part']}@{row['domain']}"
        mark = row["indexed_uid"] if row["w_validity"] == row["uidvalidity"] else 0
        if mark == 0:
            # A folder seen first, or renumbered (new UIDVALIDITY): no row of it may stay.
            low, high = folder_range(folder_id)
            await self._db.execute("DELETE FROM message_text WHERE rowid BETWEEN ? AND ?", (low, high))
        done = 0
        while True:
            # A page of the messages above the mark at a time: a backlog of 100k messages is never
            # held in memory whole, and a folder nobody has open is not loaded for them
            # (MailStore.messages_after).
            uidvalidity, uidnext, todo = await self._store.messages_after(mailbox, row["name"], mark, PAGE_MESSAGES)
            if uidvalidity != row["uidvalidity"]:
                return done  # renumbered meanwhile: the next round sees its new row
            # A few new messages (the usual case: mail just delivered) are indexed here in a thread; a
            # backlog (a Maildir copied in, the first start after an upgrade) goes to the worker process.
            # Background work: a client's FETCH or SEARCH waiting for the worker goes first.
            # (run_bulk: after the message cache's rows of files first seen at a SELECT, which the
            # client's next FETCH wants; fetch_render.prefill.)
            run = self._cpu.run_light if len(todo) <= LIGHT_MESSAGES else self._cpu.run_bulk
            for chunk in _chunks(todo):
                # Each chunk of a backlog waits for a pause in the mail (CpuPool.run_bulk), not
                # only the round: a folder copied in (minutes of chunks) otherwise held the write lock
                # in turns with every group commit of a burst, from a worker at a lower CPU priority
                # (issue 19). SEARCH scans what is not indexed yet meanwhile.
                items = [(m.uid, str(m.path)) for m in chunk if m.size <= MAX_DECODED_SEARCH_OCTETS]
                done += await run(index_messages, str(self._db_path), folder_id, uidvalidity, items, chunk[-1].uid)
            if len(todo) < PAGE_MESSAGES:
                break
            mark = todo[-1].uid
        await self._db.execute(_MARK, (folder_id, uidvalidity, uidnext - 1, folder_id, uidvalidity))
        return done

    async def lookup(self, folder_id: int, uidvalidity: int, terms: set[Term]) -> TextHits:
        """The index's answer for these terms in one folder (needles it cannot answer left out)."""
        mark = await self._db.fetchone("SELECT uidvalidity FROM message_text_folders WHERE folder_id = ?", (folder_id,))
        if mark is None or mark[0] != uidvalidity:
            return TextHits(frozenset(), {})  # renumbered since it was indexed: its rows are not trusted
        return await self._db.read(partial(_look_up, folder_id, [t for t in terms if answerable(t[1])]))

    async def size_bytes(self) -> int:
        """Octets the index takes in the database file: its FTS5 tables, each measured by name (a
        name constraint lets dbstat walk only that table)."""
        total = 0
        for table in FTS_TABLES:
            row = await self._db.fetchone("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ?", (table,))
            total += int(row[0]) if row else 0
        return total


_BEHIND = """
SELECT f.id, f.name, f.uidvalidity, f.uidnext, m.local_part, d.name AS domain,
       w.uidvalidity AS w_validity, w.indexed_uid
FROM folders f JOIN mailboxes m ON m.id = f.mailbox_id JOIN domains d ON d.id = m.domain_id
LEFT JOIN message_text_folders w ON w.folder_id = f.id
WHERE w.folder_id IS NULL OR w.uidvalidity != f.uidvalidity OR w.indexed_uid < f.uidnext - 1
"""

# The mark moves only while the folder still has that UIDVALIDITY (a folder deleted or renumbered
# meanwhile is left to the next round).
_MARK = """
INSERT INTO message_text_folders (folder_id, uidvalidity, indexed_uid)
SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM folders WHERE id = ? AND uidvalidity = ?)
ON CONFLICT (folder_id) DO UPDATE SET uidvalidity = excluded.uidvalidity, indexed_uid = excluded.indexed_uid
"""


# The rowids the index holds in a folder's range, from FTS5's docsize table (a row of sizes per row of
# the index, written and deleted with it): the index's own rowids come from its content table, whose
# rows hold the text, and with a Row object each they were 0.3-0.7 s of a SEARCH BODY at 100k, a
# tenth of that from here as plain tuples (issue 19).
_INDEXED = "SELECT id FROM message_text_docsize WHERE id BETWEEN ? AND ?"


def _look_up(folder_id: int, terms: list[Term], conn: sqlite3.Connection) -> TextHits:
    """TextIndex.lookup on the database's thread, in one trip. The rows held are read before the
    terms' matches: a row written in between is then a match of a message not counted as indexed,
    which is read from its file (never a message counted as indexed whose match was missed)."""
    low, high = folder_range(folder_id)
    cursor = conn.cursor()
    cursor.row_factory = None  # plain 1-tuples, flattened and masked in C
    indexed = frozenset(map(UID_MASK.__and__, chain.from_iterable(cursor.execute(_INDEXED, (low, high)))))
    found: dict[Term, frozenset[int]] = {}
    for term in terms if indexed else ():
        try:
            rows = cursor.execute(_LOOKUPS[term[0]], (glob_pattern(term[1]), low, high))
            found[term] = frozenset(map(UID_MASK.__and__, chain.from_iterable(rows)))
        except sqlite3.Error:
            log.warning("text index: a query failed; the term is scanned", exc_info=True)
    return TextHits(indexed, found)


def _chunks(messages: Sequence[MessageInfo]) -> Iterator[Sequence[MessageInfo]]:
    start, octets = 0, 0
    for i, m in enumerate(messages):
        octets += min(m.size, MAX_DECODED_SEARCH_OCTETS)
        if i + 1 - start >= CHUNK_MESSAGES or octets >= CHUNK_OCTETS:
            yield messages[start:i + 1]
            start, octets = i + 1, 0
    if start < len(messages):
        yield messages[start:]


# --- in the worker process (appliance/cpu_pool.py) -----------------------------------------------


def index_messages(db_path: str, folder_id: int, uidvalidity: int, items: list[tuple[int, str]],
                   upto_uid: int) -> int:
    """Extract and store the text of these messages of one folder; move the folder's mark to
    `upto_uid`. Returns how many rows were written. The text is extracted before the write
    transaction, so the database's write lock is held only for the inserts."""
    rows = []
    for uid, path in items:
        try:
            data = read_message(path, MAX_DECODED_SEARCH_OCTETS + 1)
        except OSError:
            continue  # gone meanwhile (expunged): nothing to index
        header, body = searched_texts(data)
        if "\0" in header or "\0" in body:
            continue  # SQLite's tokenizers may stop at a NUL where the scan goes on: scanned
        try:
            header.encode("utf-8")
            body.encode("utf-8")
        except UnicodeEncodeError:
            continue  # lone surrogates SQLite would change: this one is scanned
        rows.append((rowid(folder_id, uid), header, body, folder_id, uid))
    with worker_db(db_path) as conn:
        return _write_rows(conn, rows, folder_id, uidvalidity, upto_uid)


# The box's own writes (deliveries, flag changes) wait for this process's write lock for at most their
# busy timeout (db.py: 5 s): so the rows go in small transactions, each holding the lock briefly, and the
# folder's mark moves with the last one. A crash in between leaves rows without the mark: the next run
# skips them (NOT EXISTS below) and moves the mark then.
WRITE_BATCH_ROWS = 32
WRITE_BATCH_OCTETS = 1 << 20


def _write_batches(rows: list[tuple[int, str, str, int, int]]) -> Iterator[list[tuple[int, str, str, int, int]]]:
    batch: list[tuple[int, str, str, int, int]] = []
    octets = 0
    for row in rows:
        batch.append(row)
        octets += len(row[1]) + len(row[2])
        if len(batch) >= WRITE_BATCH_ROWS or octets >= WRITE_BATCH_OCTETS:
            yield batch
            batch, octets = [], 0
    yield batch  # the last, maybe empty: it carries the mark


def _write_rows(conn: sqlite3.Connection, rows: list[tuple[int, str, str, int, int]], folder_id: int,
                uidvalidity: int, upto_uid: int) -> int:
    written = 0
    batches = list(_write_batches(rows))
    for n, batch in enumerate(batches):
        conn.execute("BEGIN IMMEDIATE")
        try:
            fresh = _still_missing(conn, batch, folder_id)
            conn.executemany("INSERT INTO message_text (rowid, header, body) VALUES (?, ?, ?)", fresh)
            written += len(fresh)
            if n == len(batches) - 1:
                conn.execute(_MARK, (folder_id, uidvalidity, upto_uid, folder_id, uidvalidity))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return written


def _still_missing(conn: sqlite3.Connection, batch: list[tuple[int, str, str, int, int]],
                   folder_id: int) -> list[tuple[int, str, str]]:
    """The rows of `batch` to insert, inside the write transaction: only for messages that still
    exist (an expunge between the listing and now already ran its trigger), and only once. Looked
    up first rather than in the INSERT: SQLite runs an INSERT INTO a virtual table ... SELECT
    through a temporary table, and with the checks in its WHERE the inserts took twice the CPU (a
    10k folder's rows: about 700 against 330 us each)."""
    if not batch:
        return []
    low, high = min(r[4] for r in batch), max(r[4] for r in batch)
    alive = {r[0] for r in conn.execute(
        "SELECT uid FROM messages WHERE folder_id = ? AND uid BETWEEN ? AND ?", (folder_id, low, high))}
    done = {r[0] for r in conn.execute(
        "SELECT rowid FROM message_text WHERE rowid BETWEEN ? AND ?", (rowid(folder_id, low), rowid(folder_id, high)))}
    return [(r[0], r[1], r[2]) for r in batch if r[4] in alive and r[0] not in done]


class _Running:
    """The background service Box keeps (app.BACKGROUND): stop() ends the indexer."""

    def __init__(self, index: TextIndex, unsubscribe: Callable[[], None]) -> None:
        self._index = index
        self._unsubscribe = unsubscribe

    async def stop(self) -> None:
        self._unsubscribe()
        await self._index.stop()


async def start_text_index(services: Services) -> _Running:
    index = TextIndex(services.db, services.store, services.cpu, services.config.data.db)
    services.text_index = index
    listeners = services.store.changes.any_change
    listeners.append(index.nudge)
    index.start()

    def unsubscribe() -> None:
        if index.nudge in listeners:
            listeners.remove(index.nudge)

    return _Running(index, unsubscribe)
