"""The attack battery of bench/attack.py, reduced (its --quick sizes), so that what the box promises
under attack is checked by every `make test`: nothing relayed, at most 10 password checks a minute per
account while the owner still logs in quickly, idle connections and tricklers not keeping a real
user out, and kill -9 during an outbound burst losing, doubling and leaving nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.attack import (
    MAX_CHECKS_PER_MINUTE,
    MAX_OWNER_LOGIN_SECONDS,
    QUICK,
    AttackBox,
    attack_box,
    crash_loop,
    guess_users,
    guessing,
    relay_battery,
    relay_tricks,
    slow_clients,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackBox]:
    """One box for the relay, guessing and slow-client parts (each uses its own loopback addresses)."""
    with attack_box(tmp_path_factory.mktemp("attack"), guess_users(QUICK)) as served:
        yield served


def test_relay_battery_relays_nothing(box: AttackBox) -> None:
    result = relay_battery(box, tls_tricks=QUICK.tls_tricks)
    assert result.tried >= len(relay_tricks()), "most tricks never reached RCPT"
    # The outside receiver (the MX of far.test, and 127.0.0.5 itself) got nothing, and nothing waits
    # in the queue for a domain that is not ours.
    assert box.receiver.transactions == []
    assert box.queued_outside() == 0
    assert result.relayed == 0


def test_password_checks_are_bounded_per_account_and_the_owner_still_gets_in(box: AttackBox) -> None:
    results, before = guessing(
        box, spread_addresses=QUICK.spread_addresses, per_address=QUICK.per_address,
        brute_attempts=QUICK.brute_attempts, seconds=QUICK.guess_seconds, modes=QUICK.guess_modes,
    )
    for result in results:
        assert result.max_checked_per_minute <= MAX_CHECKS_PER_MINUTE, result
        assert result.owner_failed == 0, result
        assert result.owner_logins, result
    # The attack was real: guesses beyond the budget were refused without being checked.
    assert sum(r.refused_unchecked for r in results) > 0
    # The owner's login during the attack: within 2 s, or on a machine so loaded that a quiet login
    # already takes long, within a few times that. The owner waits for at most one stranger's hash and
    # shares the CPU with it; without the budget it waited behind every guess (a hundred hashes here).
    slowest = max(max(r.owner_logins) for r in results)
    assert slowest <= max(MAX_OWNER_LOGIN_SECONDS, 6 * before), (slowest, before)


def test_idle_connections_and_tricklers_do_not_keep_a_real_user_out(box: AttackBox) -> None:
    result = slow_clients(box, idle=QUICK.idle, tricklers=QUICK.tricklers, hold=QUICK.hold)
    assert result.idle_opened > 0
    assert result.delivered, result
    assert result.logged_in, result
    assert result.caps_held


def test_kill9_during_an_outbound_burst_loses_doubles_and_leaves_nothing(tmp_path: Path) -> None:
    with attack_box(tmp_path, []) as crashing:
        result = crash_loop(crashing, kills=QUICK.kills, burst_seconds=QUICK.burst_seconds,
                            drain_seconds=QUICK.drain_seconds)
    assert result.kills == QUICK.kills
    assert result.acknowledged
    assert result.missing == []
    assert result.duplicate_reports == 0
    assert result.leftovers == []
