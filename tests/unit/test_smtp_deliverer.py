"""What happens after DATA (appliance/smtp/delivery.py), against a real MailStore, Spool and SQLite
on tmp_path: copies, the spool, per-recipient results, bounces for accepted-but-failed copies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts import Accounts
from appliance.db import Database
from appliance.queue.spool import Spool
from appliance.smtp.delivery import Deliverer, InboundMessage, delivered_to_for
from appliance.smtp.headers import ReceivedFacts
from appliance.smtp.policy import MAILBOX_FULL, TEMPORARY_FAILURE, RecipientRoute, queued
from appliance.store.mailstore import MailStore
from tests.support.smtp_wire import maildir_messages, parse

OURS = "ourdomain.test"
ALICE, BOB, FULL = f"alice@{OURS}", f"bob@{OURS}", f"full@{OURS}"
PASSWORD = "correct horse battery staple 9"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 300


class World:
    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db
        self.accounts = Accounts(db)
        self.store = MailStore(root / "mail", db, self.accounts)
        self.spool = Spool(root / "spool", db)
        self.deliverer = Deliverer(self.accounts, self.store, self.spool, "mail.example.test")

    def inbox(self, address: str) -> list[bytes]:
        return maildir_messages(self.root / "mail", address)


def run(tmp_path: Path, body: Callable[[World], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        db = await Database.open(tmp_path / "letterbox.db")
        try:
            world = World(tmp_path, db)
            await world.accounts.add_domain(OURS)
            for address, quota in ((ALICE, 0), (BOB, 0), (FULL, 10_000)):
                await world.accounts.add_user(address, PASSWORD, quota_bytes=quota)
            return await body(world)
        finally:
            await db.close()

    return asyncio.run(main())


def message(sender: str, routes: list[RecipientRoute], data: bytes = b"Subject: x\r\n\r\nhi\r\n") -> InboundMessage:
    received = ReceivedFacts(helo="client.test", peer_ip="127.0.0.1", hostname="mail.example.test",
                             protocol="ESMTP", queue_id="QID1")
    return InboundMessage(sender, tuple(routes), data, received)


def local(address: str, *mailboxes: str) -> RecipientRoute:
    return RecipientRoute(address, mailboxes or (address,))


def test_delivered_to_keeps_the_tag_only_for_the_named_mailbox() -> None:
    assert delivered_to_for(RecipientRoute(f"alice+news@{OURS}", (ALICE,)), ALICE) == f"alice+news@{OURS}"
    assert delivered_to_for(RecipientRoute(f"team@{OURS}", (ALICE, BOB)), BOB) == BOB
    assert delivered_to_for(RecipientRoute(ALICE, (ALICE,)), ALICE) == ALICE


def test_local_copies_and_spool(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        routes = [local(ALICE), RecipientRoute(f"team@{OURS}", (ALICE, BOB), ("x@external.test",))]
        report = await w.deliverer.deliver(message("s@external.test", routes), per_recipient=False)
        assert report.summary.code == 250
        assert [r.code for r in report.replies] == [250, 250]
        assert len(w.inbox(ALICE)) == 1
        assert len(w.inbox(BOB)) == 1
        [queued] = await w.spool.messages()
        assert queued.id == "QID1"
        assert [r.recipient for r in queued.recipients] == ["x@external.test"]

    run(tmp_path, body)


def test_smtp_partial_failure_is_accepted_and_bounced(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        report = await w.deliverer.deliver(message(BOB, [local(ALICE), local(FULL)], BIG), per_recipient=False)
        assert report.summary.code == 250
        assert w.inbox(FULL) == []
        assert len(w.inbox(ALICE)) == 1
        [bounce] = w.inbox(BOB)
        assert parse(bounce).get_content_type() == "multipart/report"
        assert f"Final-Recipient: rfc822; {FULL}".encode() in bounce

    run(tmp_path, body)


def test_smtp_total_quota_failure_is_452_and_no_bounce(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        report = await w.deliverer.deliver(message(BOB, [local(FULL)], BIG), per_recipient=False)
        assert report.summary == MAILBOX_FULL
        assert w.inbox(BOB) == []

    run(tmp_path, body)


def test_lmtp_answers_per_recipient_without_bounce(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        report = await w.deliverer.deliver(message(BOB, [local(ALICE), local(FULL)], BIG), per_recipient=True)
        assert report.replies == (report.replies[0], MAILBOX_FULL)
        assert report.replies[0].code == 250
        assert w.inbox(BOB) == []

    run(tmp_path, body)


def test_spool_failure(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        w.spool.directory.write_bytes(b"not a directory")  # (chmod would not stop root)
        only_remote = RecipientRoute("x@external.test", remote="x@external.test")
        report = await w.deliverer.deliver(message(ALICE, [only_remote]), per_recipient=False)
        assert report.summary == TEMPORARY_FAILURE
        mixed = RecipientRoute(f"team@{OURS}", (BOB,), ("x@external.test",))
        report = await w.deliverer.deliver(message(ALICE, [mixed]), per_recipient=False)
        assert report.summary.code == 250
        assert len(w.inbox(BOB)) == 1
        [bounce] = w.inbox(ALICE)  # the forward that could not be spooled is reported
        assert b"Final-Recipient: rfc822; x@external.test" in bounce

    run(tmp_path, body)


def test_null_sender_never_gets_a_bounce(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        report = await w.deliverer.deliver(message("", [local(ALICE), local(FULL)], BIG), per_recipient=False)
        assert report.summary.code == 250
        assert await w.spool.messages() == []

    run(tmp_path, body)


def test_a_mailbox_removed_mid_delivery_is_451_in_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The mailbox's tree goes (removed by the administrator) while the store has it open: its copy
    is 451, retried by the sender, and the log says so in one line. It was a traceback too."""
    async def body(w: World) -> None:
        await w.deliverer.deliver(message("s@external.test", [local(BOB)]), per_recipient=True)
        tree = tmp_path / "mail" / OURS / "bob"
        tree.rename(tmp_path / "removed-bob")  # as accounts/files.py moves removed mail aside
        caplog.set_level(logging.INFO, logger="letterbox")
        report = await w.deliverer.deliver(message("s@external.test", [local(ALICE), local(BOB)]),
                                           per_recipient=True)
        assert report.replies == (queued("QID1"), TEMPORARY_FAILURE)
        assert [r.getMessage() for r in caplog.records if "delivery to bob" in r.getMessage()]
        assert not [r for r in caplog.records if r.exc_info]

    run(tmp_path, body)
