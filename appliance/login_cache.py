"""A short-lived memory of successful password checks, as Dovecot's auth cache keeps one: phones that
reconnect every few minutes do not pay argon2 (~200 ms of a core and 19 MiB) at each reconnection.

What is kept, per account: an HMAC of the password under a key drawn at random when the process starts
(never the password, never a plain hash of it, nothing that outlives the process), and the stored
password hash string the success was checked against. A later login is served from here only when
- the same password is given (compared in constant time),
- the account's stored hash is still exactly that string and the account is enabled: the caller reads
  them from the database first (a cheap indexed read), so a password change, a disable or a removal by
  the web, the CLI in another process or a restore ends the entry at once, with no message between
  processes,
- the entry is younger than `ttl` seconds.
Failures are never stored: a wrong password always meets argon2 (and the throttle before it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from appliance.passwords import MAX_PASSWORD_LENGTH, normalise

TTL_SECONDS = 300.0  # Dovecot's auth_cache_ttl is 1 hour; 5 minutes covers a phone's reconnections
MAX_ENTRIES = 1000  # accounts remembered; a family box has a few dozen


@dataclass(frozen=True)
class _Entry:
    mac: bytes
    stored_hash: str
    expires: float


class LoginCache:
    def __init__(
        self, *, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)  # per process: the MACs mean nothing outside it
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def _mac(self, password: str) -> bytes:
        data = normalise(password).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def check(self, account: str, password: str, stored_hash: str) -> bool:
        """True when this password was proven for this account against `stored_hash` (read from the
        database just now) within the last `ttl` seconds."""
        if len(password) > MAX_PASSWORD_LENGTH:
            return False
        mac = self._mac(password)
        with self._lock:
            entry = self._entries.get(account)
            if entry is None:
                return False
            if entry.stored_hash != stored_hash or entry.expires <= self._clock():
                del self._entries[account]  # changed behind us, or old: prove it again
                return False
            if not hmac.compare_digest(entry.mac, mac):
                return False
            self._entries.move_to_end(account)
            self.hits += 1
            return True

    def remember(self, account: str, password: str, stored_hash: str) -> None:
        """Only after a successful check (argon2 said yes for `stored_hash`)."""
        entry = _Entry(self._mac(password), stored_hash, self._clock() + self.ttl)
        with self._lock:
            self._entries[account] = entry
            self._entries.move_to_end(account)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, account: str) -> None:
        with self._lock:
            self._entries.pop(account, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
