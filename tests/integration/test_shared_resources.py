"""What one remote party can make the whole box hold: memory before a login, messages being received
at once (SMTP DATA, IMAP APPEND), the CPU of reading a message. Real server, real sockets; the bounds
are shrunk through each listener's limits where a real-size attack would be heavy."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from appliance.account_sessions import MAX_SESSIONS_PER_ACCOUNT
from appliance.imap.limits import ImapLimits
from appliance.imap.server import start_server as start_imap
from appliance.message_memory import MESSAGE_MEMORY_OCTETS, MessageMemory
from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.listeners import stop_server
from tests.support.polling import wait_until
from tests.support.smtp_wire import Wire, lmtp_data

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


def mx_data(port: int, source: str | None = None) -> Wire:
    """A session on port 25 at its DATA's 354, for USER."""
    wire = Wire(port, source=source, timeout=30)
    assert wire.reply()[0] == 220
    assert wire.cmd("EHLO client.test")[0] == 250
    assert wire.cmd("MAIL FROM:<sender@external.test>")[0] == 250
    assert wire.cmd(f"RCPT TO:<{USER}>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    return wire


def test_a_message_of_short_lines_costs_memory_in_proportion_to_its_size(box: BoxHandle) -> None:
    # 8 MB of two-letter lines: the DATA reader kept a bytes object per line, and the line-end
    # normalisation a regex match per line until its join: +482 MB of RSS at the peak (a 36 MiB
    # message: ~2 GB, from any sender on port 25). Now the message is held a few times over at most.
    box.add_user(USER, PASSWORD)
    wire = mx_data(box.port("smtp"))
    try:
        def send() -> None:
            wire.send(b"From: sender@external.test\r\nSubject: short lines\r\n\r\n")
            for _ in range(4):
                wire.send(b"ab\r\n" * 500_000)
            code, text = wire.cmd(b".")
            assert code == 250, text

        assert peak_rss_growth(send) < 120_000_000
    finally:
        wire.close()


@pytest.fixture
def small_budget(imap_box: BoxHandle) -> Iterator[MessageMemory]:
    """The box's memory for messages being received, 5 MB: 2.5 MB per network."""
    budget = imap_box.services.message_memory
    budget.limit = 5_000_000
    yield budget
    budget.limit = MESSAGE_MEMORY_OCTETS


def start_append(box: BoxHandle, source: str, octets: int) -> tuple[RawImap, bytes]:
    client = RawImap(box.port("imaps"), box.client_context, timeout=30, source=source)
    client.login(USER, PASSWORD)
    client.send(b"A APPEND INBOX {%d}\r\n" % octets)
    return client, client.line()


def test_messages_being_received_share_one_bound(imap_box: BoxHandle, small_budget: MessageMemory) -> None:
    # One user's ten APPENDs of 59 MB held 574 MB of the server's memory at once, and nothing bounded
    # the sum of sessions' APPENDs and DATA: fifty from one address could exhaust the box's memory.
    # Messages under the 256 KiB an APPEND or a DATA keeps in memory (past it, the rest is spooled:
    # test_message_spool.py, test_imap_append_spool.py): held whole while they come.
    header = b"From: a@example.test\r\nSubject: big\r\n\r\n"
    body = header + (b"x" * 78 + b"\r\n") * ((200_000 - len(header)) // 80)
    # Two appends leave ~10 kB: less than the message a DATA then keeps in memory.
    small_budget.limit = 410_000
    first, go = start_append(imap_box, "127.0.1.2", len(body))
    assert go.startswith(b"+")
    first.send(body[:100_000])  # the client is slow: its 200 kB stay held
    same_network, refused = start_append(imap_box, "127.0.1.3", len(body))
    assert refused.startswith(b"A NO [UNAVAILABLE]"), refused  # its network's half is taken
    second, go = start_append(imap_box, "127.0.2.2", len(body))
    assert go.startswith(b"+")
    second.send(body[:100_000])
    # Another sender's message on port 25 finds the rest taken: a temporary refusal after its dot.
    wire = mx_data(imap_box.port("smtp"), source="127.0.3.2")
    try:
        code, text = wire.cmd(body + b"\r\n.")
        assert (code, text.split()[0]) == (452, "4.3.1"), text
        # The appends end; their memory is given back, and the same message now comes in.
        for client in (first, second):
            client.send(body[100_000:] + b"\r\n")
            assert client.until_tagged(b"A")[-1].startswith(b"A OK")
        same_network.close()
        # Given back as each command ends, just after its tagged OK went out.
        wait_until(lambda: small_budget.held == 0, seconds=10, what="the appends' memory given back")
        assert wire.cmd("MAIL FROM:<sender@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{USER}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        assert wire.cmd(body + b"\r\n.")[0] == 250
        assert small_budget.held == 0
    finally:
        wire.close()
        for client in (first, second, same_network):
            client.close()


def test_catenated_appends_take_their_octets_from_the_same_bound(imap_box: BoxHandle, logged_in: RawImap,
                                                                 small_budget: MessageMemory) -> None:
    # CATENATE URLs (RFC 4469) were joined outside the budget and each message of a MULTIAPPEND had
    # 64 MiB of its own: a 24 KB APPEND of 20 CATENATEs of 60 URLs to one 1 MB message held 1.2 GB.
    header = b"From: a@example.test\r\nSubject: big\r\n\r\n"
    big = header + (b"x" * 998 + b"\r\n") * 1000  # 1 MB
    result = imap_box.run(imap_box.services.store.deliver([USER], big))[USER]
    assert isinstance(result, int)
    url = b'URL "/INBOX/;UID=%d"' % result

    def append(tag: bytes, *urls: int) -> bytes:
        catenates = b" ".join(b"CATENATE (" + b" ".join([url] * count) + b")" for count in urls)
        return logged_in.command(tag, b"APPEND INBOX " + catenates)[-1]

    def messages() -> bytes:
        return logged_in.command(b"s", b"STATUS INBOX (MESSAGES)")[0]

    assert append(b"a", 2).startswith(b"a OK [APPENDUID")  # 2 MB of this network's 2.5
    wait_until(lambda: small_budget.held == 0, seconds=10, what="the append's memory given back")
    assert append(b"b", 3) == b"b NO [UNAVAILABLE] Too many messages being received at once, try again later\r\n"
    assert messages() == b"* STATUS INBOX (MESSAGES 2)\r\n"  # nothing appended
    assert small_budget.held == 0
    small_budget.limit = MESSAGE_MEMORY_OCTETS
    # The messages of one MULTIAPPEND stay within 64 MiB together, as literals do: 80 URLs of 1 MB.
    assert append(b"c", 40, 40).startswith(b"c NO [TOOBIG] Message too big")
    assert messages() == b"* STATUS INBOX (MESSAGES 2)\r\n"
    assert small_budget.held == 0
    # A partial range of a URL is read alone, and the session goes on.
    reply = logged_in.command(b"d", b'APPEND INBOX CATENATE (URL "/INBOX/;UID=%d/;PARTIAL=6.12")' % result)
    assert reply[-1].startswith(b"d OK [APPENDUID"), reply
    logged_in.command(b"e", b"SELECT INBOX")
    assert logged_in.command(b"f", b"FETCH 3 BODY.PEEK[]")[0] == b"* 3 FETCH (BODY[] {12}\r\na@example.te)\r\n"


def test_catenate_parts_count_against_the_connections_limit_and_the_budget_as_literals(
        imap_box: BoxHandle, small_budget: MessageMemory) -> None:
    """A CATENATE's URLs were measured against the 64 MiB constant, not the listener's limit its
    literals are held to, and the joined message copies its TEXT parts outside the budget. Now: one
    limit for the command's literals and URLs, TOOBIG before a URL past it is read (1,000 URLs to a
    300 kB message build nothing past 1 MB), the copies held, and a refusal leaves nothing on disk."""
    header = b"From: a@example.test\r\nSubject: big\r\n\r\n"
    big = header + (b"x" * 998 + b"\r\n") * 300  # 300 kB
    uid = imap_box.run(imap_box.services.store.deliver([USER], big))[USER]
    assert isinstance(uid, int)
    url = b'URL "/INBOX/;UID=%d"' % uid
    server = imap_box.run(start_imap(imap_box.services, "imaps", "127.0.0.1", 0, ImapLimits(max_append_octets=1_000_000)))
    client = RawImap(int(server.sockets[0].getsockname()[1]), imap_box.client_context, timeout=30)
    maildir = imap_box.data.mail / "example.test" / USER.split("@")[0]
    try:
        client.login(USER, PASSWORD)

        def refused(tag: bytes, command: bytes, code: bytes) -> None:
            assert client.command(tag, command)[-1].startswith(tag + b" NO [" + code + b"]")
            wait_until(lambda: small_budget.held == 0, seconds=10, what="the refused command's memory given back")
            assert client.command(b"s", b"STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 2)\r\n"
            assert list((maildir / "tmp").iterdir()) == list(imap_box.data.tmp.iterdir()) == []

        assert client.command(b"a", b"APPEND INBOX CATENATE (" + b" ".join([url] * 3) + b")")[-1].startswith(b"a OK")
        # 1,000 URLs of 300 kB: refused at the fourth, before it is read.
        refused(b"b", b"APPEND INBOX CATENATE (" + b" ".join([url] * 1000) + b")", b"TOOBIG")
        # 750 kB of TEXT (spooled past its first 256 KiB) and one URL: past the limit together.
        text = b"TEXT {750000+}\r\n" + b"t" * 750_000
        refused(b"c", b"APPEND INBOX CATENATE (" + text + b" " + url + b")", b"TOOBIG")
        # Across the messages of a MULTIAPPEND too, literals first.
        refused(b"m", b"APPEND INBOX {750000+}\r\n" + b"m" * 750_000 + b" CATENATE (" + url + b")", b"TOOBIG")
        # The joined copy of 2 x 200 kB of TEXT is held besides the literals: this network's 500 kB
        # of the budget takes the literals, not their copy as well.
        small_budget.limit = 1_000_000
        two = b" ".join([b"TEXT {200000+}\r\n" + b"u" * 200_000] * 2)
        refused(b"u", b"APPEND INBOX CATENATE (" + two + b")", b"UNAVAILABLE")
        small_budget.limit = 5_000_000
        assert client.command(b"v", b"APPEND INBOX CATENATE (" + two + b")")[-1].startswith(b"v OK")
    finally:
        client.close()
        imap_box.run(stop_server(server))


def test_binary_of_a_large_part_is_decoded_as_it_is_sent(imap_box: BoxHandle, logged_in: RawImap) -> None:
    # FETCH BINARY decoded the whole part into memory and handed it to the connection at once: ten
    # sessions asking for a 22 MB attachment, their clients reading slowly, kept 300 MB of the server
    # (100 sessions per account: 3 GB) (found by attack40). Now it is decoded again as it is sent.
    content = bytes(range(256)) * 65536  # 16 MiB, NULs included: a literal8
    header = (b"From: a@example.test\r\nSubject: b\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n")
    message = header + base64.encodebytes(content).replace(b"\n", b"\r\n")
    logged_in.send(b"A APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n")
    assert logged_in.until_tagged(b"A")[-1].startswith(b"A OK")
    assert logged_in.command(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    slow = [RawImap(imap_box.port("imaps"), imap_box.client_context, timeout=30) for _ in range(5)]
    try:
        for client in slow:
            client.login(USER, PASSWORD)
            client.command(b"S", b"SELECT INBOX")

        def ask_and_wait() -> None:
            for client in slow:  # none of them reads its answer
                client.send(b"F FETCH 1 BINARY.PEEK[1]\r\n")
            time.sleep(3)

        growth = peak_rss_growth(ask_and_wait)
        assert growth < 120_000_000, growth  # ~50 MB now (a block per session in the decoding); 336 MB before
        reply = logged_in.command(b"G", b"FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1] BINARY.PEEK[1]<1000000.5>)")
        assert reply[0] == (b"* 1 FETCH (BINARY.SIZE[1] %d BINARY[1] ~{%d}\r\n" % (len(content), len(content)) + content
                            + b" BINARY[1]<1000000> {5}\r\n" + content[1000000:1000005] + b")\r\n")  # no NUL in it
    finally:
        for client in slow:
            client.close()


def test_lmtp_says_busy_once_per_recipient(imap_box: BoxHandle, small_budget: MessageMemory) -> None:
    other = "bob@example.test"
    imap_box.add_user(other, PASSWORD)
    small_budget.limit = 200_000  # a network holds 100 kB at most: less than DATA keeps before it spools
    with lmtp_data(imap_box.port("lmtp"), (USER, other)) as wire:
        wire.send(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 6000 + b".\r\n")
        replies = [wire.reply() for _ in (USER, other)]
        assert [(code, text.split()[0]) for code, text in replies] == [(452, "4.3.1")] * 2
        assert wire.cmd("NOOP")[0] == 250  # in step: one reply per recipient, no more
    assert small_budget.held == 0


def test_one_account_holds_a_bounded_number_of_sessions(imap_box: BoxHandle) -> None:
    # One account's password, from a few networks, could hold all of a listener's 1000 sessions.
    other = "bob@example.test"
    imap_box.add_user(other, PASSWORD)
    sessions = imap_box.services.account_sessions
    sessions.limit = 3
    clients = [RawImap(imap_box.port("imaps"), imap_box.client_context, source=f"127.0.{n}.2") for n in (1, 2)]
    plain = RawImap(imap_box.port("imap"), source="127.0.3.2")  # 143 and 993 count together
    refused = RawImap(imap_box.port("imaps"), imap_box.client_context, source="127.0.4.2")
    clients += [plain, refused]
    try:
        for client in clients[:2]:
            client.login(USER, PASSWORD)
        assert plain.command(b"T", b"STARTTLS")[-1].startswith(b"T OK")
        plain.sock = imap_box.client_context.wrap_socket(plain.sock, server_hostname="localhost")
        plain.login(USER, PASSWORD)
        assert refused.command(b"L", f'LOGIN "{USER}" "{PASSWORD}"'.encode())[-1].startswith(b"L NO [LIMIT]")
        mate = RawImap(imap_box.port("imaps"), imap_box.client_context)
        clients.append(mate)
        mate.login(other, PASSWORD)  # another account is not held back
        assert clients[0].command(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
        wait_until(lambda: sessions.count(USER) == 2, seconds=10, what="the logged-out session uncounted")
        refused.login(USER, PASSWORD)
    finally:
        sessions.limit = MAX_SESSIONS_PER_ACCOUNT
        for client in clients:
            client.close()
    wait_until(lambda: sessions.count(USER) == 0, seconds=10, what="every session uncounted")


def test_a_flood_from_a_few_networks_cannot_keep_a_newcomer_out(imap_box: BoxHandle) -> None:
    # A full pre-auth pool dropped its oldest connection for a newcomer only once that one had had 2 s
    # to log in: a flood reconnecting faster from a few networks refused everyone else (3750 silent
    # sockets from 50 addresses: a real client's IMAPS connection was reset).
    limits = ImapLimits(max_preauth_connections=6, max_connections=20)
    server = imap_box.run(start_imap(imap_box.services, "imaps", "127.0.0.1", 0, limits))
    port = int(server.sockets[0].getsockname()[1])
    flood = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.9.{2 + n}", 0))
             for n in range(6)]
    try:
        wait_until(lambda: server.limiter.preauth == 6, seconds=10, what="the pool full")  # type: ignore[attr-defined]
        client = RawImap(port, imap_box.client_context, source="127.0.10.2")
        try:
            client.login(USER, PASSWORD)
        finally:
            client.close()
    finally:
        for sock in flood:
            sock.close()
        imap_box.run(stop_server(server))
