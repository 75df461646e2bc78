"""What one remote party can make the whole box hold: memory before a login, messages being received
at once (SMTP DATA, IMAP APPEND), the CPU of reading a message. Real server, real sockets; the bounds
are shrunk through each listener's limits where a real-size attack would be heavy."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.smtp_wire import Wire

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def imap_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


@pytest.fixture
def logged_in(imap_box: BoxHandle) -> Iterator[RawImap]:
    client = RawImap(imap_box.port("imaps"), imap_box.client_context, timeout=30)
    client.login(USER, PASSWORD)
    try:
        yield client
    finally:
        client.close()


def test_a_command_before_login_holds_at_most_64_kib(imap_box: BoxHandle) -> None:
    # Each connection not logged in could hold a 1 MiB command of literals (100 connections: 110 MB
    # of the server's RSS; a listener keeps 600 such connections).
    client = RawImap(imap_box.port("imaps"), imap_box.client_context, timeout=30)
    try:
        client.send(b"a ID ({30000+}\r\n" + b"x" * 30000 + b" {30000+}\r\n" + b"y" * 30000 + b" {30000}\r\n")
        reply = client.line()
        assert reply.startswith(b"a NO [TOOBIG]") or reply.startswith(b"* BYE"), reply
    finally:
        client.close()


def test_a_logged_in_command_may_still_carry_a_megabyte(logged_in: RawImap) -> None:
    assert logged_in.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    text = b"".join(b" TEXT {60000+}\r\n" + b"z" * 60000 for _ in range(5))
    assert logged_in.command(b"t", b"SEARCH" + text)[-1].startswith(b"t OK")


def peak_rss_growth(action: Callable[[], object]) -> int:
    """How far this process's RSS (the box runs in it) rose above its start while `action` ran."""
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start = rss()
    peak = [start]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        action()
    finally:
        done.set()
        watcher.join()
    return peak[0] - start


def test_a_message_of_short_lines_costs_memory_in_proportion_to_its_size(box: BoxHandle) -> None:
    # 8 MB of two-letter lines: the DATA reader kept a bytes object per line, and the line-end
    # normalisation a regex match per line until its join: +482 MB of RSS at the peak (a 36 MiB
    # message: ~2 GB, from any sender on port 25). Now the message is held a few times over at most.
    box.add_user(USER, PASSWORD)
    wire = Wire(box.port("smtp"))
    try:
        assert wire.reply()[0] == 220
        assert wire.cmd("EHLO client.test")[0] == 250
        assert wire.cmd("MAIL FROM:<sender@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{USER}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354

        def send() -> None:
            wire.send(b"From: sender@external.test\r\nSubject: short lines\r\n\r\n")
            for _ in range(4):
                wire.send(b"ab\r\n" * 500_000)
            code, text = wire.cmd(b".")
            assert code == 250, text

        assert peak_rss_growth(send) < 120_000_000
    finally:
        wire.close()
