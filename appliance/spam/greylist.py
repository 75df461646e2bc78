"""Greylisting: the first attempt of an unknown (client network, sender, recipient) triplet gets a 4xx.

A real mail server queues and retries (RFC 5321 4.5.4.1); most spam software does not. The triplet is
the client's network (IPv4 /24, IPv6 /64: big senders retry from another address of the same farm),
the envelope sender and the recipient, in lower case. A retry that comes at least `greylist_delay`
seconds after the first attempt passes, and the triplet is then remembered for
`greylist_remember_days` days after its last use (35 by default), so regular correspondents are
delayed once. A triplet never retried is forgotten after RETRY_WINDOW.

Skipped (decided by appliance/spam/screen.py): logged-in users, the skip networks, and a client
that passes SPF for a sender domain that already got through greylisting before (a domain is
remembered in `greylist_spf_domains` when a retry passes with an SPF pass).

State lives in the `greylist` table (migration 0010) with its expiry; a passed triplet's `last_seen`
is refreshed at most once a day, so regular mail does not commit on every RCPT. The table is bounded:
every RCPT with a fresh sender is a new triplet, and one client flooding them wrote 264 rows a second
(each kept 2 days: gigabytes). A network holds at most MAX_WAITING_PER_NETWORK triplets not yet
retried, the table at most MAX_TRIPLETS; past either, the triplets nearest their expiry are forgotten
(a flood's own oldest first), so a client that floods mostly evicts its own rows. The SPF-known
domains are bounded the same way (MAX_SPF_DOMAINS).
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from appliance.db import Database
from appliance.every import Every

if TYPE_CHECKING:
    import aiosqlite

log = logging.getLogger("letterbox.spam")

DAY = 86400
RETRY_WINDOW = 2 * DAY  # an unretried triplet is forgotten after this (postgrey's --retry-window)
REFRESH_EVERY = DAY  # a passed triplet's last use is written at most this often
PURGE_EVERY = 3600.0
MAX_LISTED = 10_000
MAX_TRIPLETS = 100_000  # about 30 MB of database; a family's mail has a few thousand
MAX_SPF_DOMAINS = 10_000  # sender domains remembered for their SPF pass
MAX_WAITING_PER_NETWORK = 1000  # triplets of one /24 or /64 waiting for their retry
TRIM_EVERY = 1000  # new triplets between two counts of the whole table

GreylistVerdict = Literal["new", "early", "passed", "known"]
NEW: GreylistVerdict = "new"  # first attempt: deferred
EARLY: GreylistVerdict = "early"  # a retry before the delay: deferred again
PASSED: GreylistVerdict = "passed"  # the first retry after the delay: let through, now remembered
KNOWN: GreylistVerdict = "known"  # passed before: let through


def client_network(ip: str) -> str:
    """The network a triplet names: the /24 of an IPv4 address, the /64 of an IPv6 address."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if isinstance(address, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def triplet_sender(sender: str) -> str:
    return sender.strip().lower() or "<>"


@dataclass(frozen=True)
class Check:
    verdict: GreylistVerdict
    wait: int = 0  # seconds until a retry would pass (for the 4xx text); 0 once passed

    @property
    def deferred(self) -> bool:
        return self.verdict in (NEW, EARLY)


@dataclass(frozen=True)
class GreylistEntry:
    network: str
    sender: str
    recipient: str
    first_seen: int
    last_seen: int
    passed_at: int | None
    attempts: int
    expires: int


_COLUMNS = "network, sender, recipient, first_seen, last_seen, passed_at, attempts, expires"


async def _forget_beyond(tx: aiosqlite.Connection, table: str, key: str, most: int) -> None:
    """Keep `table` under `most` rows with room for the next TRIM_EVERY new ones (so it never holds
    more): the rows nearest their expiry go."""
    async with tx.execute(f"SELECT COUNT(*) FROM {table}") as cursor:  # noqa: S608  our table name
        row = await cursor.fetchone()
    count = int(row[0]) if row is not None else 0
    excess = count - most + TRIM_EVERY
    if excess > 0:
        log.warning("%s: %d rows, more than %d; forgetting the %d nearest their expiry", table, count,
                    most - TRIM_EVERY, excess)
        await tx.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}"  # noqa: S608  ours
                         " ORDER BY expires LIMIT ?)", (excess,))


def _entry(r: sqlite3.Row) -> GreylistEntry:
    return GreylistEntry(str(r["network"]), str(r["sender"]), str(r["recipient"]), int(r["first_seen"]),
                         int(r["last_seen"]), None if r["passed_at"] is None else int(r["passed_at"]),
                         int(r["attempts"]), int(r["expires"]))


class Greylist:
    """The greylist state of one box (Services.greylist)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._last_purge = 0.0
        # New rows between two counts of each table (the first new one after a start counts it).
        self.trim_triplets = Every(TRIM_EVERY)
        self.trim_spf_domains = Every(TRIM_EVERY)

    async def check(self, network: str, sender: str, recipient: str, *, delay: int, remember_days: int) -> Check:
        """Look the triplet up and record this attempt; the verdict says whether it passes."""
        key = (network, triplet_sender(sender), recipient.strip().lower())
        now = int(self._clock())
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM greylist WHERE network = ? AND sender = ?"  # noqa: S608  fixed columns
                                      " AND recipient = ?", key)
        current = _entry(row) if row is not None else None
        if current is not None and current.passed_at is not None and current.expires > now \
                and now - current.last_seen < REFRESH_EVERY:
            return Check(KNOWN)  # the common case for regular mail: no write at all
        remember = max(remember_days, 1) * DAY
        async with self._db.transaction() as tx:
            await self._purge_if_due(tx, now)
            async with tx.execute(f"SELECT {_COLUMNS} FROM greylist WHERE network = ? AND sender = ?"  # noqa: S608  fixed columns
                                  " AND recipient = ?", key) as cursor:
                row = await cursor.fetchone()
            current = _entry(row) if row is not None else None
            if current is None or current.expires <= now:
                await self._make_room(tx, network)
                await tx.execute(
                    f"INSERT OR REPLACE INTO greylist ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, 1, ?)",  # noqa: S608  fixed columns
                    (*key, now, now, now + RETRY_WINDOW))
                return Check(NEW, wait=delay)
            if current.passed_at is not None:
                await tx.execute("UPDATE greylist SET last_seen = ?, attempts = attempts + 1, expires = ?"
                                 " WHERE network = ? AND sender = ? AND recipient = ?", (now, now + remember, *key))
                return Check(KNOWN)
            waited = now - current.first_seen
            if waited < delay:
                await tx.execute("UPDATE greylist SET last_seen = ?, attempts = attempts + 1"
                                 " WHERE network = ? AND sender = ? AND recipient = ?", (now, *key))
                return Check(EARLY, wait=delay - waited)
            await tx.execute("UPDATE greylist SET last_seen = ?, passed_at = ?, attempts = attempts + 1, expires = ?"
                             " WHERE network = ? AND sender = ? AND recipient = ?", (now, now, now + remember, *key))
            return Check(PASSED)

    async def _make_room(self, tx: aiosqlite.Connection, network: str) -> None:
        """Before a new triplet: keep the network's waiting ones and the whole table within their bounds."""
        async with tx.execute("SELECT COUNT(*) FROM greylist WHERE network = ? AND passed_at IS NULL",
                              (network,)) as cursor:
            row = await cursor.fetchone()
        if row is not None and int(row[0]) >= MAX_WAITING_PER_NETWORK:
            await tx.execute(
                "DELETE FROM greylist WHERE (network, sender, recipient) IN (SELECT network, sender, recipient"
                " FROM greylist WHERE network = ? AND passed_at IS NULL ORDER BY expires LIMIT ?)",
                (network, int(row[0]) - MAX_WAITING_PER_NETWORK + 1))
        if self.trim_triplets.due():
            await _forget_beyond(tx, "greylist", "network, sender, recipient", MAX_TRIPLETS)

    async def _purge_if_due(self, tx: aiosqlite.Connection, now: int) -> None:
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        await tx.execute("DELETE FROM greylist WHERE expires <= ?", (now,))
        await tx.execute("DELETE FROM greylist_spf_domains WHERE expires <= ?", (now,))

    # --- SPF-known domains ------------------------------------------------------------------------------

    async def spf_domain_known(self, domain: str) -> bool:
        row = await self._db.fetchone("SELECT 1 FROM greylist_spf_domains WHERE domain = ? AND expires > ?",
                                      (domain.lower(), int(self._clock())))
        return row is not None

    async def remember_spf_domain(self, domain: str, *, remember_days: int) -> None:
        """Bounded as the triplets are: a domain with a wildcard SPF record names as many as it likes."""
        now = int(self._clock())
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO greylist_spf_domains (domain, passed_at, expires) VALUES (?, ?, ?)"
                " ON CONFLICT(domain) DO UPDATE SET passed_at = excluded.passed_at, expires = excluded.expires",
                (domain.lower(), now, now + max(remember_days, 1) * DAY))
            if self.trim_spf_domains.due():
                await _forget_beyond(tx, "greylist_spf_domains", "domain", MAX_SPF_DOMAINS)

    # --- what the console and the CLI see ----------------------------------------------------------------

    async def entries(self, limit: int = 1000, *, passed: bool | None = None) -> list[GreylistEntry]:
        """Live triplets, most recently seen first; `passed` filters on whether a retry got through."""
        where = "" if passed is None else " AND passed_at IS NOT NULL" if passed else " AND passed_at IS NULL"
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM greylist WHERE expires > ?{where} ORDER BY last_seen DESC LIMIT ?",  # noqa: S608  fixed clauses
            (int(self._clock()), max(0, min(limit, MAX_LISTED))))
        return [_entry(r) for r in rows]

    async def clear(self, *, network: str | None = None, sender: str | None = None,
                    recipient: str | None = None) -> int:
        """Forget the triplets matching every given part (all of them when none is given)."""
        clauses: list[str] = []
        params: list[str] = []
        for column, value in (("network", network), ("sender", sender), ("recipient", recipient)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(triplet_sender(value) if column == "sender" else value.strip().lower())
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self._db.transaction() as tx:
            cursor = await tx.execute(f"DELETE FROM greylist{where}", params)  # noqa: S608  fixed clauses, values bound
            if not clauses:
                await tx.execute("DELETE FROM greylist_spf_domains")
            return cursor.rowcount
