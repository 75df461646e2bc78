"""After DATA: write every local copy and the spool entry, then say per recipient how it went.

Nothing here replies before everything it reports as done is on disk: MailStore.deliver returns only
after the copy is fsynced and indexed, Spool.enqueue only after file and rows are committed.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from appliance import srs
from appliance.accounts import Accounts
from appliance.address import split_plus
from appliance.delivery_log import Delivery, DeliveryLog, Result, message_id_of
from appliance.disk_full import is_disk_full
from appliance.queue import dsn
from appliance.queue.report_delivery import ReportRefused, deliver_report_to_sender
from appliance.queue.spool import Spool, already_failed, new_queue_id
from appliance.smtp import headers
from appliance.smtp.headers import ReceivedFacts
from appliance.smtp.policy import (
    INSUFFICIENT_STORAGE,
    MAILBOX_FULL,
    TEMPORARY_FAILURE,
    RecipientRoute,
    Reply,
    queued,
)
from appliance.store.mailstore import MailStore, NoSuchFolder, QuotaExceeded, StoreError
from appliance.store.model import INBOX, JUNK

log = logging.getLogger("letterbox.smtp.delivery")

@dataclass(frozen=True)
class InboundMessage:
    sender: str  # '' for the null sender
    routes: tuple[RecipientRoute, ...]
    data: bytes  # CRLF-normalised, without our trace headers
    received: ReceivedFacts
    auth_user: str | None = None
    # When it came (epoch seconds): its zoned date (arrival) is made only for a report, not for each
    # message (datetime.now().astimezone() was 0.7 % of the MX's event loop, issue 19).
    arrived: float = field(default_factory=time.time)
    # The MX's SPF/DMARC verdict on `sender` (None: not checked, e.g. submission). False: a failure
    # of this message is never reported to the sender (it is likely forged: backscatter).
    sender_verified: bool | None = None
    junk: bool = False  # the content filter's verdict: local copies go to each recipient's Junk folder

    @property
    def queue_id(self) -> str:
        return self.received.queue_id

    @property
    def arrival(self) -> datetime:
        return datetime.fromtimestamp(self.arrived).astimezone()

    @functools.cached_property
    def message_id(self) -> str | None:
        """For the delivery log: read once per message, not once per recipient's row."""
        return message_id_of(self.data)


@dataclass(frozen=True)
class DeliveryReport:
    replies: tuple[Reply, ...]  # one per route, in RCPT order (LMTP sends these)
    summary: Reply  # the one reply SMTP sends


def delivered_to_for(route: RecipientRoute, mailbox: str) -> str:
    """The recipient address as given when it names this mailbox (so `alice+news@` keeps its tag),
    else the mailbox an alias led to."""
    local, _, domain = route.rcpt.rpartition("@")
    base, _tag = split_plus(local)
    return route.rcpt if f"{base}@{domain}" == mailbox or route.rcpt == mailbox else mailbox


def local_copy(message: InboundMessage, route: RecipientRoute, mailbox: str) -> bytes:
    """RFC 5321 4.4: the final delivery adds Return-Path; each copy says whom it was for."""
    return (
        headers.return_path(message.sender)
        + headers.delivered_to(delivered_to_for(route, mailbox))
        + headers.received_header(message.received, for_rcpt=route.rcpt)
        + message.data
    )


def failure_reply(error: BaseException, what: str) -> Reply:
    """The reply to a local failure, logged: a full disk (appliance/disk_full.py) is 452 4.3.1 and one
    warning line, anything else 451 4.3.0: the store's own refusal (a mailbox removed mid-delivery:
    its tree is gone) in one line, as the store logged its cause, and anything else with its traceback."""
    if is_disk_full(error):
        log.warning("%s: the disk is full (%s)", what, error)
        return INSUFFICIENT_STORAGE
    if isinstance(error, StoreError):
        log.error("%s: %s", what, error)
        return TEMPORARY_FAILURE
    log.error("%s", what, exc_info=error)
    return TEMPORARY_FAILURE


def _one_reply(failed: Iterable[Reply]) -> Reply:
    """What answers a recipient (or a whole message) none of whose copies went in: a full mailbox or a
    full disk when that was every copy's failure, else the local error."""
    kinds = set(failed)
    if kinds <= {MAILBOX_FULL}:
        return MAILBOX_FULL
    return INSUFFICIENT_STORAGE if kinds == {INSUFFICIENT_STORAGE} else TEMPORARY_FAILURE


class Deliverer:
    def __init__(
        self, accounts: Accounts, store: MailStore, spool: Spool, hostname: str | Callable[[], str],
        rewriter: srs.SenderRewriter | None = None, delivery_log: DeliveryLog | None = None,
    ) -> None:
        self._accounts = accounts
        self._log = delivery_log
        self._store = store
        self._spool = spool
        # A callable is read at each report: the host name can change while the box runs.
        self._hostname = hostname if callable(hostname) else (lambda: hostname)
        self._srs = rewriter  # None: forwards keep the original sender

    async def deliver(self, message: InboundMessage, *, per_recipient: bool) -> DeliveryReport:
        """Write everything; `per_recipient` (LMTP) means failed recipients are answered one by one,
        otherwise a partial failure is accepted and bounced (SMTP has one reply per message)."""
        first_route: dict[str, RecipientRoute] = {}
        for route in message.routes:
            for mailbox in route.mailboxes:
                first_route.setdefault(mailbox, route)
        copies = [self._store_copy(message, mailbox, local_copy(message, route, mailbox))
                  for mailbox, route in first_route.items()]
        # One mailbox (most mail): awaited here, without the task gather would make for it.
        written = [await copies[0]] if len(copies) == 1 else await asyncio.gather(*copies)
        outcomes = dict(zip(first_route, written, strict=True))
        unspooled: dict[str, Reply] = {}
        for index, (sender, recipients, aliases) in enumerate(await self._outbound_groups(message)):
            queue_id = message.queue_id if index == 0 else new_queue_id()
            if (reply := await self._spool_copy(message, sender, recipients, queue_id, aliases)) is not None:
                unspooled.update(dict.fromkeys(recipients, reply))

        replies: list[Reply] = []
        failures: list[dict[str, Reply]] = []
        for route in message.routes:
            failed = {mb: reply for mb in route.mailboxes if (reply := outcomes[mb]) is not None}
            failed.update((r, unspooled[r]) for r in route.outbound if r in unspooled)
            parts = len(route.mailboxes) + len(route.outbound)
            replies.append(queued(message.queue_id) if len(failed) < parts else _one_reply(failed.values()))
            failures.append(failed)

        accepted = any(reply.positive for reply in replies)
        # Parts of accepted recipients that failed are bounced; a recipient that failed as a whole is
        # answered with its own reply under LMTP, and bounced under SMTP when others were accepted.
        bounce: dict[str, Reply] = {}
        for reply, failed in zip(replies, failures, strict=True):
            if reply.positive or (accepted and not per_recipient):
                bounce.update(failed)
        if bounce:
            await self._bounce(message, bounce)
        summary = queued(message.queue_id) if accepted else _one_reply(replies)
        return DeliveryReport(tuple(replies), summary)

    async def _store_copy(self, message: InboundMessage, mailbox: str, data: bytes) -> Reply | None:
        """None when the copy is durably in the mailbox, else the reply that describes the failure."""
        folder = JUNK if message.junk else INBOX
        try:
            result = (await self._store.deliver([mailbox], data, folder=folder)).get(mailbox)
            if isinstance(result, NoSuchFolder) and folder == JUNK:
                # The owner deleted their Junk folder: the inbox, marked, rather than no copy at all.
                folder = INBOX
                result = (await self._store.deliver([mailbox], data)).get(mailbox)
        except Exception as exc:  # noqa: BLE001  failure_reply logs it, with its traceback unless the disk is full
            return failure_reply(exc, f"{message.queue_id}: delivery to {mailbox} failed")
        if isinstance(result, int):
            log.info("%s: delivered from=<%s> to=%s%s uid=%d size=%d", message.queue_id, message.sender,
                     mailbox, f" ({folder})" if folder != INBOX else "", result, len(data))
            self._record(message, mailbox, "junk" if folder == JUNK else "delivered", folder, len(data))
            return None
        if isinstance(result, QuotaExceeded):
            log.info("%s: %s is over quota", message.queue_id, mailbox)
            self._record(message, mailbox, "rejected", "the mailbox is full", len(data), check="quota")
            return MAILBOX_FULL
        if isinstance(result, Exception):  # the store's own "cannot write the message", its cause kept
            return failure_reply(result, f"{message.queue_id}: delivery to {mailbox} failed")
        log.error("%s: delivery to %s failed: %r", message.queue_id, mailbox, result)
        return TEMPORARY_FAILURE

    def _record(self, message: InboundMessage, recipient: str, result: Result, detail: str, size: int,
                *, check: str = "", queue_id: str | None = None) -> None:
        """One delivery log row (appliance/delivery_log.py): mail from a logged-in user is "out" and
        its owner is that user; mail from the internet is "in" and its owner the recipient mailbox."""
        if self._log is None:
            return
        out = message.auth_user is not None
        self._log.record(Delivery(
            direction="out" if out else "in", result=result, sender=message.sender, recipient=recipient,
            size=size, detail=detail, check=check, client=message.received.peer_ip,
            queue_id=queue_id or message.queue_id, message_id=message.message_id,
            owner=(message.auth_user or "") if out else (recipient if result in ("delivered", "junk") else "")))

    async def _outbound_groups(self, message: InboundMessage) -> list[tuple[str, list[str], list[str]]]:
        """The spool entries to write: (envelope sender, recipients, the aliases whose forwards they
        are). A user's own mail and anything from the null sender or a sender of our domains keeps its
        sender; an alias's forward of other people's mail gets an SRS sender of the alias's domain, so
        SPF at the receiver checks a domain that lists us (appliance/srs.py)."""
        groups: dict[str, tuple[list[str], list[str]]] = {}
        seen: set[str] = set()
        for route in message.routes:
            targets = [(route.remote, message.sender)] if route.remote else []
            if route.forwards:
                sender = await self._forward_sender(message.sender, route.rcpt)
                targets += [(rcpt, sender) for rcpt in route.forwards]
                aliases = groups.setdefault(sender, ([], []))[1]
                if route.rcpt not in aliases:
                    aliases.append(route.rcpt)
            for rcpt, sender in targets:
                if rcpt not in seen:
                    seen.add(rcpt)
                    groups.setdefault(sender, ([], []))[0].append(rcpt)
        return [(sender, recipients, aliases) for sender, (recipients, aliases) in groups.items() if recipients]

    async def _forward_sender(self, sender: str, alias: str) -> str:
        if self._srs is None or not sender:
            return sender  # the null sender is never rewritten
        if await self._accounts.is_local_domain(sender.rpartition("@")[2]):
            return sender  # ours already: SPF passes as it is
        return self._srs.forward(sender, alias.rpartition("@")[2])

    async def _spool_copy(self, message: InboundMessage, sender: str, recipients: Sequence[str],
                          queue_id: str, aliases: Sequence[str] = ()) -> Reply | None:
        """None when the copy is durably in the outbound queue, else the reply that describes the failure.
        A forward says which aliases sent it on (Delivered-To:, as Postfix's local(8) writes it), so
        the MX knows it again if it comes back (handler.py: a forwarding loop)."""
        for_rcpt = recipients[0] if len(recipients) == 1 else None
        received = message.received if queue_id == message.queue_id else replace(message.received, queue_id=queue_id)
        data = (headers.received_header(received, for_rcpt=for_rcpt)
                + b"".join(headers.delivered_to(alias) for alias in aliases) + message.data)
        try:
            await self._spool.enqueue(
                sender, recipients, data, auth_user=message.auth_user, queue_id=queue_id,
                sender_verified=message.sender_verified,
            )
        except Exception as exc:  # noqa: BLE001  failure_reply logs it, with its traceback unless the disk is full
            return failure_reply(exc, f"{message.queue_id}: could not spool for {len(recipients)} recipients")
        for rcpt in recipients:
            self._record(message, rcpt, "queued", "waiting in the outbound queue", len(data), queue_id=queue_id)
        return None

    async def _bounce(self, message: InboundMessage, failed: dict[str, Reply]) -> None:
        """Tell the sender about copies that could not be written (never to the null sender)."""
        if not message.sender:
            log.warning("%s: not delivered to %s; null sender, no bounce", message.queue_id, ", ".join(failed))
            return
        if message.sender_verified is False:
            log.warning("%s: not delivered to %s; sender <%s> not authenticated (SPF/DMARC), no bounce",
                        message.queue_id, ", ".join(failed), message.sender)
            return
        # Accepted mail that could not be written is a permanent failure from here on.
        statuses = {rcpt: ("5.2.2", "552 5.2.2 Mailbox full") if reply == MAILBOX_FULL
                    else ("5.3.0", "554 5.3.0 Local delivery failed") for rcpt, reply in failed.items()}
        report_id = email.utils.make_msgid("dsn", domain=self._hostname())
        report = dsn.build_report(
            hostname=self._hostname(),
            sender=message.sender,
            queue_id=message.queue_id,
            action="failed",
            recipients=[dsn.DsnRecipient(rcpt, status, text) for rcpt, (status, text) in statuses.items()],
            original=message.data,
            arrival=message.arrival,
            message_id=report_id,
        )
        try:
            await deliver_report_to_sender(self._accounts, self._store, self._spool, message.sender, report)
        except ReportRefused as refused:
            await self._queue_bounce(message, statuses, report_id, refused)
            return
        except Exception:
            log.exception("%s: could not send the bounce to <%s>", message.queue_id, message.sender)
            return
        log.info("%s: bounced to <%s> for %s", message.queue_id, message.sender, ", ".join(failed))

    async def _queue_bounce(self, message: InboundMessage, statuses: dict[str, tuple[str, str]], report_id: str,
                            refused: ReportRefused) -> None:
        """A mailbox of the sender refused the bounce (full, most often): the message goes into the
        queue with these recipients failed and the report begun, so the queue's sweep delivers it
        when there is room, as its own reports (appliance/queue/reports.py). It was lost, with a
        traceback."""
        now, queue_id = int(time.time()), new_queue_id()
        try:
            await self._spool.enqueue(
                message.sender, list(statuses), message.data, queue_id=queue_id,
                sender_verified=message.sender_verified,
                also=lambda tx: already_failed(tx, queue_id, statuses, report_id, now))
        except Exception as exc:  # noqa: BLE001  failure_reply logs it, with its traceback unless the disk is full
            failure_reply(exc, f"{message.queue_id}: could not queue the bounce to <{message.sender}>")
            return
        log.warning("%s: the bounce to <%s> for %s waits in the queue as %s: %s", message.queue_id,
                    message.sender, ", ".join(statuses), queue_id, refused)
