"""The delivery log (issue 18): every message in and out, what happened to it and why.

One row per recipient: time, direction, envelope, size, result (delivered to which folder, queued,
deferred, bounced, rejected and by which check), the client or remote server, queue id and
Message-ID. Admins search all of it; a mailbox owner sees the rows whose `owner` is their mailbox (the
local recipient of mail in, the logged-in sender of mail out), never anyone else's.

Written through appliance/batched_log.py: the SMTP path and the queue call `record`, which never
touches the database, so the log costs them no fsync of its own. Kept `delivery_log_days` (a setting);
`delivery_log` off stops the recording (the benchmark compares).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from appliance.batched_log import BatchedLog, cut
from appliance.db import Database

Direction = Literal["in", "out"]
Result = Literal["delivered", "junk", "queued", "deferred", "bounced", "rejected"]
RESULTS: tuple[Result, ...] = ("delivered", "junk", "queued", "deferred", "bounced", "rejected")
MAX_FIELD = 320
MAX_DETAIL = 500
MAX_SHOWN = 500  # rows a search returns at most
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,300}>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Delivery:
    direction: Direction
    result: Result
    sender: str  # '' for the null sender
    recipient: str
    size: int | None = None
    detail: str = ""  # the folder, the remote server's reply, or why it was refused
    check: str = ""  # which check refused or deferred it: recipient, relay, sender, spf, dmarc, size, dnsbl, ...
    client: str = ""  # the client's address (in), the remote server (out)
    queue_id: str | None = None
    message_id: str | None = None
    owner: str = ""  # the mailbox whose owner may see this row ('' : admins only)
    at: float = 0.0


def message_id_of(data: bytes) -> str | None:
    """The Message-ID from the header block (first 64 KiB), without parsing the message."""
    head = data[:65536]
    end = head.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(head if end < 0 else head[: end + 2])
    return match.group(1).decode("ascii", "replace") if match else None


def _row(d: Delivery) -> tuple[object, ...]:
    return (int(d.at), d.direction, d.result, cut(d.sender, MAX_FIELD), cut(d.recipient, MAX_FIELD), d.size,
            cut(d.detail, MAX_DETAIL), cut(d.check, 40), cut(d.client, MAX_FIELD),
            cut(d.queue_id, 100) if d.queue_id else None, cut(d.message_id, MAX_FIELD) if d.message_id else None,
            cut(d.owner.lower(), MAX_FIELD))


_INSERT = ("INSERT INTO delivery_log (at, direction, result, sender, recipient, size, detail, check_name, client,"
           " queue_id, message_id, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_COLUMNS = "at, direction, result, sender, recipient, size, detail, check_name, client, queue_id, message_id, owner"


@dataclass(frozen=True)
class Search:
    """What the log page asks: all optional; `owner` set for a mailbox owner's own view."""

    address: str = ""  # part of the sender or recipient
    result: str = ""
    since: float | None = None
    until: float | None = None
    owner: str | None = None
    text: str = ""  # part of the queue id, Message-ID or detail


class DeliveryLog:
    def __init__(self, db: Database, *, enabled: Callable[[], bool] = lambda: True,
                 keep_days: Callable[[], int] = lambda: 30, clock: Callable[[], float] = time.time,
                 flush_delay: float = 2.0) -> None:
        self._db = db
        self._enabled = enabled
        self._rows: BatchedLog[Delivery] = BatchedLog(db, "delivery_log", _INSERT, _row, keep_days=keep_days,
                                                      clock=clock, flush_delay=flush_delay)

    def record(self, entry: Delivery) -> None:
        """Never blocks, never raises: a log must not stand between a client and its reply."""
        if not self._enabled():
            return
        if entry.at <= 0:
            entry = replace(entry, at=self._rows.clock())
        self._rows.record(entry)

    async def close(self) -> None:
        await self._rows.close()

    async def settle(self) -> None:
        await self._rows.settle()

    async def search(self, query: Search, limit: int = MAX_SHOWN) -> list[Delivery]:
        """The newest first."""
        await self._rows.settle()
        clauses: list[str] = []
        params: list[object] = []
        if query.owner is not None:
            clauses.append("owner = ?")
            params.append(query.owner.lower())
        if query.address:
            clauses.append("(instr(lower(sender), ?) > 0 OR instr(lower(recipient), ?) > 0)")
            params += [query.address.lower()] * 2
        if query.text:
            clauses.append("(instr(queue_id, ?) > 0 OR instr(message_id, ?) > 0 OR instr(lower(detail), ?) > 0)")
            params += [query.text, query.text, query.text.lower()]
        if query.result in RESULTS:
            clauses.append("result = ?")
            params.append(query.result)
        if query.since is not None:
            clauses.append("at >= ?")
            params.append(int(query.since))
        if query.until is not None:
            clauses.append("at < ?")
            params.append(int(query.until))
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM delivery_log{where} ORDER BY id DESC LIMIT ?",  # noqa: S608  fixed clauses, values bound
            (*params, max(1, min(limit, MAX_SHOWN))))
        return [Delivery(direction=r["direction"], result=r["result"], sender=str(r["sender"]),
                         recipient=str(r["recipient"]), size=r["size"], detail=str(r["detail"]),
                         check=str(r["check_name"]), client=str(r["client"]), queue_id=r["queue_id"],
                         message_id=r["message_id"], owner=str(r["owner"]), at=float(r["at"])) for r in rows]

    async def per_day(self, days: int, now: float | None = None) -> list[tuple[dt.date, dict[str, int]]]:
        """For the charts: each of the last `days` days (UTC), the count per kind: 'in' (delivered to
        the inbox), 'junk', 'out' (delivered to other servers), 'rejected' (refused in or bounced out)."""
        await self._rows.settle()
        today = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC).date()
        first = today - dt.timedelta(days=days - 1)
        start = dt.datetime.combine(first, dt.time(), dt.UTC).timestamp()
        rows = await self._db.fetchall(
            "SELECT (at - ?) / 86400 AS day, direction, result, COUNT(*) AS n FROM delivery_log WHERE at >= ?"
            " GROUP BY day, direction, result", (int(start), int(start)))
        table = [(first + dt.timedelta(days=i), dict.fromkeys(("in", "junk", "out", "rejected"), 0))
                 for i in range(days)]
        for r in rows:
            day = int(r["day"])
            if not 0 <= day < days:
                continue
            kind = _kind(str(r["direction"]), str(r["result"]))
            if kind:
                table[day][1][kind] += int(r["n"])
        return table


def _kind(direction: str, result: str) -> str | None:
    if result == "junk":
        return "junk"
    if result in ("rejected", "bounced"):
        return "rejected"
    if result == "delivered":
        return "in" if direction == "in" else "out"
    return None
