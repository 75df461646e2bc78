"""FETCH responses for messages of the selected folder: index items straight to text, message-list
items (ENVELOPE, BODYSTRUCTURE, the usual HEADER.FIELDS) from the message cache (fetch_cache.py),
other file items read in batches on worker threads, with a small per-session cache of the MIME
structures of the messages being read.

The session decides what a FETCH means (which messages, \\Seen set by a body fetch, CONDSTORE
modifiers, EXPUNGEISSUED) and hands this the messages and items; what one item's value is lives in
fetch.py (pure). Nothing here writes to the store or to a socket: responses go to the `send` given.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, overload

from appliance.cpu_pool import open_db
from appliance.imap import fetch as fetching
from appliance.imap import fetch_cache
from appliance.imap.commands import FetchAttribute, FetchItem
from appliance.imap.limits import STRUCTURE_CACHE_OCTETS
from appliance.imap.mime import HEADER_PROBE, Part, header_block_of, scan, top_header_block
from appliance.imap.responses import FetchResponse, Preformatted, Response, Value, fetch_line
from appliance.imap.selected import SelectedFolder, flag_text
from appliance.store.mailstore import MessageInfo, open_message
from appliance.store.message_cache import FolderCache, stamp_of

if TYPE_CHECKING:
    from appliance.cpu_pool import CpuPool

log = logging.getLogger("letterbox.imap")

FETCH_BATCH = 64  # messages whose files one worker-thread call reads
INLINE_FILE_OCTETS = 64 * 1024  # a FETCH of one message no bigger reads its file on the event loop
CACHED_FETCH_BATCH = 500  # messages answered from the message cache per worker-thread call
# The first call's: after it, whether most rows are missing (the CPU pool's worker then shares the
# rest) is known; a first call of CACHED_FETCH_BATCH left the worker idle (and not yet started,
# 0.3-0.5 s of CPU) while this process described 500 messages (issue 19).
FIRST_CACHED_BATCH = 100
LEARN_BATCH = 2000  # rows computed from files kept per transaction
LEARN_CHUNK = 200  # messages a background fill describes per call of the CPU pool's worker
SHARED_FETCH = LEARN_CHUNK  # messages left after a batch that computed most rows: shared with the CPU pool (one of its chunks at least)
LEARN_LIGHT = 20  # a fill this small may run in a thread while no worker process is up (cpu_pool.run_light)
PREFILL_MIN = LEARN_LIGHT  # rows missing in a selected folder worth a prefill (delivered mail has its rows)
KEEP_AHEAD = 2  # batches of rows a shared FETCH may have queued for the worker to write (_keep)
# A FETCH starts the CPU pool's worker to share its describing only for at least this many messages
# left: its start (0.3-0.45 s of CPU, 0.4-1.2 s of wall here) outlasted a FETCH of 1k, which then
# waited for the worker to write the rows it had described itself (issue 19).
SHARE_START = 4000
# A prefill of at most this many files, while no worker process is up, is made in this process
# (_prefill_here) rather than by a worker started for it: at 1k the worker's start (above) took
# longer than the time from a SELECT to the next session's FETCH, which then described every
# message itself while the worker described the same ones (issue 19).
PREFILL_HERE = 2000
# A prefill of at least this many files runs in the worker at the server's priority (CpuPool.run_prefill):
# at 100k, at WORKER_NICE beside a busy machine, it made 4,000-11,000 rows during Thunderbird's 9-14 s
# header list, at the server's 26,600-31,400. A smaller one is over soon anyway (10k: no change in the
# next FETCH's CPU, 3 pairs), and its first chunk's imports (0.2 s of CPU) came beside the header list.
PREFILL_PROMPT = 20_000
HERE_CHUNK = 16  # messages a prefill made in this process describes per thread call: 2-3 ms of the GIL
# It waits for this long a pause in the FETCHes and SELECTs (MessageCache.quiet): a thread describing
# files beside a burst of commands (Thunderbird's five SELECTs after its list) made each wait for the
# GIL, a SELECT of 1k 1-2 ms -> 3-5 ms.
HERE_PAUSE = 0.005
HERE_WAIT = 1.0  # at the most: under clients that never pause, a chunk a second
PART_WEIGHT = 256  # octets counted per MIME part of a cached structure, beyond its header block
INDEX_FETCH_BATCH = 5000  # messages per rendered block of an index-only FETCH
# A FETCH of at most this many messages whose rows are all in memory (MessageCache.recent: mail
# just delivered or APPENDed) is answered on the event loop, a stat per file: the worker thread's
# trip (two wake-ups, the GIL handed over twice) and its SQL cost more than that (issue 19).
RECENT_FETCH = 64
MOVES_FOLLOWED = 4  # renames of one file queued at once that _stat_placed follows back (a claim, flag changes)

# (folder name, UIDVALIDITY, UID): a UID names one message for as long as its UIDVALIDITY holds.
StructureKey = tuple[str, int, int]
_Job = tuple[int, MessageInfo, fetching.MessageFacts]  # (message number, index entry, facts)


class Send(Protocol):
    async def __call__(self, *responses: Response) -> None: ...


class FetchRenderer:
    """One per session: renders FETCH answers and keeps the structures of recently fetched messages
    (a client reading a message asks for its BODYSTRUCTURE, then for its parts one by one), up to
    STRUCTURE_CACHE_OCTETS."""

    def __init__(self, cpu: CpuPool) -> None:
        self._cpu = cpu
        self._structures: OrderedDict[StructureKey, tuple[Part, int]] = OrderedDict()
        self._structure_octets = 0
        self._learning: asyncio.Task[None] | None = None
        self._selected: FolderCache | None = None  # the selected folder's cache, told of every FETCH

    def forget(self) -> None:
        """The session left its folder: the cached structures are of no more use."""
        self._structures.clear()
        self._structure_octets = 0
        self._selected = None

    async def send_fetch(
        self, view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool, send: Send, cache: FolderCache | None = None,
    ) -> list[int]:
        """Send the FETCH responses for `uids` (in the selected folder `view`), `flags_changed` adding
        FLAGS (and MODSEQ under CONDSTORE) where the fetch itself changed them (RFC 3501 6.4.5);
        returns the UIDs of the messages whose file was not at its path (no response sent). `cache`:
        the folder's message cache, which answers the items of message lists."""
        told = cache if cache is not None else self._selected
        if told is None:
            return await self._send_fetch(view, uids, items, flags_changed, condstore, send, cache)
        with told.answering_now():
            return await self._send_fetch(view, uids, items, flags_changed, condstore, send, cache)

    async def _send_fetch(
        self, view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool, send: Send, cache: FolderCache | None,
    ) -> list[int]:
        if not any(fetching.needs_file(i) for i in items):
            for start in range(0, len(uids), INDEX_FETCH_BATCH):
                await send(index_only(view, uids[start:start + INDEX_FETCH_BATCH], items, flags_changed))
            return []
        if cache is not None and fetch_cache.wants_header_only(items):
            known = _render_recent(view, uids, items, flags_changed, condstore, cache)
            if known is not None:
                if known[0]:
                    await send(Preformatted(known[0]))
                return known[1]
            return await self._send_cached(view, uids, items, flags_changed, condstore, send, cache)
        missing: list[int] = []
        dated = _dated(items)
        for start in range(0, len(uids), FETCH_BATCH):
            jobs = _jobs(view, uids[start:start + FETCH_BATCH], dated)
            if len(jobs) == 1 and jobs[0][1].size <= INLINE_FILE_OCTETS:
                # The message a client shows: a few system calls and a small parse, done here. A trip
                # to a worker thread (a wakeup of it and of the event loop, the GIL handed over twice)
                # cost more than the work, once per such FETCH (imaptest's stress mode, issue 19).
                results = self._render_files((view.name, view.uidvalidity), jobs, items, flags_changed, condstore)
            else:
                results = await asyncio.to_thread(
                    self._render_files, (view.name, view.uidvalidity), jobs, items, flags_changed, condstore,
                )
            missing += _unanswered(jobs, results)
            await send(*[r for r in results if r is not None])
        return missing

    async def _send_cached(
        self, view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool, send: Send, cache: FolderCache,
    ) -> list[int]:
        missing: list[int] = []
        learned: fetch_cache.Learned = []
        unknown: list[tuple[int, str]] = []
        writing: asyncio.Future[None] | None = None  # the rows of the batch before, being kept
        shared: asyncio.Task[None] | None = None  # the CPU pool's worker describing from the end
        keeping: list[asyncio.Task[None]] = []  # this process's rows, written by the worker (shared)
        # How many messages of uids this process has answered, or is answering (the worker's share
        # stops there).
        reached = [0]
        dated = _dated(items)
        for start, stop in _batches(len(uids)):
            reached[0] = stop
            jobs = _jobs(view, uids[start:stop], dated)
            rendered, new, later = await asyncio.to_thread(
                _render_cached, cache, jobs, items, flags_changed, condstore)
            missing += _unanswered(jobs, rendered)
            # Rendered in the thread: the event loop only writes the batch.
            await send(Preformatted(b"".join(r for r in rendered if r is not None)))
            if cache.prefilling():
                # The messages answered from a header scan get their rows in the background after
                # the answer, unless the SELECT's prefill is making the folder's missing rows
                # anyway: at 100k, Thunderbird's first list held 100k (UID, path) pairs (about
                # 15 MB) for a second fill over the prefill's files (a stat and a look-up each,
                # its chunks taking turns with the prefill's; issue 19).
                unknown = []
            else:
                unknown += later
            rest = uids[stop:]
            if (2 * len(new) >= len(jobs) and len(rest) >= SHARED_FETCH and not self._filling()
                    and (self._cpu.started or len(rest) >= SHARE_START)):
                # Most rows of this batch were missing (a folder copied in): both cores. The CPU
                # pool's worker describes the rest from its end while this goes on from here, the
                # worker skipping the rows already kept and stopping where this process has got to,
                # so they meet wherever the slower one is (a first FETCH ENVELOPE BODYSTRUCTURE was
                # all in this process, issue 19).
                self._learning = shared = cache.fill(_learn_later(
                    cache, _Files(rest, view.infos), self._cpu, background=False,
                    reached=functools.partial(_past, reached, stop)))
            if shared is not None and self._cpu.ready:
                # This process's rows are written by the worker too, batch by batch between its
                # chunks: one writer, and no insert here (until the worker has started, below:
                # its start took 0.4-2.6 s at load 1-4, and the rows this process had described
                # meanwhile, 9,600 of 10k, then went to it at once, 0.37 s after the last response). Kept here at the FETCH's end (as since
                # c39874e), they took 0.77 s of a 3.3 s FETCH of 10k (8,600 rows, 50-60 us of CPU
                # a row in one transaction: more than the 2 MB page cache, so SQLite spilled) after
                # the last response; beside the describing, the insert waited for the GIL between
                # rows while holding SQLite's write lock, which the worker's writes then waited for
                # (0.2-0.7 s each). A row pickled costs 7 us here (issue 19).
                learned += new
                learned = _hand_over(cache, learned, keeping, self._cpu)
                continue
            learned += new
            if len(learned) >= LEARN_BATCH:
                # Written while the next batch is rendered, one write at a time: the database's
                # thread spends most of an insert in SQLite, without the GIL the rendering needs.
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(cache.learn(learned))
                learned = []
        if shared is not None:
            # Every message of the FETCH has its row now, described here or by the worker (or
            # being written by it): the worker's fill would go on through the rows this process
            # described, a trip to the worker and a check of 200 rows each, during the client's
            # next command, and its chunks would come before this process's last rows (issue 19).
            shared.cancel()
        if writing is not None:
            await writing
        await cache.learn(learned)
        for task in keeping:
            await task  # (the rows are there for the client's next command)
        if unknown and not self._filling():
            # Rows for the messages answered from a header scan, computed after the answer went
            # out, in chunks in the CPU pool's worker (one fill at a time per session; it goes on after
            # the session ends, so a phone's short visit fills the cache too).
            self._learning = cache.fill(_learn_later(cache, unknown, self._cpu, background=True))
        return missing

    def prefill(self, view: SelectedFolder, cache: FolderCache) -> None:
        """After a SELECT: rows for the folder's messages that have none (files another program put
        there, first seen by this listing) made now in the CPU pool's worker, in the background,
        from the first message on, so a client's FETCH ENVELOPE BODYSTRUCTURE a moment later finds
        most of them made (the issue's "on first sight of a foreign file"). A second session's
        first FETCH of a 10k folder copied in described nearly every message then, 2.2-2.6 s; the
        worker was indexing the folder's text meanwhile (issue 19). Once per folder and size."""
        self._selected = cache
        cache.touched()
        if cache.cache.prefill_due(cache.folder_id, view.uidvalidity, view.exists):
            cache.fill(_prefill(cache, view.uids, view.infos, self._cpu))

    def _filling(self) -> bool:
        return self._learning is not None and not self._learning.done()

    def _render_files(
        self, folder: tuple[str, int], jobs: list[_Job], items: Sequence[FetchItem], flags_changed: set[int],
        condstore: bool,
    ) -> list[FetchResponse | None]:
        """Runs in a worker thread (on the event loop for one small message): read and render what
        FETCH wants of each message (None: its file is gone)."""
        needs = _needs(items)
        out: list[FetchResponse | None] = []
        for seq, info, message in jobs:
            try:
                f = open_message(info.file)
            except FileNotFoundError:
                out.append(None)
                continue
            with f:
                root = self._structure((*folder, info.uid), f, needs)
                values = fetching.item_values(items, message, f, root, _reopener(f))
            out.append(_response(seq, values, message, flags_changed, condstore))
        return out

    def _structure(self, key: StructureKey, f: BinaryIO, needs: _Needs) -> Part:
        found = self._structures.get(key)
        if found is not None:
            self._structures.move_to_end(key)
            return found[0]
        f.seek(0)
        if not needs.walk:
            return fetching.scan_for(f, False, needs.full, needs.fields)  # cheap enough not to cache
        part = scan(f)
        weight = _weight(part)
        if weight <= STRUCTURE_CACHE_OCTETS // 4:
            self._structures[key] = (part, weight)
            self._structure_octets += weight
            while self._structure_octets > STRUCTURE_CACHE_OCTETS:
                _, (_, dropped) = self._structures.popitem(last=False)
                self._structure_octets -= dropped
        return part


def _hand_over(cache: FolderCache, rows: fetch_cache.Learned, keeping: list[asyncio.Task[None]], cpu: CpuPool
               ) -> fetch_cache.Learned:
    """Give the rows a shared FETCH described to the worker to write (_keep, added to `keeping`),
    unless KEEP_AHEAD batches of them are still queued there: the worker is behind (starved: it
    runs at nice 10), and rows queued for it made the FETCH wait after its last response. Returns
    the rows left to this process (one write through the database's thread at the FETCH's end)."""
    keeping[:] = [task for task in keeping if not task.done()]
    if len(keeping) >= KEEP_AHEAD or not cpu.ready:
        # (A worker still starting would make the FETCH wait for its start after its last answer.)
        return rows
    if rows:
        keeping.append(cache.fill(_keep(cache, rows, cpu)))
    return []


async def _keep(cache: FolderCache, rows: fetch_cache.Learned, cpu: CpuPool) -> None:
    """Rows this process described, written by the CPU pool's worker (fetch_cache.keep_rows). Rows
    are derived from the files: one not kept is described again at its next use."""
    try:
        await cpu.run(fetch_cache.keep_rows, str(cache.path), cache.folder_id, rows)
    except Exception:
        log.debug("message cache: keeping rows in the worker failed", exc_info=True)


def _past(reached: list[int], base: int) -> int:
    """How far past `base` a FETCH's batches have got (_send_cached's `reached`)."""
    return reached[0] - base


def _batches(count: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of a cached FETCH's worker-thread calls over `count` messages."""
    start, stop = 0, min(count, FIRST_CACHED_BATCH)
    while start < count:
        yield start, stop
        start, stop = stop, min(count, stop + CACHED_FETCH_BATCH)


def _weight(root: Part) -> int:
    """What a scanned structure costs in memory, roughly: its header blocks and a fixed part each."""
    total, stack = 0, [root]
    while stack:
        part = stack.pop()
        total += part.header.end - part.header.start + PART_WEIGHT
        stack.extend(part.children)
    return total


def _render_cached(
    cache: FolderCache, jobs: list[_Job], items: Sequence[FetchItem], flags_changed: set[int], condstore: bool,
) -> tuple[list[bytes | None], fetch_cache.Learned, list[tuple[int, str]]]:
    """Worker thread: FETCH answers from the message cache (a stat per file, no read). A missing or
    stale row is computed from the file when the items need the whole MIME walk anyway
    (fetch_cache.needs_row), or else the message is answered from a header scan of its file and
    returned as unknown, its row computed later in the background. (Computing whole rows for a
    header list too, so that a later ENVELOPE BODYSTRUCTURE finds them, made Thunderbird's first
    list of a 10k folder cost 3-5 times the CPU: a first sync is what a user waits for; issue 19.)
    None: the message's file is gone."""
    compute = fetch_cache.needs_row(items)
    rows, learned, unknown = fetch_cache.current_rows(
        cache, [(info.uid, info.file) for _, info, _ in jobs], compute=compute)
    out: list[bytes | None] = []
    needs = _needs(items)
    for seq, info, message in jobs:
        row = rows.get(info.uid)
        values = fetch_cache.item_values(items, message, row) if row is not None else None
        if values is None and (row is not None or not compute):
            # No row yet, or a header the row cannot answer for.
            values = _from_file(info, message, items, needs)
        if values is None:
            out.append(None)
            continue
        # (No streamed literal among these items: the whole response is bytes.)
        out.append(fetch_line(seq, _with_flags(values, message, flags_changed, condstore)))
    return out, learned, unknown


def _unanswered(jobs: list[_Job], results: Sequence[object | None]) -> list[int]:
    """The UIDs of the jobs rendered as None: their file was not at its path."""
    return [info.uid for (_, info, _), result in zip(jobs, results, strict=True) if result is None]


def _render_recent(view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int],
                   condstore: bool, cache: FolderCache) -> tuple[bytes, list[int]] | None:
    """On the event loop: the FETCH answers from rows kept in memory (RECENT_FETCH), each checked
    against its file by a stat, and the UIDs of messages expunged (not yet told to this session)
    whose file was gone already (no answer for them); None when a message has no such row, its file changed
    or is gone otherwise, or the row cannot answer (the worker thread's way then, which handles each
    of those)."""
    rows = cache.recent(uids) if len(uids) <= RECENT_FETCH else None
    if rows is None:
        return None
    dated = _dated(items)
    out: list[bytes] = []
    missing: list[int] = []
    # (The view's numbers found once, and each message's info read once: per message, of 30 in each
    # of imaptest's header FETCHes, issue 19.)
    for uid, seq, row in zip(uids, view.seqs_of(uids), rows, strict=True):
        info = view.info(uid)
        st = _stat_placed(info, cache.moved_from)
        if st is None and view.is_gone(uid):
            missing.append(uid)  # as the worker thread's way finds it
            continue
        if st is None or stamp_of(st) != row.stamp:
            return None
        message = facts(view, uid, dated, info)
        values = fetch_cache.item_values(items, message, row)
        if values is None:
            return None
        out.append(fetch_line(seq, _with_flags(values, message, flags_changed, condstore)))
    return b"".join(out), missing


def _stat_placed(info: MessageInfo, moved_from: Mapping[str, str]) -> os.stat_result | None:
    """The stat of a message's file (None: gone); while the box's own rename of it is queued on the
    database's thread (index.commit_pipelined: a flag change, a claim of \\Recent), where it is until
    then. (Renamed in between, it is looked for no further: the worker thread's way finds it.)"""
    path, name = info.file, info.filename
    for _ in range(MOVES_FOLLOWED):
        try:
            return os.stat(path)
        except FileNotFoundError:
            before = moved_from.get(name)
            if before is None:
                return None
            path, name = before, before.rpartition("/")[2]
        except OSError:
            return None
    return None


async def _learn_later(cache: FolderCache, files: Sequence[tuple[int, str | Path]], cpu: CpuPool, *, background: bool,
                       prefill: bool = False, reached: Callable[[], int] | None = None) -> None:
    """Rows for messages answered from a header scan, described in the CPU pool's worker process.
    Not in a thread here: a thread describing files holds this process's GIL, and every file a
    FETCH on the event loop's side opens meanwhile gave the GIL up and waited up to the switch
    interval (5 ms) to get it back: the next FETCH of the folder took 5 ms a message (55 s for
    10k; issue 19). The worker writes the rows itself (fetch_cache.fill_rows) and skips those kept
    meanwhile. `background`: nobody waits for these rows (the answer went out), so waited-for work
    in the pool goes first. `prefill`: rows for files first seen at a SELECT (prefill), made from
    the start of the folder, only where there is none (fill_rows' missing_only), checked here
    all at once at its end (most by then by the FETCH that used them), not chunk by chunk beside
    the header list or FETCH that comes meanwhile, a big one at the server's priority
    (PREFILL_PROMPT: the client's next FETCH reads them). `reached`: how many of `files`, from the first,
    the FETCH sharing them has answered or is answering (the chunks from there down are its)."""
    run = cpu.run_background if background else cpu.run
    if prefill and len(files) >= PREFILL_PROMPT:
        run = cpu.run_prefill
    if len(files) <= LEARN_LIGHT:
        run = cpu.run_light
    described: asyncio.Task[int] | None = None  # the chunk in the worker now
    chunk: list[tuple[int, str]] = []
    unchecked: list[tuple[int, str]] = []  # a prefill's rows written
    try:
        # From the end: a FETCH of the folder that comes meanwhile computes rows from the start, so
        # the two meet in the middle instead of describing the same messages twice. A prefill from
        # the start: it comes before any FETCH, whose share with the worker goes from the end, so
        # the FETCH reads the prefill's rows in this process (nice 0) and the worker describes
        # from the end at once. (A prefill from the end was tried: the worker's share, starved at
        # nice 10 on a busy machine, first went over the prefill's rows, a stat each, while this
        # process described from the start, and a header list answers from a row about as fast
        # as from the file's header; issue 19.) The next chunk
        # is queued while the last one runs: the worker goes from one chunk to the next without a
        # gap in which background work (the full-text index) takes it (issue 19).
        starts = range(0, len(files), LEARN_CHUNK)
        for start in (starts if prefill else reversed(starts)):
            if reached is not None and start < reached():
                break
            done, chunk = chunk, [(uid, str(path)) for uid, path in files[start:start + LEARN_CHUNK]]
            previous, described = described, asyncio.ensure_future(
                run(fetch_cache.fill_rows, str(cache.path), cache.folder_id, chunk, prefill))
            # The rows written checked against their files here, so the next command of the folder
            # (the SEARCH after the FETCH) uses them without a stat (file_watch.py); a chunk whose
            # rows were all kept already (by a FETCH, or another fill) wrote none, and its rows were
            # checked by whoever kept them. A FETCH's share (not `background`) is not: the FETCH
            # checks these rows itself when its batches reach them, in its own thread, where 200
            # stats in another thread of this process each waited for the GIL the describing
            # held (24,000 context switches of the server in a 10k FETCH, issue 19).
            if previous is not None and await previous and background:
                await _vouch(cache, done, unchecked if prefill else None)
        if described is not None:
            last, described = described, None
            if await last and background:
                await _vouch(cache, chunk, unchecked if prefill else None)
        if unchecked:
            await asyncio.to_thread(fetch_cache.vouch_kept, cache, unchecked)
    except Exception:
        log.debug("message cache: computing rows in the background stopped", exc_info=True)
    finally:
        if described is not None:
            described.cancel()


async def _vouch(cache: FolderCache, written: list[tuple[int, str]], later: list[tuple[int, str]] | None) -> None:
    """Check a chunk's rows just written against their files now, or add them to `later`."""
    if later is not None:
        later += written
    else:
        await asyncio.to_thread(fetch_cache.vouch_kept, cache, written)


async def _prefill(cache: FolderCache, uids: Sequence[int], infos: Mapping[int, MessageInfo], cpu: CpuPool) -> None:
    """FetchRenderer.prefill's task: `uids` and `infos` are a folder state's (shared, never changed),
    so they hold still meanwhile."""
    # Through the database's thread: after the insert of the messages of a first listing, queued
    # before (a row of a message not inserted yet would not be kept). The messages above the
    # highest UID with a row: files first found by a listing get UIDs above all those described.
    start = bisect.bisect_right(uids, await cache.highest())
    if len(uids) - start < PREFILL_MIN:
        return
    files = _Files(uids[start:], infos)
    with cache.prefilling_now():
        if len(files) <= PREFILL_HERE and not cpu.started:
            await _prefill_here(cache, uids[start:], files)
        else:
            await _learn_later(cache, files, cpu, background=True, prefill=True)


async def _prefill_here(cache: FolderCache, uids: Sequence[int], files: Sequence[tuple[int, str]]) -> None:
    """A small prefill made in this process, in a thread, HERE_CHUNK messages at a time, each chunk
    only after a pause in the FETCHes and SELECTs (MessageCache.quiet; HERE_WAIT at the most): a
    client's commands come first, and the prefill goes on between them (at 1k: between
    Thunderbird's first list and the next session's FETCH, which then reads the rows). Rows a
    FETCH made meanwhile are skipped, from the highest UID with a row on."""
    conn = await asyncio.to_thread(_prefill_db, str(cache.path))
    start = 0
    try:
        while start < len(files):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cache.quiet(HERE_PAUSE), HERE_WAIT)
            start += HERE_CHUNK
            if not await asyncio.to_thread(_fill_here, cache, conn, files[start - HERE_CHUNK:start]):
                # A FETCH made them: on past its rows, unless the highest is a message delivered
                # since the SELECT (above all of `uids`), with files below it left without rows.
                highest = await cache.highest()
                if highest <= uids[-1]:
                    start = max(start, bisect.bisect_right(uids, highest))
    except Exception:
        log.debug("message cache: a prefill in this process stopped", exc_info=True)
    # (Cancelled as the box stops, a chunk may still run in its thread: the connection is closed
    # when it is dropped.)
    await asyncio.to_thread(conn.close)


def _prefill_db(path: str) -> sqlite3.Connection:
    conn = open_db(path)
    conn.execute("PRAGMA wal_autocheckpoint=0")  # (the box's own connection makes them, at its commits)
    return conn


def _fill_here(cache: FolderCache, conn: sqlite3.Connection, chunk: Sequence[tuple[int, str]]) -> int:
    """Worker thread: a chunk's rows (fill_rows_on), then checked against their files (vouch_kept)
    so that the FETCH that reads them needs no stat; returns how many were written."""
    written = fetch_cache.fill_rows_on(conn, cache.folder_id, chunk, True)
    if written:
        fetch_cache.vouch_kept(cache, chunk)
    return written


class _Files(Sequence[tuple[int, str]]):
    """(UID, file path) of these messages, each path made when a chunk asks for it: a prefill of
    100k files copied in would otherwise hold 100k path strings (about 15 MB) while it lasts."""

    def __init__(self, uids: Sequence[int], infos: Mapping[int, MessageInfo]) -> None:
        self._uids, self._infos = uids, infos

    def __len__(self) -> int:
        return len(self._uids)

    @overload
    def __getitem__(self, index: int) -> tuple[int, str]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[int, str]]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, str] | Sequence[tuple[int, str]]:
        if isinstance(index, slice):
            return [(uid, self._infos[uid].file) for uid in self._uids[index]]
        uid = self._uids[index]
        return uid, self._infos[uid].file


class _Needs(NamedTuple):
    """What FETCH items need of a file, worked out once for a batch (not per message)."""

    walk: bool  # the whole MIME walk (fetching.needs_walk)
    full: bool  # more than the top header block (fetching.needs_structure): its end too (scan_top)
    fields: bool  # the top header's fields parsed (fetching.needs_fields)
    header_list: bool  # nothing but the top header block (fetching.header_list_only)


def _needs(items: Sequence[FetchItem]) -> _Needs:
    return _Needs(any(fetching.needs_walk(i) for i in items), any(fetching.needs_structure(i) for i in items),
                  fetching.needs_fields(items), fetching.header_list_only(items))


def _from_file(info: MessageInfo, message: fetching.MessageFacts, items: Sequence[FetchItem], needs: _Needs,
               ) -> list[tuple[str, Value]] | None:
    """fetch.item_values from the file (None: it is gone), for what the cache does not answer."""
    path = info.file
    probed = False  # the file's first HEADER_PROBE octets were read at `path` already
    if needs.header_list:
        try:
            block = header_block_of(_head(path))
            probed = True
        except FileNotFoundError:
            block = None  # renamed by a flag change since the index was read: found below
        if block is not None:
            return fetching.header_list_values(items, message, block)
    try:
        f = open_message(path)
    except FileNotFoundError:
        return None
    with f:
        if needs.header_list and not probed:  # (a long header was probed already: scanned below)
            block = top_header_block(f)
            if block is not None:
                return fetching.header_list_values(items, message, block)
            f.seek(0)  # a long header: scanned as any other
        root = fetching.scan_for(f, needs.walk, needs.full, needs.fields)
        return fetching.item_values(items, message, f, root, _reopener(f))


def _head(path: str) -> bytes:
    """The first HEADER_PROBE octets of the file at `path` (all of it when shorter): os.open, one
    read, close. Python's open(), read() and close() made 7-8 system calls a message, each giving
    up the GIL that this thread then waited to get back from the event loop and the database's
    thread: half of answering Thunderbird's first header list of a 100k folder from the files was
    in them (py-spy, issue 19). FileNotFoundError: not at `path` (gone, or renamed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, HEADER_PROBE)
    finally:
        os.close(fd)


def _response(seq: int, values: list[tuple[str, Value]], message: fetching.MessageFacts, flags_changed: set[int],
              condstore: bool) -> FetchResponse:
    return FetchResponse(seq, tuple(_with_flags(values, message, flags_changed, condstore)))


def _with_flags(values: list[tuple[str, Value]], message: fetching.MessageFacts, flags_changed: set[int],
                condstore: bool) -> list[tuple[str, Value]]:
    """A FETCH response's values, with FLAGS (and MODSEQ under CONDSTORE) added when the fetch
    itself changed the flags (RFC 3501 6.4.5 \\Seen) and the client did not ask for them."""
    if message.uid in flags_changed and not any(name == "FLAGS" for name, _ in values):
        values.append(("FLAGS", fetching.index_value("FLAGS", message)))
        if condstore and not any(name == "MODSEQ" for name, _ in values):
            values.append(("MODSEQ", fetching.index_value("MODSEQ", message)))
    return values


def facts(view: SelectedFolder, uid: int, dated: bool = True, info: MessageInfo | None = None) -> fetching.MessageFacts:
    """What the index knows of one message (`info`, when the caller has it), as the session shows
    it (\\Recent included). Without `dated` (no INTERNALDATE asked for), the date is the index's as
    it is, perhaps UNKNOWN_DATE, never sent: reading it from an undated file is a stat, on the event
    loop (a foreign file is dated in the background after its first listing, and Thunderbird's
    first list comes before; a stat per message was a sixth of the box's CPU for that list, issue 19)."""
    if info is None:
        info = view.info(uid)
    flags = flag_text(info.flags, uid in view.recent)[1:-1].split()
    return fetching.MessageFacts(uid, tuple(flags), info.size, info.internaldate if dated else info.date, info.modseq)


def _jobs(view: SelectedFolder, uids: Sequence[int], dated: bool) -> list[_Job]:
    """(message number, message, facts) of a batch of `uids` (ascending, all in the view)."""
    infos = view.infos
    return [(seq, info, facts(view, uid, dated, info))
            for uid, seq, info in zip(uids, view.seqs_of(uids), map(infos.__getitem__, uids), strict=True)]


def _dated(items: Sequence[FetchItem]) -> bool:
    """Whether the FETCH items send INTERNALDATE (facts' `dated`)."""
    return any(isinstance(i, FetchAttribute) and i.name == "INTERNALDATE" for i in items)


def index_only(view: SelectedFolder, uids: Sequence[int], items: Sequence[FetchItem], flags_changed: set[int]) -> Response:
    """FETCH of index items only (the UID FLAGS sync every client does): rendered straight to text,
    a few microseconds per message."""
    names = [item.name for item in items if isinstance(item, FetchAttribute)]
    add_flags = "FLAGS" not in names and bool(flags_changed)
    recent, infos = view.recent, view.infos
    lines: list[str] = []
    for uid, seq in zip(uids, view.seqs_of(uids), strict=True):
        info = infos[uid]
        parts: list[str] = []
        for name in names:
            if name == "UID":
                parts.append(f"UID {uid}")
            elif name == "FLAGS":
                parts.append("FLAGS " + flag_text(info.flags, uid in recent))
            elif name == "RFC822.SIZE":
                parts.append(f"RFC822.SIZE {info.size}")
            elif name == "MODSEQ":
                parts.append(f"MODSEQ ({info.modseq})")
            else:
                parts.append("INTERNALDATE " + fetching.internaldate(info.internaldate).decode("ascii"))
        if add_flags and uid in flags_changed:
            parts.append("FLAGS " + flag_text(info.flags, uid in recent))
            if view.condstore and "MODSEQ" not in names:
                parts.append(f"MODSEQ ({info.modseq})")
        lines.append(f"* {seq} FETCH ({' '.join(parts)})\r\n")
    return Preformatted("".join(lines).encode("utf-8"))


def _reopener(f: BinaryIO) -> fetching.Reopen:
    def reopen() -> BinaryIO:
        # A second handle on the same open file (not the path: a flag change renames it).
        return os.fdopen(os.dup(f.fileno()), "rb")

    return reopen
