"""The box's DNS answer cache: every mail-path lookup (inbound SPF/DKIM/DMARC, MX and relay lookups)
asks dnspython through a resolver carrying one of these, so a burst of mail from one sender repeats
no query while its answers live.

dnspython's own `LRUCache` would do most of it (2.9 caches NXDOMAIN and NODATA with the SOA minimum,
RFC 2308 5), but it keeps answers for their full TTL (a day is common for TXT records) and reads
`time.time()` itself. This one has the same get/put/flush interface and adds:
- TTLs capped: positive answers at MAX_TTL, negative ones (NXDOMAIN, NODATA) at MAX_NEGATIVE_TTL, so a
  record the sender publishes or fixes is seen within minutes;
- a TTL of 0 is never cached (RFC 1035 3.2.1: "should not be cached"), and a negative answer without
  an SOA has no negative TTL (RFC 2308 5: "negative responses without SOA records SHOULD NOT be
  cached"; dnspython would keep them 5 minutes);
- failures (SERVFAIL, REFUSED, timeouts) never reach a cache at all: dnspython only puts NOERROR and
  NXDOMAIN answers, so the next message asks again;
- an injectable clock (tests), a bound on entries (least recently used go first), hit/miss counts.

Answers are keyed by (name, type, class) inside one cache, and there is one cache per resolver
configuration (`cache_for`), so a change of the `dns_resolver` setting starts from an empty cache at
once and never serves one server's answers for another's.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import dns.rcode
import dns.rdatatype

# Answers per resolver configuration. One answer (dnspython keeps the parsed response) is ~3 KB, so
# this is ~3 MB at most; a message needs 3-6 answers for its sender, so it covers ~200 sender domains.
MAX_ENTRIES = 1024
MAX_TTL = 3600  # seconds a positive answer is kept at most
MIN_TTL = 5  # a TTL of 1-4 s is raised to this; 0 stays "not cached"
MAX_NEGATIVE_TTL = 300  # NXDOMAIN / NODATA at most 5 minutes (RFC 2308 5 allows up to hours)
MAX_CONFIGURATIONS = 2  # the current configuration's cache and the one before (switching back is rare)


def _ttl(answer: Any) -> int:
    """The TTL dnspython computed for the answer: the smallest TTL along the CNAME chain, or for a
    negative answer min(SOA TTL, SOA MINIMUM) (RFC 2308 5)."""
    chaining = getattr(answer, "chaining_result", None)
    return int(getattr(chaining, "minimum_ttl", 0) or 0)


def _negative(answer: Any) -> bool:
    return answer.rrset is None or answer.response.rcode() == dns.rcode.NXDOMAIN


def _has_soa(answer: Any) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in answer.response.authority)


class DnsCache:
    """A thread-safe LRU answer cache in dnspython's cache interface (get/put/flush)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()  # the inbound checks resolve on worker threads
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            expires, answer = entry
            if expires <= self._clock():
                del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return answer

    def put(self, key: Hashable, value: Any) -> None:
        ttl = _ttl(value)
        negative = _negative(value)
        if ttl <= 0 or (negative and not _has_soa(value)):
            return
        ttl = min(max(ttl, MIN_TTL), MAX_NEGATIVE_TTL if negative else MAX_TTL)
        with self._lock:
            self._entries[key] = (self._clock() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def flush(self, key: Hashable | None = None) -> None:
        with self._lock:
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __bool__(self) -> bool:
        return True  # dnspython tests `if resolver.cache:`; an empty cache must still count


_caches: OrderedDict[Hashable, DnsCache] = OrderedDict()
_caches_lock = threading.Lock()


def cache_for(configuration: Hashable) -> DnsCache:
    """The shared cache of one resolver configuration (its servers and port): every resolver built for
    the same configuration, in any service, shares it; another configuration gets its own."""
    with _caches_lock:
        cache = _caches.get(configuration)
        if cache is None:
            cache = _caches[configuration] = DnsCache()
            while len(_caches) > MAX_CONFIGURATIONS:
                _caches.popitem(last=False)
        else:
            _caches.move_to_end(configuration)
        return cache


def forget_all() -> None:
    """Drop every cache (tests: a loopback DNS server's port may be reused by the next test's server)."""
    with _caches_lock:
        _caches.clear()
