"""The DATA reader (appliance/smtp/data_phase.py): the end found however the stream is cut, the dots of
transparency taken out, the bounds, what is pipelined behind the dot left for the next command, and
its cost linear in the octets, not in the lines."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.message_memory import MessageMemory
from appliance.message_spool import Spill
from appliance.smtp.data_phase import (
    BUSY,
    DISK_FULL,
    LINE_TOO_LONG,
    TOO_MUCH_DATA,
    Spooled,
    read_back,
    read_message,
)

BIG = 1 << 30


async def _read(pieces: list[bytes], limit: int, max_line: int, max_octets: int,
                spill: Spill | None = None) -> tuple[bytes | str, bytes]:
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    hold = spill.hold.take if spill is not None else None
    message = await read_message(reader, max_line=max_line, max_octets=max_octets, hold=hold, spill=spill)
    await feeding
    if isinstance(message, Spooled):
        assert spill is not None
        assert await spill.hold.take_back(message.octets)
        message = await read_back(spill, message)
    if spill is not None:
        spill.close()
        spill.hold.release()
    return message, await reader.read()


def read(data: bytes, *, cuts: list[int] | None = None, limit: int = 64 * 1024, max_line: int = BIG,
         max_octets: int = BIG, spill: Spill | None = None) -> tuple[bytes | str, bytes]:
    """(the message or refusal, what is left in the stream), data fed in pieces cut at `cuts`; with
    `spill`, what passes its `after` read back from its file."""
    points = sorted({c for c in cuts or [] if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return asyncio.run(_read(pieces, limit, max_line, max_octets, spill))


@pytest.fixture(scope="module")
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spool")


def spill(directory: Path, after: int, room: bool = True) -> Spill:
    return Spill(directory, MessageMemory().hold("192.0.2.1"), lambda _octets: room, after=after)


def by_lines(data: bytes) -> tuple[bytes, bytes]:
    """The rule itself, a line at a time: lines end at CRLF, a lone dot ends the message, a leading
    dot is taken off."""
    lines: list[bytes] = []
    rest = data
    while True:
        line, _, rest = rest.partition(b"\r\n")
        if line == b".":
            return b"".join(lines), rest
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


# Messages built from the octets that matter to the end and to transparency.
fragments = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"x", b"\r\n.", b"..", b".\r\n", b"ab"]),
                     max_size=40)


@settings(max_examples=1000, deadline=None)
@given(body=fragments, cuts=st.lists(st.integers(0, 200), max_size=8), limit=st.integers(5, 40))
def test_the_end_and_the_dots_wherever_the_stream_is_cut(body: list[bytes], cuts: list[int], limit: int) -> None:
    data = b"".join(body) + b"\r\n.\r\nQUIT\r\n"
    message, left = read(data, cuts=cuts, limit=limit)
    assert (message, left) == by_lines(data)


@settings(max_examples=500, deadline=None)
@given(body=fragments, cuts=st.lists(st.integers(0, 200), max_size=8), limit=st.integers(5, 40),
       after=st.integers(0, 60))
def test_a_spooled_message_is_the_same_message(spool_dir: Path, body: list[bytes], cuts: list[int], limit: int,
                                               after: int) -> None:
    # Past `after` the octets go to a file as sent (dot-stuffed) and come back whole after the dot: the
    # memory part and the file's meet anywhere, in a dot-stuffed line too.
    data = b"".join(body) + b"\r\n.\r\nQUIT\r\n"
    assert read(data, cuts=cuts, limit=limit, spill=spill(spool_dir, after)) == by_lines(data)
    assert os.listdir(spool_dir) == []


def test_a_spool_the_disk_has_no_room_for_is_refused_after_the_dot(spool_dir: Path) -> None:
    chosen = spill(spool_dir, after=10, room=False)
    data = b"abc\r\n" * 10 + b".\r\nNOOP\r\n"
    assert read(data, spill=chosen, limit=8) == (DISK_FULL, b"NOOP\r\n")
    assert chosen.file is None
    assert read(data, spill=spill(spool_dir, after=100, room=False)) == (b"abc\r\n" * 10, b"NOOP\r\n")  # all in memory
    over_bound = Spill(spool_dir, MessageMemory(spool_limit=20).hold("192.0.2.1"), lambda _octets: True, after=10)
    assert read(data, spill=over_bound, limit=8) == (BUSY, b"NOOP\r\n")  # the box's spool is full


def test_an_empty_message_and_a_dot_at_the_start() -> None:
    assert read(b".\r\nQUIT\r\n") == (b"", b"QUIT\r\n")
    assert read(b"\r\n.\r\n") == (b"\r\n", b"")
    assert read(b"..x\r\n.\r\n") == (b".x\r\n", b"")
    assert read(b"a\r\n..\r\n...\r\n.\r\n") == (b"a\r\n.\r\n..\r\n", b"")
    assert read(b"a.\r\n.b\r\n.\r\n", cuts=[1, 2, 3, 4, 5, 6, 7]) == (b"a.\r\nb\r\n", b"")


def test_bounds_refuse_after_the_dot() -> None:
    assert read(b"abc\r\n" * 10 + b".\r\nNOOP\r\n", max_octets=49) == (TOO_MUCH_DATA, b"NOOP\r\n")
    assert read(b"abc\r\n" * 10 + b".\r\n", max_octets=50) == (b"abc\r\n" * 10, b"")
    for limit in (8, 64 * 1024):
        long_line = b"y" * 98 + b"\r\n"
        assert read(b"a\r\n" + long_line + b"b\r\n.\r\n", max_line=100, limit=limit)[0] == b"a\r\n" + long_line + b"b\r\n"
        assert read(b"a\r\ny" + long_line + b"b\r\n.\r\n", max_line=100, limit=limit)[0] == LINE_TOO_LONG
        assert read(b"y" + long_line + b".\r\n", max_line=100, limit=limit, cuts=[99, 100, 101])[0] == LINE_TOO_LONG


def test_a_bare_lf_ends_a_line_for_the_bound() -> None:
    # Its bare LFs become CRLFs when the message is stored: a file with Unix line ends (curl -T) is lines.
    for limit in (8, 64 * 1024):
        unix = b"y" * 9 + b"\n"
        assert read(unix * 50 + b"\r\n.\r\n", max_line=10, limit=limit)[0] == unix * 50 + b"\r\n"
        assert read(unix * 5 + b"y" + unix + b"\r\n.\r\n", max_line=10, limit=limit)[0] == LINE_TOO_LONG
        assert read(unix + b"y" * 11 + b"\r\n.\r\n", max_line=10, limit=limit, cuts=[5, 10, 11])[0] == LINE_TOO_LONG


def test_many_short_lines_cost_little() -> None:
    # 4 MB of empty lines: 2 million reads and bytes objects, ~2.2 s of CPU, when read a line at a time;
    # lines ending in a full stop must not each be a read either.
    for line in (b"\r\n", b"a.\r\n"):
        data = line * (4_000_000 // len(line)) + b".\r\n"
        started = time.process_time()
        message, _ = read(data, cuts=list(range(0, len(data), 65536)))
        assert message == data[:-3]
        assert time.process_time() - started < 0.5


def test_a_spooled_message_is_read_back_at_twice_its_size(spool_dir: Path) -> None:
    # The buffer read back, the one without the dots, the bytes made of it: three times the message
    # (108 MB for the largest) while a reference to the first outlived its use.
    async def peak_of_read_back() -> int:
        chosen = spill(spool_dir, after=65536)
        reader = asyncio.StreamReader(limit=65536)
        feeding = asyncio.ensure_future(_feed(reader, b"..x" + b"y" * 97 + b"\r\n", 80_000))
        message = await read_message(reader, max_line=BIG, max_octets=BIG, hold=chosen.hold.take, spill=chosen)
        await feeding
        assert isinstance(message, Spooled)
        tracemalloc.start()
        try:
            data = await read_back(chosen, message)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            chosen.close()
        assert len(data) == 80_000 * 101
        return peak

    assert asyncio.run(peak_of_read_back()) < 2.2 * 8_080_000


async def _feed(reader: asyncio.StreamReader, line: bytes, count: int) -> None:
    for _ in range(count // 1000):
        reader.feed_data(line * 1000)
        await asyncio.sleep(0)
    reader.feed_data(b".\r\n")
