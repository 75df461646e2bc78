"""Slow clients (issue 11 item 7): time limits bound the whole pre-auth phase and each whole command (line
or literal), not each read, so a client trickling bytes cannot hold a connection. Small injected limits
stand in for the real minutes; a trickler that the server does not cut keeps going for 20 s."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from appliance.imap.limits import ImapLimits
from appliance.imap.server import start_server as start_imap
from appliance.pop3.limits import Pop3Limits
from appliance.pop3.server import start_server as start_pop3
from appliance.smtp.limits import SmtpLimits
from appliance.smtp.server import start_server as start_smtp
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.listeners import stop_server

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
TRICKLE_FOR = 20.0  # seconds a trickler keeps going if nobody stops it (the limits under test are ~1 s)
GAP = 0.2  # seconds between two trickled bytes: far below every per-read timeout used here


@pytest.fixture
def slow_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


@pytest.fixture
def listener(slow_box: BoxHandle) -> Iterator[Callable[..., int]]:
    """listener(start_server, service, limits) -> port; closed after the test."""
    servers: list[asyncio.Server] = []

    def start(start_server: Callable[..., Any], service: str, limits: Any) -> int:
        if start_server is start_smtp:
            server = slow_box.run(start_server(slow_box.services, service, "127.0.0.1", 0, limits=limits))
        else:
            server = slow_box.run(start_server(slow_box.services, service, "127.0.0.1", 0, limits))
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start


    for server in servers:
        slow_box.run(stop_server(server))


def trickle(sock: socket.socket | ssl.SSLSocket, pieces: Iterator[bytes]) -> tuple[float, bytes]:
    """Send one piece every GAP seconds until the server closes (or TRICKLE_FOR passes); returns the
    seconds it took and what the server said meanwhile."""
    started = time.monotonic()
    said = b""
    sock.settimeout(GAP)
    while time.monotonic() - started < TRICKLE_FOR:
        try:
            sock.sendall(next(pieces))
        except OSError:
            break
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        said += data
    return time.monotonic() - started, said


def forever(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def bytes_of(text: bytes) -> Iterator[bytes]:
    for i in range(len(text)):
        yield text[i:i + 1]
    yield from forever(b"x")


@contextlib.contextmanager
def _imaps(box: BoxHandle, port: int, login: bool = True) -> Iterator[RawImap]:
    """A raw IMAPS connection (logged in as USER unless told not to), closed afterwards."""
    raw = RawImap(port, box.client_context)
    try:
        if login:
            raw.login(USER, PASSWORD)
        yield raw
    finally:
        raw.close()


@contextlib.contextmanager
def _pop3s(box: BoxHandle, port: int) -> Iterator[ssl.SSLSocket]:
    """A POP3S connection past its greeting, closed afterwards."""
    sock = box.client_context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                          server_hostname="localhost")
    try:
        sock.recv(4096)  # greeting
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def _smtp(port: int) -> Iterator[socket.socket]:
    """A plaintext SMTP connection past its greeting, closed afterwards."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.recv(4096)  # greeting
        yield sock
    finally:
        sock.close()


def test_imap_preauth_phase_is_one_deadline_not_a_timer_per_command(slow_box: BoxHandle, listener: Any) -> None:
    port = listener(start_imap, "imaps", ImapLimits(preauth_timeout=1.0, command_timeout=30.0))
    with _imaps(slow_box, port, login=False) as raw:
        seconds, said = trickle(raw.sock, forever(b"a NOOP\r\n"))  # busy, but never logs in
    assert seconds < TRICKLE_FOR / 2
    assert b"* BYE Autologout" in said


def test_imap_line_trickled_byte_by_byte_is_cut_at_the_command_deadline(slow_box: BoxHandle, listener: Any) -> None:
    limits = ImapLimits(command_timeout=1.0, authenticated_timeout=60.0, preauth_timeout=60.0)
    port = listener(start_imap, "imaps", limits)
    with _imaps(slow_box, port) as raw:
        seconds, said = trickle(raw.sock, bytes_of(b"b NOOP"))  # never ends its line
    assert seconds < TRICKLE_FOR / 2
    assert b"* BYE Autologout: command not completed in time" in said


def test_imap_literal_trickled_is_cut_at_the_command_deadline(slow_box: BoxHandle, listener: Any) -> None:
    # {33000000} at 1 byte/s stayed open 30 minutes; the deadline is the command's time plus its
    # announced size at the minimum rate (here ~1 s + 1,000 octets at 1 MB/s).
    limits = ImapLimits(command_timeout=1.0, min_literal_rate=1_000_000, authenticated_timeout=60.0)
    port = listener(start_imap, "imaps", limits)
    with _imaps(slow_box, port) as raw:
        raw.send(b"c APPEND INBOX {1000}\r\n")
        assert raw.line().startswith(b"+")
        seconds, said = trickle(raw.sock, forever(b"x"))
    assert seconds < TRICKLE_FOR / 2
    assert b"* BYE Autologout: command not completed in time" in said


def test_imap_normal_commands_after_login_are_not_cut(slow_box: BoxHandle, listener: Any) -> None:
    # The pre-auth deadline ends at login, and each complete command starts a fresh command clock.
    limits = ImapLimits(preauth_timeout=3.0, command_timeout=1.0, authenticated_timeout=60.0)
    port = listener(start_imap, "imaps", limits)
    with _imaps(slow_box, port) as raw:
        for i in range(15):  # 4.5 s: past the pre-auth deadline, and each command well within its own
            time.sleep(0.3)
            assert raw.command(f"n{i}".encode(), b"NOOP")[-1].startswith(f"n{i} OK".encode())


def test_pop3_authorization_state_is_one_deadline(slow_box: BoxHandle, listener: Any) -> None:
    port = listener(start_pop3, "pop3s", Pop3Limits(preauth_timeout=1.0, command_timeout=30.0))
    with _pop3s(slow_box, port) as sock:
        seconds, _ = trickle(sock, forever(b"NOOP\r\n"))  # answered -ERR each time, never logs in
    assert seconds < TRICKLE_FOR / 2


def test_pop3_line_trickled_byte_by_byte_is_cut(slow_box: BoxHandle, listener: Any) -> None:
    port = listener(start_pop3, "pop3s", Pop3Limits(preauth_timeout=60.0, command_timeout=1.0))
    with _pop3s(slow_box, port) as sock:
        seconds, _ = trickle(sock, bytes_of(b"USER alice"))
    assert seconds < TRICKLE_FOR / 2


def test_smtp_preauth_phase_is_one_deadline(slow_box: BoxHandle, listener: Any) -> None:
    # Each NOOP used to restart aiosmtpd's 300 s timer: a client never sending mail held its slot for ever.
    # (The junk budget would end this NOOP stream first: it is set out of the way of the deadline.)
    port = listener(start_smtp, "smtp", SmtpLimits(preauth_timeout=1.0, command_timeout=30.0,
                                                   max_junk_commands=1_000_000))
    with _smtp(port) as sock:
        seconds, said = trickle(sock, forever(b"NOOP\r\n"))
    assert seconds < TRICKLE_FOR / 2
    assert b"421 4.4.2" in said


def test_smtp_transaction_ends_the_preauth_deadline(slow_box: BoxHandle, listener: Any) -> None:
    port = listener(start_smtp, "smtp", SmtpLimits(preauth_timeout=1.0, command_timeout=30.0))
    with _smtp(port) as sock:
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<someone@sender.test>\r\n")
        time.sleep(2.0)
        sock.sendall(b"RSET\r\nNOOP\r\n")
        said = b""
        while b"250 2.0.0 OK" not in said and b"421" not in said:
            chunk = sock.recv(4096)
            if not chunk:
                break
            said += chunk
        assert b"421" not in said
