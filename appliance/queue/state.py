"""The queue's state in the db: which recipients are due, what each attempt did, when a message is done.

Rows (written by spool.py, updated only here): one `queue_messages` row per spooled file, one
`queue_recipients` row per recipient with `state` queued -> delivered | failed. A message is removed
(rows, then file) when no recipient is queued and every failure has been reported to the sender.
A failure report is recorded with its sending (`dsn_sent`, in the transaction that spools it, or
after a local copy whose Message-ID was committed first as `report_id`), so a crash never makes two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.db import Database
from appliance.queue.client import Outcome
from appliance.queue.retry import RetryPolicy

if TYPE_CHECKING:
    import aiosqlite

QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"


@dataclass(frozen=True)
class JobRecipient:
    row_id: int
    address: str
    attempts: int
    delay_notified: bool


@dataclass(frozen=True)
class Job:
    """The due recipients of one message at one destination domain: one SMTP transaction."""

    message_id: str
    domain: str
    sender: str
    created_at: int
    auth_user: str | None
    recipients: tuple[JobRecipient, ...]
    sender_verified: bool | None = None  # the MX's verdict on the sender; False: never report to it

    @property
    def key(self) -> tuple[str, str]:
        return (self.message_id, self.domain)


@dataclass(frozen=True)
class Reportable:
    """A recipient the sender must hear about (failed, or delayed)."""

    address: str
    status: str
    diagnostic: str
    remote: str
    last_attempt: int
    report_id: str | None = None  # the Message-ID of a report to a local mailbox already under way
    report_started: int = 0
    # A failure: when its report may be tried (a report a local mailbox refused waits: report_deferred).
    next_attempt: int = 0


@dataclass(frozen=True)
class Recorded:
    """What an attempt changed that needs telling: delay notices, and whether the message is done."""

    delayed: tuple[Reportable, ...]
    needs_settling: bool  # failures to report, or nothing left queued


@dataclass(frozen=True)
class Settlement:
    message_id: str
    sender: str
    created_at: int
    failed: tuple[Reportable, ...]  # not yet reported
    finished: bool  # nothing left queued
    sender_verified: bool | None = None


def spool_file(spool_dir: Path, message_id: str) -> Path:
    return spool_dir / f"{message_id}.eml"


def _reportable(row: sqlite3.Row) -> Reportable:
    return Reportable(
        address=str(row["recipient"]), status=str(row["status"]) or "5.0.0", diagnostic=str(row["last_error"]),
        remote=str(row["remote"]), last_attempt=int(row["last_attempt"]),
        report_id=None if row["report_id"] is None else str(row["report_id"]),
        report_started=int(row["report_started"]), next_attempt=int(row["next_attempt"]),
    )


def _verified(value: object) -> bool | None:
    return None if value is None else bool(value)


class QueueState:
    def __init__(self, db: Database, spool_dir: Path) -> None:
        self._db = db
        self._spool_dir = spool_dir

    async def due(self, now: int, limit: int, skip: set[tuple[str, str]]) -> list[Job]:
        """Due recipients grouped per (message, domain), oldest first, leaving out jobs in `skip`."""
        rows = await self._db.fetchall(
            "SELECT r.id, r.message_id, r.recipient, r.domain, r.attempts, r.delay_notified,"
            " m.sender, m.created_at, m.auth_user, m.sender_verified"
            " FROM queue_recipients r JOIN queue_messages m ON m.id = r.message_id"
            " WHERE r.state = 'queued' AND r.next_attempt <= ?"
            " ORDER BY r.next_attempt, r.id LIMIT ?",
            (now, limit),
        )
        jobs: dict[tuple[str, str], list[sqlite3.Row]] = {}
        for row in rows:
            key = (str(row["message_id"]), str(row["domain"]))
            if key not in skip:
                jobs.setdefault(key, []).append(row)
        return [
            Job(
                message_id=key[0],
                domain=key[1],
                sender=str(group[0]["sender"]),
                created_at=int(group[0]["created_at"]),
                auth_user=None if group[0]["auth_user"] is None else str(group[0]["auth_user"]),
                recipients=tuple(
                    JobRecipient(int(r["id"]), str(r["recipient"]), int(r["attempts"]), bool(r["delay_notified"]))
                    for r in group
                ),
                sender_verified=_verified(group[0]["sender_verified"]),
            )
            for key, group in jobs.items()
        ]

    async def next_due(self, after: int) -> int | None:
        """The next time after `after` something falls due (what is due already is in hand or waits
        for a free session, whose end wakes the scheduler)."""
        row = await self._db.fetchone(
            "SELECT MIN(next_attempt) AS t FROM queue_recipients WHERE state = 'queued' AND next_attempt > ?",
            (after,),
        )
        return None if row is None or row["t"] is None else int(row["t"])

    async def record(
        self,
        job: Job,
        outcomes: Mapping[str, Outcome],
        *,
        policy: RetryPolicy,
        now: int,
        tls: str = "",
    ) -> Recorded:
        """Store one attempt's outcome for each recipient of `job`, in one transaction. A message with
        nothing left queued and nothing to report is removed right here (rows now, file after)."""
        delayed: list[Reportable] = []
        expired = policy.expired(job.created_at, now)
        finished = False
        needs_settling = False
        async with self._db.transaction() as tx:
            for rcpt in job.recipients:
                outcome = outcomes.get(rcpt.address)
                if outcome is None:
                    continue  # not attempted after all (the queue is stopping): stays due, untouched
                attempts = rcpt.attempts + 1
                if outcome.delivered:
                    state, next_attempt, text = DELIVERED, now, outcome.text
                elif outcome.permanent:
                    state, next_attempt, text = FAILED, now, outcome.text
                    needs_settling = True
                elif expired:
                    # RFC 5321 4.5.4.1: give up; the sender learns the last reason we had.
                    state, next_attempt = FAILED, now
                    days = policy.max_age / 86400
                    text = f"{outcome.text} (gave up after {days:g} days)" if days >= 1 else \
                        f"{outcome.text} (gave up after {policy.max_age:g} seconds)"
                    needs_settling = True
                else:
                    state, text = QUEUED, outcome.text
                    next_attempt = int(policy.next_attempt(job.created_at, attempts, now))
                    if (job.sender and job.sender_verified is not False and not rcpt.delay_notified
                            and policy.wants_delay_notice(job.created_at, now)):
                        delayed.append(Reportable(rcpt.address, outcome.status, outcome.text, outcome.remote, now))
                await tx.execute(
                    "UPDATE queue_recipients SET state = ?, attempts = ?, next_attempt = ?, last_error = ?,"
                    " status = ?, remote = ?, tls = ?, last_attempt = ?, updated_at = ?,"
                    " delay_notified = delay_notified OR ? WHERE id = ?",
                    (state, attempts, next_attempt, text, outcome.status, outcome.remote,
                     tls if outcome.remote else "", now, now,
                     int(any(d.address == rcpt.address for d in delayed)), rcpt.row_id),
                )
            if not needs_settling:
                cur = await tx.execute(
                    "SELECT COUNT(*) FROM queue_recipients WHERE message_id = ?"
                    " AND (state = 'queued' OR (state = 'failed' AND dsn_sent = 0))",
                    (job.message_id,),
                )
                row = await cur.fetchone()
                if row is not None and int(row[0]) == 0:
                    await tx.execute("DELETE FROM queue_messages WHERE id = ?", (job.message_id,))
                    finished = True
        if finished:
            await self.remove_file(job.message_id)
        return Recorded(tuple(delayed), needs_settling)

    async def settlement(self, message_id: str) -> Settlement | None:
        """Failures not yet reported, and whether the message is finished; None if it is gone."""
        message = await self._db.fetchone(
            "SELECT sender, created_at, sender_verified FROM queue_messages WHERE id = ?", (message_id,)
        )
        if message is None:
            return None
        rows = await self._db.fetchall(
            "SELECT recipient, state, status, last_error, remote, last_attempt, dsn_sent, report_id,"
            " report_started, next_attempt FROM queue_recipients WHERE message_id = ? ORDER BY id",
            (message_id,),
        )
        failed = tuple(_reportable(r) for r in rows if r["state"] == FAILED and not r["dsn_sent"])
        finished = not any(r["state"] == QUEUED for r in rows)
        return Settlement(message_id, str(message["sender"]), int(message["created_at"]), failed, finished,
                          _verified(message["sender_verified"]))

    async def report_started(self, settlement: Settlement, report_id: str, now: int) -> None:
        """Commit the Message-ID of the report about to be written into a local mailbox, before it
        is written: a restart looks for that copy rather than writing another."""
        async with self._db.transaction() as tx:
            await tx.executemany(
                "UPDATE queue_recipients SET report_id = ?, report_started = ? WHERE message_id = ?"
                " AND recipient = ? AND state = 'failed' AND dsn_sent = 0",
                [(report_id, now, settlement.message_id, f.address) for f in settlement.failed],
            )

    async def report_deferred(self, settlement: Settlement, until: int) -> None:
        """The failure report about `settlement.failed` is not tried again before `until` (a local
        mailbox refused it). Kept in the db, where a flush (`letterbox queue flush`, the console's
        "Retry now"), in this process or the CLI's, makes it due again."""
        async with self._db.transaction() as tx:
            await tx.executemany(
                "UPDATE queue_recipients SET next_attempt = ? WHERE message_id = ? AND recipient = ?"
                " AND state = 'failed' AND dsn_sent = 0",
                [(until, settlement.message_id, f.address) for f in settlement.failed],
            )

    async def mark_settled(self, tx: aiosqlite.Connection, settlement: Settlement) -> bool:
        """Inside `tx`: the failures in `settlement` are reported; the message's rows go if nothing
        else is pending (judged now: another job may have finished since the snapshot). True when
        they went: the caller removes the file after the commit."""
        await tx.executemany(
            "UPDATE queue_recipients SET dsn_sent = 1 WHERE message_id = ? AND recipient = ?"
            " AND state = 'failed'",
            [(settlement.message_id, f.address) for f in settlement.failed],
        )
        cur = await tx.execute(
            "DELETE FROM queue_messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM queue_recipients"
            " WHERE message_id = ? AND (state = 'queued' OR (state = 'failed' AND dsn_sent = 0)))",
            (settlement.message_id, settlement.message_id),
        )
        return bool(cur.rowcount)

    async def settled(self, settlement: Settlement) -> None:
        """The failures in `settlement` are reported (or are never to be); remove what is done."""
        async with self._db.transaction() as tx:
            removed = await self.mark_settled(tx, settlement)
        if removed:
            await self.remove_file(settlement.message_id)

    async def unsettled(self) -> list[str]:
        """Messages with unreported failures or nothing left queued (after a crash at the wrong moment)."""
        rows = await self._db.fetchall(
            "SELECT m.id FROM queue_messages m WHERE NOT EXISTS (SELECT 1 FROM queue_recipients r"
            " WHERE r.message_id = m.id AND r.state = 'queued') OR EXISTS (SELECT 1 FROM queue_recipients r"
            " WHERE r.message_id = m.id AND r.state = 'failed' AND r.dsn_sent = 0)"
        )
        return [str(r["id"]) for r in rows]

    async def remove_file(self, message_id: str) -> None:
        await asyncio.to_thread(_unlink, spool_file(self._spool_dir, message_id))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- the CLI's operations: they work on the db alone, the running server sees them on its next pass ----

async def flush(db: Database, message_ids: Iterable[str] = (), now: int | None = None) -> int:
    """Make queued recipients due now (all, or those of `message_ids`), and the failure reports a local
    mailbox refused (SenderReports._refused), as Postfix's `postqueue -f` does for every deferred
    message, bounces included; returns how many recipients are due now."""
    now = int(time.time()) if now is None else now
    ids = list(message_ids)
    # Queued recipients, and failures whose report waits (a later next_attempt than now).
    due = "(state = 'queued' OR (state = 'failed' AND dsn_sent = 0 AND next_attempt > :now))"
    async with db.transaction() as tx:
        if ids:
            marks = ",".join(f":id{n}" for n in range(len(ids)))
            cur = await tx.execute(
                f"UPDATE queue_recipients SET next_attempt = :now WHERE {due} AND message_id IN ({marks})",  # noqa: S608  only named placeholders are interpolated
                {"now": now, **{f"id{n}": message_id for n, message_id in enumerate(ids)}},
            )
        else:
            cur = await tx.execute(f"UPDATE queue_recipients SET next_attempt = :now WHERE {due}", {"now": now})  # noqa: S608  a constant
        return int(cur.rowcount or 0)


async def missing(db: Database, message_ids: Sequence[str]) -> list[str]:
    """The ids of `message_ids` that are not in the queue."""
    found = set()
    for message_id in message_ids:
        if await db.fetchone("SELECT 1 FROM queue_messages WHERE id = ?", (message_id,)):
            found.add(message_id)
    return [m for m in message_ids if m not in found]


async def delete(db: Database, spool_dir: Path, message_ids: Sequence[str]) -> list[str]:
    """Remove messages from the queue without telling anyone (the admin's decision); returns the ids
    that existed. Rows go first: a crash in between leaves only a file, which start-up cleans."""
    found: list[str] = []
    async with db.transaction() as tx:
        for message_id in message_ids:
            cur = await tx.execute("DELETE FROM queue_messages WHERE id = ?", (message_id,))
            if cur.rowcount:
                found.append(message_id)
    for message_id in found:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool_file(spool_dir, message_id))
    return found
