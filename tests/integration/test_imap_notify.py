"""RFC 5465 NOTIFY, the part Letterbox does, over a real TLS session: NOTIFY SET STATUS tells the
followed mailboxes' state at once with the items of the events asked for (imaptest notify), their
changes come as unsolicited STATUS after a command and while IDLE, NOTIFY NONE stops them, and
events not done are refused with BADEVENT."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def raw(box: BoxHandle) -> Iterator[RawImap]:
    box.add_user(USER, PASSWORD)
    client = RawImap(box.port("imaps"), box.client_context)
    client.login(USER, PASSWORD)
    client.command(b"c", b"CREATE Lists")
    yield client
    client.close()


def deliver(box: BoxHandle, folder: str) -> None:
    result = box.run(box.services.store.deliver([USER], b"Subject: hi\r\n\r\nhi\r\n", folder=folder))[USER]
    assert isinstance(result, int), result


def statuses(reply: list[bytes]) -> list[bytes]:
    return [line for line in reply if line.startswith(b"* STATUS")]


def test_capability_is_offered(raw: RawImap) -> None:
    assert b" NOTIFY" in b"".join(raw.command(b"c", b"CAPABILITY"))


def test_set_status_tells_the_items_of_the_events(box: BoxHandle, raw: RawImap) -> None:
    deliver(box, "Lists")
    reply = raw.command(b"a", b"NOTIFY SET STATUS (MAILBOXES Lists (MessageExpunge))")
    assert statuses(reply) == [b"* STATUS Lists (MESSAGES 1)\r\n"], reply
    reply = raw.command(b"b", b"NOTIFY SET STATUS (MAILBOXES Lists (MessageNew))")
    assert len(statuses(reply)) == 1
    assert statuses(reply)[0].startswith(b"* STATUS Lists (MESSAGES 1 UIDNEXT 2 UIDVALIDITY "), reply
    reply = raw.command(b"c", b"NOTIFY SET (MAILBOXES Lists (MessageNew MessageExpunge FlagChange))")
    assert statuses(reply) == [], reply
    assert reply[-1].startswith(b"c OK"), reply


def test_changes_come_after_a_command_and_during_idle(box: BoxHandle, raw: RawImap) -> None:
    raw.command(b"s", b"SELECT INBOX")
    assert raw.command(b"a", b"NOTIFY SET (SELECTED (MessageNew MessageExpunge)) (SUBTREE Lists (MessageNew MessageExpunge))")[-1].startswith(b"a OK")
    deliver(box, "Lists")
    reply = raw.command(b"n", b"NOOP")
    assert statuses(reply) == [b"* STATUS Lists (MESSAGES 1)\r\n"] or statuses(reply)[0].startswith(
        b"* STATUS Lists (MESSAGES 1 UIDNEXT 2 "), reply
    assert raw.command(b"m", b"NOOP")[:-1] == [], "told once"
    raw.send(b"i IDLE\r\n")
    assert raw.line() == b"+ idling\r\n"
    deliver(box, "Lists")
    line = raw.line()  # the server pushes it: no command needed
    assert line.startswith(b"* STATUS Lists (MESSAGES 2 UIDNEXT 3 "), line
    raw.send(b"DONE\r\n")
    assert raw.line() == b"i OK IDLE terminated\r\n"
    assert raw.command(b"x", b"NOTIFY NONE")[-1].startswith(b"x OK")
    deliver(box, "Lists")
    assert statuses(raw.command(b"y", b"NOOP")) == []


@pytest.mark.parametrize("events", [b"(MailboxName)", b"(SubscriptionChange)", b"(AnnotationChange)"])
def test_events_not_done_are_refused(raw: RawImap, events: bytes) -> None:
    reply = raw.command(b"a", b"NOTIFY SET (PERSONAL " + events + b")")
    assert reply[-1].startswith(b"a NO [BADEVENT (MessageNew MessageExpunge FlagChange)]"), reply


@pytest.mark.parametrize("bad", [b"NOTIFY", b"NOTIFY SET", b"NOTIFY SET (NOWHERE (MessageNew))",
                                 b"NOTIFY SET (MAILBOXES (MessageNew))"])
def test_malformed_notify_is_bad(raw: RawImap, bad: bytes) -> None:
    assert raw.command(b"b", bad)[-1].startswith(b"b BAD")


def test_sessions_idling_on_many_followed_mailboxes_wait_once_each(box: BoxHandle) -> None:
    """IDLE waited on each followed mailbox with a task of its own (two, with the timer's), made again
    at every change to any of them: 10 sessions following 1,500 mailboxes held 41 MB more in IDLE, and
    each APPEND to one of them took 6 s while the box stalled for seconds (4.2 s for another session's
    NOOP). Now one wait per session however many mailboxes: counted as the loop's tasks."""
    box.add_user(USER, PASSWORD)
    root = box.data.mail / "example.test" / "alice"
    for n in range(400):
        for sub in ("cur", "new", "tmp"):
            (root / f".f{n}" / sub).mkdir(parents=True)

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    sessions = [RawImap(box.port("imaps"), box.client_context) for _ in range(3)]
    try:
        for client in sessions:
            client.login(USER, PASSWORD)
            assert client.command(b"n", b"NOTIFY SET (PERSONAL (MessageNew))")[-1] == b"n OK NOTIFY completed\r\n"
        before = box.run(tasks())
        for client in sessions:
            client.send(b"i IDLE\r\n")
            assert client.line() == b"+ idling\r\n"
        for round_ in range(3):
            deliver(box, f"f{round_ * 100}")
            for client in sessions:
                assert client.line().startswith(b"* STATUS f%d (MESSAGES 1 UIDNEXT 2 " % (round_ * 100))
            assert box.run(tasks()) - before < 10 * len(sessions)  # 2,400 more before
        for client in sessions:
            client.send(b"DONE\r\n")
            assert client.until_tagged(b"i")[-1] == b"i OK IDLE terminated\r\n"
    finally:
        for client in sessions:
            client.close()

