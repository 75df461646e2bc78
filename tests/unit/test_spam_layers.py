"""The pure parts of the connection-time spam layers (issue 16): DNS list query names and answer
classes (RFC 5782), greylist networks and the greylist's life cycle on a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.spam.dnsbl import FAILING, OK, REFUSED, classify, domain_query_name, ip_query_name
from appliance.spam.greylist import DAY, EARLY, KNOWN, NEW, PASSED, RETRY_WINDOW, Greylist, client_network


def test_query_names_reverse_octets_and_nibbles() -> None:
    assert ip_query_name("192.0.2.99", "zen.spamhaus.org") == "99.2.0.192.zen.spamhaus.org"
    assert ip_query_name("::ffff:192.0.2.99", "zen.spamhaus.org.") == "99.2.0.192.zen.spamhaus.org"
    # RFC 5782 2.4: 2001:db8:1:2:3:4:567:89ab -> b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2
    assert ip_query_name("2001:db8:1:2:3:4:567:89ab", "list.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.list.example")
    assert domain_query_name("Spam.Example.", "dbl.spamhaus.org") == "spam.example.dbl.spamhaus.org"
    with pytest.raises(ValueError):
        ip_query_name("not-an-ip", "zen.spamhaus.org")


@pytest.mark.parametrize(("codes", "listed", "state"), [
    ((), False, OK),
    (("127.0.0.2",), True, OK),
    (("127.0.0.4", "127.0.0.10"), True, OK),
    (("127.0.1.2",), True, OK),
    (("127.255.255.254",), False, REFUSED),  # asked through a public resolver
    (("127.255.255.255",), False, REFUSED),  # too many queries
    (("127.255.255.252",), False, REFUSED),  # typing error in the list name
    (("127.0.1.255",), False, REFUSED),  # DBL: a query it cannot take
    (("127.0.0.1",), False, REFUSED),  # never a listing (RFC 5782 5)
    (("198.51.100.7",), False, REFUSED),  # a resolver rewriting NXDOMAIN
])
def test_answer_classes(codes: tuple[str, ...], listed: bool, state: str) -> None:
    answer = classify("zen.spamhaus.org", codes)
    assert (answer.listed, answer.state) == (listed, state)
    assert state != FAILING  # only a failed lookup is FAILING, never an answer
    if state == REFUSED:
        assert answer.detail


def test_client_networks() -> None:
    assert client_network("192.0.2.99") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.99") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:567:89ab") == "2001:db8:1:2::/64"


def test_greylist_life_cycle(tmp_path: Path) -> None:
    now = [1_000_000.0]

    async def run() -> list[str]:
        db = await Database.open(tmp_path / "db.sqlite")
        grey = Greylist(db, clock=lambda: now[0])
        seen: list[str] = []

        async def check(sender: str = "a@x.test") -> None:
            result = await grey.check("192.0.2.0/24", sender, "Bob@Example.test", delay=300, remember_days=35)
            seen.append(result.verdict)

        try:
            await check()
            now[0] += 100
            await check()
            now[0] += 200
            await check()
            now[0] += 10
            await check("A@X.TEST")  # the same triplet in other case
            now[0] += 34 * DAY
            await check()  # used within 35 days: still known, and remembered 35 days from now
            now[0] += 34 * DAY
            await check()
            now[0] += 36 * DAY
            await check()  # unused for 36 days: forgotten, a new triplet
            now[0] += RETRY_WINDOW + 1
            await check()  # never retried within the window: new again
            entries = await grey.entries()
            assert [(e.sender, e.recipient) for e in entries] == [("a@x.test", "bob@example.test")]
            return seen
        finally:
            await db.close()

    assert asyncio.run(run()) == [NEW, EARLY, PASSED, KNOWN, KNOWN, KNOWN, NEW, NEW]
