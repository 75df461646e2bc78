"""SMTP DATA past message_spool.SPOOL_AFTER_OCTETS goes to a spool file in <data>/tmp, not the box's memory
for messages being received (appliance/message_memory.py): slow senders holding large partial messages
no longer lock everyone else out. Real server, real sockets, real Maildir; the budget is shrunk as in
test_shared_resources.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from appliance.message_memory import MESSAGE_MEMORY_OCTETS, MessageMemory
from appliance.message_spool import SPOOL_AFTER_OCTETS
from tests.conftest import BoxHandle
from tests.integration.test_shared_resources import USER, mx_data
from tests.support.polling import wait_until
from tests.support.smtp_wire import lmtp_data, maildir_messages

PASSWORD = "correct horse battery staple"


@pytest.fixture
def small_budget(box: BoxHandle) -> Iterator[MessageMemory]:
    """The box's memory for messages being received, 5 MB: 2.5 MB per network."""
    box.add_user(USER, PASSWORD)
    budget = box.services.message_memory
    budget.limit = 5_000_000
    yield budget
    budget.limit = MESSAGE_MEMORY_OCTETS


def big_message(octets: int, tag: bytes) -> bytes:
    """A message of about `octets`, its lines distinct (a spool that lost or swapped a piece shows),
    some beginning with a dot (dot-stuffed on the wire, across the memory/file boundary too)."""
    header = b"From: sender@external.test\r\nSubject: big " + tag + b"\r\n\r\n"
    lines = [b"%s %08d " % (tag, n) + b"x" * 60 + b"\r\n" if n % 7 else b".dot %08d\r\n" % n
             for n in range(octets // 74)]
    return header + b"".join(lines)


def stuffed(message: bytes) -> bytes:
    body = message.replace(b"\r\n.", b"\r\n..")
    return (b"." + body if body.startswith(b".") else body) + b".\r\n"


def spool_descriptors(box: BoxHandle) -> list[str]:
    """This process's open files in the box's <data>/tmp (the box runs in it): unlinked spool files."""
    tmp = str(box.data.tmp)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmp + "/"):
            found.append(target)
    return found


def test_slow_senders_of_large_messages_do_not_lock_out_a_small_one(
        box: BoxHandle, small_budget: MessageMemory) -> None:
    # Four senders (two from one /24, two from others) each 1.3 MB into a message, then silent: each
    # held all it had sent, the 5 MB budget (and the first /24's half) was full, and every other sender
    # got 452 4.3.1 until they finished or the 30-minute DATA bound. Now each holds at most
    # SPOOL_AFTER_OCTETS in memory.
    sources = ("127.0.1.2", "127.0.1.3", "127.0.2.2", "127.0.3.2")
    messages = [big_message(2_000_000, b"slow%d" % n) for n in range(len(sources))]
    senders = [mx_data(box.port("smtp"), source=source) for source in sources]
    try:
        for wire, message in zip(senders, messages, strict=True):
            wire.send(stuffed(message)[:1_300_000])
        wait_until(lambda: small_budget.spooled >= len(sources) * 800_000,
                   seconds=20, what="the slow senders' octets spooled")
        assert small_budget.held <= len(sources) * SPOOL_AFTER_OCTETS
        assert len(spool_descriptors(box)) == len(sources)
        assert os.listdir(box.data.tmp) == []  # no names: nothing a crash could leave
        # A sender from a third network, and one from a slow sender's own network.
        for source in ("127.0.4.2", "127.0.1.4"):
            with mx_data(box.port("smtp"), source=source) as wire:
                code, text = wire.cmd(b"From: sender@external.test\r\nSubject: small\r\n\r\nHello.\r\n.")
                assert code == 250, text
        # The slow ones finish: each delivered as sent, its spool file gone.
        for wire, message in zip(senders, messages, strict=True):
            wire.send(stuffed(message)[1_300_000:])
            code, text = wire.reply()
            assert code == 250, text
    finally:
        for wire in senders:
            wire.close()
    delivered = maildir_messages(box.data.mail, USER)
    assert len(delivered) == len(sources) + 2
    for message in messages:
        [copy] = [d for d in delivered if message[:80] in d]
        assert copy.endswith(message)  # our trace headers before it, not one octet changed after
    wait_until(lambda: small_budget.held == small_budget.spooled == small_budget.read_back == 0,
               seconds=10, what="every octet given back")
    assert spool_descriptors(box) == []


def test_a_transfer_cut_short_leaves_no_spool_file(box: BoxHandle, small_budget: MessageMemory) -> None:
    wire = mx_data(box.port("smtp"))
    try:
        wire.send(stuffed(big_message(2_000_000, b"cut"))[:1_500_000])
        wait_until(lambda: small_budget.spooled > 1_000_000, seconds=20, what="the message spooled")
        assert len(spool_descriptors(box)) == 1
    finally:
        wire.close()  # the client is gone mid-DATA
    wait_until(lambda: not spool_descriptors(box), seconds=10, what="the spool file closed")
    wait_until(lambda: small_budget.held == small_budget.spooled == 0, seconds=10, what="its octets given back")
    assert os.listdir(box.data.tmp) == []
    assert maildir_messages(box.data.mail, USER) == []


def test_a_refused_spooled_message_leaves_nothing(box: BoxHandle, small_budget: MessageMemory) -> None:
    # Past the message size limit (552 after the dot): the spool file goes, the session goes on.
    with mx_data(box.port("smtp")) as wire:
        wire.send(b"Subject: too big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 40_000)
        code, text = wire.cmd(b".")
        assert code == 552, text
        assert spool_descriptors(box) == []
        assert wire.cmd("NOOP")[0] == 250
    assert small_budget.spooled == small_budget.held == 0


def test_a_restart_removes_stale_spool_files(tmp_path: Path, ca: trustme.CA) -> None:
    box = BoxHandle(tmp_path / "data", ca)
    box.close()
    stale = box.data.tmp / "incoming.0123456789abcdef"
    stale.write_bytes(b"half a message a crash left")  # named, on a file system without O_TMPFILE
    box = BoxHandle(tmp_path / "data", ca)
    try:
        assert not stale.exists()
    finally:
        box.close()


def test_lmtp_answers_a_spooled_message_per_recipient(box: BoxHandle, small_budget: MessageMemory) -> None:
    other = "bob@example.test"
    box.add_user(other, PASSWORD)
    message = big_message(1_000_000, b"lmtp")
    with lmtp_data(box.port("lmtp"), (USER, other)) as wire:
        wire.send(stuffed(message)[:-3])
        wait_until(lambda: small_budget.spooled >= 600_000, seconds=20, what="the message spooled")
        assert small_budget.held <= SPOOL_AFTER_OCTETS
        wire.send(b".\r\n")
        assert [wire.reply()[0] for _ in (USER, other)] == [250, 250]
        assert wire.cmd("NOOP")[0] == 250  # in step: one reply per recipient, no more
    for rcpt in (USER, other):
        [copy] = maildir_messages(box.data.mail, rcpt)
        assert copy.endswith(message)
    wait_until(lambda: small_budget.held == small_budget.spooled == small_budget.read_back == 0,
               seconds=10, what="every octet given back")
