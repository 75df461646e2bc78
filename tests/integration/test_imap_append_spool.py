"""IMAP APPEND literals past their first limits.append_in_memory_octets (256 KiB) go to a spool file in
<data>/tmp as they come (imap/server.py, as SMTP DATA's: test_message_spool.py), not the box's memory
for messages being received (appliance/message_memory.py): a logged-in client trickling a large
message held all of it there for as long as its command's time allowed, and other users' APPENDs and
SMTP mail were refused meanwhile. Real server, real sockets, real Maildir; the budget's counters are
read in-process (the box runs in the test's process)."""

from __future__ import annotations

import asyncio
import hashlib
import imaplib
import os
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.imap.limits import ImapLimits
from appliance.imap.server import start_server as start_imap
from appliance.message_memory import SPOOL_OCTETS, MessageMemory
from appliance.message_spool import SPOOL_AFTER_OCTETS
from tests.conftest import BoxHandle
from tests.integration.test_message_spool import big_message, spool_descriptors
from tests.support.imap_wire import RawImap
from tests.support.listeners import stop_server
from tests.support.polling import wait_until
from tests.support.smtp_wire import maildir_messages

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
MESSAGE_OCTETS = 2 * 2**20


@pytest.fixture
def budget(box: BoxHandle) -> Iterator[MessageMemory]:
    box.add_user(USER, PASSWORD)
    memory = box.services.message_memory
    yield memory
    memory.disk.limit = SPOOL_OCTETS


def logged_in(box: BoxHandle, port: int | None = None) -> RawImap:
    client = RawImap(port or box.port("imaps"), box.client_context, timeout=30)
    client.login(USER, PASSWORD)
    return client


def all_given_back(budget: MessageMemory) -> bool:
    return budget.held == budget.spooled == budget.read_back == budget.coming == 0


def nothing_left(box: BoxHandle, budget: MessageMemory) -> None:
    """No spool file open or named in <data>/tmp, every octet of the budget given back."""
    wait_until(lambda: not spool_descriptors(box), seconds=10, what="the spool file closed")
    wait_until(lambda: all_given_back(budget), seconds=10, what="the budget given back")
    assert os.listdir(box.data.tmp) == []


def test_a_slow_large_append_holds_its_first_256_kib_and_arrives_whole(box: BoxHandle,
                                                                       budget: MessageMemory) -> None:
    message = big_message(MESSAGE_OCTETS, b"slow")
    highest = {"held": 0, "spooled": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            highest["held"] = max(highest["held"], budget.held)
            highest["spooled"] = max(highest["spooled"], budget.spooled)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client = logged_in(box)
    try:
        client.send(b"A APPEND INBOX (\\Seen) {%d}\r\n" % len(message))
        assert client.line() == b"+ Ready for literal data\r\n"
        piece = 64 * 1024
        for start in range(0, len(message) - piece, piece):  # a slow client: ~1.5 s
            client.send(message[start:start + piece])
            time.sleep(0.05)
            if start == 1_000_000 // piece * piece:
                wait_until(lambda: budget.spooled >= 700_000, seconds=10, what="the message spooled")
                assert len(spool_descriptors(box)) == 1
                assert os.listdir(box.data.tmp) == []  # no name: nothing a crash could leave
        client.send(message[start + piece:] + b"\r\n")
        reply = client.until_tagged(b"A")
        assert reply[-1].startswith(b"A OK [APPENDUID "), reply
    finally:
        done.set()
        watcher.join()
        client.close()
    assert highest["held"] <= SPOOL_AFTER_OCTETS, highest  # before: the whole 2 MiB from its "+"
    assert highest["spooled"] >= len(message) - SPOOL_AFTER_OCTETS - 64 * 1024, highest
    nothing_left(box, budget)
    imap = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30)
    try:
        imap.login(USER, PASSWORD)
        assert imap.select("INBOX") == ("OK", [b"1"])
        status, data = imap.fetch("1", "(BODY.PEEK[])")
        assert status == "OK"
        body = data[0][1]  # type: ignore[index]
        assert isinstance(body, bytes)
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(message).hexdigest()
    finally:
        imap.logout()


def test_multiappend_and_catenate_literals_past_the_bound_are_spooled_too(box: BoxHandle,
                                                                          budget: MessageMemory) -> None:
    # RFC 3502 MULTIAPPEND: the command's literals together keep 256 KiB in memory. RFC 4469 CATENATE:
    # its TEXT parts are literals of the same command.
    first, second = big_message(400_000, b"one"), big_message(300_000, b"two")
    head, tail = big_message(200_000, b"head"), big_message(200_000, b"tail")
    client = logged_in(box)
    try:
        client.send(b"A APPEND INBOX {%d}\r\n" % len(first))
        assert client.line().startswith(b"+")
        client.send(first + b" {%d}\r\n" % len(second))
        assert client.line().startswith(b"+")
        client.send(second + b"\r\n")
        assert client.until_tagged(b"A")[-1].startswith(b"A OK"), "MULTIAPPEND"
        client.send(b"B APPEND INBOX CATENATE (TEXT {%d}\r\n" % len(head))
        assert client.line().startswith(b"+")
        client.send(head + b" TEXT {%d}\r\n" % len(tail))
        assert client.line().startswith(b"+")
        client.send(tail + b")\r\n")
        assert client.until_tagged(b"B")[-1].startswith(b"B OK"), "CATENATE"
    finally:
        client.close()
    nothing_left(box, budget)
    delivered = sorted(maildir_messages(box.data.mail, USER), key=len)
    assert sorted([first, second, head + tail], key=len) == delivered


def test_a_client_gone_mid_literal_leaves_no_spool_file(box: BoxHandle, budget: MessageMemory) -> None:
    message = big_message(MESSAGE_OCTETS, b"cut")
    client = logged_in(box)
    try:
        client.send(b"A APPEND INBOX {%d}\r\n" % len(message))
        assert client.line().startswith(b"+")
        client.send(message[:1_500_000])
        wait_until(lambda: budget.spooled > 1_000_000, seconds=20, what="the message spooled")
        assert len(spool_descriptors(box)) == 1
        assert budget.coming > 0  # what is still to come counts for the disk reserve
    finally:
        client.close()  # gone mid-literal
    nothing_left(box, budget)
    assert maildir_messages(box.data.mail, USER) == []


def test_a_literal_not_in_within_its_time_leaves_no_spool_file(box: BoxHandle, budget: MessageMemory) -> None:
    limits = ImapLimits(command_timeout=1.0, min_literal_rate=2**40)  # ~1 s for any literal

    async def start() -> asyncio.Server:
        return await start_imap(box.services, "imaps", "127.0.0.1", 0, limits)

    server = box.run(start())
    client = logged_in(box, int(server.sockets[0].getsockname()[1]))
    try:
        client.send(b"A APPEND INBOX {%d}\r\n" % MESSAGE_OCTETS)
        assert client.line().startswith(b"+")
        client.send(b"x" * 1_000_000)  # then nothing more
        assert client.line() == b"* BYE Autologout: command not completed in time\r\n"
        nothing_left(box, budget)
    finally:
        client.close()
        box.run(stop_server(server))


def test_the_spool_bound_refuses_the_append_and_the_session_goes_on(box: BoxHandle,
                                                                    budget: MessageMemory) -> None:
    budget.disk.limit = 1_000_000  # 500 kB per network: less than the message past its first 256 KiB
    message = big_message(MESSAGE_OCTETS, b"bound")
    client = logged_in(box)
    try:
        client.send(b"A APPEND INBOX {%d}\r\n" % len(message))
        assert client.line().startswith(b"+")
        client.send(message + b"\r\n")  # read to its end (the client sent it), then refused
        assert client.until_tagged(b"A")[-1] == \
            b"A NO [UNAVAILABLE] Too many messages being received at once, try again later\r\n"
        assert spool_descriptors(box) == []
        assert client.command(b"B", b"NOOP")[-1].startswith(b"B OK")
        budget.disk.limit = SPOOL_OCTETS
        client.send(b"C APPEND INBOX {%d}\r\n" % len(message))  # the client tries again later
        assert client.line().startswith(b"+")
        client.send(message + b"\r\n")
        assert client.until_tagged(b"C")[-1].startswith(b"C OK")
    finally:
        client.close()
    nothing_left(box, budget)
    assert maildir_messages(box.data.mail, USER) == [message]


def test_a_listener_stopped_mid_literal_leaves_no_spool_file(box: BoxHandle, budget: MessageMemory) -> None:
    # The session ends by cancellation (a shutdown, a restart of the listeners): its spool file too.
    server = box.run(start_imap(box.services, "imaps", "127.0.0.1", 0))
    client = logged_in(box, int(server.sockets[0].getsockname()[1]))
    try:
        client.send(b"A APPEND INBOX {%d}\r\n" % MESSAGE_OCTETS)
        assert client.line().startswith(b"+")
        client.send(b"x" * 1_000_000)
        wait_until(lambda: budget.spooled > 500_000, seconds=10, what="the message spooled")
        box.run(stop_server(server))
        assert client.line() == b"* BYE Server shutting down\r\n"
    finally:
        client.close()
    nothing_left(box, budget)
