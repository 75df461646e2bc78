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
  counted exactly; argon2 work is bounded by MAX_CONCURRENT_HASHES, and one of those slots is kept for
  the owner's own clients (below), which also go first in the queue: an attack on other accounts, or
  from many addresses, must not make the owner wait behind a queue of hashes.
- Distributed guessing (many addresses, a few tries each, so no address is ever slowed) meets a budget
  per account: at most `account_budget` passwords are checked per `budget_seconds` for that account from
  all addresses together. Past it an attempt is refused without looking at the password, answered like
  any failed login, so the answer never tells whether the guess was right. A check that finds the right
  password gives its unit back: only wrong guesses (and checks in flight) fill the budget.
- The budget must not lock the owner out, so the owner's own clients have their own: an address that
  logged in to the account over IMAP, POP3 or SMTP in the last `trust_seconds` (kept in the db, so it
  survives a restart), or on the web a device carrying the signed cookie set at its last login
  (`sign_device`). They are not slowed by the account-wide delay either: that comes from others'
  failures.
- Unknown accounts are checked against a dummy hash, so they take as long as known ones.
- A password proven in the last few minutes is not hashed again (LoginCache, as Dovecot's auth cache):
  the entry holds a keyed HMAC of it and the stored hash it matched, and is used only while the account's
  stored hash (read from the db at each attempt) is unchanged and the account enabled. Everything above
  (lockout, delays, budgets) still applies before the cache is consulted; failures are never cached.
- Every attempt is logged on 'letterbox.auth' with outcome, service, peer and account; never the password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeAlias, TypeVar

from argon2 import PasswordHasher

from appliance import passwords
from appliance.account_errors import InvalidAddress
from appliance.accounts import Accounts, Credentials
from appliance.address import parse_address
from appliance.db import Database
from appliance.disk_full import is_disk_full
from appliance.events import EventLog
from appliance.login_cache import LoginCache

log = logging.getLogger("letterbox.auth")

MAX_CONCURRENT_HASHES = 2  # argon2id takes 19 MiB and a core each; the Pi has 4 cores and little memory
HASH_SLOTS_KEPT_FOR_OWNERS = 1  # of those, never taken by clients an account has not seen before
MAX_LOGGED_NAME = 100  # account names come from the network: logged truncated and escaped
MAX_ACCOUNT_KEY = 320  # unparseable names are throttled by this much of their text
IPV6_PREFIX = 64  # one IPv6 host usually controls a whole /64

MAX_TRUSTED_PER_ACCOUNT = 20  # remembered client addresses per account; the least recent are forgotten
MAX_DEVICE_TOKEN = 1000  # a device cookie is ~150 characters; anything much longer is not ours

Outcome = Literal["ok", "bad-password", "unknown-account", "disabled", "locked", "over-budget"]


@dataclass(frozen=True)
class Principal:
    name: str  # canonical mailbox address, or admin user name
    kind: Literal["mailbox", "admin"]
    # The stored hash the password was proven against: a session logged in with it ends once the
    # account has another (a password changed because it leaked ends the thief's sessions).
    password_hash: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Refused:
    """An attempt answered without looking at its password: the client is locked out, or the account's
    budget for strangers is used up. The answer says "try later", never "wrong password" (issue 18): it
    cannot tell a guess from the right password, as the password was not checked."""

    reason: Literal["locked", "over-budget"]
    retry_after: float  # seconds

    def wait_words(self) -> str:
        minutes = math.ceil(self.retry_after / 60)
        return "a minute" if minutes <= 1 else f"{minutes} minutes"

    def message(self) -> str:
        if self.reason == "locked":
            return f"Too many failed logins from your address: try again in {self.wait_words()}"
        return f"Too many login attempts for this account just now: try again in {self.wait_words()}"


@dataclass(frozen=True)
class Lockout:
    """A lockout in force, for the console: `account` None when the whole client address is locked."""

    peer: str
    account: str | None
    seconds_left: float


LoginResult: TypeAlias = Principal | Refused | None


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
    account_budget: int = 10  # passwords checked per account per budget_seconds, all strangers together
    trusted_budget: int = 10  # the same, for each of the owner's remembered addresses and devices
    budget_seconds: float = 60.0
    # An attempt refused by the budget is answered after this long (Dovecot's auth_failure_delay): an
    # instant "no" would invite a tight reconnect loop, each round a TLS handshake for the box.
    over_budget_delay: float = 2.0
    trust_seconds: float = 30 * 86400  # how long a successful address or device stays remembered

    def __post_init__(self) -> None:
        if self.forgive_seconds <= 0 or self.base_delay < 0 or self.max_tracked < 1:
            raise ValueError("ThrottlePolicy needs forgive_seconds > 0, base_delay >= 0, max_tracked >= 1")
        if self.account_budget < 1 or self.trusted_budget < 1 or self.budget_seconds <= 0:
            raise ValueError("ThrottlePolicy needs budgets >= 1 and budget_seconds > 0")


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

    def entries(self) -> list[K]:
        return list(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)


class BudgetUse:
    """One unit of a budget: counted while its check runs (or waits for a hash slot), and for a
    window after the check ended. Counting from the end, not the start, is what keeps every 60 s of
    finished checks (what the log shows) within the limit, however long checks waited."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = math.inf


class _Budget(Generic[K]):
    """At most `limit` uses per `window` seconds per key, as a sliding window (a token bucket would
    allow twice the limit around a refill). Bounded like _Table."""

    def __init__(self, limit: int, window: float, max_tracked: int) -> None:
        self._limit = limit
        self._window = window
        self._max_tracked = max_tracked
        self._uses: OrderedDict[K, list[BudgetUse]] = OrderedDict()

    def take(self, key: K, now: float) -> BudgetUse | None:
        """One unit of the key's budget, or None when it is used up."""
        uses = [use for use in self._uses.pop(key, ()) if use.until > now]
        taken = None
        if len(uses) < self._limit:
            taken = BudgetUse()
            uses.append(taken)
        if uses:
            self._uses[key] = uses  # most recently used last
            while len(self._uses) > self._max_tracked:
                self._uses.popitem(last=False)
        return taken

    def give_back(self, key: K, use: BudgetUse) -> None:
        uses = self._uses.get(key)
        if uses:
            self._uses[key] = [other for other in uses if other is not use]

    def __len__(self) -> int:
        return len(self._uses)


def _failures(level: float) -> int:
    """The failures a bucket still counts. One counts until it has leaked away entirely: 2.98 after
    three failures a second apart is still three (int() made it two, so a fourth free failure slipped
    through, and a lockout came one failure late)."""
    return math.ceil(level)


class Throttle:
    """Failure accounting shared by every protocol. Pure bookkeeping except `serialised`."""

    def __init__(self, policy: ThrottlePolicy = DEFAULT_POLICY, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._peers: _Table[str] = _Table(policy)
        self._pairs: _Table[tuple[str, str]] = _Table(policy)
        self._accounts: _Table[str] = _Table(policy)
        self._account_budget: _Budget[str] = _Budget(policy.account_budget, policy.budget_seconds, policy.max_tracked)
        self._trusted_budget: _Budget[tuple[str, str]] = _Budget(
            policy.trusted_budget, policy.budget_seconds, policy.max_tracked
        )
        self._in_progress: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def _delay_for(self, level: float, free: int, cap: float) -> float:
        over = _failures(level) - free
        if over < 0:
            return 0.0
        return min(cap, self.policy.base_delay * 2.0 ** min(over, 32))

    def locked_for(self, peer: str, account: str) -> float:
        """Seconds left of a lockout affecting this attempt; 0 when none."""
        now = self._clock()
        return max(self._peers.locked_for(peer, now), self._pairs.locked_for((peer, account), now))

    def pair_locked_for(self, peer: str, account: str) -> float:
        """Seconds left of this (client, account) pair's own lockout; 0 when none."""
        return self._pairs.locked_for((peer, account), self._clock())

    def delay(self, peer: str, account: str, *, trusted: bool = False) -> float:
        """How long to wait before checking this attempt's password. The owner's own address or device
        (`trusted`) is not slowed by failures that others caused on the account."""
        now = self._clock()
        p = self.policy
        account_delay = 0.0 if trusted else self._delay_for(
            self._accounts.level(account, now), p.free_failures, p.account_max_delay
        )
        return max(
            self._delay_for(self._peers.level(peer, now), p.peer_free_failures, p.max_delay),
            self._delay_for(self._pairs.level((peer, account), now), p.free_failures, p.max_delay),
            account_delay,
        )

    def take_check(self, account: str, trusted_client: str | None) -> BudgetUse | None:
        """May a password be checked now for this account? One unit of the budget it comes out of (the
        trusted client's own, or the one all other clients of the account share), or None. The caller
        ends it with finish_check, or give_back_check when the password was right."""
        now = self._clock()
        if trusted_client is not None:
            return self._trusted_budget.take((account, trusted_client), now)
        return self._account_budget.take(account, now)

    def finish_check(self, use: BudgetUse) -> None:
        use.until = self._clock() + self.policy.budget_seconds

    def give_back_check(self, account: str, trusted_client: str | None, use: BudgetUse) -> None:
        """The check found the right password: it was no guess, so it does not use up the budget (the
        owner's many clients logging in at once are not slowed; only failures fill it)."""
        if trusted_client is not None:
            self._trusted_budget.give_back((account, trusted_client), use)
        else:
            self._account_budget.give_back(account, use)

    def failed(self, peer: str, account: str) -> str | None:
        """Count a failure; returns 'peer' or 'pair' when it starts a lockout of that key."""
        now = self._clock()
        p = self.policy
        self._accounts.add_failure(account, now)
        started: str | None = None
        pair = self._pairs.add_failure((peer, account), now)
        if _failures(pair.level) >= p.pair_lockout_failures and pair.locked_until <= now:
            pair.locked_until = now + p.lockout_seconds
            started = "pair"
        whole = self._peers.add_failure(peer, now)
        if _failures(whole.level) >= p.peer_lockout_failures and whole.locked_until <= now:
            whole.locked_until = now + p.lockout_seconds
            started = "peer"
        return started

    def succeeded(self, peer: str, account: str) -> None:
        """The right password: forget this pair's and account's failures. The peer's count stays, so
        one valid account cannot be used to launder guesses at others."""
        self._pairs.clear((peer, account))
        self._accounts.clear(account)

    def lockouts(self) -> list[Lockout]:
        """Lockouts in force now, the longest first."""
        now = self._clock()
        found = [Lockout(peer, None, left) for peer in self._peers.entries()
                 if (left := self._peers.locked_for(peer, now)) > 0]
        found += [Lockout(peer, account, left) for peer, account in self._pairs.entries()
                  if (left := self._pairs.locked_for((peer, account), now)) > 0]
        return sorted(found, key=lambda lockout: -lockout.seconds_left)

    def unlock(self, peer: str, account: str | None) -> bool:
        """Lift a lockout and forget the failures behind it (the admin vouches for the client); False
        when there was none."""
        now = self._clock()
        if account is None:
            was = self._peers.locked_for(peer, now) > 0
            self._peers.clear(peer)
            return was
        was = self._pairs.locked_for((peer, account), now) > 0
        self._pairs.clear((peer, account))
        self._accounts.clear(account)
        return was

    def tracked(self) -> int:
        """Entries in the largest table (for tests and the console)."""
        return max(len(self._peers), len(self._pairs), len(self._accounts), len(self._account_budget),
                   len(self._trusted_budget))

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


class HashSlots:
    """A semaphore for password hashes with two classes of waiters: the owners' own clients (a
    remembered address or device) may take any free slot and are served first; everyone else leaves
    `kept` slots free for them. Strangers' hashes then delay an owner by at most the one in progress."""

    def __init__(self, size: int, kept: int) -> None:
        if not 0 <= kept < size:
            raise ValueError("HashSlots needs 0 <= kept < size")
        self._free = size
        self._kept = kept
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    def _may_take(self, owner: bool) -> bool:
        return self._free > (0 if owner else self._kept)

    @asynccontextmanager
    async def slot(self, *, owner: bool) -> AsyncIterator[None]:
        queue_ahead = self._waiting[True] or (not owner and self._waiting[False])
        if self._may_take(owner) and not queue_ahead:
            self._free -= 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[owner].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot just as we were cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting[owner].remove(waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._free += 1
        while True:
            if self._waiting[True] and self._may_take(True):
                waiter = self._waiting[True].popleft()
            elif self._waiting[False] and self._may_take(False):
                waiter = self._waiting[False].popleft()
            else:
                return
            if not waiter.done():
                self._free -= 1
                waiter.set_result(None)


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


@dataclass(frozen=True)
class Device:
    """A browser that logged in to `account` before, as its signed device cookie says (sign_device)."""

    account: str  # the throttle's account key: 'mailbox:alice@example.org' or 'admin:root'
    id: str


_DEVICE_CONTEXT = b"letterbox.auth.device\x00"  # this HMAC cannot be mistaken for another use of the secret


def account_key(principal: Principal) -> str:
    return f"{principal.kind}:{principal.name}"


def _device_mac(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), _DEVICE_CONTEXT + payload, hashlib.sha256).hexdigest()


def sign_device(secret: str, principal: Principal, now: float, device_id: str | None = None) -> str:
    """The device cookie's value after a successful web login: which account, which device, when,
    signed with HMAC-SHA256 and the box's secret so that only this box can have made it. It grants no
    access, only the owner's own password-check budget; `device_id` keeps a known browser's id."""
    body = {"a": account_key(principal), "d": device_id or secrets.token_urlsafe(16), "t": int(now)}
    payload = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=") + "." + _device_mac(secret, payload)


def read_device(secret: str, token: str | None, now: float, max_age: float = DEFAULT_POLICY.trust_seconds) -> Device | None:
    """The device a cookie names, or None when it is missing, forged, damaged or older than max_age."""
    if not token or len(token) > MAX_DEVICE_TOKEN or token.count(".") != 1:
        return None
    encoded, mac = token.split(".")
    try:
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _device_mac(secret, payload)):
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    account, device_id, issued = body.get("a"), body.get("d"), body.get("t")
    if not isinstance(account, str) or not isinstance(device_id, str) or not isinstance(issued, int):
        return None
    if not 0 <= now - issued <= max_age:
        return None
    return Device(account, device_id)


def _mailbox_account(address: str) -> str:
    try:
        return parse_address(address).canonical
    except InvalidAddress:
        return address.strip().lower()[:MAX_ACCOUNT_KEY]


FAILURE_NOTE_SECONDS = 300.0


class _FailureNotes:
    """Coalesces failed-login events per account: `due` says how many failures to report now (0:
    not yet). Bounded like the throttle's tables."""

    def __init__(self, clock: Callable[[], float], max_tracked: int = 10_000) -> None:
        self._clock = clock
        self._max = max_tracked
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def due(self, key: str) -> int:
        now = self._clock()
        at, pending = self._last.pop(key, (-math.inf, 0))
        pending += 1
        if now - at >= FAILURE_NOTE_SECONDS:
            self._last[key] = (now, 0)
            result = pending
        else:
            self._last[key] = (at, pending)
            result = 0
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        return result


def _shown_account(key: str) -> str:
    """'mailbox:alice@example.org' -> 'alice@example.org', 'admin:root' -> 'admin root'; printable."""
    kind, _, name = key.partition(":")
    return printable(name) if kind == "mailbox" else f"admin {printable(name)}"


class Auth:
    def __init__(
        self, db: Database, accounts: Accounts, *, policy: ThrottlePolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic, hasher: PasswordHasher | None = None,
        wall_clock: Callable[[], float] = time.time, login_cache: LoginCache | None = None,
        events: EventLog | None = None,
    ) -> None:
        self._db = db
        self._events = events
        self._failure_notes = _FailureNotes(clock)
        self._accounts = accounts
        self.throttle = Throttle(policy, clock)
        self._wall_clock = wall_clock  # remembered addresses are stored in the db: unix time, not monotonic
        # New hashes use the parameters Accounts uses; a stored hash made otherwise is rehashed at login.
        self.hasher = hasher or accounts.hasher
        self._hash_slots = HashSlots(MAX_CONCURRENT_HASHES, HASH_SLOTS_KEPT_FOR_OWNERS)
        self._dummy_hash: str | None = None
        self.login_cache = login_cache or LoginCache(clock=clock)
        # The stored hash each (client, account) lockout began under: a password set since lifts it.
        self._locked_under: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def login(
        self, address: str, password: str, service: str, peer: str, *, device: Device | None = None
    ) -> LoginResult:
        """Check a mailbox password. `service` is 'smtp', 'imap', 'pop3' or 'web'; `peer` the client IP;
        `device` what the web's device cookie proves (read_device). Applies throttling and the account's
        budget (may sleep, may refuse without checking: Refused), logs the attempt (never the password).
        None: a wrong name or password."""
        return await self._attempt("mailbox", _mailbox_account(address), password, service, peer, device)

    async def login_admin(
        self, username: str, password: str, peer: str, *, device: Device | None = None
    ) -> LoginResult:
        """Check a web console admin's password, with the same throttle and budget as mailboxes."""
        account = username.strip().lower()[:MAX_ACCOUNT_KEY]
        return await self._attempt("admin", account, password, "web", peer, device)

    async def verify(
        self, address: str, password: str, service: str, peer: str, *, device: Device | None = None
    ) -> Principal | None:
        """`login` for callers that only need yes or no (a password re-entered to confirm a change)."""
        result = await self.login(address, password, service, peer, device=device)
        return result if isinstance(result, Principal) else None

    async def verify_admin(
        self, username: str, password: str, peer: str, *, device: Device | None = None
    ) -> Principal | None:
        result = await self.login_admin(username, password, peer, device=device)
        return result if isinstance(result, Principal) else None

    def lockouts(self) -> list[Lockout]:
        return self.throttle.lockouts()

    async def unlock(self, peer: str, account: str | None, by: str) -> bool:
        """The console's Unlock button: lift one lockout, with its event."""
        lifted = self.throttle.unlock(peer, account)
        if lifted and self._events is not None:
            whom = f"{_shown_account(account)} from {peer}" if account else f"the address {peer}"
            await self._events.record("login", f"unlocked {whom} (by {by})")
        return lifted

    async def _attempt(
        self, kind: Literal["mailbox", "admin"], account: str, password: str, service: str, peer: str,
        device: Device | None,
    ) -> LoginResult:
        client = peer_key(peer)
        key = f"{kind}:{account}"  # mailbox and admin names live in separate namespaces
        throttle = self.throttle
        async with throttle.serialised(client, key):
            await self._lift_if_password_changed(kind, account, client, key)
            trusted = await self._trusted_client(key, client, service, device)
            delay = 0.0
            if not throttle.locked_for(client, key):
                delay = throttle.delay(client, key, trusted=trusted is not None)
                if delay:
                    await asyncio.sleep(delay)
            if locked := throttle.locked_for(client, key):
                self._log("locked", kind, account, service, peer, delay)
                return Refused("locked", locked)
            use = throttle.take_check(key, trusted)
            if use is None:
                # Not checked at all, so the answer ("try later") cannot depend on the password;
                # not counted as a failure either: it proves nothing about this client.
                self._log("over-budget", kind, account, service, peer, delay)
                await asyncio.sleep(throttle.policy.over_budget_delay)
                return Refused("over-budget", throttle.policy.budget_seconds)
            try:
                outcome, creds = await self._prove(kind, account, password, client, key, trusted is not None)
            finally:
                throttle.finish_check(use)  # also when the client went away while it waited
            if outcome == "locked":  # a parallel attempt locked us out while we queued for a hash slot
                throttle.give_back_check(key, trusted, use)
                self._log("locked", kind, account, service, peer, delay)
                return Refused("locked", throttle.locked_for(client, key))
            if outcome == "ok":
                throttle.succeeded(client, key)
                throttle.give_back_check(key, trusted, use)
                if service != "web":  # the web remembers devices (a cookie), not addresses
                    await self._remember(key, client)
            elif outcome != "disabled":  # a right password for a disabled account is not a guess
                started = throttle.failed(client, key)
                if started:
                    log.warning(
                        "auth lockout: %s for %.0fs after repeated failures (service=%s peer=%s account=%s)",
                        "client address" if started == "peer" else "client address for this account",
                        throttle.policy.lockout_seconds, service, printable(peer), printable(account),
                    )
                    await self._remember_lockout_password(kind, account, client, key)
                await self._note_failure(outcome, started, key, service, client)
            self._log(outcome, kind, account, service, peer, delay)
            if outcome == "ok" and creds is not None:
                return Principal(creds.name, kind, creds.password_hash)
            return None

    async def _note_failure(self, outcome: Outcome, started: str | None, key: str, service: str, client: str) -> None:
        """Failed logins on the Events page: every lockout, and failures for accounts that exist (at
        most one entry per account in FAILURE_NOTE_SECONDS, with the count since); guesses at names
        that do not exist stay in the log only, so a flood of them cannot push real events out."""
        if self._events is None:
            return
        minutes = math.ceil(self.throttle.policy.lockout_seconds / 60)
        account = _shown_account(key)
        try:
            if started == "peer":
                await self._events.record("login", f"locked out the address {client} for {minutes} minutes after "
                                                   f"repeated failed logins ({service}, last for {account})")
            elif started == "pair":
                await self._events.record("login", f"locked out {account} from {client} for {minutes} minutes "
                                                   f"after repeated failed logins ({service})")
            elif outcome == "bad-password" and (count := self._failure_notes.due(key)):
                more = f"; {count - 1} more since the last entry" if count > 1 else ""
                await self._events.record("login", f"failed login for {account} from {client} ({service}){more}")
        except Exception:  # the event is a report; the login answer must not depend on it
            log.exception("auth: could not record a failed-login event")

    async def _prove(
        self, kind: Literal["mailbox", "admin"], account: str, password: str, client: str, key: str, owner: bool,
    ) -> tuple[Outcome, Credentials | None]:
        """The password checked: from the login cache when it was proven against the hash stored now,
        else by argon2 in a hash slot (and then remembered). 'locked' when a parallel attempt locked
        this client out while it queued for the slot."""
        creds = await self._credentials(kind, account)
        if creds is not None and self._cached(kind, creds, password):
            return "ok", creds  # proven minutes ago against this very stored hash: no argon2
        async with self._hash_slots.slot(owner=owner):
            if self.throttle.locked_for(client, key):
                return "locked", None
            # Read again: the password may have changed while this attempt queued.
            outcome, creds = await self._check(await self._credentials(kind, account), password)
            if outcome == "ok" and creds is not None:
                stored = await self._maybe_rehash(kind, creds, password)
                self.login_cache.remember(f"{kind}:{creds.name}", password, stored)
                creds = replace(creds, password_hash=stored)  # what the session logged in under
            return outcome, creds

    async def _remember_lockout_password(
        self, kind: Literal["mailbox", "admin"], account: str, client: str, key: str,
    ) -> None:
        if not self.throttle.pair_locked_for(client, key):
            return  # the address alone was locked out: no password change lifts that
        creds = await self._credentials(kind, account)
        if creds is None:
            return
        self._locked_under[(client, key)] = creds.password_hash
        while len(self._locked_under) > self.throttle.policy.max_tracked:
            self._locked_under.popitem(last=False)

    async def _lift_if_password_changed(
        self, kind: Literal["mailbox", "admin"], account: str, client: str, key: str,
    ) -> None:
        """A (client, account) lockout ends once the account has another password (set with `letterbox
        admin passwd` or `user passwd`, or by an administrator in the console): its failures were guesses
        at a password that is gone. Someone who forgot their password and tried until locked out was
        otherwise still refused the new one for 15 minutes. A lockout of the whole address stays."""
        began_under = self._locked_under.get((client, key))
        if began_under is None:
            return
        if not self.throttle.pair_locked_for(client, key):
            del self._locked_under[(client, key)]
            return
        creds = await self._credentials(kind, account)
        if creds is not None and creds.password_hash == began_under:
            return
        del self._locked_under[(client, key)]
        self.throttle.unlock(client, key)
        log.info("auth: lockout of %s from %s lifted: its password was changed", printable(account), client)
        if self._events is not None:
            with contextlib.suppress(Exception):  # a report; the login must not depend on it
                await self._events.record(
                    "login", f"lifted the lockout of {_shown_account(key)} from {client}: its password was changed")

    async def _trusted_client(self, key: str, client: str, service: str, device: Device | None) -> str | None:
        """The owner's own client this attempt comes from, if any: a device whose cookie names this
        account, or (IMAP, POP3, SMTP) an address that logged in to it within trust_seconds."""
        if device is not None and device.account == key:
            return f"device:{device.id}"
        if service == "web":
            return None
        since = self._wall_clock() - self.throttle.policy.trust_seconds
        row = await self._db.fetchone(
            "SELECT 1 FROM auth_trusted_clients WHERE account = ? AND client = ? AND last_success >= ?",
            (key, client, since),
        )
        return f"address:{client}" if row else None

    async def _remember(self, key: str, client: str) -> None:
        """Remember the address of a successful login (and forget this account's stale or surplus ones)."""
        now = self._wall_clock()
        try:
            async with self._db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO auth_trusted_clients (account, client, last_success) VALUES (?, ?, ?)"
                    " ON CONFLICT (account, client) DO UPDATE SET last_success = excluded.last_success",
                    (key, client, now),
                )
                await tx.execute(
                    "DELETE FROM auth_trusted_clients WHERE account = ? AND (last_success < ? OR client NOT IN"
                    " (SELECT client FROM auth_trusted_clients WHERE account = ?"
                    "  ORDER BY last_success DESC LIMIT ?))",
                    (key, now - self.throttle.policy.trust_seconds, key, MAX_TRUSTED_PER_ACCOUNT),
                )
        except Exception as exc:  # the login itself succeeded; the address is remembered at the next one
            if is_disk_full(exc):  # a known state (the status page says so), not a bug: one line
                log.warning("auth: could not remember the client address of %s: the disk is full", printable(key))
            else:
                log.exception("auth: could not remember the client address of %s", printable(key))

    async def _credentials(self, kind: Literal["mailbox", "admin"], account: str) -> Credentials | None:
        if kind == "mailbox":
            return await self._accounts.mailbox_credentials(account)
        return await self._accounts.admin_credentials(account)

    def _cached(self, kind: Literal["mailbox", "admin"], creds: Credentials, password: str) -> bool:
        """A recent success for this password against the hash stored now (so a change, even by the
        CLI in another process, misses), on an enabled account whose hash needs no upgrade."""
        return (creds.enabled
                and not passwords.needs_rehash(creds.password_hash, self.hasher)
                and self.login_cache.check(f"{kind}:{creds.name}", password, creds.password_hash))

    async def _check(self, creds: Credentials | None, password: str) -> tuple[Outcome, Credentials | None]:
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

    async def _maybe_rehash(self, kind: Literal["mailbox", "admin"], creds: Credentials, password: str) -> str:
        """The password was just proven: store it again with the current parameters if they changed.
        Returns the hash stored now (what the login cache must compare with)."""
        if not passwords.needs_rehash(creds.password_hash, self.hasher):
            return creds.password_hash
        new_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        try:
            stored = await self._accounts.replace_password_hash(kind, creds.name, creds.password_hash, new_hash)
        except Exception:  # the login itself succeeded; an upgrade can wait for the next one
            log.exception("auth: could not store the rehashed password of %s", printable(creds.name))
            return creds.password_hash
        if not stored:
            # Changed meanwhile: a password change (the session must not log in under the old one), or
            # another login's rehash of this same password (the owner's devices logging in at once
            # after the parameters changed), which this login's password proves too: one more check
            # in this race only. A session logs in under the hash stored (MailStore.mailbox_generation):
            # the second device was refused its right password, and asked for it again.
            current = await self._credentials(kind, creds.name)
            if current is not None and current.password_hash != creds.password_hash \
                    and (await self._check(current, password))[0] == "ok":
                return current.password_hash
            return creds.password_hash  # the cache entry will simply not match
        log.info("auth: password hash of %s upgraded to the current argon2id parameters", printable(creds.name))
        return new_hash

    @staticmethod
    def _log(outcome: Outcome, kind: str, account: str, service: str, peer: str, delay: float) -> None:
        slowed = f" delayed={delay:.1f}s" if delay else ""
        log.info(
            "auth %s: service=%s peer=%s %s=%s%s",
            outcome, printable(service, 20), printable(peer), kind, printable(account), slowed,
        )
