"""Auth against a real SQLite file: argon2id, rehash, disabled accounts, throttling, logging."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from appliance.accounts import Accounts
from appliance.auth import (
    DEFAULT_POLICY,
    Auth,
    Device,
    HashSlots,
    Principal,
    Throttle,
    ThrottlePolicy,
    peer_key,
    read_device,
    sign_device,
)
from appliance.db import Database
from appliance.passwords import make_hasher

FAST = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
PASSWORD = "a long enough password"
WRONG = "not the password at all"
ALICE = "alice@example.org"
# Small numbers so the throttle tests take well under a second of sleeping.
QUICK = ThrottlePolicy(
    free_failures=2, peer_free_failures=50, base_delay=0.05, max_delay=0.2, account_max_delay=0.1,
    pair_lockout_failures=6, peer_lockout_failures=12, lockout_seconds=60, forgive_seconds=3600,
    account_budget=1000, trusted_budget=1000,  # the budget has its own tests
)
NO_THROTTLE = ThrottlePolicy(free_failures=10**6, peer_free_failures=10**6, pair_lockout_failures=10**6,
                             peer_lockout_failures=10**6, account_budget=10**6, trusted_budget=10**6)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Box:
    db: Database
    accounts: Accounts
    auth: Auth
    clock: FakeClock


def run(tmp_path: Path, scenario: Callable[[Box], Awaitable[None]], *, policy: ThrottlePolicy = QUICK) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            accounts = Accounts(db, hasher=FAST)
            clock = FakeClock()
            await accounts.add_domain("example.org")
            await accounts.add_user(ALICE, PASSWORD)
            await scenario(Box(db, accounts, Auth(db, accounts, policy=policy, clock=clock), clock))
        finally:
            await db.close()

    asyncio.run(main())


def stored_hash(tmp_path: Path, address: str = ALICE) -> str:
    local, domain = address.split("@")
    with sqlite3.connect(tmp_path / "letterbox.db") as conn:
        (value,) = conn.execute(
            "SELECT password_hash FROM mailboxes m JOIN domains d ON d.id = m.domain_id"
            " WHERE d.name = ? AND m.local_part = ?", (domain, local)
        ).fetchone()
    return str(value)


def auth_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "letterbox.auth"]


def delayed(line: str) -> float:
    """The throttle's own wait in an auth log line ("delayed=0.1s"; none: 0)."""
    found = re.search(r" delayed=([0-9.]+)s", line)
    return float(found.group(1)) if found else 0.0


async def timed(coro: Awaitable[Principal | None]) -> tuple[Principal | None, float]:
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


def test_right_wrong_unknown(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        auth = box.auth
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        assert await auth.verify("Alice@EXAMPLE.org", PASSWORD, "smtp", "192.0.2.1") == Principal(ALICE, "mailbox")
        assert await auth.verify(ALICE, WRONG, "pop3", "192.0.2.1") is None
        assert await auth.verify(ALICE, PASSWORD.upper(), "imap", "192.0.2.1") is None
        assert await auth.verify(ALICE, "", "imap", "192.0.2.1") is None
        assert await auth.verify("nobody@example.org", PASSWORD, "imap", "192.0.2.1") is None
        assert await auth.verify("alice", PASSWORD, "imap", "192.0.2.1") is None
        assert await auth.verify("alice+tag@example.org", PASSWORD, "imap", "192.0.2.1") is None
        assert await auth.verify(ALICE, PASSWORD + "\x00x", "imap", "192.0.2.1") is None
        assert await auth.verify(ALICE, "x" * 100_000, "imap", "192.0.2.1") is None
        assert await auth.verify("\r\n" * 500, "\x00", "imap", "") is None

    run(tmp_path, scenario, policy=NO_THROTTLE)


def test_disabled_mailbox_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="letterbox.auth")

    async def scenario(box: Box) -> None:
        await box.accounts.update_user(ALICE, enabled=False)
        assert await box.auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") is None
        assert any(line.startswith("auth disabled:") for line in auth_lines(caplog))
        # A right password for a disabled account is not counted as a guess.
        for _ in range(10):
            assert await box.auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") is None
        await box.accounts.update_user(ALICE, enabled=True)
        assert await box.auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")

    run(tmp_path, scenario)


def test_rehash_when_parameters_change(tmp_path: Path) -> None:
    stronger = make_hasher(time_cost=2, memory_cost_kib=16, parallelism=1)
    seen: dict[str, str] = {}

    async def scenario(box: Box) -> None:
        seen["before"] = stored_hash(tmp_path)
        auth = Auth(box.db, box.accounts, policy=NO_THROTTLE, hasher=stronger)
        assert await auth.verify(ALICE, WRONG, "imap", "192.0.2.1") is None
        assert stored_hash(tmp_path) == seen["before"]  # only a proven password is rehashed
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        seen["after"] = stored_hash(tmp_path)
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        assert stored_hash(tmp_path) == seen["after"]  # once upgraded, left alone

    run(tmp_path, scenario)
    assert seen["before"].startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert seen["after"].startswith("$argon2id$v=19$m=16,t=2,p=1$")


def test_unknown_accounts_cost_as_much_as_known(tmp_path: Path) -> None:
    costly = make_hasher(time_cost=2, memory_cost_kib=8 * 1024, parallelism=1)

    async def scenario(box: Box) -> None:
        accounts = Accounts(box.db, hasher=costly)
        await accounts.set_password(ALICE, PASSWORD)
        auth = Auth(box.db, accounts, policy=NO_THROTTLE)
        await auth.verify("warm@example.org", WRONG, "imap", "192.0.2.1")  # makes the dummy hash

        async def cpu(address: str) -> float:
            # CPU (the hash runs in a thread of this process), not wall time: on a loaded machine the
            # known account's waits for a core made its median 4x the unknown's (0.049 s against 0.013).
            started = time.process_time()
            await auth.verify(address, WRONG, "imap", "192.0.2.1")
            return time.process_time() - started

        known = [await cpu(ALICE) for _ in range(5)]
        unknown = [await cpu("nobody@example.org") for _ in range(5)]
        assert statistics.median(unknown) > 0.3 * statistics.median(known), (known, unknown)

    run(tmp_path, scenario)


def test_burst_is_slowed_then_locked_but_other_addresses_still_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="letterbox.auth")

    async def scenario(box: Box) -> None:
        auth = box.auth
        took: list[float] = []
        for _ in range(QUICK.pair_lockout_failures):
            result, seconds = await timed(auth.verify(ALICE, WRONG, "imap", "192.0.2.1"))
            assert result is None
            took.append(seconds)
        # Free failures wait for nothing; then the delay grows up to the cap. What the throttle waited
        # is read from its log line, not from the clock: a loaded machine only adds to the wall time.
        assert [delayed(line) for line in auth_lines(caplog)[: QUICK.free_failures]] == [0.0] * QUICK.free_failures
        assert took[QUICK.free_failures] >= QUICK.base_delay
        assert took[QUICK.free_failures + 1] >= 2 * QUICK.base_delay
        assert took[-1] >= QUICK.max_delay
        # Locked out: the right password from the same address is refused at once and without a check.
        result, seconds = await timed(auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1"))
        assert result is None
        assert auth_lines(caplog)[-1].startswith("auth locked:")
        assert delayed(auth_lines(caplog)[-1]) == 0.0
        assert any(r.levelno == logging.WARNING and "lockout" in r.getMessage() for r in caplog.records)
        # The owner elsewhere gets in, at most slowed by the bounded per-account delay.
        result, seconds = await timed(auth.verify(ALICE, PASSWORD, "imap", "198.51.100.7"))
        assert result == Principal(ALICE, "mailbox")
        assert auth_lines(caplog)[-1].startswith("auth ok:")
        assert delayed(auth_lines(caplog)[-1]) <= QUICK.account_max_delay
        # The same throttle covers every protocol (and the web) for that address and account.
        assert await auth.verify(ALICE, PASSWORD, "smtp", "192.0.2.1") is None
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.1") is None
        # The lockout ends by itself.
        box.clock.now += QUICK.lockout_seconds + 1
        assert await auth.verify(ALICE, PASSWORD, "pop3", "192.0.2.1") == Principal(ALICE, "mailbox")

    run(tmp_path, scenario)


def test_parallel_guesses_are_counted_one_by_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="letterbox.auth")
    fast = ThrottlePolicy(free_failures=100, peer_free_failures=100, pair_lockout_failures=5,
                          peer_lockout_failures=100)

    async def scenario(box: Box) -> None:
        auth = Auth(box.db, box.accounts, policy=fast, clock=box.clock)
        results = await asyncio.gather(*(auth.verify(ALICE, WRONG, "imap", "192.0.2.1") for _ in range(20)))
        assert results == [None] * 20
        lines = auth_lines(caplog)
        assert sum(line.startswith("auth bad-password:") for line in lines) == fast.pair_lockout_failures
        assert sum(line.startswith("auth locked:") for line in lines) == 20 - fast.pair_lockout_failures

    run(tmp_path, scenario)


def test_password_spraying_locks_the_client_address(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        auth = Auth(box.db, box.accounts, policy=ThrottlePolicy(
            free_failures=100, peer_free_failures=100, pair_lockout_failures=100, peer_lockout_failures=8,
            lockout_seconds=60, forgive_seconds=3600), clock=box.clock)
        for i in range(8):
            assert await auth.verify(f"user{i}@example.org", WRONG, "smtp", "192.0.2.9") is None
        # The address is locked for every account, even with a right password...
        assert await auth.verify(ALICE, PASSWORD, "smtp", "192.0.2.9") is None
        # ...its IPv6 /64 neighbours count as the same client, other addresses do not.
        for _ in range(8):
            await auth.verify("x@example.org", WRONG, "smtp", "2001:db8::1")
        assert await auth.verify(ALICE, PASSWORD, "smtp", "2001:db8::ffff") is None
        assert await auth.verify(ALICE, PASSWORD, "smtp", "2001:db8:0:1::1") == Principal(ALICE, "mailbox")
        assert await auth.verify(ALICE, PASSWORD, "smtp", "192.0.2.10") == Principal(ALICE, "mailbox")

    run(tmp_path, scenario)


def test_peer_keys() -> None:
    assert peer_key("192.0.2.1") == "192.0.2.1"
    assert peer_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert peer_key("2001:db8::1") == peer_key("[2001:db8::2]") == "2001:db8::/64"
    assert peer_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert peer_key("") == "unknown"
    assert peer_key("weird\npeer") == "weird?peer"


def test_throttle_memory_is_bounded() -> None:
    throttle = Throttle(ThrottlePolicy(max_tracked=50))
    for i in range(500):
        throttle.failed(f"198.51.100.{i % 250}", f"mailbox:user{i}@example.org")
    assert throttle.tracked() <= 50


def test_admins_share_the_throttle(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        await box.accounts.add_admin("root", "the admin passphrase")
        auth = box.auth
        assert await auth.verify_admin("Root", "the admin passphrase", "192.0.2.1") == Principal("root", "admin")
        assert await auth.verify_admin("root", WRONG, "192.0.2.1") is None
        assert await auth.verify_admin(ALICE, PASSWORD, "192.0.2.1") is None  # a mailbox is no admin
        assert await auth.verify("root", "the admin passphrase", "imap", "192.0.2.1") is None
        for _ in range(QUICK.pair_lockout_failures):
            await auth.verify_admin("root", WRONG, "192.0.2.2")
        assert await auth.verify_admin("root", "the admin passphrase", "192.0.2.2") is None
        assert await auth.verify_admin("root", "the admin passphrase", "192.0.2.3") == Principal("root", "admin")

    run(tmp_path, scenario)


def test_every_attempt_is_logged_without_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (PASSWORD, WRONG, "the admin passphrase", "yet another wrong guess")

    async def scenario(box: Box) -> None:
        auth = box.auth
        await box.accounts.add_admin("root", "the admin passphrase")
        await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1")
        await auth.verify(ALICE, WRONG, "smtp", "192.0.2.1")
        await auth.verify("nobody@example.org", WRONG, "pop3", "192.0.2.1")
        await auth.verify("bob@example.org\r\nauth ok: forged", WRONG, "pop3", "192.0.2.1")
        await auth.verify_admin("root", "the admin passphrase", "192.0.2.1")
        await box.accounts.update_user(ALICE, enabled=False)
        await auth.verify(ALICE, PASSWORD, "web", "192.0.2.1")
        for _ in range(QUICK.pair_lockout_failures + 1):
            await auth.verify(ALICE, "yet another wrong guess", "imap", "192.0.2.5")

    run(tmp_path, scenario)
    lines = auth_lines(caplog)
    assert lines[0] == "auth ok: service=imap peer=192.0.2.1 mailbox=alice@example.org"
    assert lines[1] == "auth bad-password: service=smtp peer=192.0.2.1 mailbox=alice@example.org"
    assert lines[2] == "auth unknown-account: service=pop3 peer=192.0.2.1 mailbox=nobody@example.org"
    assert lines[3].startswith("auth unknown-account: service=pop3 peer=192.0.2.1 mailbox=")
    assert "\n" not in lines[3]
    assert "\r" not in lines[3]
    assert lines[4] == "auth ok: service=web peer=192.0.2.1 admin=root"
    assert lines[5] == "auth disabled: service=web peer=192.0.2.1 mailbox=alice@example.org"
    assert any(line.startswith("auth locked:") for line in lines)
    everything = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    for secret in secrets:
        assert secret not in everything


def test_exactly_three_failures_go_through_undelayed() -> None:
    """free_failures=3 means the fourth attempt waits, also when the failures came a second apart (the
    leaky bucket had forgiven 2% of one, and int() rounded 2.98 down to two)."""
    clock = FakeClock()
    throttle = Throttle(DEFAULT_POLICY, clock)
    peer, account = "192.0.2.1", "mailbox:alice@example.org"
    undelayed = 0
    while throttle.delay(peer, account) == 0:
        undelayed += 1
        throttle.failed(peer, account)
        clock.now += 1
        assert undelayed < 10
    assert undelayed == DEFAULT_POLICY.free_failures == 3
    assert throttle.delay(peer, account) == DEFAULT_POLICY.base_delay
    # Once a whole failure has leaked away, the next attempt is free again.
    clock.now += DEFAULT_POLICY.forgive_seconds
    assert throttle.delay(peer, account) == 0


def test_lockouts_start_at_exactly_their_count() -> None:
    clock = FakeClock()
    throttle = Throttle(DEFAULT_POLICY, clock)
    started = []
    for n in range(1, 12):
        started.append((n, throttle.failed("192.0.2.1", "mailbox:alice@example.org")))
        clock.now += 1
    assert [n for n, what in started if what] == [DEFAULT_POLICY.pair_lockout_failures]
    for i in range(DEFAULT_POLICY.peer_lockout_failures):
        what = throttle.failed("192.0.2.2", f"mailbox:user{i}@example.org")
        clock.now += 1
    assert what == "peer"


# Only the budget matters here: no delays, no lockouts.
BUDGET = ThrottlePolicy(
    free_failures=10**6, peer_free_failures=10**6, pair_lockout_failures=10**6, peer_lockout_failures=10**6,
    account_budget=10, trusted_budget=10, budget_seconds=60, trust_seconds=30 * 86400, over_budget_delay=0.01,
)
OWNER = "192.0.2.200"


def outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line.split(":", 1)[0].removeprefix("auth ") for line in auth_lines(caplog)]


def make_auth(box: Box, wall: FakeClock, policy: ThrottlePolicy = BUDGET) -> Auth:
    return Auth(box.db, box.accounts, policy=policy, clock=box.clock, wall_clock=wall)


def test_distributed_guessing_gets_ten_checks_a_minute_per_account(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="letterbox.auth")

    async def scenario(box: Box) -> None:
        auth = make_auth(box, FakeClock())
        # 20 addresses x 10 guesses, across every protocol, in parallel: never more than 10 checked.
        guesses = [
            auth.verify(ALICE, f"guess {n} from {i}", ("imap", "pop3", "smtp", "web")[n % 4], f"198.51.100.{i}")
            for i in range(20) for n in range(10)
        ]
        assert await asyncio.gather(*guesses) == [None] * 200
        assert outcomes(caplog).count("bad-password") == 10
        assert outcomes(caplog).count("over-budget") == 190
        # Past the budget even the right password is refused unchecked, with the same answer as a wrong one,
        # and not at once (an instant answer would invite a tight reconnect loop).
        caplog.clear()
        slow = Auth(box.db, box.accounts, policy=replace(BUDGET, over_budget_delay=0.3), clock=box.clock)
        for _ in range(10):
            await slow.verify(ALICE, WRONG, "imap", "198.51.100.76")
        result, seconds = await timed(slow.verify(ALICE, PASSWORD, "imap", "198.51.100.77"))
        assert result is None
        assert seconds >= 0.3
        assert await auth.verify(ALICE, PASSWORD, "imap", "198.51.100.77") is None
        assert outcomes(caplog)[-2:] == ["over-budget", "over-budget"]
        # Other accounts are not affected.
        await box.accounts.add_user("bob@example.org", PASSWORD)
        assert await auth.verify("bob@example.org", PASSWORD, "imap", "198.51.100.1") is not None
        # A sliding minute: 59 s later still nothing, a minute after the checks the next 10.
        box.clock.now += 59
        assert await auth.verify(ALICE, PASSWORD, "imap", "198.51.100.77") is None
        box.clock.now += 1.5
        caplog.clear()
        for i in range(12):
            await auth.verify(ALICE, WRONG, "pop3", f"203.0.113.{i}")
        assert outcomes(caplog).count("bad-password") == 10

    run(tmp_path, scenario)


def test_a_check_counts_while_it_waits_and_for_a_minute_after_it_ends() -> None:
    """Checks that waited long for a hash slot must not bunch up: no 60 s of finished checks (what the
    log shows) holds more than the budget."""
    clock = FakeClock()
    throttle = Throttle(BUDGET, clock)
    account = "mailbox:alice@example.org"
    uses = [throttle.take_check(account, None) for _ in range(10)]
    assert all(use is not None for use in uses)
    clock.now += 600  # all ten still waiting for a slot: still counted
    assert throttle.take_check(account, None) is None
    for use in uses:
        assert use is not None
        throttle.finish_check(use)
    clock.now += 59
    assert throttle.take_check(account, None) is None
    clock.now += 1
    assert throttle.take_check(account, None) is not None
    # Trusted clients have their own ten.
    assert all(throttle.take_check(account, "address:192.0.2.9") is not None for _ in range(10))
    assert throttle.take_check(account, "address:192.0.2.9") is None


def test_right_passwords_do_not_use_up_the_budget(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        auth = make_auth(box, FakeClock())
        # Many clients of the owner logging in at once, from an address never seen before.
        logins = [auth.verify(ALICE, PASSWORD, "imap", "192.0.2.77") for _ in range(30)]
        assert all(result is not None for result in await asyncio.gather(*logins))
        assert await auth.verify(ALICE, PASSWORD, "smtp", "192.0.2.78") is not None

    run(tmp_path, scenario)


def test_the_owners_addresses_keep_their_own_budget_across_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="letterbox.auth")
    slow_account = ThrottlePolicy(
        free_failures=1, peer_free_failures=10**6, pair_lockout_failures=10**6, peer_lockout_failures=10**6,
        base_delay=5.0, max_delay=5.0, account_max_delay=5.0, forgive_seconds=3600,
        account_budget=10, trusted_budget=10, budget_seconds=60, trust_seconds=30 * 86400, over_budget_delay=0.01,
    )

    async def attack(auth: Auth) -> None:
        await asyncio.gather(*(auth.verify(ALICE, WRONG, "imap", f"198.51.100.{i}") for i in range(30)))

    async def scenario(box: Box) -> None:
        wall = FakeClock()
        auth = make_auth(box, wall)
        assert await auth.verify(ALICE, PASSWORD, "imap", OWNER) is not None  # the owner's client, last week
        wall.now += 7 * 86400
        auth = make_auth(box, wall, BUDGET)  # a restart: the budget is gone, the address is remembered
        await attack(auth)
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.201") is None  # a stranger: over budget
        for service in ("imap", "pop3", "smtp"):
            assert await auth.verify(ALICE, PASSWORD, service, OWNER) == Principal(ALICE, "mailbox")
        # The web does not go by address: there, the device cookie is what counts.
        assert await auth.verify(ALICE, PASSWORD, "web", OWNER) is None
        # Also not slowed by the attackers' failures on the account (the account-wide delay).
        auth = make_auth(box, wall, slow_account)
        await attack(auth)
        result, seconds = await timed(auth.verify(ALICE, PASSWORD, "pop3", OWNER))
        assert result is not None
        assert seconds < 2.0
        # Even the owner's address has only a budget: its wrong passwords are checked 10 times a minute.
        auth = make_auth(box, wall, BUDGET)
        caplog.clear()
        for _ in range(12):
            assert await auth.verify(ALICE, WRONG, "smtp", OWNER) is None
        assert outcomes(caplog).count("bad-password") == 10
        assert outcomes(caplog)[-2:] == ["over-budget", "over-budget"]
        # Forgotten after 30 days without a login from it.
        auth = make_auth(box, wall, BUDGET)
        wall.now += 31 * 86400
        await attack(auth)
        assert await auth.verify(ALICE, PASSWORD, "imap", OWNER) is None

    run(tmp_path, scenario)


def test_remembered_addresses_are_bounded_per_account(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        wall = FakeClock()
        auth = make_auth(box, wall)
        for i in range(40):
            wall.now += 1
            assert await auth.verify(ALICE, PASSWORD, "imap", f"192.0.2.{i}") is not None
        rows = await box.db.fetchall("SELECT client FROM auth_trusted_clients ORDER BY last_success")
        assert [row["client"] for row in rows] == [f"192.0.2.{i}" for i in range(20, 40)]

    run(tmp_path, scenario)


SECRET = "0123456789abcdef" * 4


def test_device_cookies_are_signed_bound_to_an_account_and_expire() -> None:
    alice = Principal(ALICE, "mailbox")
    token = sign_device(SECRET, alice, 1000.0)
    device = read_device(SECRET, token, 2000.0)
    assert device is not None
    assert device.account == "mailbox:alice@example.org"
    assert read_device(SECRET, sign_device(SECRET, alice, 1000.0, device.id), 1000.0) == device
    assert read_device("another box's secret" * 3, token, 2000.0) is None
    payload, mac = token.split(".")
    assert read_device(SECRET, payload + "." + mac[:-1] + ("0" if mac[-1] != "0" else "1"), 2000.0) is None
    forged = sign_device(SECRET, Principal("root", "admin"), 1000.0).split(".")[0] + "." + mac
    assert read_device(SECRET, forged, 2000.0) is None
    assert read_device(SECRET, token, 1000.0 + DEFAULT_POLICY.trust_seconds + 1) is None
    for junk in ("", "x", "a.b.c", "!!!.zz", "." * 5000, None):
        assert read_device(SECRET, junk, 2000.0) is None


def test_a_known_device_logs_in_to_the_web_during_an_attack(tmp_path: Path) -> None:
    async def scenario(box: Box) -> None:
        auth = make_auth(box, FakeClock())
        await box.accounts.add_admin("root", "the admin passphrase")
        alice_device = read_device(SECRET, sign_device(SECRET, Principal(ALICE, "mailbox"), 0), 0)
        root_device = read_device(SECRET, sign_device(SECRET, Principal("root", "admin"), 0), 0)
        for i in range(30):
            await auth.verify(ALICE, WRONG, "web", f"198.51.100.{i}")
            await auth.verify_admin("root", WRONG, f"198.51.100.{i}")
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.9") is None
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.9", device=root_device) is None
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.9", device=alice_device) is not None
        assert await auth.verify_admin("root", "the admin passphrase", "192.0.2.9") is None
        assert await auth.verify_admin("root", "the admin passphrase", "192.0.2.9", device=root_device) is not None
        # A device is one client: its own wrong passwords meet its own budget.
        other = Device("mailbox:alice@example.org", "another")
        for _ in range(10):
            assert await auth.verify(ALICE, WRONG, "web", "192.0.2.9", device=other) is None
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.9", device=other) is None
        assert await auth.verify(ALICE, PASSWORD, "web", "192.0.2.9", device=alice_device) is not None

    run(tmp_path, scenario)


def test_hash_slots_keep_room_for_owners_and_serve_them_first() -> None:
    async def main() -> None:
        slots = HashSlots(2, 1)
        order: list[str] = []
        release = asyncio.Event()

        async def hash_(name: str, owner: bool) -> None:
            async with slots.slot(owner=owner):
                order.append(name)
                await release.wait()

        strangers = [asyncio.create_task(hash_(f"stranger{i}", False)) for i in range(3)]
        await asyncio.sleep(0)
        assert order == ["stranger0"]  # the second slot is kept for owners
        owner = asyncio.create_task(hash_("owner", True))
        await asyncio.sleep(0)
        assert order == ["stranger0", "owner"]  # no wait behind the strangers' queue
        cancelled = strangers[1]
        cancelled.cancel()
        late_owner = asyncio.create_task(hash_("late owner", True))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(owner, late_owner, strangers[0], strangers[2])
        assert cancelled.cancelled()
        assert order == ["stranger0", "owner", "late owner", "stranger2"]
        async with slots.slot(owner=False), slots.slot(owner=True):
            pass  # every slot was given back

    asyncio.run(main())


def test_failed_login_events_are_coalesced_per_account() -> None:
    from appliance.auth import FAILURE_NOTE_SECONDS, _FailureNotes

    clock = FakeClock()
    notes = _FailureNotes(clock, max_tracked=2)
    assert notes.due("mailbox:a") == 1  # the first failure is reported at once
    assert [notes.due("mailbox:a") for _ in range(3)] == [0, 0, 0]
    clock.now += FAILURE_NOTE_SECONDS
    assert notes.due("mailbox:a") == 4  # then the count of those held back with the next one
    assert notes.due("mailbox:b") == 1
    assert notes.due("mailbox:c") == 1
    assert notes.due("mailbox:a") == 1  # forgotten (bounded table): reported again


def test_lockouts_are_listed_and_lifted() -> None:
    clock = FakeClock()
    throttle = Throttle(QUICK, clock)
    for _ in range(QUICK.pair_lockout_failures):
        throttle.failed("192.0.2.1", "mailbox:a@x")
    (lockout,) = throttle.lockouts()
    assert (lockout.peer, lockout.account, lockout.seconds_left) == ("192.0.2.1", "mailbox:a@x", QUICK.lockout_seconds)
    assert throttle.unlock("192.0.2.1", "mailbox:a@x")
    assert throttle.lockouts() == []
    assert throttle.locked_for("192.0.2.1", "mailbox:a@x") == 0
    assert not throttle.unlock("192.0.2.1", "mailbox:a@x")
    for n in range(QUICK.peer_lockout_failures):
        throttle.failed("192.0.2.9", f"mailbox:{n}@x")
    assert any(lockout.account is None for lockout in throttle.lockouts())
    assert throttle.unlock("192.0.2.9", None)
    assert throttle.locked_for("192.0.2.9", "mailbox:new@x") == 0
