"""Reports to the sender of outbound mail: a failure report (bounce) once every recipient of a message
is settled, a warning after a long delay; never to the null sender (RFC 5321 6.1), never to a forged
sender of a forward, and exactly once across crashes. The reports are built by dsn.py and handed
over by report_delivery.deliver_report_to_sender (a local mailbox or the spool).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import srs
from appliance.disk_full import is_disk_full
from appliance.queue import dsn
from appliance.queue.report_delivery import ReportRefused, deliver_report_to_sender
from appliance.queue.retry import RetryPolicy
from appliance.queue.spool import Spool
from appliance.queue.state import QueueState, Reportable, Settlement, spool_file

if TYPE_CHECKING:
    import aiosqlite

    from appliance.services import Services

log = logging.getLogger("letterbox.queue")


class SenderReports:
    def __init__(self, services: Services, spool: Spool, state: QueueState, clock: Callable[[], float],
                 policy: Callable[[], Awaitable[RetryPolicy]]) -> None:
        self._services = services
        self._spool = spool
        self._state = state
        self._clock = clock
        # The queue's retry schedule as set: a report a local mailbox refuses is tried again on it, for
        # as long as the queue keeps a message (its max age).
        self._policy = policy
        self._settle_lock = asyncio.Lock()  # one report per failure, however many jobs end at once
        # Failure reports a local mailbox refused, by the message they are about: how many times. When
        # the next try is due is kept in the db (QueueState.report_deferred), where a flush finds it;
        # the sweep (every minute) passes them by until then.
        self._tries: dict[str, int] = {}
        # Which local mailboxes hold a copy of a report (by its Message-ID), known without reading
        # them: every copy this process wrote, and each mailbox looked into once after a restart.
        # Each try of a refused report read every message of the mailbox's INBOX that had arrived
        # since the report was begun, every minute, for days.
        self._copies: dict[str, dict[str, bool]] = {}
        self._begun_here: set[str] = set()  # reports begun by this process: a mailbox not in _copies has none

    async def settle(self, message_id: str) -> None:
        async with self._settle_lock:
            await self._settle_locked(message_id)

    async def _settle_locked(self, message_id: str) -> None:
        settlement = await self._state.settlement(message_id)
        if settlement is None:
            self._tries.pop(message_id, None)
            return
        if any(f.next_attempt > self._clock() for f in settlement.failed):
            return  # a report a mailbox refused, not due yet
        if settlement.failed:
            target = await self._report_address(settlement.sender)
            if not settlement.sender:
                log.info("%s: failure not reported: the sender is null (RFC 5321 6.1)", message_id)
            elif settlement.sender_verified is False:
                # A forward of mail whose sender passed neither SPF nor DMARC: the address is likely
                # forged and a report would be backscatter to an innocent party.
                log.info("%s: failure not reported to <%s>: the sender was not authenticated (SPF/DMARC)",
                         message_id, settlement.sender)
            elif target is None:
                log.warning("%s: failure not reported: <%s> is an SRS address that does not verify",
                            message_id, settlement.sender)
            else:
                # An interrupted report first, as it was begun; then one report for the rest.
                groups: dict[str | None, list[Reportable]] = {}
                for failed in settlement.failed:
                    groups.setdefault(failed.report_id, []).append(failed)
                for report_id, group in sorted(groups.items(), key=lambda item: item[0] is None):
                    part = replace(settlement, failed=tuple(group))
                    if not await self._report_failures(part, target, report_id):
                        return  # kept unsettled: the periodic sweep tries the report again
                await self._record_bounces(settlement)
                return
        await self._state.settled(settlement)
        await self._record_bounces(settlement)

    async def _record_bounces(self, settlement: Settlement) -> None:
        for failed in settlement.failed:
            await self._services.events.record(
                "bounce", f"{settlement.message_id}: to <{failed.address}> failed: "
                f"{dsn.one_line(failed.diagnostic, 200)}"
            )

    async def _report_address(self, sender: str) -> str | None:
        """Where a report about mail from `sender` goes: the sender, or for a forward's SRS sender of
        ours the original sender it encodes (None if it does not verify)."""
        local, _, domain = sender.rpartition("@")
        if not sender or not srs.is_srs(local) or not await self._services.accounts.is_local_domain(domain):
            return sender
        try:
            return self._services.srs.reverse(sender).original
        except srs.InvalidSrs:
            return None

    async def _report_failures(self, part: Settlement, target: str, report_id: str | None) -> bool:
        """Send one failure report about `part.failed` and record it as sent, exactly once across
        crashes: a copy for a remote address is spooled in the transaction that marks the failures
        reported; a copy for a local mailbox is written after its Message-ID is committed, and a
        restart that finds that Message-ID in the mailbox does not write it again. False when the
        report could not be handed over (logged; retried later)."""
        message_id = part.message_id
        resumed = report_id is not None
        report_id = report_id or email.utils.make_msgid("dsn", domain=self._services.hostname)
        report = await self._build(message_id, target, part.created_at, "failed", part.failed,
                                   report_id=report_id)
        try:
            removed = False

            copies = self._copies.setdefault(report_id, {})

            async def begun() -> None:
                if not resumed:
                    await self._state.report_started(part, report_id, int(self._clock()))
                    self._begun_here.add(report_id)

            async def already_in(mailbox: str) -> bool:
                return await self._already_in(part, report_id, mailbox, resumed=resumed)

            def copied(mailbox: str) -> None:
                copies[mailbox] = True

            async def mark(tx: aiosqlite.Connection) -> None:
                nonlocal removed
                removed = await self._state.mark_settled(tx, part)

            spooled = await deliver_report_to_sender(self._services.accounts, self._services.store, self._spool, target,
                                                     report, before_local=begun, already_in=already_in,
                                                     copied=copied, with_spooling=mark)
            if not spooled:
                await self._state.settled(part)
            elif removed:
                await self._state.remove_file(message_id)
        except ReportRefused as exc:
            return await self._refused(part, target, exc, resumed, report_id)
        except Exception:
            log.exception("%s: could not send the failure report to <%s>", message_id, target)
            return False
        self._forget(message_id, report_id)
        log.info("%s: failed report sent to <%s> for %s", message_id, target,
                 ", ".join(r.address for r in part.failed))
        return True

    async def _refused(self, part: Settlement, target: str, refused: ReportRefused, resumed: bool,
                       report_id: str) -> bool:
        """A mailbox of the sender would not take the report (full, most often): tried again on the
        queue's retry schedule until it has waited as long as the queue keeps a message, then dropped
        (True), as Postfix defers a bounce to a full mailbox until bounce_queue_lifetime. Said once,
        without a traceback: it was a traceback a minute, for ever, and the message never left the
        queue."""
        now = self._clock()
        started = min((f.report_started for f in part.failed if f.report_started), default=0) or now
        policy = await self._policy()
        if now - started < policy.max_age:
            if not resumed:
                log.warning("%s: the failure report to <%s> waits: %s; tried again as the queue retries mail",
                            part.message_id, target, refused)
            tries = self._tries[part.message_id] = self._tries.get(part.message_id, 0) + 1
            try:
                await self._state.report_deferred(part, math.ceil(policy.next_attempt(started, tries, now)))
            except Exception as exc:  # not kept: the report is tried again at the next sweep instead
                if not is_disk_full(exc):
                    raise
            return False
        waited = now - started
        self._forget(part.message_id, report_id)
        await self._state.settled(part)
        await self._services.events.record(
            "bounce", f"{part.message_id}: the failure report to <{target}> was dropped after"
            f" {waited / 86400:.1f} days: {refused}")
        return True

    async def _already_in(self, part: Settlement, report_id: str, mailbox: str, *, resumed: bool) -> bool:
        """Whether the mailbox holds the report: known when this process wrote or looked for it, else
        (a report begun before a restart) looked for once."""
        copies = self._copies.setdefault(report_id, {})
        if mailbox not in copies:
            if not resumed or report_id in self._begun_here:
                return False  # every copy of a report begun here is in `copies`
            started = min((f.report_started for f in part.failed), default=0)
            copies[mailbox] = await self._holds_report(mailbox, report_id, started)
            if copies[mailbox]:
                log.info("%s: report %s already in %s (before a restart)", part.message_id, report_id, mailbox)
        return copies[mailbox]

    def _forget(self, message_id: str, report_id: str) -> None:
        self._tries.pop(message_id, None)
        self._copies.pop(report_id, None)
        self._begun_here.discard(report_id)

    async def _holds_report(self, mailbox: str, report_id: str, since: int) -> bool:
        """Is the report with this Message-ID in the mailbox already? Only messages that arrived since
        the report was begun are read (a restart right after a crash: a handful)."""
        store = self._services.store
        snapshot = await store.snapshot(mailbox, "INBOX")
        paths = [m.path for m in snapshot.messages if m.internaldate >= since - 2]
        needle = f"message-id: {report_id}".lower().encode("utf-8")

        def search() -> bool:
            for path in paths:
                try:
                    with path.open("rb") as f:
                        head = f.read(dsn.MAX_RETURNED_HEADERS)
                except FileNotFoundError:
                    continue
                top = head.split(b"\r\n\r\n", 1)[0].lower()
                if needle in top:
                    return True
            return False

        return await asyncio.to_thread(search)

    async def _build(
        self,
        message_id: str,
        target: str,
        created_at: int,
        action: dsn.Action,
        recipients: tuple[Reportable, ...],
        will_retry_until: int | None = None,
        report_id: str | None = None,
    ) -> bytes:
        path = spool_file(self._spool.directory, message_id)
        try:
            original = await asyncio.to_thread(_read_head, path)
        except FileNotFoundError:
            original = b""
        zone = datetime.now().astimezone().tzinfo
        last = max(r.last_attempt for r in recipients)
        return dsn.build_report(
            hostname=self._services.hostname,
            sender=target,
            queue_id=message_id,
            action=action,
            recipients=[dsn.DsnRecipient(r.address, r.status, r.diagnostic, r.remote.partition("[")[0])
                        for r in recipients],
            original=original,
            arrival=datetime.fromtimestamp(created_at, zone),
            last_attempt=datetime.fromtimestamp(last, zone) if last else None,
            will_retry_until=datetime.fromtimestamp(will_retry_until, zone) if will_retry_until else None,
            message_id=report_id,
        )

    async def delayed(self, message_id: str, sender: str, created_at: int, recipients: tuple[Reportable, ...],
                      will_retry_until: int) -> bool:
        """A delay warning to the sender: local mailboxes via the store, others via the spool.
        False when it could not be handed over (logged)."""
        target = await self._report_address(sender)
        if not target:
            return True
        report = await self._build(message_id, target, created_at, "delayed", recipients, will_retry_until)
        try:
            await deliver_report_to_sender(self._services.accounts, self._services.store, self._spool, target, report)
        except Exception:
            log.exception("%s: could not send the delayed report to <%s>", message_id, target)
            return False
        log.info("%s: delayed report sent to <%s> for %s", message_id, target,
                 ", ".join(r.address for r in recipients))
        return True


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(dsn.MAX_RETURNED_HEADERS + 4)
