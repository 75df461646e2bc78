"""The outbound queue: takes what the spool holds to other domains' servers, retries, reports.

One scheduler task finds due recipients (state in the db, so a restart loses nothing) and hands them,
grouped per (message, destination domain), to workers: at most MAX_SESSIONS SMTP sessions in all and
MAX_SESSIONS_PER_DOMAIN per destination domain. A worker opens one session for its domain and sends
every pending message of that domain through it, each message as one transaction carrying all its
recipients there. Outcomes are recorded per recipient; permanent failures and expiry produce a
failure DSN to the sender, a long delay a warning DSN; nothing is ever sent to the null sender.

Blocking work (smtplib, DKIM signing, reading the spool file) runs on daemon threads (appliance/threads.py), so
a remote server that stops answering can hold up neither the event loop nor the process's exit. What
the settings say is read by config.py, the signing key chosen by dkim_sign.py, the reports to
senders made by reports.py: this module is the scheduling and the workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.delivery_log import Delivery
from appliance.queue.client import (
    AbortSignal,
    OutboundSession,
    Outcome,
    Outgoing,
    SessionFailed,
    opportunistic_context,
    verifying_context,
)
from appliance.queue.config import DeliveryConfig, DeliveryConfigs, route
from appliance.queue.dkim_sign import SigningKeys, load_and_sign
from appliance.queue.mx import Hop, RouteError, delivery_hops, host_hops, reaches_this_box, relay_loop
from appliance.queue.reports import SenderReports
from appliance.queue.retry import RetryPolicy
from appliance.queue.spool import Spool
from appliance.queue.state import Job, QueueState, spool_file
from appliance.threads import DaemonThreads

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.queue")

T = TypeVar("T")

MAX_SESSIONS = 20  # SMTP sessions open at once, all destinations together
MAX_SESSIONS_PER_DOMAIN = 4  # per destination domain: polite to the receiver, like Postfix's default
MAX_MESSAGES_PER_SESSION = 100  # then a fresh session (Postfix: smtp_connection_reuse_count_limit)
DISPATCH_BATCH = 500  # due recipient rows fetched per scheduler pass (beyond those in flight)
POLL_INTERVAL = 5.0  # seconds; the scheduler also looks at the db this often (CLI flush/delete)
SWEEP_INTERVAL = 60.0  # seconds between looks for reports due to be tried again (reports.py)
STOP_TIMEOUT = 2.0  # seconds stop() waits for workers to record what they finished (app: 5 s in all)


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
        self._configs = DeliveryConfigs(services.settings, policy or RetryPolicy())
        self._signing_keys = SigningKeys(services.accounts, services.db, services.config.data.dkim)
        self.reports = SenderReports(services, self.spool, self.state, clock, self._retry_policy)
        self._max_sessions = max_sessions
        self._per_domain = max_sessions_per_domain
        self._poll_interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311  retry jitter, not a secret
        self._clock = clock
        self._wake = asyncio.Event()
        self._sweep_now = False  # the next pass sweeps the reports waiting (wake(sweep=True))
        self._pending: dict[str, collections.deque[Job]] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._in_flight_rows = 0
        self._active: collections.Counter[str] = collections.Counter()
        self._sessions: collections.Counter[str] = collections.Counter()  # open SMTP sessions per domain
        self._workers: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._abort = AbortSignal()
        # One per session plus spares for the short jobs (signing and sending a message, closing).
        self._threads = DaemonThreads(max_sessions * 2)
        self._tls_context = opportunistic_context()
        self._relay_contexts: dict[str, ssl.SSLContext] = {}
        self._unsubscribe: Callable[[], None] | None = None
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

    def wake(self, *, sweep: bool = False) -> None:
        """Look for due work now (a flush; a settings change, through _on_settings_changed). `sweep`:
        the failure reports waiting for a local mailbox are looked at in this pass too (a flush makes
        them due: state.flush), not at the next minute's sweep."""
        self._sweep_now = self._sweep_now or sweep
        self._wake.set()

    def _on_settings_changed(self, _before: object, _after: object) -> None:
        self._wake.set()  # a relay switched, hold lifted, retry times shortened: act now

    def _on_enqueue(self, _queue_id: str) -> None:
        self._wake.set()

    async def flush(self) -> int:
        from appliance.queue.state import flush

        count = await flush(self.services.db, now=int(self._clock()))
        self.wake(sweep=True)
        return count

    async def _clean_up(self) -> None:
        """Start-up: remove spool debris, and finish what a crash interrupted (reports, removals)."""
        for path in await self.spool.orphans():
            log.warning("removing orphaned spool file %s", path.name)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for message_id in await self.state.unsettled():
            await self.reports.settle(message_id)

    # --- scheduling -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_sweep = self._clock()
        while not self._stopping:
            self._wake.clear()
            delay = self._poll_interval
            try:
                delay = await self._dispatch()
                if self._sweep_now or self._clock() - last_sweep >= SWEEP_INTERVAL:
                    self._sweep_now = False
                    last_sweep = self._clock()
                    for message_id in await self.state.unsettled():
                        if not any(key[0] == message_id for key in self._in_flight):
                            await self.reports.settle(message_id)
            except Exception:
                log.exception("queue scheduler pass failed")
            if self._stopping:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    async def _retry_policy(self) -> RetryPolicy:
        """The queue's retry schedule and max age, as set: a failure report a local mailbox refuses is
        tried on it too."""
        return (await self._configs.current()).policy

    async def _dispatch(self) -> float:
        """One pass: start workers for due jobs; returns seconds until the next pass is needed."""
        config = await self._configs.current()
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
                session, config = await self._follow_settings(domain, session, config)
                if config.hold or not jobs:  # the deque may have been emptied while we awaited
                    break
                job = jobs.popleft()
                handed_back = False
                try:
                    if session is not None and (session.broken or session.messages >= MAX_MESSAGES_PER_SESSION):
                        await self._close(domain, session)
                        session = None
                    if session is None:
                        try:
                            session = await self._open(domain, config)
                            self._sessions[domain] += 1
                        except (RouteError, SessionFailed) as exc:
                            if self._sessions[domain] > 0 and not getattr(exc, "permanent", False):
                                # Another worker holds a session to this domain (servers often cap
                                # sessions per client): leave the job to it, and no failure. Only a
                                # session that is open counts: workers that were all still opening
                                # handed their jobs to each other forever when the domain was down,
                                # and nothing was ever recorded, retried later or expired.
                                jobs.appendleft(job)
                                handed_back = True
                                break
                            await self._fail_waiting(job, jobs, _failure(exc), config)
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
                    await self._close(domain, session)
            self._active[domain] -= 1
            if self._active[domain] <= 0:
                del self._active[domain]
            self._wake.set()

    async def _fail_waiting(self, job: Job, jobs: collections.deque[Job], failure: Outcome,
                            config: DeliveryConfig) -> None:
        """The same failure holds for `job` and for everything waiting for its domain now."""
        await self._finish(job, dict.fromkeys((r.address for r in job.recipients), failure), config, "")
        while jobs:
            other = jobs.popleft()
            try:
                await self._finish(other, dict.fromkeys((r.address for r in other.recipients), failure), config, "")
            finally:
                self._release(other)

    async def _close(self, domain: str, session: OutboundSession) -> None:
        self._sessions[domain] -= 1
        if self._sessions[domain] <= 0:
            del self._sessions[domain]
        await self._threads.run(session.close)

    def _leave_for_later(self, jobs: collections.deque[Job], hold: bool) -> None:
        """Stopping, or a hold came: what this worker had not taken waits; its rows are still queued."""
        while jobs and (self._stopping or hold):
            self._release(jobs.popleft())

    async def _follow_settings(
        self, domain: str, session: OutboundSession | None, config: DeliveryConfig
    ) -> tuple[OutboundSession | None, DeliveryConfig]:
        """Each message goes by the settings in force when it is taken (a relay switched off by the
        CLI a moment ago must not carry it): a session opened for another route, or under a hold, ends."""
        latest = await self._configs.current()
        if session is not None and (latest.hold or route(latest) != route(config)):
            await self._close(domain, session)
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
            hops: list[Hop] = await host_hops(config.resolver, relay.host, system=config.system_resolver)
            if any(map(reaches_this_box(self.services, relay.port), (hop.address for hop in hops))):
                raise SessionFailed("4.4.6", relay_loop(relay.host))
            context = self._relay_contexts.get(relay.ca_file)
            if context is None:
                context = self._relay_contexts[relay.ca_file] = await asyncio.to_thread(
                    verifying_context, relay.ca_file)
            return await self._threads.run(lambda: OutboundSession.open(
                hops, port=relay.port, helo_name=self.services.hostname,
                tls_policy="implicit" if relay.tls == "implicit" else "required",
                tls_context=context, login=relay.login, abort=self._abort,
            ))
        hops = await delivery_hops(config.resolver, domain, own_hostnames=[self.services.hostname],
                                   is_own=reaches_this_box(self.services, config.port), rng=self._rng)
        return await self._threads.run(lambda: OutboundSession.open(
            hops, port=config.port, helo_name=self.services.hostname, tls_policy="opportunistic",
            tls_context=self._tls_context, abort=self._abort,
        ))

    async def _deliver(self, job: Job, session: OutboundSession, config: DeliveryConfig) -> None:
        path = spool_file(self.spool.directory, job.message_id)
        try:
            key = await self._signing_keys.for_message(job.message_id, job.auth_user, path)
        except FileNotFoundError:
            key = None
        addresses = tuple(r.address for r in job.recipients)

        def transmit() -> dict[str, Outcome]:
            try:
                data = load_and_sign(path, key)
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
            self.services.delivery_log.record(Delivery(
                direction="out", result="delivered" if outcome.delivered else "bounced" if outcome.permanent
                else "deferred", sender=job.sender, recipient=address, detail=outcome.text,
                client=outcome.remote, queue_id=job.message_id, owner=job.auth_user or ""))
        recorded = await self.state.record(job, outcomes, policy=config.policy, now=now, tls=tls)
        refused = [o for o in outcomes.values() if o.permanent]
        if job.auth_user and refused:
            # A burst of these is what a stolen password looks like (spam/outbound.py suspends).
            await self.services.outbound_guard.note_refused(job.auth_user, len(refused), refused[-1].text)
        if recorded.delayed:
            # At most once: delay_notified was committed with the attempt (a warning lost in a crash
            # costs less than two).
            await self.reports.delayed(job.message_id, job.sender, job.created_at, recorded.delayed,
                                       will_retry_until=int(job.created_at + config.policy.max_age))
        if recorded.needs_settling:
            await self.reports.settle(job.message_id)


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
