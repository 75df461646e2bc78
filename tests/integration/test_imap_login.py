"""IMAP connection set-up over real sockets: greeting, capabilities, STARTTLS, 993, login, limits."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import logging

import pytest
from imapclient import IMAPClient

from appliance.imap.limits import ImapLimits
from appliance.imap.server import start_server
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.listeners import stop_server
from tests.support.polling import wait_until

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
READ_BOUND = 20.0  # seconds a read of the autologout test may wait


@pytest.fixture
def imap_box(box: BoxHandle) -> BoxHandle:
    box.add_user(USER, PASSWORD)
    return box


def test_cleartext_port_offers_starttls_and_refuses_passwords(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imap"))
    try:
        assert raw.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
        caps = raw.command(b"a", b"CAPABILITY")[0]
        assert b" STARTTLS" in caps
        assert b" LOGINDISABLED" in caps
        assert b"AUTH=PLAIN" not in caps
        reply = raw.command(b"b", f"LOGIN {USER} \"{PASSWORD}\"".encode())
        assert reply[-1].startswith(b"b NO [PRIVACYREQUIRED]")
        reply = raw.command(b"c", b"AUTHENTICATE PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()))
        assert reply[-1].startswith(b"c NO [PRIVACYREQUIRED]")
        assert raw.command(b"d", b"SELECT INBOX")[-1].startswith(b"d BAD")
        assert raw.command(b"e", b"LOGOUT")[0].startswith(b"* BYE")
    finally:
        raw.close()


def test_imaplib_starttls_then_login(imap_box: BoxHandle) -> None:
    with imaplib.IMAP4("127.0.0.1", imap_box.port("imap"), timeout=15) as client:
        client.starttls(ssl_context=imap_box.client_context)
        assert "AUTH=PLAIN" in client.capabilities
        assert "LOGINDISABLED" not in client.capabilities
        assert "STARTTLS" not in client.capabilities
        typ, _ = client.login(USER, PASSWORD)
        assert typ == "OK"
        _, data = client.capability()
        caps = data[0].split()
        for cap in (b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"NAMESPACE", b"ID", b"ENABLE", b"LITERAL+",
                    b"CHILDREN", b"UNSELECT", b"QUOTA"):
            assert cap in caps
        client.logout()


def test_imaplib_implicit_tls_login(imap_box: BoxHandle) -> None:
    with imaplib.IMAP4_SSL("127.0.0.1", imap_box.port("imaps"), ssl_context=imap_box.client_context,
                           timeout=15) as client:
        assert "STARTTLS" not in client.capabilities
        assert "AUTH=PLAIN" in client.capabilities
        assert client.login(USER, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"


def test_imapclient_plain_login_both_ports(imap_box: BoxHandle) -> None:
    with IMAPClient("127.0.0.1", port=imap_box.port("imaps"), ssl_context=imap_box.client_context,
                    timeout=15) as client:
        client.plain_login(USER, PASSWORD)
        assert client.select_folder("INBOX")[b"UIDVALIDITY"]
    with IMAPClient("127.0.0.1", port=imap_box.port("imap"), ssl=False, timeout=15) as client:
        client.starttls(imap_box.client_context)
        client.login(USER, PASSWORD)
        assert client.list_folders()


def test_authenticate_plain_with_and_without_initial_response(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        reply = raw.command(b"a", b"AUTHENTICATE PLAIN " + token)  # RFC 4959 SASL-IR
        assert reply[-1].startswith(b"a OK [CAPABILITY IMAP4rev1")
    finally:
        raw.close()
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.send(b"a AUTHENTICATE PLAIN\r\n")
        assert raw.line() == b"+ \r\n"
        raw.send(token + b"\r\n")
        assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    finally:
        raw.close()
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.send(b"a AUTHENTICATE PLAIN\r\n")
        raw.line()
        raw.send(b"*\r\n")
        assert raw.until_tagged(b"a")[-1].startswith(b"a BAD")  # RFC 3501 6.2.2 cancel
        assert raw.command(b"b", b"AUTHENTICATE CRAM-MD5")[-1].startswith(b"b NO")
    finally:
        raw.close()


def test_wrong_password(imap_box: BoxHandle) -> None:
    with imaplib.IMAP4_SSL("127.0.0.1", imap_box.port("imaps"), ssl_context=imap_box.client_context,
                           timeout=30) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(USER, "wrong")
        assert client.login(USER, PASSWORD)[0] == "OK"


def test_starttls_drops_pipelined_plaintext(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imap"))
    try:
        # CVE-2011-0411 style: a command pipelined behind STARTTLS must not run after the handshake.
        raw.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert raw.line().startswith(b"a OK")
        tls = imap_box.client_context.wrap_socket(raw.sock, server_hostname="localhost")
        tls.sendall(b"c NOOP\r\n")
        assert tls.recv(4096).startswith(b"c OK")
        tls.close()
    finally:
        raw.close()


def test_bad_commands_are_answered_then_the_budget_ends_the_session(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imap"))
    try:
        assert raw.command(b"a", b"FETCH")[-1].startswith(b"a BAD")
        raw.send(b"\x00\xff garbage\r\n")
        assert raw.line().startswith(b"* BAD")
        # In one write: sent one by one, a write after the budget's BYE and close met a broken pipe.
        raw.send(b"".join(b"x%d BOGUS\r\n" % i for i in range(12)))
        seen = b""
        while True:
            try:
                seen += raw.line()
            except EOFError:
                break
        assert b"* BYE Too many invalid commands" in seen
    finally:
        raw.close()


def test_overlong_line_is_refused(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imap"))
    try:
        raw.send(b"a NOOP " + b"x" * (ImapLimits().max_line_octets + 10))
        assert raw.line().startswith(b"* BYE")
        assert raw.closed()
    finally:
        raw.close()


def test_literal_too_big_is_refused_before_sending(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imap"))
    try:
        assert raw.command(b"a", b"LOGIN {999999999}")[-1] == b"a NO [TOOBIG] Literal too large\r\n"
        assert raw.command(b"b", b"NOOP")[-1].startswith(b"b OK")
    finally:
        raw.close()


def test_idle_client_is_logged_out(imap_box: BoxHandle) -> None:
    limits = ImapLimits(preauth_timeout=0.5, authenticated_timeout=1.0)

    async def start() -> asyncio.Server:
        return await start_server(imap_box.services, "imaps", "127.0.0.1", 0, limits)


    server = imap_box.run(start())
    port = int(server.sockets[0].getsockname()[1])
    try:
        _autologout(imap_box, port)
    finally:
        imap_box.run(stop_server(server, 5))


def _autologout(imap_box: BoxHandle, port: int) -> None:
    # No clock read here: each read waits at most READ_BOUND seconds, far below the default limits,
    # so a BYE at all means the short limits given to this server cut the session.
    assert min(ImapLimits().preauth_timeout, ImapLimits().authenticated_timeout) > READ_BOUND * 4
    raw = RawImap(port, imap_box.client_context, timeout=READ_BOUND)
    try:
        assert raw.line().startswith(b"* BYE Autologout")
    finally:
        raw.close()
    raw = RawImap(port, imap_box.client_context, timeout=READ_BOUND)
    try:
        raw.login(USER, PASSWORD)
        assert raw.line().startswith(b"* BYE Autologout")
    finally:
        raw.close()


def test_logout(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        reply = raw.command(b"z", b"LOGOUT")
        assert reply[0].startswith(b"* BYE")
        assert reply[-1].startswith(b"z OK")
        assert raw.closed()
    finally:
        raw.close()


def test_id_and_namespace_and_enable(imap_box: BoxHandle) -> None:
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        reply = raw.command(b"a", b'ID ("name" "test" "version" "1")')
        assert reply[0].startswith(b'* ID ("name" "Letterbox"')
        raw.login(USER, PASSWORD)
        assert raw.command(b"b", b"NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
        assert raw.command(b"c", b"ENABLE CONDSTORE")[0] == b"* ENABLED CONDSTORE\r\n"  # RFC 7162
        assert raw.command(b"d", b"ENABLE UTF8=ACCEPT")[0] == b"* ENABLED\r\n"  # not offered: ignored
    finally:
        raw.close()


def test_id_is_logged_once_per_session(imap_box: BoxHandle, caplog: pytest.LogCaptureFixture) -> None:
    """ID is answered every time, but only the first is logged: a client not logged in could
    otherwise write a log line per command for as long as its pre-login time lasts."""
    caplog.set_level(logging.INFO, logger="letterbox.imap")
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        for n in range(50):
            assert raw.command(b"i%d" % n, b'ID ("name" "flood")')[0].startswith(b'* ID ("name" "Letterbox"')
        assert raw.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    finally:
        raw.close()
    assert caplog.text.count("imap client id:") == 1


def test_a_message_over_the_append_limit_is_refused_with_the_limit(imap_box: BoxHandle) -> None:
    """A mail program saving a draft or a sent copy shows the server's words: "Literal too large" did
    not say how big a message may be."""
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)
        reply = raw.command(b"a", b"APPEND Sent {70000000}")[-1]
        assert reply == b"a NO [TOOBIG] Message too big: this server takes messages of at most 64 MiB (67108864 octets)\r\n"
        assert raw.command(b"b", b"NOOP")[-1].startswith(b"b OK")
    finally:
        raw.close()


def test_append_before_login_gets_no_room_for_a_message(imap_box: BoxHandle) -> None:
    """Before a login APPEND's literal is bounded as any other literal (64 KiB), not by the 64 MiB
    of a message: a client not logged in was sent "+" for 50 MB and had it kept in memory."""
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        assert raw.command(b"a", b"APPEND INBOX {100000}")[-1].startswith(b"a NO [TOOBIG]")
        raw.send(b"b APPEND INBOX {10}\r\n")
        assert raw.line() == b"+ Ready for literal data\r\n"  # small: read, then refused for the state
        raw.send(b"0123456789\r\n")
        assert raw.until_tagged(b"b")[-1].startswith(b"b BAD")
        raw.send(b"c APPEND INBOX {1000000+}\r\n" + b"x" * 1000)
        assert raw.line().startswith(b"* BYE Literal too large")
    finally:
        raw.close()
    raw = RawImap(imap_box.port("imaps"), imap_box.client_context)
    try:
        raw.login(USER, PASSWORD)  # after the login a message is welcome
        message = b"Subject: big\r\n\r\n" + b"y" * 78 * 1300 + b"\r\n"
        raw.send(b"d APPEND INBOX {%d}\r\n" % len(message))
        assert raw.line() == b"+ Ready for literal data\r\n"
        raw.send(message + b"\r\n")
        assert raw.until_tagged(b"d")[-1].startswith(b"d OK [APPENDUID")
    finally:
        raw.close()


def test_connections_per_client_are_limited(imap_box: BoxHandle) -> None:
    limits = ImapLimits(max_connections_per_client=2)

    async def start() -> asyncio.Server:
        return await start_server(imap_box.services, "imap", "127.0.0.1", 0, limits)


    server = imap_box.run(start())
    port = int(server.sockets[0].getsockname()[1])
    clients = [RawImap(port), RawImap(port)]
    try:
        assert all(c.greeting.startswith(b"* OK") for c in clients)
        third = RawImap(port)
        assert third.greeting.startswith(b"* BYE Too many connections")
        third.close()
        leaving = clients.pop()
        leaving.command(b"z", b"LOGOUT")
        leaving.close()

        def greeted() -> bool:  # the slot is freed when the server sees the close: poll for it
            attempt = RawImap(port)
            attempt.close()
            return attempt.greeting.startswith(b"* OK")

        wait_until(greeted, seconds=10, what="a connection accepted after one left")
    finally:
        for c in clients:
            c.close()
        imap_box.run(stop_server(server, 5))
