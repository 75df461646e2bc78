"""Recipient harvesting defence for the MX (issue 11 item 8), after Postfix's smtpd_error_sleep_time /
smtpd_soft_error_limit and postscreen.

Two parts. Within a session, every refused recipient past the first few costs the client a growing
delay before the reply (the handler sleeps with asyncio.sleep: the event loop and every other session
go on, and nothing is held while it sleeps). Across sessions, unknown recipients are counted per
client address and per network (/24 for IPv4, /64 for IPv6) in a sliding window; past the limit that
address or network gets 450 for every recipient for a while, so reconnecting gains nothing and the
answer no longer tells a real user from an unknown one. Pure bookkeeping with an injected clock;
bounded memory (the oldest keys are dropped first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.channel import network_of
from appliance.smtp.policy import Reply

# Refused recipients a session may make before each further one is delayed (Postfix's soft limit is 10;
# a real sender mistypes one or two addresses, a harvester tries thousands).
SOFT_ERRORS = 3
ERROR_DELAY = 1.0  # seconds for the first delayed refusal; each further one adds as much again
MAX_ERROR_DELAY = 10.0
# Unknown recipients per client address and per network in PROBE_WINDOW seconds before it is blocked.
PROBE_WINDOW = 600.0
MAX_UNKNOWN_PER_ADDRESS = 20
MAX_UNKNOWN_PER_NETWORK = 60
BLOCK_SECONDS = 600.0
MAX_TRACKED_KEYS = 20_000  # addresses and networks remembered at once

PROBING_BLOCKED = Reply(450, "4.7.1", "Too many unknown recipients from your network, try again later")


@dataclass(frozen=True)
class ProbeLimits:
    soft_errors: int = SOFT_ERRORS
    error_delay: float = ERROR_DELAY
    max_error_delay: float = MAX_ERROR_DELAY
    window: float = PROBE_WINDOW
    per_address: int = MAX_UNKNOWN_PER_ADDRESS
    per_network: int = MAX_UNKNOWN_PER_NETWORK
    block_seconds: float = BLOCK_SECONDS
    max_keys: int = MAX_TRACKED_KEYS


class RecipientProbeGuard:
    def __init__(self, limits: ProbeLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ProbeLimits()
        self.clock = clock
        # How the handler waits: asyncio.sleep holds no lock and blocks nothing but this client.
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: OrderedDict[str, float] = OrderedDict()

    def delay_for(self, refused_in_session: int) -> float:
        """Seconds to wait before answering the session's `refused_in_session`-th refused recipient."""
        over = refused_in_session - self.limits.soft_errors
        if over <= 0:
            return 0.0
        return min(self.limits.max_error_delay, self.limits.error_delay * over)

    def blocked(self, ip: str) -> bool:
        now = self.clock()
        for key in (ip, network_of(ip)):
            until = self._blocked_until.get(key)
            if until is None:
                continue
            if until > now:
                return True
            del self._blocked_until[key]
        return False

    def record_unknown(self, ip: str) -> None:
        """One unknown recipient from `ip`: count it for the address and its network, block either
        once it is over its limit within the window."""
        now = self.clock()
        for key, limit in ((ip, self.limits.per_address), (network_of(ip), self.limits.per_network)):
            if self._count(key, now) >= limit:
                self._blocked_until[key] = now + self.limits.block_seconds
                self._blocked_until.move_to_end(key)
                self._trim(self._blocked_until)

    def _count(self, key: str, now: float) -> int:
        events = self._events.pop(key, None) or deque()
        events.append(now)
        horizon = now - self.limits.window
        while events and events[0] <= horizon:
            events.popleft()
        while len(events) > max(self.limits.per_address, self.limits.per_network):
            events.popleft()  # only "over the limit or not" matters: older entries add nothing
        self._events[key] = events  # most recently seen last
        self._trim(self._events)
        return len(events)

    def _trim(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > self.limits.max_keys:
            table.popitem(last=False)
