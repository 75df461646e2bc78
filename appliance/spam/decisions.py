"""The log of spam decisions: who was accepted, junked, deferred or refused, by which layer and why.

One `DecisionLog` per box (`Services.spam_decisions`). Every layer calls `record(Decision(...))` for
each decision it makes; the console's Spam page and `letterbox spam status` read `recent()` and
`counts()`.

    services.spam_decisions.record(Decision(
        layer=RSPAMD, verdict=JUNK, reason="BAYES_SPAM, MISSING_DATE", score=7.3,
        client_ip="192.0.2.7", helo="mx.example.net", sender="a@example.net",
        recipients=("alice@example.org",), queue_id="1KzQ...",
    ))

Cost on the SMTP path: `record` is synchronous and never touches the database. Rows wait in memory
and are written in one transaction `FLUSH_DELAY` seconds after the first of them (or at once when
`FLUSH_BATCH` are waiting), so a burst of rejected connections costs one commit (one WAL fsync under
`synchronous=FULL`) per couple of seconds, not one per command. A crash loses at most those few
seconds of log, never mail: decisions are a record, not state anything depends on. At most
`MAX_PENDING` rows wait (a flood cannot grow memory); beyond that the oldest are dropped and counted.
`recent()` and `counts()` flush first, so a reader sees every decision made before the call.

Rows older than the `decisions_keep_days` setting (SpamSettings) are deleted, at most once an hour,
by a flush. Texts are cut to bounded lengths: the client chooses its HELO and envelope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from appliance.batched_log import BatchedLog, cut
from appliance.db import Database

log = logging.getLogger("letterbox.spam")

# The layers (the `layer` column). A new layer may use its own short name; these are the known ones.
DNSBL = "dnsbl"  # the client's IP address on a DNS blocklist (zen.spamhaus.org)
DBL = "dbl"  # the envelope sender's domain on a domain blocklist (dbl.spamhaus.org)
EARLY_TALKER = "early-talker"  # the client spoke before the greeting
GREYLIST = "greylist"  # first attempt of a triplet deferred, or a retry let through
RSPAMD = "rspamd"  # the content filter's score at DATA
OUTBOUND_LIMIT = "outbound-limit"  # a user over their hourly messages or recipients
OUTBOUND_SUSPENDED = "outbound-suspended"  # a user whose sending is suspended

Verdict = Literal["accept", "junk", "defer", "reject"]
ACCEPT: Verdict = "accept"  # let through (worth logging for greylist passes and content scores)
JUNK: Verdict = "junk"  # accepted into the recipient's Junk folder
DEFER: Verdict = "defer"  # 4xx: the client is to try again later
REJECT: Verdict = "reject"  # 5xx

FLUSH_DELAY = 2.0  # seconds a decision may wait before its batch is written
FLUSH_BATCH = 200  # this many waiting decisions are written at once
MAX_PENDING = 5000
MAX_TEXT = 500  # reason
MAX_FIELD = 320  # client ip, helo, sender, each recipient, queue id
MAX_RECIPIENTS = 50  # recipients kept per decision (the count beyond is noted)


@dataclass(frozen=True)
class Decision:
    """One decision. `at` (Unix seconds) is stamped by `record` when left at 0."""

    layer: str
    verdict: Verdict
    reason: str = ""
    client_ip: str = ""
    helo: str = ""
    sender: str = ""  # the envelope sender ('' for the null sender or when refused before MAIL)
    recipients: tuple[str, ...] = ()
    score: float | None = None  # the content filter's score; None for layers without one
    queue_id: str | None = None  # the Received: id or the outbound queue's id, when known
    at: float = 0.0


def _cut(text: str, limit: int = MAX_FIELD) -> str:
    return cut(text, limit)


def _row(d: Decision) -> tuple[object, ...]:
    recipients = [_cut(r) for r in d.recipients[:MAX_RECIPIENTS]]
    if len(d.recipients) > MAX_RECIPIENTS:
        recipients.append(f"(+{len(d.recipients) - MAX_RECIPIENTS} more)")
    return (int(d.at), _cut(d.client_ip), _cut(d.helo), _cut(d.sender), "\n".join(recipients), _cut(d.layer, 40),
            d.verdict, _cut(d.reason, MAX_TEXT), d.score, _cut(d.queue_id) if d.queue_id else None)


_INSERT = ("INSERT INTO spam_decisions (at, client_ip, helo, sender, recipients, layer, verdict, reason, score,"
           " queue_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class DecisionLog:
    """The batched writer (appliance/batched_log.py) and the reader of `spam_decisions`."""

    def __init__(self, db: Database, *, keep_days: Callable[[], int] = lambda: 30,
                 clock: Callable[[], float] = time.time, flush_delay: float = FLUSH_DELAY) -> None:
        self._db = db
        self._rows: BatchedLog[Decision] = BatchedLog(
            db, "spam_decisions", _INSERT, _row, keep_days=keep_days, clock=clock, flush_delay=flush_delay,
            batch=FLUSH_BATCH, max_pending=MAX_PENDING)

    @property
    def dropped(self) -> int:
        """Decisions dropped because MAX_PENDING were waiting."""
        return self._rows.dropped

    # --- writing ----------------------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """Remember one decision; written within FLUSH_DELAY seconds. Never blocks, never raises."""
        if decision.at <= 0:
            decision = replace(decision, at=self._rows.clock())
        log.debug("%s %s %s: %s", decision.layer, decision.verdict, decision.client_ip, decision.reason)
        self._rows.record(decision)

    async def flush(self) -> int:
        """Write every waiting decision in one transaction (and prune when due); returns how many."""
        return await self._rows.flush()

    async def prune(self) -> int:
        """Delete the rows older than the setting now; returns how many."""
        return await self._rows.prune()

    async def close(self) -> None:
        """Write what waits and stop scheduling (the box is stopping; the db closes next)."""
        await self._rows.close()

    async def _settle(self) -> None:
        await self._rows.settle()

    # --- reading ----------------------------------------------------------------------------------------

    async def recent(self, limit: int = 100, *, layer: str | None = None, verdict: str | None = None,
                     client_ip: str | None = None, since: float | None = None) -> list[Decision]:
        """The newest decisions first, optionally only one layer's, one verdict's, one client's, or
        those since a time (Unix seconds)."""
        await self._settle()
        where, params = _filters(layer=layer, verdict=verdict, client_ip=client_ip, since=since)
        columns = "at, client_ip, helo, sender, recipients, layer, verdict, reason, score, queue_id"
        sql = f"SELECT {columns} FROM spam_decisions{where} ORDER BY id DESC LIMIT ?"  # noqa: S608  fixed clauses, values bound
        rows = await self._db.fetchall(sql, (*params, max(0, min(limit, 10_000))))
        return [Decision(layer=str(r["layer"]), verdict=r["verdict"], reason=str(r["reason"]),
                         client_ip=str(r["client_ip"]), helo=str(r["helo"]), sender=str(r["sender"]),
                         recipients=tuple(x for x in str(r["recipients"]).split("\n") if x),
                         score=None if r["score"] is None else float(r["score"]),
                         queue_id=None if r["queue_id"] is None else str(r["queue_id"]), at=float(r["at"]))
                for r in rows]

    async def counts(self, since: float | None = None) -> dict[tuple[str, str], int]:
        """(layer, verdict) -> how many decisions, since a time or all that are kept."""
        await self._settle()
        where, params = _filters(since=since)
        rows = await self._db.fetchall(
            f"SELECT layer, verdict, COUNT(*) AS n FROM spam_decisions{where} GROUP BY layer, verdict", params)  # noqa: S608  fixed clauses, values bound
        return {(str(r["layer"]), str(r["verdict"])): int(r["n"]) for r in rows}


def _filters(*, layer: str | None = None, verdict: str | None = None, client_ip: str | None = None,
             since: float | None = None) -> tuple[str, tuple[object, ...]]:
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("layer", layer), ("verdict", verdict), ("client_ip", client_ip)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("at >= ?")
        params.append(int(since))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)
