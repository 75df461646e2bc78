"""DNS blocklists (RFC 5782): is the client's address, or the envelope sender's domain, listed?

An IPv4 address is asked as its reversed octets under the list (192.0.2.99 on zen.spamhaus.org:
`99.2.0.192.zen.spamhaus.org`), an IPv6 address as its 32 reversed nibbles (RFC 5782 2.4), a domain
as itself under the list (`example.net.dbl.spamhaus.org`, RFC 5782 3). An A record in 127.0.0.0/8
means "listed"; NXDOMAIN means not listed.

Not every answer is a listing. Spamhaus answers 127.255.255.0/24 when it refuses the query itself
(.254: asked through a public resolver such as 8.8.8.8 or 1.1.1.1, .255: too many queries, .252: a
typing error in the list name), DBL answers 127.0.1.255 to a query it cannot take, and 127.0.0.1 is
never a listing (RFC 5782 5: it must not be listed; lists use it for errors). An answer outside
127.0.0.0/8 comes from a resolver that rewrites NXDOMAIN (an ISP's "search page"). None of these
refuses mail: the list is marked `refused` for the status page ("this list can't be used with this
resolver"), which is what a box behind a public resolver needs to hear.

A DNS failure (timeout, SERVFAIL, no server) never refuses mail either: the check counts as "not
listed", the list is marked `failing`, and the message goes on to greylisting and the content
filter. Deferring instead would hold all inbound mail hostage to one list's availability, and
Spamhaus's own advice is to fail open.

Lookups go through the box's resolver (the `dns_resolver` setting, else the system's) with the shared
answer cache (queue/resolver.py, queue/dns_cache.py) and a short time budget (LOOKUP_LIFETIME).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.resolver

from appliance.db import Database
from appliance.queue.resolver import make_async_resolver

log = logging.getLogger("letterbox.spam")

LOOKUP_TIMEOUT = 2.0  # seconds for one server to answer
LOOKUP_LIFETIME = 4.0  # seconds for one list's answer, retries included

ListState = Literal["ok", "refused", "failing"]
OK: ListState = "ok"
REFUSED: ListState = "refused"
FAILING: ListState = "failing"

# RFC 5782 5: every IP list must list 127.0.0.2 and every domain list the name "test", for testing.
TEST_IP = "127.0.0.2"
TEST_DOMAIN = "test"

_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_SPAMHAUS_ERRORS = ipaddress.ip_network("127.255.255.0/24")
_ERROR_CODES = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.1.255")})

ERROR_TEXT = {
    "127.255.255.252": "the list name has a typing error",
    "127.255.255.254": "the list refuses queries through a public resolver (use the box's own resolver)",
    "127.255.255.255": "the list refuses this resolver: too many queries",
    "127.0.1.255": "the list cannot answer this kind of query",
    "127.0.0.1": "the list answered with an error code (127.0.0.1)",
}


def ip_query_name(ip: str, zone: str) -> str:
    """RFC 5782 2.1/2.4: reversed octets (IPv4) or nibbles (IPv6) under the list's zone."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:192.0.2.1 is asked as 192.0.2.1
    if isinstance(address, ipaddress.IPv4Address):
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone.strip(".")


def domain_query_name(domain: str, zone: str) -> str:
    """RFC 5782 3: the domain itself under the list's zone."""
    return domain.strip(".").lower() + "." + zone.strip(".")


@dataclass(frozen=True)
class Answer:
    """What one list said about one name."""

    zone: str
    listed: bool
    state: ListState  # the list's usability as this answer showed it
    codes: tuple[str, ...] = ()  # the A records (listing codes, or the error codes)
    detail: str = ""  # why the list is refused or failing; the TXT reason is not fetched

    @property
    def reply_text(self) -> str:
        return f"listed on {self.zone}" + (f" ({', '.join(self.codes)})" if self.codes else "")


def classify(zone: str, codes: Sequence[str]) -> Answer:
    """An answer's A records -> listed / refused (pure)."""
    listing: list[str] = []
    errors: list[str] = []
    for code in codes:
        try:
            address = ipaddress.ip_address(code)
        except ValueError:
            errors.append(code)
            continue
        if address in _SPAMHAUS_ERRORS or address in _ERROR_CODES or address not in _LOOPBACK_NET:
            errors.append(code)
        else:
            listing.append(code)
    if listing:
        return Answer(zone, listed=True, state=OK, codes=tuple(listing))
    if errors:
        first = errors[0]
        if first in ERROR_TEXT:
            detail = ERROR_TEXT[first]
        elif _in_loopback(first):
            detail = f"the list answered an error code ({first})"
        else:
            detail = f"the answer {first} is not a list's (the resolver seems to rewrite answers)"
        return Answer(zone, listed=False, state=REFUSED, codes=tuple(errors), detail=detail)
    return Answer(zone, listed=False, state=OK)


def _in_loopback(code: str) -> bool:
    try:
        return ipaddress.ip_address(code) in _LOOPBACK_NET
    except ValueError:
        return False


async def ask(resolver: dns.asyncresolver.Resolver, zone: str, name: str, lifetime: float = LOOKUP_LIFETIME) -> Answer:
    """One list, one name. Never raises: a failure is a FAILING answer that lists nothing."""
    try:
        answer = await resolver.resolve(name, "A", lifetime=lifetime, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return Answer(zone, listed=False, state=OK)
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoAnswer) as exc:
        return Answer(zone, listed=False, state=FAILING, detail=f"no answer: {type(exc).__name__}")
    except dns.exception.DNSException as exc:
        return Answer(zone, listed=False, state=FAILING, detail=f"DNS error: {exc}"[:200])
    codes = [rdata.address for rdata in answer.rrset or ()]
    return classify(zone, codes)


class ListStatus:
    """The last known state of each list, kept in `spam_list_status` for the status page. Written only
    when a list's state changes (not once per connection), so it costs nothing in steady state."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._known: dict[str, tuple[ListState, str]] = {}
        self._lock = asyncio.Lock()

    async def note(self, answer: Answer) -> None:
        current = (answer.state, answer.detail)
        if self._known.get(answer.zone) == current:
            return
        async with self._lock:
            if self._known.get(answer.zone) == current:
                return
            self._known[answer.zone] = current
            if answer.state != OK:
                log.warning("DNS list %s: %s (%s)", answer.zone, answer.state, answer.detail)
            try:
                await self._db.execute(
                    "INSERT INTO spam_list_status (list, state, detail, checked_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(list) DO UPDATE SET state = excluded.state, detail = excluded.detail,"
                    " checked_at = excluded.checked_at",
                    (answer.zone, answer.state, answer.detail, int(self._clock())))
            except Exception:
                log.exception("could not record the state of the list %s", answer.zone)


@dataclass(frozen=True)
class ListReport:
    """One list as the status page shows it."""

    zone: str
    kind: Literal["ip", "domain"]
    state: ListState | Literal["unknown"]
    detail: str
    checked_at: int | None


async def list_reports(db: Database, ip_lists: Sequence[str], domain_lists: Sequence[str]) -> list[ListReport]:
    """Each configured list with its last known state ('unknown' until it was first asked)."""
    rows = {str(r["list"]): r for r in await db.fetchall("SELECT list, state, detail, checked_at FROM spam_list_status")}
    reports: list[ListReport] = []
    for kind, zones in (("ip", ip_lists), ("domain", domain_lists)):
        for zone in zones:
            row = rows.get(zone)
            reports.append(ListReport(zone, kind,  # type: ignore[arg-type]  # one of the two literals
                                      row["state"] if row else "unknown", str(row["detail"]) if row else "",
                                      int(row["checked_at"]) if row else None))
    return reports


class Blocklists:
    """The box's DNS list checks: one per box (shared by every MX connection)."""

    def __init__(self, status: ListStatus, resolver_setting: Callable[[], str | None]) -> None:
        self.status = status
        self._resolver_setting = resolver_setting
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._resolver_key: tuple[str | None, float] | None = None
        self.lookup_lifetime = LOOKUP_LIFETIME  # seconds one list may take (tests shorten it)

    def _current_resolver(self) -> dns.asyncresolver.Resolver:
        setting = self._resolver_setting()
        if self._resolver is None or (setting, self.lookup_lifetime) != self._resolver_key:
            resolver = make_async_resolver(setting)
            resolver.timeout = min(LOOKUP_TIMEOUT, self.lookup_lifetime)
            resolver.lifetime = self.lookup_lifetime
            self._resolver, self._resolver_key = resolver, (setting, self.lookup_lifetime)
        return self._resolver

    async def _first_listing(self, names: Sequence[tuple[str, str]]) -> Answer | None:
        if not names:
            return None
        resolver = self._current_resolver()
        answers = await asyncio.gather(*(ask(resolver, zone, name, self.lookup_lifetime) for zone, name in names))
        for answer in answers:
            await self.status.note(answer)
        return next((a for a in answers if a.listed), None)

    async def client_listing(self, ip: str, zones: Sequence[str]) -> Answer | None:
        """The first list (in the setting's order) that lists the client's address; None when none
        does, or when the address cannot be asked (not an IP address)."""
        try:
            names = [(zone, ip_query_name(ip, zone)) for zone in zones]
        except ValueError:
            return None
        return await self._first_listing(names)

    async def domain_listing(self, domain: str, zones: Sequence[str]) -> Answer | None:
        """The first domain list that lists the sender's domain (None for the null sender or an
        address literal)."""
        domain = domain.strip().strip(".").lower()
        if not domain or domain.startswith("[") or "." not in domain:
            return None
        try:
            ipaddress.ip_address(domain)
            return None  # an IP address is not asked on a domain list (DBL answers 127.0.1.255)
        except ValueError:
            pass
        return await self._first_listing([(zone, domain_query_name(domain, zone)) for zone in zones])

    async def probe(self, ip_zones: Sequence[str], domain_zones: Sequence[str]) -> list[Answer]:
        """Ask each list for its RFC 5782 test entry: does it answer this box's resolver at all?
        (The status checklist; the answers update each list's state like real lookups.)"""
        names = [(zone, ip_query_name(TEST_IP, zone)) for zone in ip_zones]
        names += [(zone, domain_query_name(TEST_DOMAIN, zone)) for zone in domain_zones]
        resolver = self._current_resolver()
        answers = list(await asyncio.gather(*(ask(resolver, zone, name, self.lookup_lifetime) for zone, name in names)))
        for answer in answers:
            await self.status.note(answer)
        return answers
