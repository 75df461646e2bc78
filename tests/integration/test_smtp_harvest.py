"""Recipient harvesting on the MX (issue 11 item 8): refused recipients past the first few are answered
after a growing delay that holds up nobody else, and an address (or its /24) that keeps probing across
connections gets 450 for every recipient, real ones included, for a while. Delays and the clock are
injected: the guard's sleep records what it was asked and waits on an event the test controls."""

from __future__ import annotations

import asyncio
import smtplib
import threading

import pytest

from appliance.smtp.probes import ProbeLimits, RecipientProbeGuard
from tests.conftest import BoxHandle

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mx(box: BoxHandle) -> BoxHandle:
    box.add_user(ALICE, PASSWORD)
    return box


def install(box: BoxHandle, limits: ProbeLimits, clock: Clock) -> tuple[RecipientProbeGuard, list[float]]:
    guard = RecipientProbeGuard(limits, clock)
    asked: list[float] = []

    async def record(delay: float) -> None:
        asked.append(delay)

    guard.sleep = record
    box.services.recipient_guard = guard
    return guard, asked


def connect(box: BoxHandle, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30, source_address=(source, 0))
    client.ehlo("prober.test")
    assert client.mail("x@sender.test")[0] == 250
    return client


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_refused_recipients_past_the_soft_limit_are_delayed_more_and_more(mx: BoxHandle, clock: Clock) -> None:
    _, asked = install(mx, ProbeLimits(soft_errors=3, error_delay=1.0, max_error_delay=5.0, per_address=1000,
                                       per_network=1000), clock)
    with connect(mx) as client:
        codes = [client.rcpt(f"nobody{i}@ourdomain.test")[0] for i in range(9)]
        assert codes == [550] * 9
        assert client.rcpt(ALICE)[0] == 250  # a real recipient is not delayed
    assert asked == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0]


def test_a_delayed_client_holds_up_nobody_else(mx: BoxHandle, clock: Clock) -> None:
    guard, _ = install(mx, ProbeLimits(soft_errors=0, per_address=1000, per_network=1000), clock)
    release = asyncio.Event()
    waiting = threading.Event()

    async def park(delay: float) -> None:
        waiting.set()
        await release.wait()  # as long as the test likes: the loop must go on meanwhile

    guard.sleep = park
    result: list[int] = []
    prober = connect(mx)
    thread = threading.Thread(target=lambda: result.append(prober.rcpt("nobody@ourdomain.test")[0]))
    thread.start()
    try:
        assert waiting.wait(10)
        with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=10) as other:
            assert other.noop()[0] == 250
            other.sendmail("y@sender.test", [ALICE], b"Subject: meanwhile\r\n\r\nhi\r\n")
        assert thread.is_alive()
        assert not result
    finally:
        mx.loop.call_soon_threadsafe(release.set)
        thread.join(10)
        prober.close()
    assert result == [550]


def test_probing_across_connections_blocks_the_address_for_a_while(mx: BoxHandle, clock: Clock) -> None:
    install(mx, ProbeLimits(soft_errors=100, per_address=5, per_network=1000, window=600, block_seconds=600), clock)
    for round_ in range(5):  # a new connection per probe, as the harvester did
        with connect(mx) as client:
            assert client.rcpt(f"guess{round_}@ourdomain.test")[0] == 550
    with connect(mx) as client:
        # Blocked: every recipient gets the same 450, so the answer tells nothing.
        code, text = client.rcpt(ALICE)
        assert code == 450
        assert text.startswith(b"4.7.1")
        assert client.rcpt("guess9@ourdomain.test")[0] == 450
    with connect(mx, source="127.0.1.1") as client:  # another network is not affected
        assert client.rcpt(ALICE)[0] == 250
    clock.now += 601
    with connect(mx) as client:
        assert client.rcpt(ALICE)[0] == 250


def test_probing_from_many_addresses_of_one_network_blocks_the_network(mx: BoxHandle, clock: Clock) -> None:
    install(mx, ProbeLimits(soft_errors=100, per_address=1000, per_network=6), clock)
    for i in range(6):
        with connect(mx, source=f"127.0.0.{i + 2}") as client:
            assert client.rcpt(f"guess{i}@ourdomain.test")[0] == 550
    with connect(mx, source="127.0.0.100") as client:  # never seen, same /24
        assert client.rcpt(ALICE)[0] == 450


def test_logged_in_submission_and_lmtp_are_not_slowed(mx: BoxHandle, clock: Clock) -> None:
    _, asked = install(mx, ProbeLimits(soft_errors=0, per_address=1, per_network=1), clock)
    with smtplib.SMTP("127.0.0.1", mx.port("lmtp"), timeout=30) as client:
        client.ehlo_resp = None
        assert client.docmd("LHLO", "mta.test")[0] == 250
        assert client.docmd("MAIL", "FROM:<x@sender.test>")[0] == 250
        for i in range(3):
            assert client.docmd("RCPT", f"TO:<nobody{i}@ourdomain.test>")[0] == 550
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=30, context=mx.client_context) as client:
        client.login(ALICE, PASSWORD)
        client.mail(ALICE)
        for i in range(3):
            assert client.rcpt(f"nobody{i}@ourdomain.test")[0] == 550
    assert asked == []
    with connect(mx) as client:  # and they did not count towards a block
        assert client.rcpt(ALICE)[0] == 250
