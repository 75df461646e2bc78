"""The inbound checks from the DNS cache alone, on the event loop (issue 19): a message whose every
answer is cached is checked without a thread and with the same results as the full evaluation; one
that needs a lookup the cache lacks is never judged on a half answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest

from appliance import dkim_keys, inbound_auth
from appliance.inbound_auth import check_message, evaluate, evaluate_from_cache
from appliance.queue import dkim_sign
from appliance.queue.resolver import make_resolver
from tests.support.dns_server import ZoneServer

SENDER = "bounce@sender.test"
HELO = "mta.sender.test"


def message(author: str = "news@sender.test") -> bytes:
    return (f"From: Sender <{author}>\r\nTo: alice@ourdomain.test\r\nSubject: hi\r\n"
            "Message-ID: <m1@sender.test>\r\n\r\nHello.\r\n").encode()


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = ZoneServer(ttl=3600, negative_ttl=900)  # answers the box's cache keeps
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim_keys.DkimKey:
    return dkim_keys.generate_key(tmp_path_factory.mktemp("dkim"), "sender.test", "s1")


def threads_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions check_message hands to a thread."""
    used: list[str] = []
    real = asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        used.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return used


def check(zone: ZoneServer, data: bytes, sender: str = SENDER) -> inbound_auth.AuthResults:
    resolver = make_resolver(zone.address)
    return asyncio.run(check_message(data, peer_ip="127.0.0.1", helo=HELO, mail_from=sender, resolver=resolver,
                                     rng=random.Random(0)))


def test_a_sender_seen_before_is_checked_from_the_cache_without_a_thread(
        zone: ZoneServer, key: dkim_keys.DkimKey, monkeypatch: pytest.MonkeyPatch) -> None:
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    zone.set(HELO, "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    zone.set("_dmarc.sender.test", "TXT", ['"v=DMARC1; p=reject"'])
    zone.set(key.record_name, "TXT", [" ".join(f'"{part}"' for part in _chunks(key.txt_record()))])
    signed = dkim_sign.sign(message(), key)
    used = threads_used(monkeypatch)

    first = check(zone, signed)
    assert used == ["evaluate"]  # nothing cached yet: the lookups run on a thread
    asked = zone.queries
    assert asked > 0
    second = check(zone, signed)
    assert used == ["evaluate"]  # the second message: no thread, no query
    assert zone.queries == asked
    assert second == first
    assert (first.spf_mailfrom.result, first.spf_helo.result, first.dmarc.result) == ("pass", "pass", "pass")
    assert [d.result for d in first.dkim] == ["pass"]
    # A tampered body fails the same way from the cache as it would on a thread.
    tampered = signed.replace(b"Hello.", b"Hellp.")
    from_cache = check(zone, tampered)
    assert used == ["evaluate"]
    assert from_cache.dkim[0].result == "fail"
    assert from_cache == evaluate(make_resolver(zone.address), tampered, peer_ip="127.0.0.1", helo=HELO,
                                  mail_from=SENDER, rng=random.Random(0))


def test_a_lookup_the_cache_lacks_sends_the_whole_check_to_a_thread(
        zone: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> None:
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    zone.set("_dmarc.sender.test", "TXT", ['"v=DMARC1; p=reject"'])
    check(zone, message())  # SPF and DMARC of sender.test now cached (and the HELO's NXDOMAIN)
    used = threads_used(monkeypatch)
    # Another author domain: its DMARC record is not cached. A half answer (a temperror from the
    # missing lookup) must not be the verdict: the real lookup finds p=reject and a failure.
    zone.set("_dmarc.other.test", "TXT", ['"v=DMARC1; p=reject"'])
    resolver = make_resolver(zone.address)
    assert evaluate_from_cache(resolver, message("x@other.test"), peer_ip="127.0.0.1", helo=HELO,
                               mail_from=SENDER) is None
    results = check(zone, message("x@other.test"))
    assert used == ["evaluate"]
    assert (results.dmarc.result, results.dmarc.disposition) == ("fail", "reject")


def test_a_large_message_is_hashed_on_a_thread_even_when_cached(
        zone: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> None:
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    check(zone, message())
    used = threads_used(monkeypatch)
    big = message() + (b"x" * 76 + b"\r\n") * (inbound_auth.INLINE_MAX_OCTETS // 78 + 1)
    assert check(zone, big).spf_mailfrom.result == "pass"
    assert used == ["evaluate"]


def _chunks(value: str) -> list[str]:
    return [value[i:i + 255] for i in range(0, len(value), 255)]
