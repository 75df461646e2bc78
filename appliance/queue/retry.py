"""When to try a deferred recipient again, when to give up, when to warn the sender.

RFC 5321 4.5.4.1: retry intervals of at least 30 minutes are suggested and give-up times of 4-5 days;
like Postfix and Exim we start sooner (most temporary failures are greylisting, which clears in
minutes) and grow towards hourly. Tests (and the console) shrink these through the `queue_*` settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from appliance.db import Database

log = logging.getLogger("letterbox.queue")

# Seconds after the 1st, 2nd, ... failed attempt; after the last one, RETRY_EVERY forever.
RETRY_INTERVALS: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
RETRY_EVERY = 3600.0
MAX_QUEUE_AGE = 5 * 24 * 3600.0  # RFC 5321 4.5.4.1: give up after 4-5 days
DELAY_NOTICE_AFTER = 4 * 3600.0  # RFC 3464 "delayed" DSN once, after this long; 0 = never

# Settings (seconds) that override the defaults; the console and the tests write these.
SETTING_INTERVALS = "queue_retry_intervals"  # comma-separated seconds; the last one repeats
SETTING_MAX_AGE = "queue_max_age"
SETTING_DELAY_NOTICE = "queue_delay_notice"  # 0 turns delay notices off


@dataclass(frozen=True)
class RetryPolicy:
    intervals: tuple[float, ...] = RETRY_INTERVALS
    then_every: float = RETRY_EVERY
    max_age: float = MAX_QUEUE_AGE
    delay_notice_after: float = DELAY_NOTICE_AFTER  # 0 = no delay notices

    def __post_init__(self) -> None:
        if any(i <= 0 for i in self.intervals) or self.then_every <= 0 or self.max_age <= 0:
            raise ValueError("retry intervals and the maximum queue age must be positive")

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        if attempts <= 0:
            return 0.0
        if attempts <= len(self.intervals):
            return self.intervals[attempts - 1]
        return self.then_every

    def expired(self, created_at: float, now: float) -> bool:
        return now - created_at >= self.max_age

    def next_attempt(self, created_at: float, attempts: int, now: float) -> float:
        """When to try again; never later than the expiry time, so the last try is at the deadline."""
        return min(now + self.delay_after(attempts), created_at + self.max_age)

    def wants_delay_notice(self, created_at: float, now: float) -> bool:
        return self.delay_notice_after > 0 and now - created_at >= self.delay_notice_after


def _seconds(text: str) -> float:
    value = float(text.strip())
    if value < 0:
        raise ValueError(f"negative duration: {text!r}")
    return value


def parse_intervals(text: str) -> tuple[float, ...]:
    """'60, 300, 900' -> (60.0, 300.0, 900.0)."""
    values = tuple(_seconds(part) for part in text.split(",") if part.strip())
    if not values:
        raise ValueError("no retry intervals given")
    return values


async def load_policy(db: Database, default: RetryPolicy | None = None) -> RetryPolicy:
    """The policy in force: the defaults overridden by whatever settings are present and valid."""
    base = default or RetryPolicy()
    intervals, then_every = base.intervals, base.then_every
    max_age, notice = base.max_age, base.delay_notice_after
    try:
        if text := await db.get_setting(SETTING_INTERVALS):
            intervals = parse_intervals(text)
            then_every = intervals[-1]
        if text := await db.get_setting(SETTING_MAX_AGE):
            max_age = _seconds(text)
        if (text := await db.get_setting(SETTING_DELAY_NOTICE)) is not None:
            notice = _seconds(text)
        return RetryPolicy(intervals, then_every, max_age, notice)
    except ValueError as exc:
        # A bad setting must not stop delivery: keep the defaults (the console validates on input).
        log.warning("ignoring the queue retry settings: %s", exc)
        return base
