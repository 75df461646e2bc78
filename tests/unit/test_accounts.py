"""Domains, mailboxes, aliases and resolve() against a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from appliance.accounts import (
    MAX_ALIAS_DEPTH,
    AccountError,
    Accounts,
    AlreadyExists,
    InUse,
    InvalidAddress,
    NotFound,
    Resolution,
    WeakPassword,
)
from appliance.db import Database
from appliance.passwords import make_hasher, verify_password

# Real argon2id, cheap parameters: these tests are about accounts, not hashing cost.
FAST = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
PASSWORD = "a long enough password"

Scenario = Callable[[Accounts], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            await scenario(Accounts(db, hasher=FAST))
        finally:
            await db.close()

    asyncio.run(main())


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "letterbox.db") as conn:
        return conn.execute(sql).fetchall()


async def setup(accounts: Accounts, *users: str, domains: tuple[str, ...] = ("example.org",)) -> None:
    for domain in domains:
        await accounts.add_domain(domain)
    for user in users:
        await accounts.add_user(user, PASSWORD)


def res(mailboxes: tuple[str, ...] = (), forwards: tuple[str, ...] = (), stopped: str = "") -> Resolution:
    return Resolution(mailboxes, forwards, stopped)


# --- domains ------------------------------------------------------------------------------------------

def test_domains(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        assert await a.add_domain("Example.ORG.") == "example.org"
        assert await a.add_domain("Bücher.example") == "xn--bcher-kva.example"
        with pytest.raises(AlreadyExists, match=re.escape("domain example.org already exists")):
            await a.add_domain("EXAMPLE.org")
        with pytest.raises(AlreadyExists):
            await a.add_domain("xn--bcher-kva.example")
        with pytest.raises(InvalidAddress, match="domain"):
            await a.add_domain("-bad-.example")
        with pytest.raises(InvalidAddress, match=re.escape("address literal")):
            await a.add_domain("[127.0.0.1]")
        assert await a.list_domains() == ["example.org", "xn--bcher-kva.example"]
        assert await a.is_local_domain("EXAMPLE.ORG")
        assert await a.is_local_domain("bücher.example")
        assert await a.is_local_domain("example.org.")
        assert not await a.is_local_domain("example.net")
        assert not await a.is_local_domain("[127.0.0.1]")
        assert not await a.is_local_domain("not a domain")

        await a.add_user("alice@example.org", PASSWORD)
        await a.add_alias("postmaster@example.org", ["alice@example.org"])
        with pytest.raises(InUse) as info:
            await a.remove_domain("example.org")
        assert str(info.value) == (
            "domain example.org still has 1 mailbox(es) and 1 alias(es); remove them first"
        )
        await a.remove_alias("postmaster@example.org")
        await a.remove_user("alice@example.org")
        await a.remove_domain("Example.org")
        assert await a.list_domains() == ["xn--bcher-kva.example"]
        with pytest.raises(NotFound, match=re.escape("no domain example.org")):
            await a.remove_domain("example.org")

    run(tmp_path, scenario)


# --- mailboxes ----------------------------------------------------------------------------------------

def test_mailboxes(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await a.add_domain("example.org")
        before = int(time.time())
        info = await a.add_user("Alice@Example.ORG", PASSWORD, display_name=" Alice Liddell ", quota_bytes=1024)
        assert info.address == "alice@example.org"
        assert info.display_name == "Alice Liddell"
        assert info.quota_bytes == 1024
        assert info.enabled
        assert info.created_at >= before
        assert await a.get_user("ALICE@example.org.") == info
        assert await a.get_user("nobody@example.org") is None
        assert await a.get_user("garbage") is None

        with pytest.raises(AlreadyExists, match=re.escape("mailbox alice@example.org already exists")):
            await a.add_user("aLiCe@example.org", PASSWORD)
        with pytest.raises(NotFound, match=re.escape("unknown domain example.net")):
            await a.add_user("bob@example.net", PASSWORD)
        with pytest.raises(InvalidAddress, match="address"):
            await a.add_user("not an address", PASSWORD)
        for bad in ("a/b@example.org", '"a b"@example.org', "-x@example.org", "x@[127.0.0.1]"):
            with pytest.raises(InvalidAddress):
                await a.add_user(bad, PASSWORD)
        with pytest.raises(WeakPassword, match=re.escape("password is empty")):
            await a.add_user("bob@example.org", "")
        with pytest.raises(WeakPassword, match=re.escape("too short")):
            await a.add_user("bob@example.org", "short")
        with pytest.raises(WeakPassword, match=re.escape("too common")):
            await a.add_user("bob@example.org", "Password123")
        with pytest.raises(WeakPassword, match=re.escape("must not be the address")):
            await a.add_user("bobby.tables@example.org", "Bobby.Tables@example.org")
        with pytest.raises(AccountError, match="quota"):
            await a.add_user("bob@example.org", PASSWORD, quota_bytes=-1)
        with pytest.raises(AccountError, match=re.escape("control character")):
            await a.add_user("bob@example.org", PASSWORD, display_name="Bob\r\nBcc: x")
        assert [u.address for u in await a.list_users()] == ["alice@example.org"]

        await a.add_domain("example.net")
        await a.add_user("bob@example.net", PASSWORD)
        await a.add_user("carol@example.org", PASSWORD)
        assert [u.address for u in await a.list_users()] == [
            "bob@example.net", "alice@example.org", "carol@example.org"
        ]
        assert [u.address for u in await a.list_users("EXAMPLE.org")] == ["alice@example.org", "carol@example.org"]
        with pytest.raises(NotFound):
            await a.list_users("unknown.test")

        changed = await a.update_user("alice@example.org", display_name="A.", quota_bytes=0, enabled=False)
        assert (changed.display_name, changed.quota_bytes, changed.enabled) == ("A.", 0, False)
        assert (await a.update_user("alice@example.org")).enabled is False
        with pytest.raises(NotFound, match=re.escape("no mailbox nobody@example.org")):
            await a.update_user("nobody@example.org", enabled=True)

        with pytest.raises(NotFound, match=re.escape("no mailbox nobody@example.org")):
            await a.remove_user("nobody@example.org")
        await a.remove_user("CAROL@example.org")
        assert await a.get_user("carol@example.org") is None

    run(tmp_path, scenario)


def test_passwords_are_argon2id_hashes_in_the_db(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org")
        with pytest.raises(WeakPassword):
            await a.set_password("alice@example.org", "tiny")
        with pytest.raises(NotFound, match=re.escape("no mailbox nobody@example.org")):
            await a.set_password("nobody@example.org", "another long passphrase")
        creds = await a.mailbox_credentials("alice@example.org")
        assert creds is not None
        assert verify_password(creds.password_hash, PASSWORD, FAST)
        await a.set_password("Alice@example.org", "another long passphrase")

    run(tmp_path, scenario)
    ((stored,),) = rows(tmp_path, "SELECT password_hash FROM mailboxes")
    assert isinstance(stored, str)
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "another long passphrase", FAST)
    assert not verify_password(stored, PASSWORD, FAST)
    raw = (tmp_path / "letterbox.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("letterbox.db-*")
    )
    assert b"another long passphrase" not in raw
    assert PASSWORD.encode() not in raw


# --- aliases ------------------------------------------------------------------------------------------

def test_aliases(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", "bob@example.org")
        info = await a.add_alias("Team@Example.org", ["alice@example.org", "BOB@example.org", "Ext@Remote.Test",
                                                      "alice@EXAMPLE.org"])
        assert info.source == "team@example.org"
        assert info.targets == ("alice@example.org", "BOB@example.org", "Ext@remote.test")
        catch_all = await a.add_alias("@example.org", ["alice@example.org"])
        assert catch_all.source == "@example.org"
        with pytest.raises(AlreadyExists, match=re.escape("alias team@example.org already exists")):
            await a.add_alias("TEAM@example.org", ["bob@example.org"])
        with pytest.raises(NotFound, match=re.escape("unknown domain remote.test")):
            await a.add_alias("x@remote.test", ["bob@example.org"])
        with pytest.raises(InvalidAddress, match="address"):
            await a.add_alias("x@example.org", ["not an address"])
        with pytest.raises(InvalidAddress, match=re.escape("only for a catch-all")):
            await a.add_alias("x@example.org", ["@example.net"])
        with pytest.raises(InvalidAddress, match="literal"):
            await a.add_alias("x@example.org", ["root@[192.0.2.1]"])
        with pytest.raises(AccountError, match=re.escape("at least one target")):
            await a.add_alias("x@example.org", [])
        assert [(i.source, i.targets) for i in await a.list_aliases()] == [
            ("@example.org", ("alice@example.org",)),
            ("team@example.org", ("alice@example.org", "BOB@example.org", "Ext@remote.test")),
        ]
        assert await a.list_aliases("example.org") == await a.list_aliases()
        assert await a.get_alias("team@example.org") == info
        assert await a.get_alias("nobody@example.org") is None

        replaced = await a.set_alias_targets("team@example.org", ["bob@example.org"])
        assert replaced.targets == ("bob@example.org",)
        with pytest.raises(NotFound, match=re.escape("no alias nobody@example.org")):
            await a.set_alias_targets("nobody@example.org", ["bob@example.org"])
        await a.remove_alias("@EXAMPLE.org")
        with pytest.raises(NotFound, match=re.escape("no alias @example.org")):
            await a.remove_alias("@example.org")
        assert [i.source for i in await a.list_aliases()] == ["team@example.org"]

    run(tmp_path, scenario)


# --- resolution ---------------------------------------------------------------------------------------

def test_resolve_mailboxes_case_and_idn(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", domains=("example.org", "bücher.example"))
        with pytest.raises(InvalidAddress, match=re.escape("non-ASCII")):
            await a.add_user("jörg@bücher.example", PASSWORD)
        assert await a.resolve("alice@example.org") == res(("alice@example.org",))
        assert await a.resolve("ALICE@Example.ORG.") == res(("alice@example.org",))
        assert await a.resolve('"alice"@example.org') == res(("alice@example.org",))
        assert await a.resolve("jörg@xn--bcher-kva.example") == res()  # a UTF-8 local part is no mailbox
        await a.add_user("joerg@bücher.example", PASSWORD)
        assert await a.resolve("Joerg@BÜCHER.example") == res(("joerg@xn--bcher-kva.example",))
        assert await a.resolve("joerg@xn--bcher-kva.example") == res(("joerg@xn--bcher-kva.example",))
        # Unknown, remote, literal and malformed recipients resolve to nothing (never to a forward).
        for nobody in ("nobody@example.org", "alice@example.net", "alice@[127.0.0.1]", "garbage", "",
                       "alice@example.org@example.org"):
            assert await a.resolve(nobody) == res(), nobody

    run(tmp_path, scenario)


def test_resolve_aliases_and_forwards(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", "bob@example.org")
        await a.add_alias("team@example.org", ["alice@example.org", "bob@example.org", "Carol@Remote.Test"])
        await a.add_alias("all@example.org", ["team@example.org", "alice@example.org", "carol@remote.test"])
        assert await a.resolve("team@example.org") == res(
            ("alice@example.org", "bob@example.org"), ("Carol@remote.test",)
        )
        # Nested and overlapping: each mailbox and forward once, the external local part as written.
        assert await a.resolve("ALL@example.org") == res(
            ("alice@example.org", "bob@example.org"), ("Carol@remote.test",)
        )
        # An alias wins over a mailbox of the same name; naming the mailbox itself keeps a copy.
        await a.add_alias("bob@example.org", ["bob@example.org", "bob@elsewhere.test"])
        assert await a.resolve("bob@example.org") == res(("bob@example.org",), ("bob@elsewhere.test",))
        # Without the mailbox among its targets it would silently take all of alice's mail (issue 10 item 10).
        with pytest.raises(AlreadyExists, match="is a mailbox"):
            await a.add_alias("alice@example.org", ["alice@elsewhere.test"])
        assert await a.resolve("alice@example.org") == res(("alice@example.org",))

    run(tmp_path, scenario)


def test_resolve_plus_addressing(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", "bob@example.org")
        assert await a.resolve("alice+news@example.org") == res(("alice@example.org",))
        assert await a.resolve("Alice+News+More@example.org") == res(("alice@example.org",))
        assert await a.resolve("alice+@example.org") == res(("alice@example.org",))
        assert await a.resolve("nobody+news@example.org") == res()
        # An exact mailbox or alias with the plus in its name wins over plus-addressing.
        await a.add_user("alice+shop@example.org", PASSWORD)
        assert await a.resolve("alice+shop@example.org") == res(("alice+shop@example.org",))
        await a.add_alias("alice+list@example.org", ["bob@example.org"])
        assert await a.resolve("alice+list@example.org") == res(("bob@example.org",))
        # Plus-addressing works on aliases too.
        await a.add_alias("team@example.org", ["alice@example.org", "bob@example.org"])
        assert await a.resolve("team+x@example.org") == res(("alice@example.org", "bob@example.org"))

    run(tmp_path, scenario)


def test_resolve_catch_all_and_domain_alias(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", "admin@example.org", "alice@example.net",
                    domains=("example.org", "example.net", "example.com"))
        await a.add_alias("@example.org", ["admin@example.org"])
        assert await a.resolve("whoever@example.org") == res(("admin@example.org",))
        assert await a.resolve("alice@example.org") == res(("alice@example.org",))  # existing names first
        assert await a.resolve("alice+x@example.org") == res(("alice@example.org",))
        assert await a.resolve("whoever@example.net") == res()  # other domains unaffected
        # '@domain' target: the same local part in another domain (a domain alias).
        await a.add_alias("@example.com", ["@example.net"])
        assert await a.resolve("Alice@example.com") == res(("alice@example.net",))
        assert await a.resolve("bob@example.com") == res()

    run(tmp_path, scenario)


def test_relay_tricks_stay_local(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "user@example.org")
        for trick in ("user%remote.test@example.org", "remote.test!user@example.org",
                      '"user@remote.test"@example.org', "user@remote.test@example.org"):
            assert await a.resolve(trick) == res(), trick
        await a.add_alias("@example.org", ["user@example.org"])
        # With a catch-all the trick lands in a local mailbox, still never outside.
        assert await a.resolve("user%remote.test@example.org") == res(("user@example.org",))

    run(tmp_path, scenario)


def test_resolve_loops_stop_and_deliver_what_is_reachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="letterbox.accounts")

    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org")
        await a.add_alias("a@example.org", ["b@example.org"])
        await a.add_alias("b@example.org", ["a@example.org"])
        assert await a.resolve("a@example.org") == res(stopped="loop")
        assert any("alias loop" in r.getMessage() for r in caplog.records)

        await a.add_alias("c@example.org", ["d@example.org", "alice@example.org"])
        await a.add_alias("d@example.org", ["c@example.org", "out@remote.test"])
        assert await a.resolve("c@example.org") == res(("alice@example.org",), ("out@remote.test",))
        assert await a.resolve("d@example.org") == res(("alice@example.org",), ("out@remote.test",))

        # A catch-all pointing into its own domain's unknown names, and a domain alias pair.
        await a.add_domain("example.net")
        await a.add_alias("@example.net", ["@example.org"])
        await a.add_alias("@example.org", ["@example.net"])
        assert await a.resolve("ghost@example.net") == res(stopped="loop")
        assert await a.resolve("alice@example.net") == res(("alice@example.org",))

    run(tmp_path, scenario)


def test_resolve_depth_and_fan_out_are_bounded(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org")
        # A chain longer than the depth limit stops instead of recursing forever.
        length = MAX_ALIAS_DEPTH + 5
        for i in range(length):
            await a.add_alias(f"chain{i}@example.org", [f"chain{i + 1}@example.org"])
        await a.add_alias(f"chain{length}@example.org", ["alice@example.org"])
        assert await a.resolve("chain0@example.org") == res(stopped="too deep")
        assert await a.resolve(f"chain{length - 3}@example.org") == res(("alice@example.org",))
        # A lattice with 2**12 paths: each address is expanded once, so this is quick.
        for level in range(12):
            nxt = [f"l{level + 1}x@example.org", f"l{level + 1}y@example.org"]
            await a.add_alias(f"l{level}x@example.org", nxt)
            await a.add_alias(f"l{level}y@example.org", nxt)
        await a.add_alias("l12x@example.org", ["alice@example.org"])
        await a.add_alias("l12y@example.org", ["fan@remote.test"])
        started = time.monotonic()
        assert await a.resolve("l0x@example.org") == res(("alice@example.org",), ("fan@remote.test",))
        assert time.monotonic() - started < 2

    run(tmp_path, scenario)


def test_disabled_mailbox_still_receives(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org")
        await a.update_user("alice@example.org", enabled=False)
        assert await a.resolve("alice@example.org") == res(("alice@example.org",))

    run(tmp_path, scenario)


def test_may_send_as(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        await setup(a, "alice@example.org", "bob@example.org")
        await a.add_alias("team@example.org", ["alice@example.org", "bob@example.org"])
        await a.add_alias("sales@example.org", ["team@example.org"])
        await a.add_alias("bobonly@example.org", ["bob@example.org"])
        await a.add_alias("@example.org", ["alice@example.org"])
        alice = "alice@example.org"
        assert await a.may_send_as(alice, "alice@example.org")
        assert await a.may_send_as(alice, "Alice@EXAMPLE.org")
        assert await a.may_send_as(alice, "alice+news@example.org")
        assert await a.may_send_as(alice, "team@example.org")
        assert await a.may_send_as(alice, "sales+x@example.org")
        assert not await a.may_send_as(alice, "bobonly@example.org")
        assert not await a.may_send_as(alice, "bob@example.org")
        assert not await a.may_send_as(alice, "bob+x@example.org")
        assert not await a.may_send_as(alice, "unused@example.org")  # the catch-all is not a licence
        assert not await a.may_send_as(alice, "alice@remote.test")
        assert not await a.may_send_as(alice, "alice@[127.0.0.1]")
        assert not await a.may_send_as(alice, "garbage")
        await a.add_user("alice+shop@example.org", PASSWORD)
        assert not await a.may_send_as(alice, "alice+shop@example.org")  # someone else's exact name

    run(tmp_path, scenario)


# --- admins -------------------------------------------------------------------------------------------

def test_admins(tmp_path: Path) -> None:
    async def scenario(a: Accounts) -> None:
        assert not await a.has_admin()
        with pytest.raises(WeakPassword):
            await a.add_admin("admin", "short")
        with pytest.raises(AccountError, match=re.escape("admin name")):
            await a.add_admin("bad name", PASSWORD)
        await a.add_admin("Admin", PASSWORD)
        assert await a.has_admin()
        with pytest.raises(AlreadyExists, match=re.escape("admin admin already exists")):
            await a.add_admin("ADMIN", PASSWORD)
        with pytest.raises(InUse, match=re.escape("last admin")):
            await a.remove_admin("admin")
        await a.add_admin("second", PASSWORD)
        assert await a.list_admins() == ["admin", "second"]
        await a.set_admin_password("second", "another long passphrase")
        creds = await a.admin_credentials("SECOND")
        assert creds is not None
        assert verify_password(creds.password_hash, "another long passphrase", FAST)
        with pytest.raises(NotFound):
            await a.set_admin_password("nobody", "another long passphrase")
        await a.remove_admin("admin")
        assert await a.list_admins() == ["second"]

    run(tmp_path, scenario)
