"""The outbound spool: one durable file per message plus its envelope rows in the db.

The format, for the outbound side that reads it:
- `spool/<id>.eml` is the message exactly as it will be sent (CRLF line ends, our Received: on top).
- `queue_messages` has one row per file (`id` = file name without `.eml`, the envelope sender, '' for
  the null sender), `queue_recipients` one row per recipient, state 'queued', due now.
- Writing order: the file goes to `spool/.<id>.eml.tmp`, is fsynced, linked as `<id>.eml` and the
  directory fsynced; only then are the rows committed, in one transaction. So every row has its
  complete file; a crash can leave a `.tmp` file or an `.eml` without rows, and both are debris
  (`orphans()` lists them for the queue's start-up cleanup). Such a file was never acknowledged
  (the 250 comes after the commit) or is fully settled (rows go before the file), so it is judged by
  state alone, whatever its age; only the enqueues in progress in this process are spared.
- Ids sort by creation time (nanosecond clock in hex, then random), so a listing is in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.db import Database
from appliance.durable import fsync_dir, write_file
from appliance.plain_errors import queue_error

if TYPE_CHECKING:
    import aiosqlite


log = logging.getLogger("letterbox.spool")

SPOOL_SUFFIX = ".eml"
TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


def new_queue_id() -> str:
    """Unique, time-ordered, safe as a file name and in a Received: `id` clause."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}".upper()


@dataclass(frozen=True)
class QueuedRecipient:
    recipient: str
    domain: str
    state: str  # queued | delivered | failed
    attempts: int
    next_attempt: int
    last_error: str


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    sender: str  # '' is the null sender
    size: int
    created_at: int
    auth_user: str | None
    recipients: tuple[QueuedRecipient, ...]


def _write_durably(directory: Path, name: str, data: bytes) -> None:
    """tmp -> fsync -> rename -> fsync dir: after this returns the file survives a power cut."""
    final = directory / name
    tmp = directory / f"{TMP_PREFIX}{name}{TMP_SUFFIX}"
    try:
        write_file(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        os.link(tmp, final)  # unlike rename (durable.replace_file), never replaces an existing message
    finally:
        tmp.unlink()
    fsync_dir(directory)


async def already_failed(tx: aiosqlite.Connection, queue_id: str, failures: Mapping[str, tuple[str, str]],
                         report_id: str, now: int) -> None:
    """Inside enqueue's transaction: the recipients in `failures` ((status, diagnostic) each) failed
    already, and a report with Message-ID `report_id` was begun now: the queue's sweep sends it (a
    mailbox holding it is skipped) and keeps trying a mailbox that refuses it, as its own reports."""
    await tx.executemany(
        "UPDATE queue_recipients SET state = 'failed', status = ?, last_error = ?, last_attempt = ?,"
        " updated_at = ?, report_id = ?, report_started = ? WHERE message_id = ? AND recipient = ?",
        [(status, text, now, now, report_id, now, queue_id, rcpt) for rcpt, (status, text) in failures.items()],
    )


def recipient_domain(recipient: str) -> str:
    return recipient.rpartition("@")[2].lower()


class Spool:
    def __init__(self, directory: Path, db: Database) -> None:
        self.directory = directory
        self._db = db
        # Called (synchronously, after commit) with the new id: the queue worker's wake-up.
        self.on_enqueue: list[Callable[[str], None]] = []
        # Ids whose file may be on disk before their rows are: `orphans()` must not take them.
        self._writing: set[str] = set()

    def path(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}{SPOOL_SUFFIX}"

    async def enqueue(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        auth_user: str | None = None,
        queue_id: str | None = None,
        sender_verified: bool | None = None,
        also: Callable[[aiosqlite.Connection], Awaitable[None]] | None = None,
    ) -> str:
        """Durably spool one message for `recipients`; returns its id once file and rows are on disk.
        `auth_user` is the login that submitted it (it decides the DKIM key), `sender_verified` the
        MX's verdict on the envelope sender (None: not checked), and `also` runs in the transaction
        that commits the rows: whatever it records happens if and only if the message is queued."""
        if not recipients:
            raise ValueError("a spooled message needs at least one recipient")
        queue_id = queue_id or new_queue_id()
        self._writing.add(queue_id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_write_durably, self.directory, queue_id + SPOOL_SUFFIX, data)
            now = int(time.time())
            verified = None if sender_verified is None else int(sender_verified)
            try:
                async with self._db.transaction() as tx:
                    await tx.execute(
                        "INSERT INTO queue_messages (id, sender, size, created_at, auth_user, sender_verified)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (queue_id, sender, len(data), now, auth_user, verified),
                    )
                    await tx.executemany(
                        "INSERT INTO queue_recipients (message_id, recipient, domain, state, next_attempt,"
                        " updated_at) VALUES (?, ?, ?, 'queued', ?, ?)",
                        [(queue_id, rcpt, recipient_domain(rcpt), now, now) for rcpt in dict.fromkeys(recipients)],
                    )
                    if also is not None:
                        await also(tx)
            except BaseException:
                # No rows: the file would be debris. Remove it now rather than leave it to the cleanup.
                with contextlib.suppress(OSError):
                    self.path(queue_id).unlink()
                raise
        finally:
            self._writing.discard(queue_id)
        log.info("spooled %s from=<%s> rcpts=%d size=%d", queue_id, sender, len(recipients), len(data))
        for callback in self.on_enqueue:
            try:
                callback(queue_id)
            except Exception:
                log.exception("spool wake-up callback failed")
        return queue_id

    async def messages(self) -> list[QueuedMessage]:
        """Everything in the queue, oldest first, with each recipient's state."""
        rows = await self._db.fetchall(
            "SELECT id, sender, size, created_at, auth_user FROM queue_messages ORDER BY created_at, id"
        )
        rcpt_rows = await self._db.fetchall(
            "SELECT message_id, recipient, domain, state, attempts, next_attempt, last_error"
            " FROM queue_recipients ORDER BY id"
        )
        by_message: dict[str, list[QueuedRecipient]] = {}
        for r in rcpt_rows:
            by_message.setdefault(str(r["message_id"]), []).append(
                QueuedRecipient(
                    recipient=str(r["recipient"]),
                    domain=str(r["domain"]),
                    state=str(r["state"]),
                    attempts=int(r["attempts"]),
                    next_attempt=int(r["next_attempt"]),
                    last_error=str(r["last_error"]),
                )
            )
        return [
            QueuedMessage(
                id=str(r["id"]),
                sender=str(r["sender"]),
                size=int(r["size"]),
                created_at=int(r["created_at"]),
                auth_user=None if r["auth_user"] is None else str(r["auth_user"]),
                recipients=tuple(by_message.get(str(r["id"]), ())),
            )
            for r in rows
        ]

    async def orphans(self) -> list[Path]:
        """Files in spool/ no row refers to: an `.eml` whose rows were never committed (never
        acknowledged) or are gone (settled), and every `.tmp`; never one an enqueue of this process is
        still writing. Judged by state, not age, so a start after a crash cleans at once.

        Order matters: the directory is listed first, then the enqueues in progress are noted, then
        the rows read. A listed file whose enqueue is no longer in progress had its rows committed
        before that note was taken (or never will: then it is debris), so the rows read after see it."""

        def scan() -> list[os.DirEntry[str]]:
            if not self.directory.is_dir():
                return []
            with os.scandir(self.directory) as entries:
                return list(entries)

        listed = await asyncio.to_thread(scan)
        writing = set(self._writing)
        known = {str(r["id"]) for r in await self._db.fetchall("SELECT id FROM queue_messages")}
        found = []
        for entry in listed:
            name = entry.name
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
                queue_id = name[len(TMP_PREFIX):-len(TMP_SUFFIX)].removesuffix(SPOOL_SUFFIX)
                if queue_id not in writing:
                    found.append(Path(entry.path))
            elif name.endswith(SPOOL_SUFFIX):
                queue_id = name[: -len(SPOOL_SUFFIX)]
                if queue_id not in known and queue_id not in writing:
                    found.append(Path(entry.path))
        return sorted(found)



def format_queue(messages: Sequence[QueuedMessage]) -> str:
    """`letterbox queue list`: one line per message, one indented line per recipient."""
    if not messages:
        return "queue is empty"
    lines = []
    for m in messages:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
        lines.append(f"{m.id}  {when}  {m.size:>9} bytes  from <{m.sender}>")
        for r in m.recipients:
            attempts = f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"
            error = f"  {queue_error(r.last_error)}" if r.last_error else ""
            lines.append(f"    {r.recipient}  {r.state}, {attempts}{error}")
    total = sum(len(m.recipients) for m in messages)
    lines.append(f"{len(messages)} message{'s' if len(messages) != 1 else ''}, {total} recipient"
                 f"{'s' if total != 1 else ''}")
    return "\n".join(lines)
