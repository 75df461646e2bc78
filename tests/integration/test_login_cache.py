"""The cache of successful password checks (appliance/login_cache.py, used by auth.py): a reconnecting
client skips argon2; a wrong password never does; a change made anywhere (the CLI in another process,
a disable, a removal) ends the cached success at once, over IMAP, POP3 and SMTP AUTH alike; the
throttle still comes first.

argon2 work is counted by giving the box's Auth a hasher that counts its verify calls.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from argon2 import PasswordHasher

from appliance import passwords
from appliance.accounts import Accounts
from appliance.auth import Auth, Principal
from appliance.db import Database
from appliance.login_cache import LoginCache
from tests.conftest import LETTERBOX, BoxHandle
from tests.unit.test_auth import NO_THROTTLE, QUICK, FakeClock

ALICE = "alice@example.org"
PASSWORD = "a long enough password"
NEW_PASSWORD = "another long enough password"
WRONG = "not the password at all"


class CountingHasher(PasswordHasher):
    """The box's own argon2id parameters, counting the hashes verified."""

    def __init__(self) -> None:
        super().__init__(time_cost=passwords.TIME_COST, memory_cost=passwords.MEMORY_COST_KIB,
                         parallelism=passwords.PARALLELISM, hash_len=passwords.HASH_LEN, salt_len=passwords.SALT_LEN)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified += 1
        return super().verify(hash, password)


@pytest.fixture
def counted(box: BoxHandle) -> CountingHasher:
    box.add_user(ALICE, PASSWORD)
    hasher = CountingHasher()
    box.services.auth.hasher = hasher
    return hasher


def imap_login(box: BoxHandle, password: str) -> bool:
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
        try:
            imap.login(ALICE, password)
        except imaplib.IMAP4.error:
            return False
        imap.logout()
        return True


def test_a_reconnecting_client_skips_argon2_and_a_wrong_password_never_does(
    box: BoxHandle, counted: CountingHasher
) -> None:
    assert imap_login(box, PASSWORD)
    assert counted.verified == 1
    assert imap_login(box, PASSWORD)
    assert imap_login(box, PASSWORD)
    assert counted.verified == 1  # both from the cache
    assert not imap_login(box, WRONG)
    assert not imap_login(box, PASSWORD + " ")
    assert counted.verified == 3  # each wrong password met argon2
    assert imap_login(box, PASSWORD)
    assert counted.verified == 3  # the failures did not evict the owner's entry


def pop3_login(box: BoxHandle, password: str) -> bool:
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=30)
    try:
        pop.user(ALICE)
        pop.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        pop.close()
    return True


def smtp_login(box: BoxHandle, password: str) -> bool:
    with smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), context=box.client_context, timeout=30) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = ALICE, password
        try:
            smtp.auth("PLAIN", smtp.auth_plain)  # one mechanism: login() would try LOGIN after a failed PLAIN
        except smtplib.SMTPAuthenticationError:
            return False
    return True


@pytest.mark.parametrize("login", [imap_login, pop3_login, smtp_login], ids=["imap", "pop3", "smtp"])
def test_a_password_changed_by_the_cli_ends_the_cached_success(
    box: BoxHandle, counted: CountingHasher, login: Callable[[BoxHandle, str], bool],
) -> None:
    assert login(box, PASSWORD)
    assert login(box, PASSWORD)
    assert counted.verified == 1
    result = subprocess.run([LETTERBOX, "--data", str(box.data.root), "user", "passwd", ALICE, "--password-stdin"],
                            input=NEW_PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert not login(box, PASSWORD)  # another process changed it: the old password is refused at once
    assert counted.verified == 2
    assert login(box, NEW_PASSWORD)
    assert login(box, NEW_PASSWORD)
    assert counted.verified == 3


def test_disabling_or_removing_the_account_ends_the_cached_success(box: BoxHandle, counted: CountingHasher) -> None:
    accounts = box.services.accounts
    assert imap_login(box, PASSWORD)
    box.run(accounts.update_user(ALICE, enabled=False))
    assert not imap_login(box, PASSWORD)
    box.run(accounts.update_user(ALICE, enabled=True))
    assert imap_login(box, PASSWORD)
    box.run(accounts.remove_user(ALICE))
    assert not imap_login(box, PASSWORD)


# --- Auth directly, with an injected clock ----------------------------------------------------------------

def run(tmp_path: Path, scenario: Any, *, policy: Any = NO_THROTTLE) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            hasher = passwords.make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
            accounts = Accounts(db, hasher=hasher)
            await accounts.add_domain("example.org")
            await accounts.add_user(ALICE, PASSWORD)
            clock = FakeClock()
            calls = [0]
            original = passwords.verify_password

            def counting(*args: Any) -> bool:
                calls[0] += 1
                return original(*args)

            auth = Auth(db, accounts, policy=policy, clock=clock)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(passwords, "verify_password", counting)
                await scenario(auth, accounts, clock, calls)
        finally:
            await db.close()

    asyncio.run(main())


def test_a_cached_success_expires(tmp_path: Path) -> None:
    async def scenario(auth: Auth, _accounts: Accounts, clock: FakeClock, calls: list[int]) -> None:
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        clock.now += auth.login_cache.ttl - 1
        assert await auth.verify(ALICE, PASSWORD, "pop3", "192.0.2.7") == Principal(ALICE, "mailbox")
        assert calls[0] == 1
        clock.now += 2
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        assert calls[0] == 2

    run(tmp_path, scenario)


def test_a_locked_out_client_is_refused_even_with_a_cached_password(tmp_path: Path) -> None:
    async def scenario(auth: Auth, _accounts: Accounts, _clock: FakeClock, calls: list[int]) -> None:
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        for _ in range(QUICK.pair_lockout_failures):
            assert await auth.verify(ALICE, WRONG, "imap", "192.0.2.66") is None
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.66") is None  # locked, cache or not
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")

    run(tmp_path, scenario, policy=QUICK)


def test_a_rehash_to_new_parameters_is_what_gets_cached(tmp_path: Path) -> None:
    async def scenario(auth: Auth, accounts: Accounts, _clock: FakeClock, calls: list[int]) -> None:
        # The box moved to new parameters (here the production ones): the first login rehashes...
        auth.hasher = passwords.DEFAULT_HASHER
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        creds = await accounts.mailbox_credentials(ALICE)
        assert creds is not None
        assert creds.password_hash.startswith(
            f"$argon2id$v=19$m={passwords.MEMORY_COST_KIB},t={passwords.TIME_COST},p={passwords.PARALLELISM}$")
        # ...and the next is served from the cache against the new hash.
        assert await auth.verify(ALICE, PASSWORD, "imap", "192.0.2.1") == Principal(ALICE, "mailbox")
        assert calls[0] == 1

    run(tmp_path, scenario)


def test_the_cache_holds_no_password_and_is_bounded() -> None:
    cache = LoginCache(max_entries=2)
    for name in ("a", "b", "c"):
        cache.remember(name, PASSWORD, "$hash")
    assert len(cache) == 2
    assert not cache.check("a", PASSWORD, "$hash")  # the least recent went
    assert cache.check("c", PASSWORD, "$hash")
    assert not cache.check("c", PASSWORD, "$other")  # another stored hash: gone
    assert not cache.check("c", PASSWORD, "$hash")
    assert PASSWORD.encode() not in repr(vars(cache)).encode()
