"""The box's one budget for messages being received (appliance/message_memory.py), by network."""

from __future__ import annotations

import asyncio

from appliance.message_memory import MessageMemory


def test_one_ipv6_site_holds_at_most_half_whatever_its_64s() -> None:
    # An IPv6 site has 65536 /64s (a /48, RFC 6177; a home's /56 has 256): counted per /64, two of them
    # took the whole budget, and every other sender's DATA was refused with 452.
    budget = MessageMemory(limit=1000)
    first, second = budget.hold("2001:db8:7:1::25"), budget.hold("2001:db8:7:2::25")
    assert first.take(500)
    assert not second.take(1)  # the site's half is taken
    other = budget.hold("2001:db8:8::25")  # another site
    assert other.take(500)
    first.release()
    assert second.take(500)


def test_ipv4_networks_are_their_24s() -> None:
    budget = MessageMemory(limit=1000)
    assert budget.hold("192.0.2.1").take(500)
    assert not budget.hold("192.0.2.200").take(1)
    assert budget.hold("198.51.100.1").take(500)
    assert not budget.hold("203.0.113.1").take(1)  # the whole budget is taken


def test_spooled_messages_are_read_back_in_turn_within_their_bound() -> None:
    # The octets on disk are not the budget's; read back after the dot (then others() counts them),
    # a message waits for its turn rather than taking the room of the small messages being received.
    async def run() -> None:
        budget = MessageMemory(limit=1000, read_back_limit=100)
        first, second, third = (budget.hold(f"192.0.2.{n}") for n in (1, 2, 3))
        assert first.spool(80)
        assert second.spool(50)
        assert (budget.held, budget.spooled, budget.others()) == (0, 130, 0)  # on the disk already
        assert await first.take_back(80)
        assert (budget.spooled, budget.read_back, budget.others(first), budget.others()) == (50, 80, 0, 80)
        assert not await second.take_back(50, wait=0.05)  # no room: 452 after the dot
        waiting = asyncio.ensure_future(second.take_back(50))
        await asyncio.sleep(0.01)
        later = asyncio.ensure_future(third.take_back(10))  # would fit, but comes after `second`
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert not later.done()
        first.release()
        assert await waiting
        assert await later
        assert (budget.spooled, budget.read_back, budget.others()) == (0, 60, 60)
        second.release()
        third.release()
        assert budget.others() == 0
        big = budget.hold("198.51.100.1")
        assert await big.take_back(150)  # alone, a message over the bound is read back still

    asyncio.run(run())


def test_spooled_octets_have_their_own_bound_half_per_network() -> None:
    # Unbounded, the MX's 500 connections could spool 18 GiB, slow senders bringing a small disk to its
    # reserve (all mail refused) as they filled the memory.
    budget = MessageMemory(limit=1000, spool_limit=10_000)
    first, same, other = budget.hold("192.0.2.1"), budget.hold("192.0.2.7"), budget.hold("198.51.100.1")
    assert first.spool(5000)
    assert not same.spool(1)
    assert other.spool(5000)
    assert not budget.hold("203.0.113.1").spool(1)
    assert first.take(500)  # the memory's bound is another
    first.release()
    assert same.spool(5000)
    assert budget.spooled == 10_000


def test_octets_announced_for_a_spool_file_count_for_the_disk_until_written() -> None:
    # An IMAP APPEND announces its size: the part bound for a spool file is neither in memory nor on
    # the disk yet, and the reserve checks of other messages must see it coming.
    budget = MessageMemory(limit=1000)
    append, other = budget.hold("192.0.2.1"), budget.hold("198.51.100.1")
    assert append.take(100)
    append.expect(900)
    assert (budget.held, budget.coming, budget.others(other), budget.others(append)) == (100, 900, 1000, 0)
    append.arrived(400)
    assert append.spool(400)
    assert (budget.coming, budget.spooled, budget.others(other)) == (500, 400, 600)
    append.release()
    assert (budget.held, budget.coming, budget.spooled, budget.others()) == (0, 0, 0, 0)
