"""When to try a deferred recipient again, when to give up, when to warn the sender.

RFC 5321 4.5.4.1: retry intervals of at least 30 minutes are suggested and give-up times of 4-5 days;
like Postfix and Exim we start sooner (most temporary failures are greylisting, which clears in
minutes) and grow towards hourly. Tests (and the console) shrink these through the `queue_*` settings.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds after the 1st, 2nd, ... failed attempt; after the last one, RETRY_EVERY forever.
RETRY_INTERVALS: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
RETRY_EVERY = 3600.0
MAX_QUEUE_AGE = 5 * 24 * 3600.0  # RFC 5321 4.5.4.1: give up after 4-5 days
DELAY_NOTICE_AFTER = 4 * 3600.0  # RFC 3464 "delayed" DSN once, after this long; 0 = never


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


@dataclass(frozen=True)
class RetryOverrides:
    """What the queue_* settings change (appliance/settings.py reads them); None keeps the default."""

    intervals: tuple[float, ...] | None = None  # the last one repeats
    max_age: float | None = None
    delay_notice_after: float | None = None  # 0 turns delay notices off

    def apply(self, base: RetryPolicy) -> RetryPolicy:
        intervals, then_every = base.intervals, base.then_every
        if self.intervals:
            intervals, then_every = self.intervals, self.intervals[-1]
        return RetryPolicy(
            intervals, then_every,
            base.max_age if self.max_age is None else self.max_age,
            base.delay_notice_after if self.delay_notice_after is None else self.delay_notice_after,
        )


def parse_overrides(intervals: str | None, max_age: str | None, delay_notice: str | None) -> RetryOverrides:
    """The settings' texts (None or empty: not set) as overrides; ValueError names a bad one."""
    overrides = RetryOverrides(
        intervals=parse_intervals(intervals) if intervals else None,
        max_age=_seconds(max_age) if max_age else None,
        delay_notice_after=_seconds(delay_notice) if delay_notice is not None and delay_notice.strip() else None,
    )
    overrides.apply(RetryPolicy())  # a zero max age or interval is refused here, not at delivery
    return overrides
