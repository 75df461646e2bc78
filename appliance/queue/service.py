"""The outbound queue: takes what the spool holds to other domains' servers, retries, reports.

One scheduler task finds due recipients (state in the db, so a restart loses nothing) and hands them,
grouped per (message, destination domain), to workers: at most MAX_SESSIONS SMTP sessions in all and
MAX_SESSIONS_PER_DOMAIN per destination domain. A worker opens one session for its domain and sends
every pending message of that domain through it, each message as one transaction carrying all its
recipients there. Outcomes are recorded per recipient; permanent failures and expiry produce a
failure DSN to the sender, a long delay a warning DSN; nothing is ever sent to the null sender.

Blocking work (smtplib, DKIM signing, reading the spool file) runs on daemon threads, so a remote
server that stops answering can hold up neither the event loop nor the process's exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance import dkim_keys, srs
from appliance.queue import dkim_sign, dsn
from appliance.queue.client import (
    AbortSignal,
    OutboundSession,
    Outcome,
    Outgoing,
    SessionFailed,
    opportunistic_context,
    verifying_context,
)
from appliance.queue.mx import Hop, RouteError, delivery_hops, host_hops
from appliance.queue.report_delivery import deliver_report_to_sender
from appliance.queue.resolver import make_async_resolver
from appliance.queue.retry import RetryPolicy
from appliance.queue.smarthost import Smarthost
from appliance.queue.spool import Spool
from appliance.queue.state import Job, QueueState, Reportable, Settlement, spool_file
from appliance.queue.threads import DaemonThreads

if TYPE_CHECKING:
    import aiosqlite
    import dns.asyncresolver

    from appliance.services import Services

log = logging.getLogger("letterbox.queue")

T = TypeVar("T")

MAX_SESSIONS = 20  # SMTP sessions open at once, all destinations together
MAX_SESSIONS_PER_DOMAIN = 4  # per destination domain: polite to the receiver, like Postfix's default
MAX_MESSAGES_PER_SESSION = 100  # then a fresh session (Postfix: smtp_connection_reuse_count_limit)
DISPATCH_BATCH = 500  # due recipient rows fetched per scheduler pass (beyond those in flight)
POLL_INTERVAL = 5.0  # seconds; the scheduler also looks at the db this often (CLI flush/delete)
DKIM_KEY_TTL = 1.0  # seconds a domain's DKIM key is reused (a rotation is in force within this)
SWEEP_INTERVAL = 60.0  # seconds between retries of reports that could not be handed over
STOP_TIMEOUT = 2.0  # seconds stop() waits for workers to record what they finished (app: 5 s in all)


@dataclass(frozen=True)
class DeliveryConfig:
    """Everything a delivery needs from the settings: read afresh (one cheap check, see
    appliance/settings.py) before each pass and before each session, so a change made by the
    console or the CLI is in force for the next message without any timer."""

    policy: RetryPolicy
    port: int
    smarthost: Smarthost | None
    resolver: dns.asyncresolver.Resolver
    hold: bool
    smarthost_error: str = ""


def _load_and_sign(path: Path, key: dkim_keys.DkimKey | None) -> bytes:
    data = path.read_bytes()
    if key is None:
        return data
    try:
        return dkim_sign.sign(data, key)
    except Exception:
        # An unsignable message (broken headers) still goes out; the receiver judges it unsigned.
        log.exception("DKIM signing with %s failed; sending unsigned", key.record_name)
        return data


class OutboundQueue:
    def __init__(
        self,
        services: Services,
        *,
        spool: Spool | None = None,
        policy: RetryPolicy | None = None,
        max_sessions: int = MAX_SESSIONS,
        max_sessions_per_domain: int = MAX_SESSIONS_PER_DOMAIN,
        poll_interval: float = POLL_INTERVAL,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.spool = spool or services.spool
        self.state = QueueState(services.db, self.spool.directory)
        self._default_policy = policy or RetryPolicy()
        self._max_sessions = max_sessions
        self._per_domain = max_sessions_per_domain
        self._poll_interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311  retry jitter, not a secret
        self._clock = clock
        self._wake = asyncio.Event()
        self._pending: dict[str, collections.deque[Job]] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._in_flight_rows = 0
        self._active: collections.Counter[str] = collections.Counter()
        self._workers: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._abort = AbortSignal()
        # One per session plus spares for the short jobs (signing and sending a message, closing).
        self._threads = DaemonThreads(max_sessions * 2)
        self._tls_context = opportunistic_context()
        self._relay_contexts: dict[str, ssl.SSLContext] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._settle_lock = asyncio.Lock()  # one report per failure, however many jobs end at once
        self._keys: dict[str, tuple[float, dkim_keys.DkimKey | None]] = {}
        self._resolver_key: str | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._abort = AbortSignal()
        await self._clean_up()
        self.spool.on_enqueue.append(self._on_enqueue)
        self._unsubscribe = self.services.settings.subscribe(self._on_settings_changed)
        self._scheduler = asyncio.create_task(self._run(), name="letterbox-queue")
        log.info("outbound queue started")

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(ValueError):
            self.spool.on_enqueue.remove(self._on_enqueue)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._abort.abort()  # every SMTP socket fails now; workers record a temporary failure
        self._wake.set()
        tasks = [t for t in (self._scheduler, *self._workers) if t is not None]
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        self._scheduler = None
        self._threads.shutdown()
        log.info("outbound queue stopped")

    def wake(self) -> None:
        """Look for due work now (a flush; a settings change, through _on_settings_changed)."""
        self._wake.set()

    def _on_settings_changed(self, _before: object, _after: object) -> None:
        self._wake.set()  # a relay switched, hold lifted, retry times shortened: act now

    def _on_enqueue(self, _queue_id: str) -> None:
        self._wake.set()

    async def flush(self) -> int:
        from appliance.queue.state import flush

        count = await flush(self.services.db, now=int(self._clock()))
        self.wake()
        return count

    async def _clean_up(self) -> None:
        """Start-up: remove spool debris, and finish what a crash interrupted (reports, removals)."""
        for path in await self.spool.orphans():
            log.warning("removing orphaned spool file %s", path.name)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for message_id in await self.state.unsettled():
            await self._settle(message_id)

    # --- scheduling -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_sweep = self._clock()
        while not self._stopping:
            self._wake.clear()
            delay = self._poll_interval
            try:
                delay = await self._dispatch()
                if self._clock() - last_sweep >= SWEEP_INTERVAL:
                    last_sweep = self._clock()
                    for message_id in await self.state.unsettled():
                        if not any(key[0] == message_id for key in self._in_flight):
                            await self._settle(message_id)
            except Exception:
                log.exception("queue scheduler pass failed")
            if self._stopping:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    async def _config(self) -> DeliveryConfig:
        """The settings in force now, whoever changed them last (this process or the CLI)."""
        values = await self.services.settings.fresh()
        if self._resolver is None or values.dns_resolver != self._resolver_key:
            self._resolver, self._resolver_key = make_async_resolver(values.dns_resolver), values.dns_resolver
        smarthost_error = f"the relay setting is invalid: {values.relay_problem}" if values.relay_problem else ""
        return DeliveryConfig(values.retry.apply(self._default_policy), values.mx_port, values.relay,
                              self._resolver, values.hold, smarthost_error)

    async def _dispatch(self) -> float:
        """One pass: start workers for due jobs; returns seconds until the next pass is needed."""
        config = await self._config()
        if config.hold:
            return self._poll_interval
        now = int(self._clock())
        if len(self._in_flight) < DISPATCH_BATCH * 4:
            jobs = await self.state.due(now, self._in_flight_rows + DISPATCH_BATCH, self._in_flight)
            for job in jobs:
                self._in_flight.add(job.key)
                self._in_flight_rows += len(job.recipients)
                self._pending.setdefault(job.domain, collections.deque()).append(job)
        for domain, jobs_for_domain in list(self._pending.items()):
            while (jobs_for_domain and self._active[domain] < self._per_domain
                   and sum(self._active.values()) < self._max_sessions):
                self._active[domain] += 1
                task = asyncio.create_task(self._worker(domain, config), name=f"letterbox-queue-{domain}")
                self._workers.add(task)
                task.add_done_callback(self._workers.discard)
            if not jobs_for_domain and not self._active[domain]:
                del self._pending[domain]
        next_due = await self.state.next_due(after=now)
        if next_due is None:
            return self._poll_interval
        return min(self._poll_interval, max(0.0, next_due - self._clock()))

    # --- delivery -------------------------------------------------------------------------------------

    async def _worker(self, domain: str, config: DeliveryConfig) -> None:
        session: OutboundSession | None = None
        jobs = self._pending.get(domain) or collections.deque()
        try:
            while jobs and not self._stopping:
                session, config = await self._follow_settings(session, config)
                if config.hold:
                    break
                job = jobs.popleft()
                handed_back = False
                try:
                    if session is not None and (session.broken or session.messages >= MAX_MESSAGES_PER_SESSION):
                        await self._threads.run(session.close)
                        session = None
                    if session is None:
                        try:
                            session = await self._open(domain, config)
                        except (RouteError, SessionFailed) as exc:
                            if self._active[domain] > 1 and not getattr(exc, "permanent", False):
                                # Others are already sending to this domain (servers often cap
                                # sessions per client): leave the job to them, and no failure.
                                jobs.appendleft(job)
                                handed_back = True
                                break
                            # The same failure holds for everything waiting for this domain now.
                            failure = _failure(exc)
                            await self._finish(job, dict.fromkeys((r.address for r in job.recipients), failure),
                                               config, "")
                            while jobs:
                                other = jobs.popleft()
                                try:
                                    await self._finish(other, dict.fromkeys(
                                        (r.address for r in other.recipients), failure), config, "")
                                finally:
                                    self._release(other)
                            break
                    await self._deliver(job, session, config)
                finally:
                    if not handed_back:
                        self._release(job)
        except Exception:
            log.exception("queue worker for %s failed", domain)
        finally:
            self._leave_for_later(jobs, config.hold)
            if session is not None:
                with contextlib.suppress(Exception):
                    await self._threads.run(session.close)
            self._active[domain] -= 1
            if self._active[domain] <= 0:
                del self._active[domain]
            self._wake.set()

    def _leave_for_later(self, jobs: collections.deque[Job], hold: bool) -> None:
        """Stopping, or a hold came: what this worker had not taken waits; its rows are still queued."""
        while jobs and (self._stopping or hold):
            self._release(jobs.popleft())

    async def _follow_settings(
        self, session: OutboundSession | None, config: DeliveryConfig
    ) -> tuple[OutboundSession | None, DeliveryConfig]:
        """Each message goes by the settings in force when it is taken (a relay switched off by the
        CLI a moment ago must not carry it): a session opened for another route, or under a hold, ends."""
        latest = await self._config()
        if session is not None and (latest.hold or _route(latest) != _route(config)):
            await self._threads.run(session.close)
            session = None
        return session, latest

    def _release(self, job: Job) -> None:
        if job.key in self._in_flight:
            self._in_flight.discard(job.key)
            self._in_flight_rows -= len(job.recipients)

    async def _open(self, domain: str, config: DeliveryConfig) -> OutboundSession:
        relay = config.smarthost
        if config.smarthost_error:
            raise SessionFailed("4.3.5", config.smarthost_error)
        if relay is not None:
            # Without a dns_resolver setting the relay is found as any program finds a host (/etc/hosts too).
            hops: list[Hop] = await host_hops(config.resolver, relay.host, system=self._resolver_key is None)
            context = self._relay_contexts.get(relay.ca_file)
            if context is None:
                context = self._relay_contexts[relay.ca_file] = await asyncio.to_thread(
                    verifying_context, relay.ca_file)
            return await self._threads.run(lambda: OutboundSession.open(
                hops, port=relay.port, helo_name=self.services.hostname,
                tls_policy="implicit" if relay.tls == "implicit" else "required",
                tls_context=context, login=relay.login, abort=self._abort,
            ))
        hops = await delivery_hops(config.resolver, domain, own_hostnames=[self.services.hostname], rng=self._rng)
        return await self._threads.run(lambda: OutboundSession.open(
            hops, port=config.port, helo_name=self.services.hostname, tls_policy="opportunistic",
            tls_context=self._tls_context, abort=self._abort,
        ))

    async def _signing_key(self, job: Job, path: Path) -> dkim_keys.DkimKey | None:
        """The author domain's key for mail our users submitted (RFC 6376; DMARC alignment), and only
        when the login recorded with the message may send as the From: address: a signature of ours
        says the domain vouches for the author, so the header alone must never choose the key
        (submission refuses such a From: too; this is the second, independent check).

        Forwards (an alias's mail to another domain, sent with an SRS sender) are not signed: they
        have no login, their From: is someone else's domain, so a signature of the alias's domain
        would not align for DMARC and would lend our domain's name to whatever the forward carries.
        Their original signatures travel unchanged (only a Received: is added on top)."""
        if not job.auth_user:
            return None

        def author() -> tuple[str | None, list[str]]:
            with path.open("rb") as f:
                head = f.read(256 * 1024)  # the header section is enough
            return dkim_sign.author_domain(head), dkim_sign.author_addresses(head)

        domain, authors = await asyncio.to_thread(author)
        if domain is None:
            return None
        for address in authors:
            if not await self.services.accounts.may_send_as(job.auth_user, address):
                log.warning("%s: not DKIM-signed: %s may not send as the From: address <%s>",
                            job.message_id, job.auth_user, address[:100])
                return None
        cached = self._keys.get(domain)
        if cached is not None and time.monotonic() - cached[0] < DKIM_KEY_TTL:
            return cached[1]
        key = None
        if await self.services.accounts.is_local_domain(domain):
            key = await dkim_keys.current_key(self.services.db, self.services.config.data.dkim, domain)
            if key is None:
                log.warning("no DKIM key for %s: its mail goes out unsigned", domain)
        self._keys[domain] = (time.monotonic(), key)
        return key

    async def _deliver(self, job: Job, session: OutboundSession, config: DeliveryConfig) -> None:
        path = spool_file(self.spool.directory, job.message_id)
        try:
            key = await self._signing_key(job, path)
        except FileNotFoundError:
            key = None
        addresses = tuple(r.address for r in job.recipients)

        def transmit() -> dict[str, Outcome]:
            try:
                data = _load_and_sign(path, key)
            except FileNotFoundError:
                # Deleted by `letterbox queue delete` meanwhile, or lost: nothing to send.
                return dict.fromkeys(addresses, Outcome("5.3.0", "the spool file of this message is missing"))
            return session.send(Outgoing(job.sender, addresses, data))

        outcomes = await self._threads.run(transmit)
        await self._finish(job, outcomes, config, session.tls)

    async def _finish(self, job: Job, outcomes: dict[str, Outcome], config: DeliveryConfig, tls: str) -> None:
        now = int(self._clock())
        if self._stopping:
            # Sessions were cut by stop(): those failures are ours, not the destination's. Leave the
            # recipients due, untouched, for the next start; record only what is certain.
            outcomes = {a: o for a, o in outcomes.items() if o.delivered or o.permanent}
        for address, outcome in outcomes.items():
            verdict = "sent" if outcome.delivered else "bounced" if outcome.permanent else "deferred"
            log.info("%s: to=<%s> relay=%s tls=%s status=%s (%s)", job.message_id, address,
                     outcome.remote or "none", tls or "none", verdict, outcome.text)
        recorded = await self.state.record(job, outcomes, policy=config.policy, now=now, tls=tls)
        if recorded.delayed:
            # At most once: delay_notified was committed with the attempt (a warning lost in a crash
            # costs less than two).
            await self._report(job.message_id, job.sender, job.created_at, "delayed", recorded.delayed,
                               will_retry_until=int(job.created_at + config.policy.max_age))
        if recorded.needs_settling:
            await self._settle(job.message_id)

    # --- reports to the sender ------------------------------------------------------------------------

    async def _settle(self, message_id: str) -> None:
        async with self._settle_lock:
            await self._settle_locked(message_id)

    async def _settle_locked(self, message_id: str) -> None:
        settlement = await self.state.settlement(message_id)
        if settlement is None:
            return
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
        await self.state.settled(settlement)
        await self._record_bounces(settlement)

    async def _record_bounces(self, settlement: Settlement) -> None:
        for failed in settlement.failed:
            await self.services.events.record(
                "bounce", f"{settlement.message_id}: to <{failed.address}> failed: "
                f"{dsn.one_line(failed.diagnostic, 200)}"
            )

    async def _report_address(self, sender: str) -> str | None:
        """Where a report about mail from `sender` goes: the sender, or for a forward's SRS sender of
        ours the original sender it encodes (None if it does not verify)."""
        local, _, domain = sender.rpartition("@")
        if not sender or not srs.is_srs(local) or not await self.services.accounts.is_local_domain(domain):
            return sender
        try:
            return self.services.srs.reverse(sender).original
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
        report_id = report_id or email.utils.make_msgid("dsn", domain=self.services.hostname)
        report = await self._build(message_id, target, part.created_at, "failed", part.failed,
                                   report_id=report_id)
        try:
            removed = False

            async def begun() -> None:
                if not resumed:
                    await self.state.report_started(part, report_id, int(self._clock()))

            async def already_in(mailbox: str) -> bool:
                started = min((f.report_started for f in part.failed), default=0)
                if resumed and await self._holds_report(mailbox, report_id, started):
                    log.info("%s: report %s already in %s (before a restart)", message_id, report_id, mailbox)
                    return True
                return False

            async def mark(tx: aiosqlite.Connection) -> None:
                nonlocal removed
                removed = await self.state.mark_settled(tx, part)

            spooled = await deliver_report_to_sender(self.services.accounts, self.services.store, self.spool, target,
                                                     report, before_local=begun, already_in=already_in,
                                                     with_spooling=mark)
            if not spooled:
                await self.state.settled(part)
            elif removed:
                await self.state.remove_file(message_id)
        except Exception:
            log.exception("%s: could not send the failure report to <%s>", message_id, target)
            return False
        log.info("%s: failed report sent to <%s> for %s", message_id, target,
                 ", ".join(r.address for r in part.failed))
        return True

    async def _holds_report(self, mailbox: str, report_id: str, since: int) -> bool:
        """Is the report with this Message-ID in the mailbox already? Only messages that arrived since
        the report was begun are read (a restart right after a crash: a handful)."""
        store = self.services.store
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
        path = spool_file(self.spool.directory, message_id)
        try:
            original = await asyncio.to_thread(_read_head, path)
        except FileNotFoundError:
            original = b""
        zone = datetime.now().astimezone().tzinfo
        last = max(r.last_attempt for r in recipients)
        return dsn.build_report(
            hostname=self.services.hostname,
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

    async def _report(
        self,
        message_id: str,
        sender: str,
        created_at: int,
        action: dsn.Action,
        recipients: tuple[Reportable, ...],
        will_retry_until: int | None = None,
    ) -> bool:
        """A delay warning to the sender: local mailboxes via the store, others via the spool.
        False when it could not be handed over (logged)."""
        target = await self._report_address(sender)
        if not target:
            return True
        report = await self._build(message_id, target, created_at, action, recipients, will_retry_until)
        try:
            await deliver_report_to_sender(self.services.accounts, self.services.store, self.spool, target, report)
        except Exception:
            log.exception("%s: could not send the %s report to <%s>", message_id, action, target)
            return False
        log.info("%s: %s report sent to <%s> for %s", message_id, action, target,
                 ", ".join(r.address for r in recipients))
        return True


def _route(config: DeliveryConfig) -> tuple[object, ...]:
    """What an open session depends on: the same route lets it carry the next message."""
    return (config.smarthost, config.port, config.smarthost_error)


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(dsn.MAX_RETURNED_HEADERS + 4)


def _failure(exc: RouteError | SessionFailed) -> Outcome:
    if isinstance(exc, RouteError):
        return Outcome(exc.status, exc.text)
    return exc.outcome()




async def start_queue(services: Services, **options: Any) -> OutboundQueue:
    """The composition root's hook (appliance/app.py BACKGROUND)."""
    queue = OutboundQueue(services, **options)
    await queue.start()
    services.queue = queue
    return queue
