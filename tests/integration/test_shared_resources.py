"""What one remote party can make the whole box hold: memory before a login, messages being received
at once (SMTP DATA, IMAP APPEND), the CPU of reading a message. Real server, real sockets; the bounds
are shrunk through each listener's limits where a real-size attack would be heavy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

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
