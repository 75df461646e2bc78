"""The recipient-harvesting guard's bookkeeping with a fake clock (issue 11 item 8)."""

from __future__ import annotations

from appliance.channel import network_of
from appliance.smtp.probes import ProbeLimits, RecipientProbeGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_start_after_the_soft_limit_and_grow_to_a_cap() -> None:
    guard = RecipientProbeGuard(ProbeLimits(soft_errors=3, error_delay=1.0, max_error_delay=4.0))
    assert [guard.delay_for(n) for n in range(1, 10)] == [0, 0, 0, 1, 2, 3, 4, 4, 4]


def test_an_address_over_its_limit_is_blocked_for_a_while() -> None:
    clock = Clock()
    guard = RecipientProbeGuard(ProbeLimits(per_address=3, per_network=100, window=60, block_seconds=300), clock)
    for _ in range(2):
        guard.record_unknown("192.0.2.1")
    assert not guard.blocked("192.0.2.1")
    guard.record_unknown("192.0.2.1")
    assert guard.blocked("192.0.2.1")
    assert not guard.blocked("192.0.2.2")
    clock.now += 301
    assert not guard.blocked("192.0.2.1")


def test_the_window_slides() -> None:
    clock = Clock()
    guard = RecipientProbeGuard(ProbeLimits(per_address=3, per_network=100, window=60), clock)
    for _ in range(10):  # one every 30 s: never 3 within 60 s
        guard.record_unknown("192.0.2.1")
        clock.now += 30
    assert not guard.blocked("192.0.2.1")


def test_a_network_is_counted_as_one() -> None:
    guard = RecipientProbeGuard(ProbeLimits(per_address=100, per_network=5), Clock())
    for i in range(5):
        guard.record_unknown(f"198.51.100.{i + 1}")
    assert guard.blocked("198.51.100.200")  # never seen, same /24
    assert not guard.blocked("198.51.101.1")
    assert network_of("2001:db8::1") == network_of("2001:db8::ffff") == "2001:db8::/64"
    assert network_of("unknown") == "unknown"


def test_memory_is_bounded() -> None:
    guard = RecipientProbeGuard(ProbeLimits(max_keys=50), Clock())
    for i in range(2000):
        guard.record_unknown(f"10.{i // 256 % 256}.{i % 256}.1")
    assert len(guard._events) <= 50
