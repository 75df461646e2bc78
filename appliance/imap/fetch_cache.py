"""What the per-message cache (appliance/store/message_cache.py) holds for IMAP, and FETCH, SEARCH
and SORT answered from it (issue 19).

A row holds ENVELOPE, BODYSTRUCTURE and BODY as they are sent, and the header fields mail clients
ask for to fill a message list (Thunderbird, iOS Mail, K-9: `CACHED_FIELDS`) as BODY[HEADER.FIELDS
(...)] renders them: any HEADER.FIELDS request within that set, and any SEARCH or SORT key on
those fields, is answered from the row without opening the file, byte for byte what the file
would give (HEADER.FIELDS of the kept fields is the same text as of the whole header block).

A row is used only while the file is the one it was computed from: size, modification time and
inode, compared by a stat (no open, no read), or vouched for by the box's inotify watch of the
folder since such a stat (appliance/store/file_watch.py has the rule). A missing or stale row is
computed from the file, used, and given back to be kept (`Learned`).
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from appliance.cpu_pool import worker_db
from appliance.imap import fetch as fetching
from appliance.imap.commands import BinarySection, BodySection, FetchAttribute, FetchItem
from appliance.imap.limits import MAX_HEADER_OCTETS
from appliance.imap.mime import Headers, Part, crlf_line_ends, decode_words, parses_whole, scan, scan_bytes
from appliance.imap.responses import LiteralBytes, Raw, Value, without_nul
from appliance.store import message_cache
from appliance.store.file_watch import FolderCheck, Located
from appliance.store.maildir import open_message, read_to_end
from appliance.store.message_cache import CachedMessage, CacheUnreadable, FileStamp, FolderCache, stamp_of

# RFC 3501 6.4.5 HEADER.FIELDS names as clients send them, lower-cased. What Thunderbird, iOS Mail,
# K-9, Evolution and mutt ask for their lists, plus what ENVELOPE, SORT and THREAD read.
CACHED_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "priority", "x-priority", "importance",
    "references", "newsgroups", "in-reply-to", "content-type", "reply-to", "sender", "x-mailer",
    "list-id", "list-post", "list-unsubscribe", "list-unsubscribe-post", "list-help", "list-subscribe",
    "list-owner", "list-archive", "disposition-notification-to", "return-receipt-to", "x-spam-flag",
    "x-spam-status", "x-spam-score", "mime-version", "content-transfer-encoding", "delivered-to",
    "return-path", "x-original-to", "received", "x-mozilla-draft-info", "x-uniform-type-identifier",
    "x-universally-unique-identifier", "x-apple-mail-remote-attachments", "followup-to",
    "mail-followup-to", "mail-reply-to", "x-label", "keywords", "autocrypt", "x-mailing-list",
})
_CACHED_ORDER = tuple(sorted(CACHED_FIELDS))
# The usual spellings of the cached names ("Message-ID", "X-Mailer"): a header whose fields all have
# one of them is kept whole, with no name lower-cased (_kept_source).
_CACHED_SPELLINGS = frozenset(CACHED_FIELDS | {name.title() for name in CACHED_FIELDS} | {
    "Message-ID", "MIME-Version", "List-ID", "X-Original-To", "Return-path", "Reply-to", "In-reply-to"})
_ROW_ITEMS = frozenset({"ENVELOPE", "BODYSTRUCTURE", "BODY"})

Learned = list[tuple[int, CachedMessage]]  # (UID, row) computed from the files, to be kept
WHOLE_READ = 1024 * 1024  # a message file up to this size is described from memory (describe)


def describe(f: BinaryIO, stamp: FileStamp) -> CachedMessage:
    """The cache row of the message in `f` (read from position 0), computed as FETCH would. A message
    up to WHOLE_READ octets is read at once and described in memory (describe_bytes), where its
    scan is a few searches per part (mime.scan_bytes) instead of a line reader (issue 19)."""
    if stamp[0] <= WHOLE_READ:
        return describe_bytes(f.read(), stamp)
    root = scan(f)
    f.seek(root.header.start)
    return _row(root, f.read(min(root.header.end - root.header.start, MAX_HEADER_OCTETS)), stamp)


def describe_bytes(data: bytes | bytearray, stamp: FileStamp) -> CachedMessage:
    """describe() of a message in memory: at delivery and APPEND (MailStore's `describe`), and
    for a small file."""
    if isinstance(data, bytearray):
        # An APPEND's literal over 64 KiB arrives as the bytearray it was read into (protocol.py
        # hands it on uncopied); its slices are looked up in dicts and sets, which need bytes.
        data = bytes(data)
    line_ends = crlf_line_ends(data)
    root = scan_bytes(data, line_ends, counted=True)
    return _row(root, data[root.header.start:min(root.header.end, root.header.start + MAX_HEADER_OCTETS)], stamp,
                line_ends is not None)


def _row(root: Part, block: bytes, stamp: FileStamp, crlf_only: bool = False) -> CachedMessage:
    """The row of a scanned message whose top header block (at most MAX_HEADER_OCTETS of it) is
    `block`; `crlf_only`: every line end of the message is a CRLF (its octets were counted)."""
    size = root.header.end - root.header.start
    headers = root.headers
    # (Counting one octet is quicker than two: 2.3 against 3.3 us over a 2.9 KB message.)
    crlf = block.count(b"\n") if crlf_only else block.count(b"\r\n")
    # (The scan parsed this very block: whether it was all fields is known already, nearly always.)
    exact = (size <= MAX_HEADER_OCTETS and (crlf_only or block.count(b"\n") == crlf)
             and ((isinstance(headers, Headers) and headers.whole) or parses_whole(block)))
    extended, basic = fetching.structure_texts(root)
    # Every CR of the block in a CRLF too: the kept fields are then the block's own lines, with no
    # bare CR (usable_fields) to count again in them (issue 19: the counts were 4 % of a row).
    fields = _kept_source(headers, block) if exact and block.count(b"\r") == crlf else None
    usable = fields is not None
    if fields is None:
        fields = fetching.header_fields(block, _CACHED_ORDER, exclude=False)
        usable = exact and fields.count(b"\r") == fields.count(b"\r\n")  # (usable_fields)
    subject = None
    if usable:
        # What SEARCH SUBJECT compares (search.Searcher): each value decoded and casefolded. The
        # header's own values: an exact row's fields give the same (exact_headers).
        subject = "\0".join([decode_words(value).casefold() for value in headers.get_all("Subject") or []])
    return CachedMessage(stamp, fetching.envelope_text(headers), extended, basic, fields, exact, subject)


def _kept_source(headers: Message, block: bytes) -> bytes | None:
    """header_fields(block, _CACHED_ORDER, exclude=False) from the fields the scan found, when
    `block` is exactly those fields then the blank line, every line ending in CRLF (no bare CR
    either, which header_fields would take for a line end: the caller counted them): the kept
    fields as they are in the block, then the blank line. A loop over the fields found instead of
    splitting the block into lines again (issue 19). None: ask header_fields."""
    source = headers.source if isinstance(headers, Headers) else None
    if source is None or (not block.endswith(b"\r\n\r\n") and block != b"\r\n"):
        return None
    if _CACHED_SPELLINGS.issuperset([name for name, _, _ in source]):
        return block  # every field kept: the block itself (the fields found tile it)
    return "".join([name + ":" + blanks + rest for name, blanks, rest in source
                    if name.lower() in CACHED_FIELDS]).encode("ascii", "surrogateescape") + b"\r\n"


def serves(item: FetchItem) -> bool:
    """Whether the row (with the index) answers this FETCH item."""
    if isinstance(item, BinarySection):
        return False
    if isinstance(item, BodySection):
        section = item.section
        return (not section.part and section.text == "HEADER.FIELDS"
                and all(name.lower() in CACHED_FIELDS for name in section.fields))
    return item.name in fetching.INDEX_ITEMS or item.name in _ROW_ITEMS


def wants_header_only(items: Iterable[FetchItem]) -> bool:
    return all(serves(i) for i in items)


def item_values(items: Sequence[FetchItem], facts: fetching.MessageFacts, row: CachedMessage
                ) -> list[tuple[str, Value]] | None:
    """fetch.item_values for items that `serves`, from the row; None when the file must answer."""
    out: list[tuple[str, Value]] = []
    for item in items:
        if isinstance(item, BodySection):
            fields = usable_fields(row)
            if fields is None:
                return None
            data = kept_fields(fields, item.section.fields)
            if item.partial is not None:
                origin, count = item.partial
                data = data[origin:origin + count]
            out.append((item.response_name(), LiteralBytes(data)))
            continue
        assert not isinstance(item, BinarySection), "not served from the cache"
        name = item.name
        # without_nul: a row rendered before b6b187f may still hold a NUL in a string (a Subject, a
        # parameter); a search for one is cheaper than bumping CACHE_VERSION, which would make every
        # user's first message list after an update read every file again.
        if name == "ENVELOPE":
            out.append((name, Raw(without_nul(row.envelope))))
        elif name == "BODYSTRUCTURE":
            out.append((name, Raw(without_nul(row.bodystructure))))
        elif name == "BODY":
            out.append((name, Raw(without_nul(row.body))))
        else:
            out.append((name, fetching.index_value(name, facts)))
    return out


def usable_fields(row: CachedMessage) -> bytes | None:
    """The row's header fields, or None when they hold a bare CR: header_fields takes a CR for a
    line end, so its output is then not the same text again and the file must answer."""
    fields = row.fields
    return fields if fields.count(b"\r") == fields.count(b"\r\n") else None


def kept_fields(block: bytes, fields: Sequence[str]) -> bytes:
    """fetch.header_fields(header, fields, exclude=False) from a row's usable `block` (fields within
    CACHED_FIELDS): that block is header_fields' own output for the header (CRLF line ends, only
    the cached fields and their continuation lines, then the blank line when the header had one),
    so header_fields of it gives the same fields again (its regex for CRLF blocks, issue 19)."""
    return fetching.header_fields(block, tuple(fields), exclude=False)


def current_rows(cache: FolderCache | None, files: Sequence[tuple[int, str]], *, compute: bool
                 ) -> tuple[dict[int, CachedMessage], Learned, list[tuple[int, str]]]:
    """The rows of these (UID, file) pairs, each checked against its file (`_current`'s rule). With
    `compute`, a missing or stale row is computed from the file; without, the pair is returned as
    unknown. A file that is gone has no row. Blocking: worker thread. Returns the rows, those newly
    computed (for `FolderCache.learn`) and the unknown pairs.

    A row computed here counts as checked against its file by the fstat of the file it was read
    from (opened at its path, in the check: its directory was watched before), so the next command
    uses it without a stat (the SEARCH after the FETCH that filled the cache): a stat of each file
    again after describing it was 4-6 % of a first FETCH ENVELOPE BODYSTRUCTURE (issue 19)."""
    if cache is None:
        return _computed(files) if compute else ({}, [], list(files))
    rows: dict[int, CachedMessage] = {}
    learned: Learned = []
    unknown: list[tuple[int, str]] = []
    known = cache.read([uid for uid, _ in files])
    with cache.check() as check:
        rows, rest = check.split(files, known)
        stale: list[tuple[tuple[int, str, CachedMessage | None], str, FileStamp | None]] = []
        for uid, path, found in rest:
            if found is not None and _matches_file(check, uid, path, found.stamp):
                rows[uid] = found
                continue
            if not compute:
                # (A file that is gone may have been renamed by a flag change: the caller looks.)
                unknown.append((uid, path))
                continue
            stale.append(((uid, path, found), path, found.stamp if found is not None else None))
        for (uid, path, found), described, st, here in described_files(stale):  # (gone: expunged meanwhile)
            fresh = found if described is None else described  # (None: the stamp matched the row's)
            assert fresh is not None
            if fresh is not found:
                learned.append((uid, fresh))
            rows[uid] = fresh
            if here:
                check.matched(uid, path, fresh.stamp, st.st_nlink)
    return rows, learned, unknown


def _computed(files: Sequence[tuple[int, str]]) -> tuple[dict[int, CachedMessage], Learned, list[tuple[int, str]]]:
    """current_rows without a cache: every row computed from its file."""
    rows = {uid: row for uid, row, _, _ in described_files([(uid, path, None) for uid, path in files])
            if row is not None}  # (gone: expunged meanwhile)
    return rows, list(rows.items()), []


def vouch_kept(cache: FolderCache, files: Sequence[tuple[int, str]]) -> None:
    """Check the rows the CPU pool's worker wrote for these (UID, path) pairs (fill_rows), their
    stamps read back, against their files now (a stat each), so that the next command uses them
    without one. Worker thread."""
    _current(cache, cache.stamps([uid for uid, _ in files]), files)


def fill_rows(db_path: str, folder_id: int, files: Sequence[tuple[int, str]], missing_only: bool = False) -> int:
    """Rows for these (UID, file path) pairs of one folder (in UID order) that have none, or one of
    another file: described from the files and written by this process itself, in short
    transactions (cpu_pool.worker_db, message_cache.keep); returns how many were written. Run by the CPU pool's worker
    for fills: the server's process only waits for the count. Sending the rows back for the event
    loop's connection to write cost the server a pickle load and an insert per row while the
    client's FETCH ran on the same GIL (issue 19). Rows already current (a FETCH, or another fill,
    kept them meanwhile) are not described again. `missing_only`: a message with a row of the
    current version is left as it is, unstat'ed (a prefill of files first seen, prefill_later: who
    uses a row checks it)."""
    if not files:
        return 0
    with worker_db(db_path) as conn:
        return fill_rows_on(conn, folder_id, files, missing_only)


def fill_rows_on(conn: sqlite3.Connection, folder_id: int, files: Sequence[tuple[int, str]], missing_only: bool) -> int:
    """fill_rows on a connection the caller holds (a prefill in the server's process, chunk after
    chunk: a connection opened per chunk of 16 was a quarter of its CPU)."""
    if not files:
        return 0
    known = message_cache.current_stamps(conn, folder_id, files[0][0], files[-1][0])
    wanted: list[tuple[int, str, FileStamp | None]] = []
    for uid, path in files:
        stamp = known.get(uid)
        if stamp is not None:
            if missing_only:
                continue
            try:
                if stamp == stamp_of(os.stat(path)):
                    continue
            except FileNotFoundError:
                continue  # expunged meanwhile
        wanted.append((uid, path, stamp))
    # (Found again by its unique name if renamed; a file gone is left out: expunged meanwhile.)
    learned: Learned = [(uid, fresh) for uid, fresh, _, _ in described_files(wanted) if fresh is not None]
    return message_cache.keep(conn, folder_id, learned)


def keep_rows(db_path: str, folder_id: int, rows: Learned) -> int:
    """Write rows the server described (a FETCH sharing its describing with the CPU pool's worker),
    in the worker, as fill_rows writes its own (message_cache.keep); returns how many were kept."""
    with worker_db(db_path) as conn:
        return message_cache.keep(conn, folder_id, rows)


def needs_row(items: Iterable[FetchItem]) -> bool:
    """Whether the items need the whole MIME walk (BODYSTRUCTURE, BODY): computing a row then costs
    little more than answering from the file."""
    return any(isinstance(i, FetchAttribute) and i.name in ("BODYSTRUCTURE", "BODY") for i in items)


# How far describing many files reads ahead (described_files): files, and octets read but not
# yet described.
READ_AHEAD = 16
READ_AHEAD_OCTETS = 256 * 1024

_Key = TypeVar("_Key")


def described_files(files: Iterable[tuple[_Key, str, FileStamp | None]]
                    ) -> Iterator[tuple[_Key, CachedMessage | None, os.stat_result, bool]]:
    """For each (key, path, known stamp): the row of the file at `path` (found again by its unique
    name when a flag change renamed it, as open_message does), or None when the file's stamp is
    `known`; as (key, row or None, fstat, at `path` itself), in order; a file that is gone is left out. The files are read READ_AHEAD at a time
    (at most READ_AHEAD_OCTETS of them, and one more), then described: a Python parse right after
    the open, fstat, read and close of its file cost about 10 us a message more than the same
    parse after a batch of reads (bench.describe --files, 2,000 corpus messages: 101-107 us a
    message one file at a time, 93-97 us by 16, 92-95 us all read first; issue 19)."""
    batch: list[tuple[_Key, bytes | CachedMessage | None, os.stat_result, bool]] = []
    octets = 0
    for key, path, known in files:
        try:
            content, st, here = _loaded(path, known)
        except FileNotFoundError:
            continue
        batch.append((key, content, st, here))
        if isinstance(content, bytes):
            octets += len(content)
        if len(batch) >= READ_AHEAD or octets >= READ_AHEAD_OCTETS:
            for key, content, st, here in batch:
                yield key, _finished(content, st), st, here
            batch, octets = [], 0
    for key, content, st, here in batch:
        yield key, _finished(content, st), st, here


def _finished(content: bytes | CachedMessage | None, st: os.stat_result) -> CachedMessage | None:
    """The row of what _loaded gave for a file of this fstat."""
    return describe_bytes(content, stamp_of(st)) if isinstance(content, bytes) else content


def _loaded(path: str, known: FileStamp | None) -> tuple[bytes | CachedMessage | None, os.stat_result, bool]:
    """One file of described_files up to the describing of a small file: the content of a file up to WHOLE_READ (for
    describe_bytes), the row of a bigger or renamed one, or None when the file's stamp is `known`;
    with the file's fstat, and whether it was at `path` itself. A file up to WHOLE_READ is read with
    one read() on its descriptor: Python's open() and read() made 11 system calls a message (an
    ioctl, three fstats, two lseeks, two reads), each of which gives up the GIL that the FETCH's
    thread then waits to get back while the event loop or the database's thread holds it (issue
    19). FileNotFoundError: gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        with open_message(path) as f:  # renamed by a flag change since the index was read
            st = os.fstat(f.fileno())
            stamp = stamp_of(st)
            return (None if stamp == known else describe(f, stamp)), st, f.name == path
    try:
        st = os.fstat(fd)
        stamp = stamp_of(st)
        if stamp == known:
            return None, st, True
        if st.st_size <= WHOLE_READ:
            return read_to_end(fd, st.st_size), st, True
        with open(fd, "rb", closefd=False) as f:
            return describe(f, stamp), st, True
    finally:
        os.close(fd)


class HeaderLookup(Protocol):
    """What SEARCH and SORT ask of a header: email.message.Message, or the cached fields."""

    def get(self, name: str, failobj: None = None) -> str | None: ...
    def get_all(self, name: str, failobj: None = None) -> list[str] | None: ...


_FOLD = re.compile(rb"\r?\n(?=[ \t])")  # mime.unfold's line breaks, over a row's fields


@functools.lru_cache(maxsize=128)
def _field_pattern(name: str) -> re.Pattern[bytes]:
    """Every field called `name` (ASCII, any case) of a row's fields, each its first line and the
    continuation lines after it: a line starting with a blank continues a field, never starts one."""
    return re.compile(rb"^" + re.escape(name.encode("ascii")) + rb":([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)",
                      re.MULTILINE | re.IGNORECASE)


class CachedFields:
    """The cached header fields of a message by name, with the values Message.get / get_all give
    for the whole header (exact rows only: see `exact_headers`). A field is looked up when asked
    for, not all parsed up front: a header SEARCH over a folder asks each message for one or two
    of its dozen fields (parsing them all was a quarter of a SEARCH SUBJECT, issue 19)."""

    def __init__(self, fields: bytes) -> None:
        self._fields = fields
        self._values: dict[str, list[str]] = {}
        self._plain: bytes | None = None  # the fields unfolded and lower-cased, when plain (may_contain)

    def may_contain(self, needle: str) -> bool:
        """False when no field's value, as SEARCH decodes it (search.decode_words, casefolded), can
        hold `needle` (casefolded): the fields are plain ASCII without encoded words, so decoding
        only unfolds them, and the needle is not in the whole unfolded block, case aside. One test
        in C per message instead of a field look-up and a decoding of each value: a SEARCH
        SUBJECT answered from the cache mostly finds nothing (issue 19)."""
        if not needle.isascii():
            return True  # (a non-ASCII needle cannot be in ASCII text; the look-up says so)
        if self._plain is None:
            fields = self._fields
            self._plain = _FOLD.sub(b"", fields).lower() if fields.isascii() and b"=?" not in fields else b""
        return not self._plain or needle.encode("ascii") in self._plain

    def get(self, name: str, failobj: None = None) -> str | None:
        values = self._lookup(name)
        return values[0] if values else failobj

    def get_all(self, name: str, failobj: None = None) -> list[str] | None:
        return self._lookup(name) or failobj

    def _lookup(self, name: str) -> list[str]:
        key = name.lower()
        found = self._values.get(key)
        if found is None:
            # compat32's header_source_parse: blanks after the colon dropped, the last line end too.
            found = [value.decode("ascii", "surrogateescape").lstrip(" \t").rstrip("\r\n")
                     for value in _field_pattern(key).findall(self._fields)] if key.isascii() else []
            self._values[key] = found
        return found


def exact_headers(row: CachedMessage | None) -> CachedFields | None:
    """The cached header fields of a message when they are what parsing the whole header gives for
    those fields (SEARCH and SORT keys on them); None: read the file."""
    if row is None or not row.exact or usable_fields(row) is None:
        return None
    return CachedFields(row.fields)


def known_subjects(cache: FolderCache, files: Sequence[tuple[int, str]]) -> dict[int, str]:
    """The SEARCH SUBJECT text (CachedMessage.subject) of these (UID, file) pairs whose rows have
    one and match their files (`_current`): a header SEARCH on the subject alone reads nothing
    else, not even the cached fields. Worker thread."""
    current, _ = _current(cache, cache.subjects([uid for uid, _ in files]), files)
    return {uid: subject for uid, (_, subject) in current.items()}


def subject_search(cache: FolderCache, uids: Sequence[int], files: Mapping[int, Located], needle: str
                   ) -> tuple[list[int], list[int]]:
    """SEARCH SUBJECT `needle` (casefolded, Searcher.lone_subject) over these messages (`uids`
    ascending, `files` where each one's file is: the view's MessageInfos) from the rows' subject
    texts: (the UIDs whose text holds it, the UIDs the rows cannot answer: no row or no text,
    another file's, or a file not where the index has it, perhaps renamed), both ascending. One
    statement over the folder's span and one check of its rows as they come (FolderCheck.sift,
    `_current`'s rule): nothing per message is made for the rows that need no stat and do not
    match, and only UIDs go back to the event loop. Worker thread."""
    if not uids:
        return [], []
    hits: list[int] = []
    stale: list[int] = []
    absent: list[int] = []
    covered = uids[0] - 1  # the rows up to this UID are all accounted for
    try:
        with cache.check() as check:
            for batch in cache.subject_scan(uids[0], uids[-1], needle):
                wanted, trusted, rest = check.sift(batch, files)
                hits += wanted
                for uid, path, stamp, hit in rest:
                    if _matches_file(check, uid, path, stamp):
                        if hit:
                            hits.append(uid)
                    else:
                        stale.append(uid)
                # The messages without a row (or text) here: between the batches, and within a
                # batch when it holds fewer of them than the messages in its span (rows of UIDs
                # not among `uids` are left out by sift).
                first, last = batch[0][0], batch[-1][0]
                absent += uids[bisect.bisect_right(uids, covered):bisect.bisect_left(uids, first)]
                low, high = bisect.bisect_left(uids, first), bisect.bisect_right(uids, last)
                if high - low != trusted + len(rest):
                    there = {row[0] for row in batch}
                    absent += [uid for uid in uids[low:high] if uid not in there]
                covered = last
    except CacheUnreadable:
        return [], list(uids)
    absent += uids[bisect.bisect_right(uids, covered):]
    hits.sort()
    return hits, sorted(stale + absent) if stale else absent


def known_rows(cache: FolderCache | None, files: Sequence[tuple[int, str | Path]]) -> dict[int, CachedMessage]:
    """The rows of these (UID, file) pairs that match their files (`_current`), none computed:
    for SEARCH and SORT, which read the header of a message without a row. Worker thread."""
    if cache is None:
        return {}
    pairs = [(uid, os.fspath(path)) for uid, path in files]
    return _current(cache, cache.read([uid for uid, _ in pairs], fields_only=True), pairs)[0]


_Stamped = TypeVar("_Stamped", bound=tuple[Any, ...])  # the stamp first


def _current(cache: FolderCache, known: dict[int, _Stamped], files: Sequence[tuple[int, str]]
             ) -> tuple[dict[int, _Stamped], list[tuple[int, str, _Stamped | None]]]:
    """Of `known` (by UID, each with the stamp of the file it was computed from first), those whose
    file is still that file, and the other pairs with their rows or None (no row, a stale one, or
    a file that is gone). A row the box's watch of the folder vouches for needs nothing; the others
    a stat each (file_watch.py: when a row is used without one)."""
    with cache.check() as check:
        out, rest = check.split(files, known)
        stale: list[tuple[int, str, _Stamped | None]] = []
        for uid, path, found in rest:
            if found is not None and _matches_file(check, uid, path, found[0]):
                out[uid] = found
                continue
            stale.append((uid, path, found))
    return out, stale


def _matches_file(check: FolderCheck, uid: int, path: str, stamp: FileStamp) -> bool:
    """Whether the file at `path` is still the one of `stamp` (a stat), told to `check` if so."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if stamp != stamp_of(st):
        return False
    check.matched(uid, path, stamp, st.st_nlink)
    return True
