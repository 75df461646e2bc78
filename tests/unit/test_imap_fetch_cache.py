"""The message cache's answers are the ones the file gives (fetch.item_values), octet for octet."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.imap import fetch, fetch_cache
from appliance.imap.commands import BodySection, FetchAttribute, FetchItem, HeaderKey, Section
from appliance.imap.mime import HEADER_PROBE, decode_words, parse_header, scan, top_header_block
from appliance.imap.responses import FetchResponse, render_value
from appliance.imap.search import CachedSubject, Candidate, Searcher
from appliance.store.maildir import read_message, read_to_end
from appliance.store.message_cache import CachedMessage, stamp_of

CORPUS = Path(__file__).parent.parent / "corpus" / "mime"
FACTS = fetch.MessageFacts(7, ("\\Seen",), 1234, 1_700_000_000, 3)
LIST_FIELDS = ("FROM", "TO", "CC", "BCC", "SUBJECT", "DATE", "MESSAGE-ID", "PRIORITY", "X-PRIORITY", "REFERENCES",
               "NEWSGROUPS", "IN-REPLY-TO", "CONTENT-TYPE", "REPLY-TO", "LIST-ID")


def _items(fields: tuple[str, ...]) -> list[FetchItem]:
    return [FetchAttribute("UID"), FetchAttribute("RFC822.SIZE"), FetchAttribute("ENVELOPE"),
            FetchAttribute("BODYSTRUCTURE"), FetchAttribute("BODY"),
            BodySection(Section((), "HEADER.FIELDS", fields), peek=True),
            BodySection(Section((), "HEADER.FIELDS", fields[:2]), peek=True, partial=(3, 20))]


def _from_file(data: bytes, items: list[FetchItem]) -> bytes:
    f = io.BytesIO(data)
    root = scan(f)
    return FetchResponse(1, tuple(fetch.item_values(items, FACTS, f, root))).to_bytes()


def _from_cache(data: bytes, items: list[FetchItem]) -> bytes:
    row = fetch_cache.describe_bytes(data, (len(data), 0, 0))
    assert all(fetch_cache.serves(i) for i in items)
    values = fetch_cache.item_values(items, FACTS, row)
    assert values is not None
    return FetchResponse(1, tuple(values)).to_bytes()


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_cached_answers_are_the_files_answers(path: Path) -> None:
    data = path.read_bytes()
    items = _items(LIST_FIELDS)
    assert _from_cache(data, items) == _from_file(data, items)


_LINES = st.sampled_from([
    b"Subject: hi", b"From: a@b", b"To: c@d", b" folded", b"\tfolded", b"X-Other: x", b"Date: today",
    b"Subject : spaced", b"cc:lower", b"no colon", b"Subject: a\rb", b"\xff: v", b"References: <a@b>",
])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_LINES, st.sampled_from([b"\r\n", b"\n"])), max_size=10), st.booleans(),
       st.lists(st.sampled_from(["SUBJECT", "FROM", "TO", "CC", "DATE", "REFERENCES"]), min_size=1, max_size=4))
def test_kept_fields_match_header_fields(lines: list[tuple[bytes, bytes]], body: bool, wanted: list[str]) -> None:
    data = b"".join(a + b for a, b in lines) + (b"\r\nbody\r\n" if body else b"")
    row = fetch_cache.describe_bytes(data, (0, 0, 0))
    fields = fetch_cache.usable_fields(row)
    if fields is None:  # a bare CR: answered from the file
        assert b"\r" in data.replace(b"\r\n", b"")
        return
    items: list[FetchItem] = [BodySection(Section((), "HEADER.FIELDS", tuple(wanted)), peek=True)]
    assert _from_cache(data, items) == _from_file(data, items)
    cached = fetch_cache.exact_headers(row)
    if cached is not None:  # SEARCH and SORT read these values instead of the file's
        whole = parse_header(data[:scan(io.BytesIO(data)).header.end])
        for name in wanted:
            assert cached.get_all(name) == whole.get_all(name)
            assert cached.get(name) == whole.get(name)


_ROW_LINES = st.sampled_from([
    b"Subject: hi", b"From: a@b", b"X-Other: x", b" folded", b"\tfolded ", b"Subject :spaced", b"cc:lower",
    b"no colon", b"Subject: a\rb", b"\xff: v", b"To: \xc3\xa9t\xc3\xa9", b"Date:", b"Date:  \t ", b"From x",
    b":novalue", b"References: <a@b>", b"LIST-ID: <l.x>", b"Received: by x;", b'From: "A \\"q\\"" <a@b>, c@d',
    b"To: group: x@y, z@w;", b"Sender: s@t", b"Reply-To: =?utf-8?q?x?= <r@s>", b"Message-ID: <m@x>",
    b"In-Reply-To:  <i@x> ", b"Cc: \xff@x",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_ROW_LINES, st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"])), max_size=10),
       st.sampled_from([b"\r\nbody\r\n", b"\r\n", b""]))
def test_row_fields_are_header_fields_of_the_block(lines: list[tuple[bytes, bytes]], end: bytes) -> None:
    """A row's fields, taken from the fields the scan found where the block is all fields with CRLF
    line ends, are what header_fields gives for the block (and so what the file answers)."""
    data = b"".join(a + b for a, b in lines) + end
    root = scan(io.BytesIO(data))
    block = data[root.header.start:root.header.end]
    row = fetch_cache.describe_bytes(data, (0, 0, 0))
    assert row.fields == fetch.header_fields(block, fetch_cache._CACHED_ORDER, exclude=False)
    assert row.envelope == render_value(fetch.envelope(root.headers))


_SEARCH_LINES = st.sampled_from([
    b"Subject: Invoice 42", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= invoice", b"Subject: in", b" voice",
    b"\tVOICE", b"Subject: Stra\xc3\x9fe", b"To: c@d", b"Date: today", b"Subject:   spaced   out",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(_SEARCH_LINES, max_size=6),
       st.sampled_from(["invoice", "in voice", "invoice 42", "voice", "strasse", "grüße", "spaced   out", " ", ""]))
def test_may_contain_never_hides_a_match(lines: list[bytes], needle: str) -> None:
    """The cache's quick test says no only where SEARCH's own decoding of every value finds nothing."""
    row = fetch_cache.describe_bytes(b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n", (0, 0, 0))
    cached = fetch_cache.exact_headers(row)
    if cached is None:
        return
    needle = needle.casefold()
    found = any(needle in decode_words(v).casefold() for v in cached.get_all("Subject") or [])
    assert cached.may_contain(needle) or not found


def test_what_the_cache_does_not_serve() -> None:
    assert not fetch_cache.serves(BodySection(Section((), "HEADER.FIELDS", ("X-UNCOMMON",))))
    assert not fetch_cache.serves(BodySection(Section((), "HEADER.FIELDS.NOT", ("SUBJECT",))))
    assert not fetch_cache.serves(BodySection(Section((1,), "HEADER.FIELDS", ("SUBJECT",))))
    assert not fetch_cache.serves(BodySection(Section((), "HEADER")))
    assert not fetch_cache.serves(FetchAttribute("RFC822.HEADER"))


@settings(max_examples=200, deadline=None)
@given(st.lists(_SEARCH_LINES, max_size=6),
       st.sampled_from(["invoice", "in voice", "invoice 42", "voice", "strasse", "grüße", "spaced   out", " ",
                        "42\0gr"]))
def test_cached_subject_answers_as_the_header_does(lines: list[bytes], needle: str) -> None:
    """SEARCH SUBJECT from the row's subject text (migration 0019) finds what decoding every Subject
    value of the whole header finds; a needle with a NUL is not answered from it."""
    data = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
    row = fetch_cache.describe_bytes(data, (0, 0, 0))
    if row.subject is None:
        assert fetch_cache.exact_headers(row) is None  # the fields are not exact: the file answers
        return
    whole = parse_header(data[:scan(io.BytesIO(data)).header.end])
    needle = needle.casefold()
    expected = any(needle in decode_words(v).casefold() for v in whole.get_all("Subject") or [])
    searcher = Searcher(HeaderKey("SUBJECT", needle), 1, 1)
    assert searcher.subject_only() == ("\0" not in needle)
    if searcher.subject_only():
        candidate = Candidate(1, 1, frozenset(), len(data), 0)
        assert searcher.matches(candidate, _no_file, CachedSubject(row.subject)) == expected


def _no_file() -> BinaryIO:
    raise AssertionError("the cached subject answers without the file")


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_cached_subject_of_the_corpus(path: Path) -> None:
    data = path.read_bytes()
    row = fetch_cache.describe_bytes(data, (len(data), 0, 0))
    cached = fetch_cache.exact_headers(row)
    assert (row.subject is None) == (cached is None)
    if cached is not None:
        assert row.subject == "\0".join(decode_words(v).casefold() for v in cached.get_all("Subject") or [])


def _header_list(data: bytes, items: list[FetchItem]) -> bytes | None:
    """What fetch_render answers a message list with: the top header block alone, read once."""
    assert fetch.header_list_only(items)
    block = top_header_block(io.BytesIO(data))
    if block is None:
        return None
    return FetchResponse(1, tuple(fetch.header_list_values(items, FACTS, block))).to_bytes()


def _list_items(fields: tuple[str, ...]) -> list[FetchItem]:
    return [FetchAttribute("UID"), FetchAttribute("RFC822.SIZE"), FetchAttribute("FLAGS"),
            BodySection(Section((), "HEADER.FIELDS", fields), peek=True),
            BodySection(Section((), "HEADER.FIELDS.NOT", fields[:3])),
            BodySection(Section((), "HEADER.FIELDS", fields[:2]), peek=True, partial=(3, 20))]


def _check_header_list(data: bytes, items: list[FetchItem]) -> None:
    fast = _header_list(data, items)
    if fast is None:  # only a header longer than one probe is left to the scan
        assert len(data) >= HEADER_PROBE
        assert re.search(rb"^\r?\n|\n\r?\n", data[:HEADER_PROBE]) is None
        return
    assert fast == _from_file(data, items)


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_header_list_answers_are_the_files_answers(path: Path) -> None:
    _check_header_list(path.read_bytes(), _list_items(LIST_FIELDS))


@pytest.mark.parametrize("data", [
    b"", b"\r\n", b"\n", b"\r\nbody\r\n", b"\nbody\n", b"Subject: no body", b"Subject: x\r\n", b"Subject: x\n\nb\n",
    b"Subject: x\r\n\r\n", b"From: a\r\n folded\r\nSubject: y\r\n\r\n--b\r\n\r\n", b"Subject: a\rb\r\n\r\nx",
    b"Subject: x\r\nTo: y\r\n\n\r\nbody", b"X: " + b"y" * (HEADER_PROBE - 10) + b"\r\n\r\nbody",
    b"X: " + b"y" * (HEADER_PROBE - 3) + b"\r\n\r\nbody",  # the blank line just past the probe
    b"X: " + b"y" * HEADER_PROBE,
])
def test_header_list_edges(data: bytes) -> None:
    _check_header_list(data, _list_items(("SUBJECT", "FROM", "X", "TO")))


def test_header_list_only() -> None:
    assert fetch.header_list_only(_list_items(LIST_FIELDS))
    assert not fetch.header_list_only([*_list_items(LIST_FIELDS), FetchAttribute("ENVELOPE")])
    assert not fetch.header_list_only([BodySection(Section((1,), "HEADER.FIELDS", ("SUBJECT",)))])
    assert not fetch.header_list_only([BodySection(Section((), "HEADER"))])


def _described(path: str, known: tuple[int, int, int] | None) -> tuple[CachedMessage | None, os.stat_result, bool]:
    """One file through fetch_cache.described_files, as FETCH describes it."""
    [(_, row, st, here)] = fetch_cache.described_files([(0, path, known)])
    return row, st, here


def test_a_file_is_described_from_its_descriptor_as_from_a_file_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    """fetch_cache.described_files (os.open, one read) gives describe()'s row for small and large files (the
    large ones scanned from a file object on the same descriptor), None for the stamp it is told of,
    and a file that grew since its fstat is read to its end."""
    monkeypatch.setattr(fetch_cache, "WHOLE_READ", 4096)
    for n, path in enumerate(sorted(CORPUS.glob("*.eml"))[:20]):
        data = path.read_bytes() * (1 if n % 2 else 40)  # (beyond WHOLE_READ: the scan of the file)
        copy = tmp_path / f"m{n}"
        copy.write_bytes(data)
        stamp = stamp_of(copy.stat())
        row, st, here = _described(str(copy), None)
        with open(copy, "rb") as f:
            assert (row, stamp_of(st), here) == (fetch_cache.describe(f, stamp), stamp, True)
        assert _described(str(copy), stamp)[0] is None
    grown = tmp_path / "grown"
    grown.write_bytes(b"x" * 200_000)
    fd = os.open(grown, os.O_RDONLY)
    try:
        assert read_to_end(fd, 10) == b"x" * 200_000
    finally:
        os.close(fd)


def test_files_described_in_batches_are_described_as_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """fetch_cache.described_files (files read READ_AHEAD at a time, then described) gives each file's
    row of one at a time in order, for small, large and renamed files and known stamps, and leaves out a file
    that is gone; it holds no more than READ_AHEAD_OCTETS (and one file) read but not described."""
    monkeypatch.setattr(fetch_cache, "WHOLE_READ", 4096)
    monkeypatch.setattr(fetch_cache, "READ_AHEAD", 4)
    monkeypatch.setattr(fetch_cache, "READ_AHEAD_OCTETS", 8192)
    cur = tmp_path / "cur"
    cur.mkdir()
    (tmp_path / "new").mkdir()
    wanted: list[tuple[int, str, tuple[int, int, int] | None]] = []
    for n, path in enumerate(sorted(CORPUS.glob("*.eml"))[:30]):
        data = path.read_bytes() * (1 if n % 3 else 40)  # (beyond WHOLE_READ: the scan of the file)
        copy = cur / f"{n}.M{n}P1.test:2,"
        copy.write_bytes(data)
        wanted.append((n, str(copy), stamp_of(copy.stat()) if n % 7 == 6 else None))
    expected = {n: _described(path, known) for n, path, known in wanted}
    os.rename(wanted[5][1], wanted[5][1] + "S")  # renamed by a flag change: found again, not at its path
    os.unlink(wanted[9][1])  # expunged: left out
    read_ahead: list[int] = []
    loaded = fetch_cache._loaded

    def counted(path: str, known: tuple[int, int, int] | None) -> object:
        found = loaded(path, known)
        read_ahead.append(len(found[0]) if isinstance(found[0], bytes) else 0)
        return found

    monkeypatch.setattr(fetch_cache, "_loaded", counted)
    got = []
    for n, row, fstat, here in fetch_cache.described_files(wanted):
        got.append(n)
        assert (row, stamp_of(fstat), here) == (expected[n][0], stamp_of(expected[n][1]), n != 5)
        assert len(read_ahead) - len(got) <= 4
        assert sum(read_ahead[len(got):]) <= 8192 + 4096
    assert got == [n for n, _, _ in wanted if n != 9]


def test_a_message_read_to_a_limit_is_what_a_file_object_reads(tmp_path: Path) -> None:
    """maildir.read_message(path, limit) (os.open, one read) gives open_message(path).read(limit): a
    file shorter or longer than the limit, one that grew since its fstat, one renamed by a flag change."""
    cur = tmp_path / "cur"
    cur.mkdir()
    (tmp_path / "new").mkdir()
    data = bytes(range(256)) * 40
    path = cur / "1.M1P1.test:2,"
    path.write_bytes(data)
    for limit in (1, 100, len(data) - 1, len(data), len(data) + 1, 1 << 20):
        assert read_message(str(path), limit) == data[:limit]
    os.rename(path, str(path) + "S")
    assert read_message(str(path), 100) == data[:100]
    with pytest.raises(FileNotFoundError):
        read_message(str(cur / "2.M2P1.test:2,"), 100)
    grown = tmp_path / "grown"
    grown.write_bytes(b"x" * 200_000)
    fd = os.open(grown, os.O_RDONLY)
    try:
        for limit in (5, 11, 12, 70_000, 200_000, 300_000):
            os.lseek(fd, 0, os.SEEK_SET)
            assert read_to_end(fd, 10, limit) == b"x" * min(limit, 200_000)
    finally:
        os.close(fd)
