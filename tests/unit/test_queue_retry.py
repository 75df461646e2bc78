"""Retry schedule, expiry and delay notices of the outbound queue (issue 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.queue.retry import (
    DELAY_NOTICE_AFTER,
    MAX_QUEUE_AGE,
    RETRY_EVERY,
    RETRY_INTERVALS,
    RetryPolicy,
    parse_intervals,
)
from appliance.settings import read_settings


def test_the_default_schedule_grows_to_hourly_and_gives_up_after_five_days() -> None:
    policy = RetryPolicy()
    assert [policy.delay_after(n) for n in range(1, 8)] == [60, 300, 900, 1800, 3600, 3600, 3600]
    assert RETRY_INTERVALS == (60, 300, 900, 1800, 3600)
    assert RETRY_EVERY == 3600
    assert MAX_QUEUE_AGE == 5 * 86400
    assert DELAY_NOTICE_AFTER == 4 * 3600
    assert not policy.expired(0, MAX_QUEUE_AGE - 1)
    assert policy.expired(0, MAX_QUEUE_AGE)


def test_the_last_try_is_at_the_deadline_not_after_it() -> None:
    policy = RetryPolicy()
    created = 1000
    now = created + MAX_QUEUE_AGE - 600
    assert policy.next_attempt(created, 20, now) == created + MAX_QUEUE_AGE


def test_delay_notice_after_four_hours_unless_turned_off() -> None:
    assert not RetryPolicy().wants_delay_notice(0, 4 * 3600 - 1)
    assert RetryPolicy().wants_delay_notice(0, 4 * 3600)
    assert not RetryPolicy(delay_notice_after=0).wants_delay_notice(0, 10**9)


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(intervals=(0,))
    with pytest.raises(ValueError):
        RetryPolicy(max_age=0)
    with pytest.raises(ValueError):
        parse_intervals(" , ")
    assert parse_intervals("1, 2.5,10") == (1.0, 2.5, 10.0)


def test_settings_override_the_defaults_and_bad_ones_are_ignored(tmp_path: Path) -> None:
    async def run() -> tuple[RetryPolicy, RetryPolicy]:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            await db.set_setting("queue_retry_intervals", "1,2")
            await db.set_setting("queue_max_age", "30")
            await db.set_setting("queue_delay_notice", "0")
            good = (await read_settings(db)).retry.apply(RetryPolicy())
            await db.set_setting("queue_max_age", "soon")
            bad = (await read_settings(db)).retry.apply(RetryPolicy())
            return good, bad
        finally:
            await db.close()

    good, bad = asyncio.run(run())
    assert good == RetryPolicy((1.0, 2.0), 2.0, 30.0, 0.0)
    assert [good.delay_after(n) for n in (1, 2, 3, 4)] == [1, 2, 2, 2]
    assert bad == RetryPolicy()
