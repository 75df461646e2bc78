"""The DNS answer cache (appliance/queue/dns_cache.py) against a real DNS server on loopback that
counts the questions it gets (tests/support/dns_server.py): answers are reused while their TTL (capped)
lives, negative answers with the SOA minimum (RFC 2308), failures never, and a change of the
`dns_resolver` setting is obeyed at once.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator

import dns.resolver
import pytest

from appliance.queue import dns_cache
from appliance.queue.dns_cache import DnsCache
from appliance.queue.mx import delivery_hops
from appliance.queue.resolver import make_async_resolver, make_resolver
from tests.conftest import BoxHandle
from tests.support.dns_server import ZoneServer

ALICE = "alice@ourdomain.test"
PASSWORD = "correct horse battery staple 9"


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer({("host.example.test", "A"): ["192.0.2.1"]}, ttl=60, negative_ttl=30) as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_with_clock(zone: ZoneServer) -> tuple[dns.resolver.Resolver, Clock]:
    clock = Clock()
    resolver = make_resolver(zone.address)
    resolver.cache = DnsCache(clock=clock)
    return resolver, clock


def a_record(resolver: dns.resolver.Resolver, name: str = "host.example.test") -> list[str]:
    return [r.to_text() for r in resolver.resolve(name, "A")]


def test_a_second_lookup_is_answered_from_the_shared_cache(zone: ZoneServer) -> None:
    assert a_record(make_resolver(zone.address)) == ["192.0.2.1"]
    assert zone.queries == 1
    # Another resolver for the same setting (another service, another message) shares the cache.
    assert a_record(make_resolver(zone.address)) == ["192.0.2.1"]
    assert zone.queries == 1


def test_an_answer_lives_for_its_ttl_and_no_longer(zone: ZoneServer) -> None:
    resolver, clock = resolver_with_clock(zone)
    a_record(resolver)
    clock.now += 59
    a_record(resolver)
    assert zone.queries == 1
    zone.set("host.example.test", "A", ["192.0.2.2"])
    clock.now += 2  # past the 60 s TTL
    assert a_record(resolver) == ["192.0.2.2"]
    assert zone.queries == 2


def test_long_ttls_are_capped(zone: ZoneServer) -> None:
    zone.ttl = 86400
    resolver, clock = resolver_with_clock(zone)
    a_record(resolver)
    clock.now += dns_cache.MAX_TTL - 1
    a_record(resolver)
    assert zone.queries == 1
    clock.now += 2
    a_record(resolver)
    assert zone.queries == 2


def test_a_zero_ttl_is_not_cached(zone: ZoneServer) -> None:
    zone.ttl = 0
    resolver, _clock = resolver_with_clock(zone)
    a_record(resolver)
    a_record(resolver)
    assert zone.queries == 2


def test_nxdomain_and_nodata_are_cached_for_the_soa_minimum(zone: ZoneServer) -> None:
    resolver, clock = resolver_with_clock(zone)
    for _ in range(2):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("missing.example.test", "TXT")
        with pytest.raises(dns.resolver.NoAnswer):  # the name exists, without TXT: NODATA
            resolver.resolve("host.example.test", "TXT")
        assert resolver.resolve("host.example.test", "TXT", raise_on_no_answer=False).rrset is None
    assert zone.queries == 2
    clock.now += 31  # past the SOA minimum (30 s)
    zone.set("missing.example.test", "TXT", ['"now here"'])
    assert [r.to_text() for r in resolver.resolve("missing.example.test", "TXT")] == ['"now here"']
    assert zone.queries == 3


def test_negative_ttls_are_capped_and_need_an_soa(zone: ZoneServer) -> None:
    zone.negative_ttl = 86400
    resolver, clock = resolver_with_clock(zone)
    for _ in range(2):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("missing.example.test", "A")
    assert zone.queries == 1
    clock.now += dns_cache.MAX_NEGATIVE_TTL + 1
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.example.test", "A")
    assert zone.queries == 2
    # RFC 2308 5: a negative answer without an SOA is not cached.
    zone.negative_ttl = None
    for _ in range(2):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("other.example.test", "A")
    assert zone.queries == 4


def test_a_server_failure_is_never_cached(zone: ZoneServer) -> None:
    resolver, _clock = resolver_with_clock(zone)
    resolver.lifetime = 2.0
    zone.servfail = True
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("host.example.test", "A")
    zone.servfail = False
    assert a_record(resolver) == ["192.0.2.1"]


def test_the_cache_is_bounded_least_recently_used_first(zone: ZoneServer) -> None:
    for name in ("a", "b", "c"):
        zone.set(f"{name}.example.test", "A", ["192.0.2.3"])
    resolver, _clock = resolver_with_clock(zone)
    resolver.cache = DnsCache(2, clock=_clock)
    a_record(resolver, "a.example.test")
    a_record(resolver, "b.example.test")
    a_record(resolver, "a.example.test")  # a is now the most recent
    a_record(resolver, "c.example.test")  # b goes
    assert zone.queries == 3
    a_record(resolver, "a.example.test")
    assert zone.queries == 3
    a_record(resolver, "b.example.test")
    assert zone.queries == 4
    assert len(resolver.cache) == 2


def test_each_resolver_setting_has_its_own_cache(zone: ZoneServer) -> None:
    with ZoneServer({("host.example.test", "A"): ["192.0.2.99"]}, ttl=60) as other:
        assert a_record(make_resolver(zone.address)) == ["192.0.2.1"]
        assert a_record(make_resolver(other.address)) == ["192.0.2.99"]
        assert a_record(make_resolver(zone.address)) == ["192.0.2.1"]
        assert (zone.queries, other.queries) == (1, 1)
    # The diagnostics a person runs after changing their DNS ask afresh.
    a_record(make_resolver(zone.address, cached=False))
    assert zone.queries == 2


def test_the_queue_mx_lookups_use_the_cache(zone: ZoneServer) -> None:
    zone.set("dest.example.test", "MX", ["10 host.example.test."])

    async def twice() -> None:
        for _ in range(2):
            hops = await delivery_hops(make_async_resolver(zone.address), "dest.example.test")
            assert [h.address for h in hops] == ["192.0.2.1"]

    asyncio.run(twice())
    assert zone.queries == 3  # MX, A, AAAA once


# --- the inbound checks through the MX ------------------------------------------------------------------

def send(box: BoxHandle, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        client.ehlo("mta.sender.test")
        client.mail("bounce@sender.test")
        assert client.rcpt(ALICE)[0] == 250
        data = (f"From: news@sender.test\r\nTo: {ALICE}\r\nSubject: {n}\r\n"
                f"Message-ID: <m{n}@sender.test>\r\n\r\nHello.\r\n").encode()
        assert client.data(data)[0] == 250


def test_inbound_checks_repeat_no_lookup_and_follow_a_setting_change(box: BoxHandle, zone: ZoneServer) -> None:
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    zone.set("mta.sender.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    zone.set("_dmarc.sender.test", "TXT", ['"v=DMARC1; p=none"'])
    box.add_user(ALICE, PASSWORD)
    box.run(box.services.db.set_setting("dns_resolver", zone.address))
    box.run(box.services.db.set_setting("inbound_auth", "on"))
    send(box, 1)
    first = zone.queries
    assert first > 0
    send(box, 2)
    send(box, 3)
    assert zone.queries == first  # SPF (MAIL FROM and HELO) and DMARC all from the cache
    spf = ['"v=spf1 ip4:127.0.0.1 -all"']
    with ZoneServer({("sender.test", "TXT"): spf, ("mta.sender.test", "TXT"): list(spf)}, ttl=60) as other:
        box.run(box.services.db.set_setting("dns_resolver", other.address))
        send(box, 4)
        assert other.queries > 0  # the new server is asked at once
    assert zone.queries == first
