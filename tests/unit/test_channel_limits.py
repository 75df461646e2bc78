"""The connection limiter shared by every protocol listener (appliance/channel.py): what is acquired is
released exactly once, per address, per network, the pre-auth pool, and stress (issue 10 items 2, 6)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from appliance.channel import ConnectionLimiter, Slot, network_of, site_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Callable[[], float] | None = None, **overrides: float) -> ConnectionLimiter:
    settings: dict[str, float] = {
        "per_client": 3, "per_network": 5, "preauth": 8, "total": 10,
        "preauth_timeout": 120.0, "stressed_preauth_timeout": 5.0, "stress_fraction": 0.5,
    }
    settings.update(overrides)
    return ConnectionLimiter(
        per_client=int(settings["per_client"]),
        per_network=int(settings["per_network"]),
        preauth=int(settings["preauth"]),
        total=int(settings["total"]),
        preauth_timeout=settings["preauth_timeout"],
        stressed_preauth_timeout=settings["stressed_preauth_timeout"],
        stress_fraction=settings["stress_fraction"],
        **({"clock": clock} if clock is not None else {}),
    )


def test_networks_are_slash_24_and_slash_64() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.9") == "192.0.2.0/24"  # IPv4-mapped counts as IPv4
    assert network_of("unknown") == "unknown"


def test_release_is_exactly_once_and_frees_what_was_acquired() -> None:
    lim = limiter()
    slot = lim.acquire("192.0.2.1")
    assert slot is not None
    assert (lim.count("192.0.2.1"), lim.network_count("192.0.2.1"), lim.open, lim.preauth) == (1, 1, 1, 1)
    slot.release()
    slot.release()  # a second path ending the same connection must not free someone else's slot
    assert (lim.count("192.0.2.1"), lim.network_count("192.0.2.1"), lim.open, lim.preauth) == (0, 0, 0, 0)
    other = lim.acquire("192.0.2.1")
    assert other is not None
    assert lim.count("192.0.2.1") == 1


def test_the_slot_remembers_its_address_whatever_the_transport_says_later() -> None:
    # The bug of issue 10 item 2: release looked the address up again and got "unknown".
    lim = limiter(per_client=2)
    for _ in range(50):
        slot = lim.acquire("192.0.2.1")
        assert slot is not None, "a closed connection's slot leaked"
        slot.release()
    assert lim.open == 0
    assert lim.count("unknown") == 0


def test_per_address_per_network_and_total_limits() -> None:
    lim = limiter(per_client=3, per_network=5, preauth=100, total=10)
    held = [lim.acquire("192.0.2.1") for _ in range(3)]
    assert all(held)
    assert lim.acquire("192.0.2.1") is None  # per address
    held += [lim.acquire("192.0.2.2"), lim.acquire("192.0.2.3")]
    assert lim.acquire("192.0.2.4") is None  # per /24: a new address of the same network is refused
    held += [lim.acquire(f"198.51.100.{i}") for i in range(1, 6)]
    assert all(held)
    assert lim.open == 10
    assert lim.acquire("203.0.113.1") is None  # total
    for slot in held:
        assert slot is not None
        slot.release()
    assert lim.open == 0


def test_ipv6_addresses_of_one_slash_64_share_a_budget() -> None:
    lim = limiter(per_client=10, per_network=2)
    assert lim.acquire("2001:db8::1")
    assert lim.acquire("2001:db8::2")
    assert lim.acquire("2001:db8::3") is None
    assert lim.acquire("2001:db8:0:1::1") is not None  # the next /64


def test_preauth_pool_leaves_room_for_logged_in_sessions() -> None:
    lim = limiter(per_client=100, per_network=100, preauth=4, total=6)
    slots = [lim.acquire(f"192.0.2.{i}") for i in range(4)]
    assert all(slots)
    assert lim.acquire("192.0.2.50") is None  # the pre-auth pool is full, though the total is not
    first = slots[0]
    assert first is not None
    first.promote()
    first.promote()  # idempotent
    assert lim.preauth == 3
    assert lim.open == 4
    assert lim.acquire("192.0.2.51") is not None  # a login made room in the pre-auth pool
    first.release()
    assert lim.preauth == 4
    assert lim.open == 4


def test_stress_shortens_the_preauth_deadline_of_new_and_waiting_connections() -> None:
    clock = Clock()
    lim = limiter(clock, per_client=100, per_network=100, preauth=10, total=20, stress_fraction=0.5)
    early = lim.acquire("192.0.2.1")
    assert early is not None
    assert not lim.stressed
    assert early.preauth_deadline == 1000.0 + 120.0
    clock.now += 1
    rest = [lim.acquire(f"192.0.2.{i}") for i in range(2, 6)]  # 5 of 10: stressed
    assert lim.stressed
    assert early.preauth_deadline == 1000.0 + 5.0  # counted from its connect
    last = rest[-1]
    assert last is not None
    assert last.preauth_deadline == 1001.0 + 5.0
    for slot in rest:
        assert slot is not None
        slot.release()
    assert not lim.stressed


def test_deadline_timer_fires_moves_earlier_under_stress_and_stops_at_login() -> None:
    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        lim = limiter(loop.time, per_client=100, per_network=100, preauth=4, total=8,
                      preauth_timeout=30.0, stressed_preauth_timeout=0.2, stress_fraction=0.5)
        fired: list[str] = []
        done = asyncio.Event()
        idle = lim.acquire("192.0.2.1")
        logged_in = lim.acquire("192.0.2.2")
        assert idle is not None
        assert logged_in is not None

        def on_idle() -> None:
            fired.append("idle")
            done.set()

        idle.watch_preauth(on_idle)
        logged_in.watch_preauth(lambda: fired.append("logged_in"))
        logged_in.promote()
        started = loop.time()
        more: list[Slot | None] = [lim.acquire("192.0.2.3"), lim.acquire("192.0.2.4")]  # 3 of 4 pre-auth
        assert lim.stressed
        assert all(more)
        await asyncio.wait_for(done.wait(), 10)
        elapsed = loop.time() - started
        await asyncio.sleep(0.3)
        return fired, elapsed

    fired, elapsed = asyncio.run(scenario())
    assert fired == ["idle"]  # once; never for the logged-in one
    assert elapsed < 5  # well before the 30 s it had without stress


@pytest.mark.parametrize("path", ["released", "promoted"])
def test_a_released_or_promoted_slot_never_fires(path: str) -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        lim = limiter(loop.time, preauth_timeout=0.05)
        fired: list[str] = []
        slot = lim.acquire("192.0.2.1")
        assert slot is not None
        slot.watch_preauth(lambda: fired.append("x"))
        slot.release() if path == "released" else slot.promote()
        await asyncio.sleep(0.2)
        return fired

    assert asyncio.run(scenario()) == []


def test_a_full_preauth_pool_drops_its_oldest_connection_for_a_newcomer() -> None:
    # Dovecot's login processes do the same: idle sockets alone never refuse a new client.
    clock = Clock()
    lim = limiter(clock, per_client=100, per_network=100, preauth=3, total=10)
    dropped: list[str] = []
    slots = []
    for i in range(3):  # one per network: none holds more of the pool than the newcomer's
        slot = lim.acquire(f"192.0.{i}.1")
        assert slot is not None
        slot.on_evict = lambda i=i: dropped.append(f"192.0.{i}.1")
        slots.append(slot)
        clock.now += 0.5
    assert lim.acquire("198.51.100.1") is None  # the oldest has had only 1.5 s to log in
    clock.now += 1.0
    newcomer = lim.acquire("198.51.100.1")
    assert newcomer is not None
    assert dropped == ["192.0.0.1"]
    assert slots[0].evicted
    assert lim.preauth == 3
    assert lim.open == 4
    slots[0].promote()  # too late: an evicted connection does not come back into the counts
    assert lim.preauth == 3
    slots[0].release()
    assert lim.open == 3
    assert lim.count("192.0.0.1") == 0


def test_a_network_holding_most_of_a_full_pool_gives_way_at_once() -> None:
    # A flood reconnecting faster than EVICT_MIN_AGE kept every socket of a full pool too young to be
    # dropped: everyone else was refused for as long as it went on.
    clock = Clock()
    lim = limiter(clock, per_client=100, per_network=100, preauth=4, total=10)
    dropped: list[str] = []
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "198.51.100.1"):
        slot = lim.acquire(address)
        assert slot is not None
        slot.on_evict = lambda address=address: dropped.append(address)
    assert lim.acquire("203.0.113.1") is not None  # 192.0.2.0/24 holds three, the newcomer's none
    assert dropped == ["192.0.2.1"]
    assert lim.acquire("203.0.113.2") is None  # two against its network's one: the age rule
    assert lim.acquire("203.0.114.1") is not None  # two against none: the heavier network's oldest
    assert dropped == ["192.0.2.1", "192.0.2.2"]
    assert lim.acquire("192.0.2.9") is None  # one each now: the age rule
    assert lim.network_count("192.0.2.1") == 3  # evicted sockets count until their sessions end
    clock.now += 2.0
    assert lim.acquire("192.0.2.9") is not None
    assert dropped == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def test_logged_in_sessions_are_never_evicted() -> None:
    clock = Clock()
    lim = limiter(clock, per_client=100, per_network=100, preauth=2, total=10)
    dropped: list[Slot] = []
    first, second = lim.acquire("192.0.2.1"), lim.acquire("192.0.2.2")
    assert first is not None
    assert second is not None
    for slot in (first, second):
        slot.on_evict = lambda slot=slot: dropped.append(slot)
    first.promote()
    clock.now += 10
    assert lim.acquire("192.0.2.3") is not None  # room: one logged in left the pool, no eviction
    assert lim.acquire("192.0.2.4") is not None  # the pool is full again: the pre-auth `second` goes
    assert dropped == [second]


def test_a_full_pool_is_judged_by_site_an_ipv6_slash_48() -> None:
    # One /48 holds 65536 /64s: one socket from each of them is still one site's flood.
    clock = Clock()
    lim = limiter(clock, per_client=100, per_network=100, preauth=3, total=10)
    dropped: list[str] = []
    for n in range(3):
        address = f"2001:db8:1:{n}::1"  # three /64s of 2001:db8:1::/48
        slot = lim.acquire(address)
        assert slot is not None
        slot.on_evict = lambda address=address: dropped.append(address)
    assert lim.acquire("2001:db8:2::1") is not None  # another site: the flooding /48's oldest goes
    assert dropped == ["2001:db8:1:0::1"]
    assert site_of(network_of("192.0.2.7")) == "192.0.2.0/24"
    assert site_of(network_of("2001:db8:1:ff::9")) == "2001:db8:1::/48"
