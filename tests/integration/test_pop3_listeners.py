"""POP3 connection set-up over real sockets: 110 with STLS, 995, CAPA, AUTH PLAIN, limits, errors."""

from __future__ import annotations

import base64
import logging
import poplib
import re
import ssl
import time

import pytest

from appliance.pop3.limits import Pop3Limits
from appliance.pop3.server import start_server
from tests.conftest import BoxHandle
from tests.support.listeners import stop_server
from tests.support.raw_wire import RawLineClient

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


class RawPop3(RawLineClient):
    """Exact bytes in and out, for what poplib cannot send."""

    def command(self, text: bytes) -> bytes:
        self.send(text + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def capa(self) -> list[bytes]:
        assert self.command(b"CAPA").startswith(b"+OK")
        return self.multiline()

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.command(b"STLS") == b"+OK Begin TLS negotiation"
        assert not self.buffer
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def at_eof(self) -> bool:
        """True when the server has closed the connection (no further bytes)."""
        try:
            return not self.buffer and self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLEOFError):
            return True

    def close(self) -> None:
        self.sock.close()


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


@pytest.fixture
def pop_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


def test_port_110_offers_stls_and_refuses_passwords_before_it(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3"))
    try:
        assert raw.greeting == b"+OK Letterbox POP3 server ready on mail.example.test"
        caps = raw.capa()
        assert caps == [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"STLS",
                        b"IMPLEMENTATION Letterbox"]
        refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections: use STLS first"
        assert raw.command(f"USER {USER}".encode()) == refused
        assert raw.command(f"PASS {PASSWORD}".encode()) == refused
        assert raw.command(b"AUTH PLAIN " + plain(USER, PASSWORD)) == refused
        assert raw.command(b"STAT").startswith(b"-ERR STAT is not valid")
        raw.starttls(pop_box.client_context)
        caps = raw.capa()
        assert b"USER" in caps
        assert b"SASL PLAIN" in caps
        assert b"STLS" not in caps
        assert raw.command(b"STLS") == b"-ERR Already using TLS"
        assert raw.command(f"USER {USER}".encode()) == b"+OK Send your password"
        assert raw.command(f"PASS {PASSWORD}".encode()).startswith(b"+OK Logged in, 0 messages")
        caps = raw.capa()
        assert b"USER" not in caps
        assert b"SASL PLAIN" not in caps
        assert b"TOP" in caps
        assert raw.command(b"QUIT").startswith(b"+OK")
        assert raw.at_eof()
    finally:
        raw.close()


def test_poplib_stls_and_implicit_tls(pop_box: BoxHandle) -> None:
    client = poplib.POP3("127.0.0.1", pop_box.port("pop3"), timeout=15)
    client.stls(pop_box.client_context)
    assert set(client.capa()) >= {"USER", "SASL", "TOP", "UIDL", "RESP-CODES", "PIPELINING"}
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat() == (0, 0)
    client.quit()
    client = poplib.POP3_SSL("127.0.0.1", pop_box.port("pop3s"), context=pop_box.client_context, timeout=15)
    caps = client.capa()
    assert caps["SASL"] == ["PLAIN"]
    assert "STLS" not in caps
    with pytest.raises(poplib.error_proto, match="Already using TLS"):
        client._shortcmd("STLS")  # type: ignore[attr-defined]  # poplib's one-line command, not in its stubs
    client.user(USER)
    client.pass_(PASSWORD)
    client.quit()


def test_stls_drops_plaintext_pipelined_behind_it(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3"))
    try:
        raw.send(b"STLS\r\nCAPA\r\n")  # CVE-2011-0411: CAPA must not be run as if sent over TLS
        assert raw.line() == b"+OK Begin TLS negotiation"
        raw.sock = pop_box.client_context.wrap_socket(raw.sock, server_hostname="localhost")
        assert raw.command(b"QUIT") == b"+OK Letterbox POP3 server signing off"
    finally:
        raw.close()


def test_auth_plain_with_and_without_initial_response(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        assert raw.command(b"AUTH") == b"+OK Supported mechanisms follow"
        assert raw.multiline() == [b"PLAIN"]
        assert raw.command(b"AUTH CRAM-MD5").startswith(b"-ERR Unsupported authentication mechanism")
        assert raw.command(b"AUTH PLAIN") == b"+ "
        assert raw.command(b"*") == b"-ERR Authentication cancelled"
        assert raw.command(b"AUTH PLAIN") == b"+ "
        assert raw.command(b"not base64!") == b"-ERR Invalid base64 in the SASL response"
        assert raw.command(b"AUTH PLAIN " + plain(USER, PASSWORD, "bob@example.test")) == (
            b"-ERR [AUTH] Logging in as another user is not supported")
        assert raw.command(b"AUTH PLAIN") == b"+ "
        assert raw.command(plain(USER, PASSWORD)).startswith(b"+OK Logged in")
        assert raw.command(b"QUIT").startswith(b"+OK")
    finally:
        raw.close()
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        assert raw.command(b"auth plain " + plain(USER.upper(), PASSWORD, USER)).startswith(b"+OK Logged in")
        raw.command(b"QUIT")
    finally:
        raw.close()


def test_failed_logins_get_auth_code_and_end_the_connection(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        assert raw.command(b"PASS x") == b"-ERR Send USER first"
        raw.command(f"USER {USER}".encode())
        assert raw.command(b"PASS wrong") == b"-ERR [AUTH] Authentication failed"
        assert raw.command(b"STAT").startswith(b"-ERR")  # still AUTHORIZATION
        assert raw.command(b"AUTH PLAIN " + plain("nobody@example.test", "x")) == b"-ERR [AUTH] Authentication failed"
        raw.command(b"USER nobody@example.test")
        assert raw.command(b"PASS x") == b"-ERR [AUTH] Authentication failed; too many failures, closing"
        assert raw.at_eof()
    finally:
        raw.close()


def test_pipelined_commands_are_answered_in_order(pop_box: BoxHandle) -> None:
    pop_box.run(pop_box.services.store.deliver([USER], b"Subject: one\r\n\r\nbody\r\n"))
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        raw.send(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nLIST\r\nTOP 1 0\r\nDELE 1\r\nSTAT\r\nQUIT\r\n".encode())
        assert raw.line() == b"+OK Send your password"
        assert raw.line().startswith(b"+OK Logged in, 1 messages")
        assert raw.line() == b"+OK 1 22"
        assert raw.line() == b"+OK 1 messages (22 octets)"
        assert raw.multiline() == [b"1 22"]
        assert raw.line() == b"+OK Top of message follows"
        assert raw.multiline() == [b"Subject: one", b""]
        assert raw.line() == b"+OK Message 1 deleted"
        assert raw.line() == b"+OK 0 0"
        assert raw.line() == b"+OK Letterbox POP3 server signing off (1 message deleted)"
        assert raw.at_eof()
    finally:
        raw.close()
    assert pop_box.run(pop_box.services.store.snapshot(USER, "INBOX")).messages == ()


def test_bad_command_budget(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3"))
    try:
        raw.send(b"XYZZY\r\n" * 25)
        replies = [raw.line() for _ in range(21)]
        assert replies[:20] == [b"-ERR Unknown command"] * 20
        assert replies[20] == b"-ERR Too many invalid commands"
        assert raw.at_eof()
    finally:
        raw.close()


def test_line_too_long_closes_the_connection(pop_box: BoxHandle) -> None:
    raw = RawPop3(pop_box.port("pop3"))
    try:
        raw.send(b"USER " + b"x" * 20_000)
        assert raw.line() == b"-ERR Line too long"
        assert raw.at_eof()
    finally:
        raw.close()


def test_message_numbers_are_checked(pop_box: BoxHandle) -> None:
    pop_box.run(pop_box.services.store.deliver([USER], b"Subject: one\r\n\r\nbody\r\n"))
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        raw.command(f"USER {USER}".encode())
        raw.command(f"PASS {PASSWORD}".encode())
        assert raw.command(b"RETR 2") == b"-ERR No such message"
        assert raw.command(b"RETR 0") == b"-ERR No such message"
        assert raw.command(b"LIST x") == b"-ERR Invalid number: x"
        assert raw.command(b"TOP 1 -1") == b"-ERR Invalid number: -1"
        assert raw.command(b"UIDL 99999999999") == b"-ERR Invalid number: 99999999999"
        assert raw.command(b"RETR 1") == b"+OK 22 octets"
        assert raw.multiline() == [b"Subject: one", b"", b"body"]
        raw.command(b"QUIT")
    finally:
        raw.close()


def test_idle_timeout_closes_silently_and_deletes_nothing(pop_box: BoxHandle) -> None:
    pop_box.run(pop_box.services.store.deliver([USER], b"Subject: one\r\n\r\nbody\r\n"))
    server = pop_box.run(start_server(pop_box.services, "pop3s", "127.0.0.1", 0, Pop3Limits(idle_timeout=0.5)))
    try:
        port = server.sockets[0].getsockname()[1]
        raw = RawPop3(port, pop_box.client_context)
        try:
            raw.command(f"USER {USER}".encode())
            raw.command(f"PASS {PASSWORD}".encode())
            assert raw.command(b"DELE 1") == b"+OK Message 1 deleted"
            started = time.monotonic()
            assert raw.at_eof()  # RFC 1939 3: no reply, no UPDATE
            assert time.monotonic() - started < 10
        finally:
            raw.close()
    finally:
        pop_box.run(stop_server(server))
    assert len(pop_box.run(pop_box.services.store.snapshot(USER, "INBOX")).messages) == 1
    client = poplib.POP3_SSL("127.0.0.1", pop_box.port("pop3s"), context=pop_box.client_context, timeout=15)
    client.user(USER)
    client.pass_(PASSWORD)  # the lock went with the session
    client.quit()


def test_unexpected_errors_give_err_and_a_logged_traceback(
    pop_box: BoxHandle, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_snapshot(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pop_box.services.store, "snapshot", broken_snapshot)
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        raw.command(f"USER {USER}".encode())
        with caplog.at_level(logging.ERROR, logger="letterbox.pop3"):
            reply = raw.command(f"PASS {PASSWORD}".encode())
            assert reply == b"-ERR [SYS/TEMP] Internal server error, closing connection"
            assert raw.at_eof()
    finally:
        raw.close()
    assert any(r.exc_info and "disk on fire" in str(r.exc_info[1]) for r in caplog.records)
    monkeypatch.undo()
    client = poplib.POP3_SSL("127.0.0.1", pop_box.port("pop3s"), context=pop_box.client_context, timeout=15)
    client.user(USER)
    assert re.match(rb"\+OK Logged in", client.pass_(PASSWORD))  # the failed login left no lock behind
    client.quit()


@pytest.mark.parametrize("password", [
    "correct\u00a0horse battery",  # a no-break space (macOS: Option+Space)
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467 pass",  # an emoji joined by ZWJ (a format character)
    "ideographic\u3000space pass",
])
def test_pass_takes_every_password_the_policy_allows(box: BoxHandle, password: str) -> None:
    """The policy refuses only control characters (passwords.password_problem); PASS refused any character
    str.isprintable() calls unprintable (separators, format characters) as a bad command, though IMAP
    LOGIN and AUTH PLAIN took the same password."""
    box.add_user(USER, password)
    raw = RawPop3(box.port("pop3s"), box.client_context)
    try:
        assert raw.command(f"USER {USER}".encode()) == b"+OK Send your password"
        assert raw.command(f"PASS {password}".encode()).startswith(b"+OK Logged in")
        raw.command(b"QUIT")
    finally:
        raw.close()


def test_top_with_a_line_count_past_any_message_sends_it_whole(pop_box: BoxHandle) -> None:
    """'TOP 1 99999999999' (more digits than a message number may have) was refused as an invalid
    number; RFC 1939 7 takes any non-negative count, and Dovecot sends the whole message."""
    pop_box.run(pop_box.services.store.deliver([USER], b"Subject: one\r\n\r\nbody\r\n.dot\r\n"))
    raw = RawPop3(pop_box.port("pop3s"), pop_box.client_context)
    try:
        raw.command(f"USER {USER}".encode())
        raw.command(f"PASS {PASSWORD}".encode())
        for count in (b"99999999999", b"18446744073709551616", b"0" * 30 + b"1"):
            assert raw.command(b"TOP 1 " + count) == b"+OK Top of message follows"
            assert raw.multiline() == ([b"Subject: one", b"", b"body"] if count.endswith(b"01") else
                                       [b"Subject: one", b"", b"body", b"..dot"])
        assert raw.command(b"TOP 1 " + b"9" * 5000) == b"-ERR Invalid number: " + b"9" * 20
        assert raw.command(b"TOP 1 -1") == b"-ERR Invalid number: -1"
        assert raw.command(b"QUIT").startswith(b"+OK")
    finally:
        raw.close()
