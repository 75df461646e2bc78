"""The certificate use-cases the CLI (`letterbox cert ...`) and the web console share, and the renewer.

- status(): what is served, where it came from, the order in progress, the last error, the next renewal;
- request(): an ACME order (Let's Encrypt by default) for the host name and the autoconfig/autodiscover
  names that resolve to the box, installed and served at once;
- renew(): the same for the names of the current certificate (the renewer calls it);
- import_pem(): an uploaded certificate + chain + key, refused with a plain reason when it would not work;
- self_signed(): back to a self-signed certificate.
Every one of them records an event. A failure never replaces the certificate being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.resolver

from appliance import acme_terms
from appliance.acme_terms import AcmeProblem, AcmeSettings, ChallengeSink, Issued
from appliance.db import Database
from appliance.dns_records import public_addresses
from appliance.events import EventLog
from appliance.postmaster import mail_postmaster
from appliance.queue.resolver import make_async_resolver
from appliance.settings import read_settings
from appliance.tasks import cancel_and_wait
from appliance.tls import (
    CertificateInfo,
    CertificateProblem,
    TlsManager,
    tls_alpn_challenge_pem,
)

if TYPE_CHECKING:
    from appliance.cpu_pool import CpuPool
    from appliance.services import Services

log = logging.getLogger(__name__)

# Settings (db): where certificates come from and how the last order went.
SOURCE = "cert_source"  # "self-signed" | "acme" | "imported"
DIRECTORY = "acme_directory"
EMAIL = "acme_email"
EAB_KID = "acme_eab_kid"
EAB_HMAC = "acme_eab_hmac"
CA_FILE = "acme_ca_file"  # CA bundle for the directory's HTTPS (a private CA; tests)
CHALLENGE = "acme_challenge"  # "http-01" (default) or "tls-alpn-01"
STATE = "cert_order_state"  # JSON {"phase", "message", "at"}: survives a page reload
LAST_ERROR = "cert_last_error"
NEXT_ATTEMPT = "cert_next_attempt"  # epoch seconds: after a failure, not before
WARNED_SERIAL = "cert_warned_serial"  # the certificate the 14-day warning went out for

CHECK_EVERY = dt.timedelta(hours=12)
RETRY_MIN, RETRY_MAX = dt.timedelta(minutes=30), dt.timedelta(minutes=60)
WARN_LEFT = dt.timedelta(days=14)
FILE_POLL_SECONDS = 10.0  # a certificate installed by the CLI (another process) is picked up this fast
DNS_TIMEOUT = 5.0
STALE_ANSWERS = 24 * 3600  # seconds: an http-01 answer older than this belongs to no running order


@dataclass(frozen=True)
class OrderState:
    phase: str  # "idle" | "pending" | "validating" | "issued" | "failed"
    message: str
    at: int


@dataclass(frozen=True)
class CertStatus:
    info: CertificateInfo
    source: str
    trusted: bool  # from a CA (ACME or imported), not self-signed
    order: OrderState
    last_error: str | None
    next_renewal: dt.datetime | None
    directory: str


@dataclass(frozen=True)
class NamesCheck:
    names: list[str]
    left_out: list[str]  # plain-words reasons, one per name left out


@dataclass
class CertContext:
    """What the use-cases need; the running box gives its own (live TLS, the port-80 dict), the CLI a
    standalone one (answers through the db, read by the box that owns port 80)."""

    db: Database
    tls: TlsManager
    events: EventLog
    hostname: Callable[[], str]
    acme_dir: Path
    http01: dict[str, str] | None = None  # in-process answers, read by web/routes/wellknown.py
    # tls-alpn-01 is answered by this process's 443 listener: not from the CLI (another process).
    answers_tls_alpn: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    running: asyncio.Task[None] | None = None  # an order started from the web, followed by its page
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    # The box's CPU pool: the renewer asks for the ARI window in its worker process, which stops when
    # idle. The ACME client it imports (acme, josepy, requests, cryptography) stayed in the box for
    # good otherwise, from the renewer's first check at start: 64.6 MiB idle RSS for a box with a
    # Let's Encrypt certificate against 48.2 without (issue 19). None (the CLI): a thread here.
    cpu: CpuPool | None = None


# --- status ------------------------------------------------------------------------------------------------

async def order_state(db: Database) -> OrderState:
    raw = await db.get_setting(STATE)
    try:
        data = json.loads(raw) if raw else {}
        return OrderState(str(data["phase"]), str(data["message"]), int(data["at"]))
    except (ValueError, KeyError, TypeError):
        return OrderState("idle", "", 0)


async def _set_state(ctx: CertContext, phase: str, message: str) -> None:
    await ctx.db.set_setting(STATE, json.dumps({"phase": phase, "message": message, "at": int(time.time())}))


def lifetime_due(info: CertificateInfo) -> dt.datetime:
    """Without ARI: renew when a third of the lifetime is left (90-day certificates at 30 days left,
    45-day ones at 15), so shorter lifetimes need no new setting."""
    return info.not_after - info.lifetime / 3


async def status(ctx: CertContext) -> CertStatus:
    info = ctx.tls.info()
    source = await ctx.db.get_setting(SOURCE) or ("self-signed" if info.self_signed else "imported")
    next_renewal = None
    if source == "acme":
        next_renewal = lifetime_due(info)
        retry = await ctx.db.get_setting(NEXT_ATTEMPT)
        if retry:
            next_renewal = max(next_renewal, dt.datetime.fromtimestamp(int(retry), dt.UTC))
    return CertStatus(
        info=info, source=source, trusted=not info.self_signed, order=await order_state(ctx.db),
        last_error=await ctx.db.get_setting(LAST_ERROR) or None, next_renewal=next_renewal,
        directory=await ctx.db.get_setting(DIRECTORY) or acme_terms.LETS_ENCRYPT,
    )


# --- which names -------------------------------------------------------------------------------------------

async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> set[str]:
    found: set[str] = set()
    for rdtype in ("A", "AAAA"):
        with contextlib.suppress(dns.exception.DNSException):
            answer = await resolver.resolve(name, rdtype, lifetime=DNS_TIMEOUT)
            found.update(r.to_text() for r in answer)
    return found


async def check_names(ctx: CertContext, domains: list[str]) -> NamesCheck:
    """The host name must lead to this box (else the order would fail and count against the CA's rate
    limit): AcmeProblem if it doesn't. autoconfig./autodiscover.<domain> go in only when they do too."""
    hostname = ctx.hostname()
    resolver = make_async_resolver((await read_settings(ctx.db)).dns_resolver, cached=False)  # the person just fixed their DNS
    ipv4, ipv6 = await public_addresses(ctx.db)
    public = {a for a in (ipv4, ipv6) if a}
    host_addresses = await _addresses(resolver, hostname)
    if not host_addresses:
        raise AcmeProblem(f"The host name {hostname} does not resolve (no A or AAAA record): publish it first, "
                          "pointing at this box's public address.", kind="dns")
    if public and not host_addresses & public:
        raise AcmeProblem(f"The host name {hostname} points at {', '.join(sorted(host_addresses))}, not at this "
                          f"box's public address {', '.join(sorted(public))}: fix its DNS record first.", kind="dns")
    expected = public or host_addresses
    names, left_out = [hostname], []
    for domain in domains:
        for prefix in ("autoconfig", "autodiscover"):
            name = f"{prefix}.{domain}"
            if name == hostname:
                continue
            found = await _addresses(resolver, name)
            if not found:
                left_out.append(f"{name}: not in the DNS")
            elif not found & expected:
                left_out.append(f"{name}: points at {', '.join(sorted(found))}, not at this box")
            else:
                names.append(name)
    return NamesCheck(names, left_out)


# --- ordering ----------------------------------------------------------------------------------------------

def _order_certificate(settings: AcmeSettings, acme_dir: Path, names: list[str], sink: ChallengeSink,
                       progress: Callable[[str, str], None]) -> Issued:
    """acme_client.order_certificate, the ACME library loaded on first use (in the worker thread, so the
    event loop does not wait for its imports): a box that just runs never loads it (acme_terms)."""
    from appliance import acme_client

    return acme_client.order_certificate(settings, acme_dir, names, sink, progress)


async def acme_settings(db: Database) -> AcmeSettings:
    return AcmeSettings(
        directory=await db.get_setting(DIRECTORY) or acme_terms.LETS_ENCRYPT,
        email=await db.get_setting(EMAIL) or None,
        eab_kid=await db.get_setting(EAB_KID) or None,
        eab_hmac_key=await db.get_setting(EAB_HMAC) or None,
        ca_file=await db.get_setting(CA_FILE) or None,
        challenge=await db.get_setting(CHALLENGE) or acme_terms.HTTP_01,
    )


def _sink(ctx: CertContext, loop: asyncio.AbstractEventLoop) -> ChallengeSink:
    """Called from the worker thread: the in-process dict (the box's own listener) and the db (a box
    in another process, when the CLI orders)."""

    def on_loop(coro: Awaitable[object]) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # type: ignore[arg-type]

    def set_http01(token: str, answer: str) -> None:
        if ctx.http01 is not None:
            ctx.http01[token] = answer
        on_loop(ctx.db.execute(
            "INSERT OR REPLACE INTO acme_challenges (token, key_authorization, created_at) VALUES (?, ?, ?)",
            (token, answer, int(time.time()))))

    def clear_http01(token: str) -> None:
        if ctx.http01 is not None:
            ctx.http01.pop(token, None)
        on_loop(ctx.db.execute("DELETE FROM acme_challenges WHERE token = ?", (token,)))

    def set_tls(name: str, key_authorization: str) -> None:
        ctx.tls.set_challenge(name, *tls_alpn_challenge_pem(name, key_authorization))

    return ChallengeSink(set_http01, clear_http01, set_tls, ctx.tls.clear_challenge)


async def _order(ctx: CertContext, settings: AcmeSettings, names: list[str], *, reason: str) -> CertificateInfo:
    loop = asyncio.get_running_loop()
    if settings.challenge == acme_terms.TLS_ALPN_01 and not ctx.answers_tls_alpn:
        settings = dataclasses.replace(settings, challenge=acme_terms.HTTP_01)

    def progress(phase: str, text: str) -> None:
        asyncio.run_coroutine_threadsafe(_set_state(ctx, phase, text), loop).result(30)

    await _set_state(ctx, "pending", f"Contacting {settings.directory} for {', '.join(names)}.")
    # Answers left behind by an order that never finished (the process was killed mid-order).
    await ctx.db.execute("DELETE FROM acme_challenges WHERE created_at < ?", (int(time.time()) - STALE_ANSWERS,))
    try:
        issued = await asyncio.to_thread(
            _order_certificate, settings, ctx.acme_dir, names, _sink(ctx, loop), progress)
        info = await asyncio.to_thread(ctx.tls.install, issued.fullchain_pem, issued.key_pem,
                                       hostname=ctx.hostname(), now=ctx.clock())
    except (AcmeProblem, CertificateProblem) as exc:
        message = exc.message if isinstance(exc, AcmeProblem) else f"The issued certificate was refused: {exc}"
        await _set_state(ctx, "failed", message)
        await ctx.db.set_setting(LAST_ERROR, message)
        await ctx.events.record("certificate", f"{reason} failed: {message} (the current certificate stays)")
        raise
    await ctx.db.set_setting(SOURCE, "acme")
    await ctx.db.set_setting(LAST_ERROR, "")
    await ctx.db.set_setting(NEXT_ATTEMPT, "")
    await _set_state(ctx, "issued", f"Issued by {info.issuer}, valid until {info.not_after:%Y-%m-%d}.")
    await ctx.events.record("certificate", f"{reason}: certificate for {', '.join(info.names)} from "
                            f"{info.issuer}, serial {info.serial:x}, until {info.not_after:%Y-%m-%d %H:%M} UTC")
    return info


async def request(ctx: CertContext, domains: list[str], *, directory: str | None = None, email: str | None = None,
                  eab_kid: str | None = None, eab_hmac_key: str | None = None,
                  challenge: str | None = None) -> tuple[CertificateInfo, NamesCheck]:
    """Order a certificate from an ACME CA now; the settings given are kept for renewals."""
    async with ctx.lock:
        for key, value in ((DIRECTORY, directory), (EMAIL, email), (EAB_KID, eab_kid), (EAB_HMAC, eab_hmac_key),
                           (CHALLENGE, challenge)):
            if value is not None:
                await ctx.db.set_setting(key, value.strip())
        try:
            names = await check_names(ctx, domains)
        except AcmeProblem as exc:
            await _set_state(ctx, "failed", exc.message)
            await ctx.db.set_setting(LAST_ERROR, exc.message)
            await ctx.events.record("certificate", f"order not placed: {exc.message}")
            raise
        if names.left_out:
            await ctx.events.record("certificate", "names left out of the order: " + "; ".join(names.left_out))
        info = await _order(ctx, await acme_settings(ctx.db), names.names, reason="certificate ordered")
        return info, names


async def start_request(ctx: CertContext, domains: list[str], **options: str | None) -> bool:
    """Start an order in the background (the web page shows its progress from the stored state, so a
    reload or another browser sees it too). False when one is already running."""
    if ctx.running is not None and not ctx.running.done():
        return False
    await _set_state(ctx, "pending", "Checking that the names lead to this box.")

    async def run() -> None:
        try:
            await request(ctx, domains, **options)
        except (AcmeProblem, CertificateProblem):
            pass  # recorded in the state, the last error and the events by request()
        except Exception:
            log.exception("certificate order failed")
            await _set_state(ctx, "failed", "The order failed unexpectedly; the log has the details.")

    ctx.running = asyncio.create_task(run(), name="letterbox-cert-order")
    return True


async def renew(ctx: CertContext, domains: list[str], *, force: bool = False) -> CertificateInfo | None:
    """Renew the ACME certificate when it is due (or now with force); None when not due."""
    async with ctx.lock:
        if await ctx.db.get_setting(SOURCE) != "acme":
            raise AcmeProblem("This certificate was not ordered through ACME by the box (it is self-signed or "
                              "imported): use `letterbox cert request` (or the Certificate page) to get one.",
                              kind="not-acme")
        info = ctx.tls.info()
        if not force and ctx.clock() < lifetime_due(info):
            return None
    info, _ = await request(ctx, domains)
    return info


async def import_pem(ctx: CertContext, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"") -> CertificateInfo:
    """An uploaded certificate: CertificateProblem (plain words) when it would not work; else served now."""
    async with ctx.lock:
        try:
            info = await asyncio.to_thread(ctx.tls.install, cert_pem, key_pem, chain_pem,
                                           hostname=ctx.hostname(), now=ctx.clock())
        except CertificateProblem as exc:
            await ctx.events.record("certificate", f"upload refused: {exc}")
            raise
        await ctx.db.set_setting(SOURCE, "imported")
        await ctx.db.set_setting(LAST_ERROR, "")
        await _set_state(ctx, "idle", "")
        await ctx.events.record("certificate", f"certificate imported for {', '.join(info.names)} from {info.issuer}, "
                                f"until {info.not_after:%Y-%m-%d %H:%M} UTC")
        return info


async def self_signed(ctx: CertContext) -> CertificateInfo:
    async with ctx.lock:
        hostname = ctx.hostname()
        info = await asyncio.to_thread(ctx.tls.install_self_signed, hostname)
        ctx.tls.hostname = hostname
        await ctx.db.set_setting(SOURCE, "self-signed")
        await _set_state(ctx, "idle", "")
        await ctx.events.record("certificate", f"self-signed certificate made for {hostname}")
        return info


async def pending_http01(ctx: CertContext, token: str) -> str | None:
    """The answer for /.well-known/acme-challenge/<token>: this process's order first, then the CLI's."""
    if ctx.http01 is not None and token in ctx.http01:
        return ctx.http01[token]
    row = await ctx.db.fetchone("SELECT key_authorization FROM acme_challenges WHERE token = ?", (token,))
    return str(row["key_authorization"]) if row else None


# --- the renewer -------------------------------------------------------------------------------------------

def retry_delay(rng: random.Random) -> dt.timedelta:
    """30-60 minutes with jitter: never a tight loop, and a fleet of boxes does not retry in step."""
    return RETRY_MIN + (RETRY_MAX - RETRY_MIN) * rng.random()


def next_attempt(now: dt.datetime, problem: Exception, rng: random.Random) -> dt.datetime:
    """After a failed renewal: 30-60 minutes with jitter, or later if the CA said so (Retry-After)."""
    when = now + retry_delay(rng)
    retry_after = getattr(problem, "retry_after", None)
    if isinstance(retry_after, dt.datetime) and retry_after > when:
        when = retry_after
    return when


class Renewer:
    """Checks at start and every 12 hours; renews an ACME certificate in its ARI window (RFC 9773) or when
    a third of its lifetime is left; retries a failure after 30-60 minutes (or the CA's Retry-After);
    warns the postmaster by mail when 14 days are left; picks up a certificate the CLI installed."""

    def __init__(self, ctx: CertContext, domains: Callable[[], Awaitable[list[str]]],
                 warn: Callable[[str, str], Awaitable[None]], *, rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.domains = domains
        self.warn = warn
        self.rng = rng or random.Random()  # noqa: S311  retry jitter, not a secret
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._file_stamp = self._stamp()

    def _stamp(self) -> tuple[float, int]:
        try:
            st = self.ctx.tls.cert_path.stat()
            return (st.st_mtime, st.st_size)
        except OSError:
            return (0.0, 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="letterbox-cert-renewer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        next_check = self.ctx.clock()
        while True:
            if self.ctx.clock() >= next_check:
                try:
                    next_check = await self.check()
                except Exception:
                    log.exception("certificate check failed")
                    next_check = self.ctx.clock() + retry_delay(self.rng)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FILE_POLL_SECONDS)
            self._pick_up_file()

    def _pick_up_file(self) -> None:
        stamp = self._stamp()
        if stamp != self._file_stamp:
            self._file_stamp = stamp
            try:
                self.ctx.tls.reload()
            except (CertificateProblem, OSError) as exc:
                log.warning("the certificate file changed but cannot be used (%s): keeping the served one", exc)

    async def check(self) -> dt.datetime:
        """One pass; returns when to check next. The warning comes after the attempt, so it carries
        the attempt's error (and is not sent when the renewal worked)."""
        now = self.ctx.clock()
        before = self.ctx.tls.info().serial
        next_check = await self._renew_if_due(now)
        if self.ctx.tls.info().serial == before:  # just renewed: nothing to warn about
            await self._maybe_warn(self.ctx.tls.info(), now)
        return next_check

    async def _renew_if_due(self, now: dt.datetime) -> dt.datetime:
        db = self.ctx.db
        info = self.ctx.tls.info()
        if (await db.get_setting(SOURCE)) != "acme":
            return now + CHECK_EVERY
        retry_at = await db.get_setting(NEXT_ATTEMPT)
        if retry_at and now.timestamp() < int(retry_at):
            return dt.datetime.fromtimestamp(int(retry_at), dt.UTC)
        settings = await acme_settings(db)
        cert_pem = self.ctx.tls.cert_path.read_bytes()
        due = await self._ari_window(settings, cert_pem) or lifetime_due(info)
        if now < due:
            return min(now + CHECK_EVERY, due)
        try:
            await request(self.ctx, await self.domains())
        except (AcmeProblem, CertificateProblem) as exc:
            when = next_attempt(now, exc, self.rng)
            await db.set_setting(NEXT_ATTEMPT, str(int(when.timestamp())))
            await self.ctx.events.record("certificate", f"renewal will be tried again at {when:%Y-%m-%d %H:%M} UTC")
            return when
        self._file_stamp = self._stamp()
        return now + CHECK_EVERY

    async def _ari_window(self, settings: AcmeSettings, cert_pem: bytes) -> dt.datetime | None:
        if self.ctx.cpu is None:
            return await asyncio.to_thread(acme_terms.ari_window, settings, self.ctx.acme_dir, cert_pem)
        return await self.ctx.cpu.run_background(acme_terms.ari_window, settings, self.ctx.acme_dir, cert_pem)

    async def _maybe_warn(self, info: CertificateInfo, now: dt.datetime) -> None:
        if info.self_signed or info.not_after - now > WARN_LEFT:
            return
        if await self.ctx.db.get_setting(WARNED_SERIAL) == f"{info.serial:x}":
            return
        days = max(0, (info.not_after - now).days)
        last = await self.ctx.db.get_setting(LAST_ERROR) or "none recorded"
        text = (f"The certificate of {self.ctx.hostname()} expires in {days} days ({info.not_after:%Y-%m-%d %H:%M} "
                f"UTC) and has not been renewed yet.\n\nLast error: {last}\n\nOpen the console's Certificate page "
                "to renew it or upload another one. Once it expires, mail programs refuse to connect.\n")
        await self.warn(f"Certificate of {self.ctx.hostname()} expires in {days} days", text)
        await self.ctx.db.set_setting(WARNED_SERIAL, f"{info.serial:x}")
        await self.ctx.events.record("certificate", f"expiry warning sent to the postmaster ({days} days left)")


async def start_renewer(svc: Services) -> Renewer:
    async def domains() -> list[str]:
        return list(await svc.accounts.list_domains())

    async def warn(subject: str, text: str) -> None:
        await mail_postmaster(svc, subject, text)

    renewer = Renewer(svc.certificates, domains, warn)
    svc.renewer = renewer
    renewer.start()
    return renewer
