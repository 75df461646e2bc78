"""Channel.read_within (issue 19): a read's time limit without a timer per read. asyncio.timeout made
a TimerHandle, a heap entry and a cancel for every IMAP command; the connection now keeps one timer,
moved only when it would fire late, and a read still times out at its own deadline."""

from __future__ import annotations

import asyncio
import socket

import pytest

from appliance.channel import Channel


async def _connected() -> tuple[Channel, socket.socket]:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    channel = Channel(lambda _: None, 1 << 20)
    await loop.connect_accepted_socket(lambda: channel, left)
    return channel, right


def _live_timers(loop: asyncio.AbstractEventLoop) -> int:
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]  # the loop's timer heap
    return sum(1 for handle in scheduled if not handle.cancelled())


def test_many_reads_keep_one_timer_and_cancel_none() -> None:
    async def run() -> tuple[int, int, list[bytes]]:
        loop = asyncio.get_running_loop()
        channel, peer = await _connected()
        got = []
        with peer:
            for i in range(50):
                peer.sendall(b"a%d\r\n" % i)
                got.append(await channel.read_within(60.0))
            timers, scheduled = _live_timers(loop), len(loop._scheduled)  # type: ignore[attr-defined]
        return timers, scheduled, got

    timers, scheduled, got = asyncio.run(run())
    assert got == [b"a%d\r\n" % i for i in range(50)]
    assert timers == 1
    assert scheduled == 1  # no cancelled timer left in the heap either


def test_a_read_times_out_at_its_own_deadline_not_an_earlier_reads() -> None:
    async def run() -> tuple[float, bytes]:
        loop = asyncio.get_running_loop()
        channel, peer = await _connected()
        with peer:
            peer.sendall(b"x")
            first = await channel.read_within(0.3)  # its timer stays set for 0.3 s from now
            await asyncio.sleep(0.2)
            started = loop.time()
            with pytest.raises(TimeoutError):
                await channel.read_within(0.3)  # fires at 0.5 s, not at the first read's 0.3
            return loop.time() - started, first

    waited, first = asyncio.run(run())
    assert first == b"x"
    assert 0.29 <= waited < 1.0


def test_a_shorter_read_moves_the_timer_sooner_and_data_after_a_timeout_still_reads() -> None:
    async def run() -> tuple[float, bytes]:
        loop = asyncio.get_running_loop()
        channel, peer = await _connected()
        with peer:
            peer.sendall(b"x")
            await channel.read_within(60.0)
            started = loop.time()
            with pytest.raises(TimeoutError):
                await channel.read_within(0.2)
            waited = loop.time() - started
            peer.sendall(b"y")
            return waited, await channel.read_within(60.0)

    waited, later = asyncio.run(run())
    assert 0.19 <= waited < 1.0
    assert later == b"y"


def test_a_closed_connection_drops_its_timer() -> None:
    async def run() -> int:
        loop = asyncio.get_running_loop()
        channel, peer = await _connected()
        peer.sendall(b"x")
        await channel.read_within(600.0)
        peer.close()
        assert await channel.read_within(600.0) == b""
        for _ in range(3):
            await asyncio.sleep(0)
        return _live_timers(loop)

    assert asyncio.run(run()) == 0
