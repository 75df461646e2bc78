"""verify(address, password, service, peer) for every protocol and the web, with one shared throttle.

How failed logins are slowed (one Auth, so one Throttle, per box: SMTP, IMAP, POP3 and the web share it):
- Failures are counted in leaky buckets (one failure is forgiven every `forgive_seconds`), for three keys:
  the client address (IPv6 by /64, as one host owns a whole /64), the (client, account) pair, and the
  account alone.
- After a few free failures each further attempt waits a growing delay (asyncio.sleep, so the loop keeps
  serving everyone else) before its password is checked.
- Too many failures lock out the (client, account) pair, and, at a higher count, the client address,
  for `lockout_seconds`. The account alone is never locked, only delayed a bounded time: an attacker
  elsewhere must not be able to lock its owner out, and a right password from another address works.
- Attempts for one (client, account) pair are checked one at a time, so a burst of parallel guesses is
  counted exactly; argon2 work is bounded by MAX_CONCURRENT_HASHES.
- Unknown accounts are checked against a dummy hash, so they take as long as known ones.
- Every attempt is logged on 'letterbox.auth' with outcome, service, peer and account; never the password.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from argon2 import PasswordHasher

from appliance import passwords
from appliance.account_errors import InvalidAddress
from appliance.accounts import Accounts, Credentials
from appliance.address import parse_address
from appliance.db import Database

log = logging.getLogger("letterbox.auth")

MAX_CONCURRENT_HASHES = 2  # argon2id takes 64 MiB and a core each; the Pi has 4 cores and little memory
MAX_LOGGED_NAME = 100  # account names come from the network: logged truncated and escaped
MAX_ACCOUNT_KEY = 320  # unparseable names are throttled by this much of their text
IPV6_PREFIX = 64  # one IPv6 host usually controls a whole /64

Outcome = Literal["ok", "bad-password", "unknown-account", "disabled", "locked"]


@dataclass(frozen=True)
class Principal:
    name: str  # canonical mailbox address, or admin user name
    kind: Literal["mailbox", "admin"]


@dataclass(frozen=True)
class ThrottlePolicy:
    """All throttle numbers in one place; tests pass small ones."""

    free_failures: int = 3  # per (peer, account) and per account, before any delay
    peer_free_failures: int = 10  # per peer: many users may share one address behind NAT
    base_delay: float = 1.0  # seconds for the first delayed attempt, doubling after
    max_delay: float = 15.0  # cap of the delay from peer and (peer, account) failures
    account_max_delay: float = 3.0  # cap of the delay from an account's failures from anywhere
    pair_lockout_failures: int = 10  # (peer, account) failures that lock out that pair
    peer_lockout_failures: int = 30  # failures from one peer, any accounts, that lock out the peer
    lockout_seconds: float = 900.0
    forgive_seconds: float = 60.0  # one counted failure leaks away every this many seconds
    max_tracked: int = 10_000  # entries per table; the least recently failed are dropped beyond

    def __post_init__(self) -> None:
        if self.forgive_seconds <= 0 or self.base_delay < 0 or self.max_tracked < 1:
            raise ValueError("ThrottlePolicy needs forgive_seconds > 0, base_delay >= 0, max_tracked >= 1")


DEFAULT_POLICY = ThrottlePolicy()

K = TypeVar("K", bound=Hashable)


@dataclass
class _Bucket:
    level: float = 0.0
    at: float = 0.0
    locked_until: float = 0.0

    def current(self, now: float, forgive_seconds: float) -> float:
        return max(0.0, self.level - (now - self.at) / forgive_seconds)


class _Table(Generic[K]):
    """Leaky buckets by key, bounded in number (a flood of made-up names cannot exhaust memory)."""

    def __init__(self, policy: ThrottlePolicy) -> None:
        self._policy = policy
        self._buckets: OrderedDict[K, _Bucket] = OrderedDict()

    def level(self, key: K, now: float) -> float:
        bucket = self._buckets.get(key)
        return bucket.current(now, self._policy.forgive_seconds) if bucket else 0.0

    def locked_for(self, key: K, now: float) -> float:
        bucket = self._buckets.get(key)
        return max(0.0, bucket.locked_until - now) if bucket else 0.0

    def add_failure(self, key: K, now: float) -> _Bucket:
        bucket = self._buckets.pop(key, None) or _Bucket()
        bucket.level = bucket.current(now, self._policy.forgive_seconds) + 1
        bucket.at = now
        self._buckets[key] = bucket  # most recent last
        while len(self._buckets) > self._policy.max_tracked:
            self._buckets.popitem(last=False)
        return bucket

    def clear(self, key: K) -> None:
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)


class Throttle:
    """Failure accounting shared by every protocol. Pure bookkeeping except `serialised`."""

    def __init__(self, policy: ThrottlePolicy = DEFAULT_POLICY, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._peers: _Table[str] = _Table(policy)
        self._pairs: _Table[tuple[str, str]] = _Table(policy)
        self._accounts: _Table[str] = _Table(policy)
        self._in_progress: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def _delay_for(self, level: float, free: int, cap: float) -> float:
        over = int(level) - free
        if over < 0:
            return 0.0
        return min(cap, self.policy.base_delay * 2 ** min(over, 32))

    def locked_for(self, peer: str, account: str) -> float:
        """Seconds left of a lockout affecting this attempt; 0 when none."""
        now = self._clock()
        return max(self._peers.locked_for(peer, now), self._pairs.locked_for((peer, account), now))

    def delay(self, peer: str, account: str) -> float:
        """How long to wait before checking this attempt's password."""
        now = self._clock()
        p = self.policy
        return max(
            self._delay_for(self._peers.level(peer, now), p.peer_free_failures, p.max_delay),
            self._delay_for(self._pairs.level((peer, account), now), p.free_failures, p.max_delay),
            self._delay_for(self._accounts.level(account, now), p.free_failures, p.account_max_delay),
        )

    def failed(self, peer: str, account: str) -> str | None:
        """Count a failure; returns 'peer' or 'pair' when it starts a lockout of that key."""
        now = self._clock()
        p = self.policy
        self._accounts.add_failure(account, now)
        started: str | None = None
        pair = self._pairs.add_failure((peer, account), now)
        if pair.level >= p.pair_lockout_failures and pair.locked_until <= now:
            pair.locked_until = now + p.lockout_seconds
            started = "pair"
        whole = self._peers.add_failure(peer, now)
        if whole.level >= p.peer_lockout_failures and whole.locked_until <= now:
            whole.locked_until = now + p.lockout_seconds
            started = "peer"
        return started

    def succeeded(self, peer: str, account: str) -> None:
        """The right password: forget this pair's and account's failures. The peer's count stays, so
        one valid account cannot be used to launder guesses at others."""
        self._pairs.clear((peer, account))
        self._accounts.clear(account)

    def tracked(self) -> int:
        """Entries in the largest table (for tests and the console)."""
        return max(len(self._peers), len(self._pairs), len(self._accounts))

    @asynccontextmanager
    async def serialised(self, peer: str, account: str) -> AsyncIterator[None]:
        """One attempt at a time per (peer, account), so parallel guesses see each other's failures."""
        key = (peer, account)
        lock, users = self._in_progress.get(key, (asyncio.Lock(), 0))
        self._in_progress[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._in_progress[key]
            if users <= 1:
                del self._in_progress[key]
            else:
                self._in_progress[key] = (lock, users - 1)


def peer_key(peer: str) -> str:
    """The throttle key of a client address: IPv4 as is, IPv4-mapped IPv6 as IPv4, IPv6 by /64."""
    text = peer.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return printable(text) or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip.exploded.split("%")[0], IPV6_PREFIX), strict=False))
    return str(ip)


def printable(text: str, limit: int = MAX_LOGGED_NAME) -> str:
    """Network-supplied text made safe for one log line."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def _mailbox_account(address: str) -> str:
    try:
        return parse_address(address).canonical
    except InvalidAddress:
        return address.strip().lower()[:MAX_ACCOUNT_KEY]


class Auth:
    def __init__(
        self, db: Database, accounts: Accounts, *, policy: ThrottlePolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic, hasher: PasswordHasher | None = None,
    ) -> None:
        self._db = db
        self._accounts = accounts
        self.throttle = Throttle(policy, clock)
        # New hashes use the parameters Accounts uses; a stored hash made otherwise is rehashed at login.
        self.hasher = hasher or accounts.hasher
        self._hash_slots = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self._dummy_hash: str | None = None

    async def verify(self, address: str, password: str, service: str, peer: str) -> Principal | None:
        """Check a mailbox password. `service` is 'smtp', 'imap', 'pop3' or 'web'; `peer` the client IP.
        Applies throttling (may sleep), logs the attempt (never the password)."""
        return await self._attempt("mailbox", _mailbox_account(address), password, service, peer)

    async def verify_admin(self, username: str, password: str, peer: str) -> Principal | None:
        """Check a web console admin's password, with the same throttle as mailboxes."""
        return await self._attempt("admin", username.strip().lower()[:MAX_ACCOUNT_KEY], password, "web", peer)

    async def _attempt(
        self, kind: Literal["mailbox", "admin"], account: str, password: str, service: str, peer: str
    ) -> Principal | None:
        client = peer_key(peer)
        key = f"{kind}:{account}"  # mailbox and admin names live in separate namespaces
        throttle = self.throttle
        async with throttle.serialised(client, key):
            delay = 0.0
            if not throttle.locked_for(client, key):
                delay = throttle.delay(client, key)
                if delay:
                    await asyncio.sleep(delay)
            if throttle.locked_for(client, key):
                self._log("locked", kind, account, service, peer, delay)
                return None
            async with self._hash_slots:
                if throttle.locked_for(client, key):  # a parallel attempt locked us out while we queued
                    self._log("locked", kind, account, service, peer, delay)
                    return None
                outcome, creds = await self._check(kind, account, password)
                if outcome == "ok" and creds is not None:
                    await self._maybe_rehash(kind, creds, password)
            if outcome == "ok":
                throttle.succeeded(client, key)
            elif outcome != "disabled":  # a right password for a disabled account is not a guess
                started = throttle.failed(client, key)
                if started:
                    log.warning(
                        "auth lockout: %s for %.0fs after repeated failures (service=%s peer=%s account=%s)",
                        "client address" if started == "peer" else "client address for this account",
                        throttle.policy.lockout_seconds, service, printable(peer), printable(account),
                    )
            self._log(outcome, kind, account, service, peer, delay)
            if outcome == "ok" and creds is not None:
                return Principal(creds.name, kind)
            return None

    async def _check(
        self, kind: Literal["mailbox", "admin"], account: str, password: str
    ) -> tuple[Outcome, Credentials | None]:
        if kind == "mailbox":
            creds = await self._accounts.mailbox_credentials(account)
        else:
            creds = await self._accounts.admin_credentials(account)
        if creds is None:
            # Same work as for a real account, so response time does not tell which names exist.
            await asyncio.to_thread(passwords.verify_password, await self._dummy(), password, self.hasher)
            return "unknown-account", None
        ok = await asyncio.to_thread(passwords.verify_password, creds.password_hash, password, self.hasher)
        if not ok:
            return "bad-password", None
        if not creds.enabled:
            return "disabled", None
        return "ok", creds

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(
                passwords.hash_password, secrets.token_urlsafe(24), self.hasher
            )
        return self._dummy_hash

    async def _maybe_rehash(self, kind: Literal["mailbox", "admin"], creds: Credentials, password: str) -> None:
        """The password was just proven: store it again with the current parameters if they changed."""
        if not passwords.needs_rehash(creds.password_hash, self.hasher):
            return
        new_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        try:
            stored = await self._accounts.replace_password_hash(kind, creds.name, creds.password_hash, new_hash)
        except Exception:  # the login itself succeeded; an upgrade can wait for the next one
            log.exception("auth: could not store the rehashed password of %s", printable(creds.name))
            return
        if stored:
            log.info("auth: password hash of %s upgraded to the current argon2id parameters", printable(creds.name))

    @staticmethod
    def _log(outcome: Outcome, kind: str, account: str, service: str, peer: str, delay: float) -> None:
        slowed = f" delayed={delay:.1f}s" if delay else ""
        log.info(
            "auth %s: service=%s peer=%s %s=%s%s",
            outcome, printable(service, 20), printable(peer), kind, printable(account), slowed,
        )
