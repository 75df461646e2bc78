"""The box's one budget for messages being received (appliance/message_memory.py), by network."""

from __future__ import annotations

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
