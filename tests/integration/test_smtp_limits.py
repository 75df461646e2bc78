"""Every SMTP limit answers with its reply code and never hangs: recipients, errors, connections,
timeouts, sizes, line lengths, garbage. Servers with small limits run on the box's own loop."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from appliance.smtp.limits import MAX_TEXT_LINE_OCTETS
from appliance.smtp.server import start_server
from tests.conftest import BoxHandle
from tests.support.polling import wait_until
from tests.support.smtp_wire import Wire, hold_outbound

OURS = "ourdomain.test"
FORWARD = f"fwd@{OURS}"  # an alias to an external address: accepted from anyone, lands in the spool

StartServer = Callable[..., int]


@pytest.fixture
def limited(box: BoxHandle) -> Iterator[StartServer]:
    """start(service='smtp', **limits) -> port of an extra listener with those SmtpLimits."""
    from appliance.smtp.limits import SmtpLimits

    servers: list[asyncio.Server] = []

    def start(service: str = "smtp", **limits: Any) -> int:
        server = box.run(start_server(box.services, service, "127.0.0.1", 0, limits=SmtpLimits(**limits)))
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def add_alias() -> None:
        await box.services.accounts.add_domain(OURS)
        await box.services.accounts.add_alias(FORWARD, ["partner@external.test"])

    hold_outbound(box)
    box.run(add_alias())
    yield start

    async def close(server: asyncio.Server) -> None:
        server.close()

    for server in servers:
        box.run(close(server))


def greet(port: int) -> Wire:
    wire = Wire(port)
    assert wire.reply()[0] == 220
    assert wire.cmd("EHLO client.test")[0] == 250
    return wire


def spooled(box: BoxHandle) -> int:
    async def count() -> int:
        row = await box.services.db.fetchone("SELECT COUNT(*) AS n FROM queue_messages")
        return int(row["n"]) if row else 0

    return box.run(count())


def test_recipients_per_message(box: BoxHandle, limited: StartServer) -> None:
    port = limited(max_recipients=3)
    with greet(port) as wire:
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        for _ in range(3):
            assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        code, text = wire.cmd(f"RCPT TO:<{FORWARD}>")
        assert (code, text[:5]) == (452, "4.5.3")
        assert wire.cmd("DATA")[0] == 354
        code, text = wire.cmd(b"Subject: x\r\n\r\nhello\r\n.")
        assert code == 250
        assert text.startswith("2.0.0 Ok: queued as ")
    assert spooled(box) == 1


def test_error_budget_ends_the_session_with_421(limited: StartServer) -> None:
    port = limited(max_errors=4)
    with greet(port) as wire:
        assert wire.cmd("BOGUS")[0] == 500
        assert wire.cmd("RCPT TO:<x@y.test>")[0] == 503
        assert wire.cmd("MAIL FROM:<not an address>")[0] in (501, 553)
        code, text = wire.cmd("XYZZY")
        assert code == 500
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.7.0")
        assert wire.closed()


def test_an_accepted_message_resets_the_error_budget(box: BoxHandle, limited: StartServer) -> None:
    port = limited(max_errors=3)
    with greet(port) as wire:
        for _round in range(3):
            assert wire.cmd("BOGUS")[0] == 500
            assert wire.cmd("BOGUS")[0] == 500
            assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
            assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
            assert wire.cmd(b"Subject: x\r\n\r\nhi\r\n.")[0] == 250
        assert wire.cmd("NOOP")[0] == 250


def test_connections_per_client(limited: StartServer) -> None:
    port = limited(max_connections_per_client=2)
    first, second = greet(port), greet(port)
    with Wire(port) as third:
        code, text = third.reply()
        assert (code, text.split()[0]) == (421, "4.7.0")
        assert third.closed()
    first.cmd("QUIT")
    first.close()
    def served_again() -> bool:  # the server notices the close asynchronously
        with Wire(port) as again:
            return again.reply()[0] == 220

    wait_until(served_again, seconds=30, what="a connection accepted once the first one closed")
    second.close()


def test_idle_timeout_says_421(limited: StartServer) -> None:
    port = limited(command_timeout=0.5)
    with greet(port) as wire:
        started = time.monotonic()
        code, text = wire.reply()
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert wire.closed()
        assert 0.4 < time.monotonic() - started < 5


def test_data_stalled_mid_transfer_times_out(limited: StartServer) -> None:
    port = limited(data_chunk_timeout=0.5)
    with greet(port) as wire:
        wire.cmd("MAIL FROM:<a@external.test>")
        wire.cmd(f"RCPT TO:<{FORWARD}>")
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: slow\r\n\r\npart")
        code, _ = wire.reply()
        assert code == 421
        assert wire.closed()


def test_a_dribbling_client_is_cut_off_after_the_data_deadline(limited: StartServer) -> None:
    port = limited(data_chunk_timeout=1.0, max_data_seconds=1.5)
    with greet(port) as wire:
        wire.cmd("MAIL FROM:<a@external.test>")
        wire.cmd(f"RCPT TO:<{FORWARD}>")
        assert wire.cmd("DATA")[0] == 354
        started = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):  # noqa: PT012  the server must cut a trickle somewhere in the loop
            for _ in range(100):  # one byte every 0.2 s would last 20 s
                wire.send(b"x")
                time.sleep(0.2)
        assert time.monotonic() - started < 4


def test_oversize_message_552(box: BoxHandle, limited: StartServer) -> None:
    port = limited(max_message_octets=10_000)
    with greet(port) as wire:
        # The limit is in the reply: msmtp and curl show only the server's words.
        code, text = wire.cmd("MAIL FROM:<a@external.test> SIZE=20000")
        assert (code, text[:5]) == (552, "5.3.4")
        assert "at most 10000 octets" in text
        assert wire.cmd("MAIL FROM:<a@external.test> SIZE=5000")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n")
        wire.send((b"y" * 70 + b"\r\n") * 200)
        code, text = wire.cmd(b".")
        assert (code, text[:5]) == (552, "5.3.4")
        assert "at most 10000 octets" in text
        assert wire.cmd("NOOP")[0] == 250  # the session goes on
    assert spooled(box) == 0


def test_lmtp_refuses_an_oversize_message_once_per_recipient(box: BoxHandle, limited: StartServer) -> None:
    # RFC 2033 4.2: after the dot, one reply per accepted recipient. The session's envelope was
    # emptied before the refusal was sent, so it went out once: the client waited for the others.
    port = limited(service="lmtp", max_message_octets=10_000)
    recipients = [f"u{n}@{OURS}" for n in (1, 2)]
    for rcpt in recipients:
        box.add_user(rcpt, "a password of some length")
    with Wire(port, timeout=15) as wire:
        assert wire.reply()[0] == 220
        assert wire.cmd("LHLO client.test")[0] == 250
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        for rcpt in recipients:
            assert wire.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200 + b".\r\n")
        assert [wire.reply()[0] for _ in range(2)] == [552, 552]
        assert wire.cmd("NOOP")[0] == 250  # in step: no reply owed
    assert spooled(box) == 0


def test_commands_that_carry_no_mail_are_errors_past_the_junk_budget(box: BoxHandle, limited: StartServer) -> None:
    # A session that began a transaction left the pre-auth deadline behind, and a NOOP every few
    # minutes held its slot for ever (500 such sessions: port 25 refused everyone).
    port = limited(max_junk_commands=3, max_errors=2)
    with greet(port) as wire:  # EHLO: 1
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert [wire.cmd("NOOP")[0] for _ in range(2)] == [250, 250]  # 2, 3
        assert wire.cmd("RSET")[0] == 250  # 4: the first error, still answered
        code, text = wire.cmd("NOOP")
        assert (code, text.split()[0]) == (421, "4.7.0")  # the second error: goodbye
        assert wire.closed()
    with greet(port) as wire:  # an accepted message starts the count over
        for _ in range(3):
            assert wire.cmd("NOOP")[0] == 250
            assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
            assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
            assert wire.cmd(b"Subject: hi\r\n\r\nhello\r\n.")[0] == 250
    assert spooled(box) == 3


def test_recipients_refused_for_now_count_as_junk(box: BoxHandle, limited: StartServer) -> None:
    # A RCPT every few minutes held a slot for ever once its replies were 4xx: past the message's
    # recipient limit (452 4.5.3) or greylisted (450), it was neither junk nor an error, so the junk
    # budget that ends a NOOP loop never came (Postfix counts excess recipients as errors too).
    port = limited(max_junk_commands=3, max_errors=2, max_recipients=2)
    with greet(port) as wire:  # EHLO: 1
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert [wire.cmd(f"RCPT TO:<{FORWARD}>")[0] for _ in range(2)] == [250, 250]
        assert [wire.cmd(f"RCPT TO:<{FORWARD}>")[0] for _ in range(3)] == [452, 452, 452]  # 2, 3, 4: an error
        assert wire.cmd("DATA")[0] == 354  # the message still goes, to the recipients taken
        assert wire.cmd(b"Subject: hi\r\n\r\nhello\r\n.")[0] == 250  # and starts the budgets over
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert [wire.cmd(f"RCPT TO:<{FORWARD}>")[0] for _ in range(2)] == [250, 250]
        assert [wire.cmd(f"RCPT TO:<{FORWARD}>")[0] for _ in range(4)] == [452, 452, 452, 452]  # 1-4: an error
        code, text = wire.cmd(f"RCPT TO:<{FORWARD}>")
        assert (code, text.split()[0]) == (421, "4.7.0"), text  # the second error: goodbye
        assert wire.closed()


def test_a_crowded_listener_wants_each_command_soon(limited: StartServer) -> None:
    # Postfix's stress: once half the listener's connections are taken, every session, in a transaction
    # or logged in too, gets 10 s (here 1) per command, not 300.
    port = limited(max_connections=4, stressed_preauth_timeout=1.0)
    with greet(port) as holder:
        assert holder.cmd("MAIL FROM:<a@external.test>")[0] == 250  # out of the pre-auth pool
        with greet(port):  # two of four: crowded
            assert holder.cmd("RCPT TO:<" + FORWARD + ">")[0] == 250
            started = time.monotonic()
            code, text = holder.reply()
            assert (code, text.split()[0]) == (421, "4.4.2"), text
            assert time.monotonic() - started < 5


def test_ehlo_advertises_the_size_limit(limited: StartServer) -> None:
    port = limited(max_message_octets=12_345)
    with Wire(port) as wire:
        wire.reply()
        _, text = wire.cmd("EHLO client.test")
        assert "SIZE 12345" in text.splitlines()


def test_long_lines(box: BoxHandle, limited: StartServer) -> None:
    port = limited()
    with greet(port) as wire:
        code, text = wire.cmd("NOOP " + "x" * 2000)
        assert (code, text[:5]) == (500, "5.5.2")
        code, _ = wire.cmd("MAIL FROM:<" + "a" * 600 + "@external.test>")
        assert code == 500
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        # Text lines over RFC 5321's 1000 octets are taken (as Postfix does), up to 1 MiB.
        assert wire.cmd(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\nshort\r\n.")[0] == 250
    assert spooled(box) == 1


def test_a_line_over_1_mib_is_refused_after_the_dot(box: BoxHandle, limited: StartServer) -> None:
    port = limited()
    with greet(port) as wire:
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: x\r\n\r\n" + b"z" * MAX_TEXT_LINE_OCTETS + b"\r\nshort\r\n")
        code, text = wire.cmd(b".")
        assert (code, text[:5]) == (500, "5.5.2")
        assert wire.cmd("NOOP")[0] == 250  # the session goes on
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        assert wire.cmd(b"Subject: y\r\n\r\nok\r\n.")[0] == 250
    assert spooled(box) == 1


def test_unix_line_ends_end_lines_for_the_line_limit(box: BoxHandle, limited: StartServer) -> None:
    # curl -T sends a file as it is: a 20 MiB attachment saved with LF line ends was refused as one line
    # over 1 MiB ("500 Line too long"), though its bare LFs become CRLFs as a small message's do.
    port = limited()
    body = (b"y" * 75 + b"\n") * (2 * MAX_TEXT_LINE_OCTETS // 76)
    with greet(port) as wire:
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: unix\n\n" + body)
        code, text = wire.cmd(b"\r\n.")
        assert code == 250, text
        # A line over 1 MiB is one whichever way it ends.
        assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: x\n\n" + b"y\n" * 10 + b"z" * MAX_TEXT_LINE_OCTETS + b"\nshort\n")
        code, text = wire.cmd(b"\r\n.")
        assert (code, text[:5]) == (500, "5.5.2")
    assert spooled(box) == 1


def rss_octets() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_sessions_sending_endless_lines_hold_bounded_memory(box: BoxHandle, limited: StartServer) -> None:
    # The listener runs in this process. aiosmtpd kept every read of an over-long line until its CRLF:
    # 12 sessions x 6 MB held 72 MB. Now each session holds at most its reader's buffer.
    port = limited()
    sessions = [greet(port) for _ in range(12)]
    try:
        for wire in sessions:
            assert wire.cmd("MAIL FROM:<a@external.test>")[0] == 250
            assert wire.cmd(f"RCPT TO:<{FORWARD}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
        before = rss_octets()
        for _ in range(6):
            for wire in sessions:
                wire.send(b"z" * 1_000_000)
        peak = rss_octets()
        for wire in sessions:
            code, _ = wire.cmd(b"\r\n.")
            assert code == 500
            peak = max(peak, rss_octets())
        assert peak - before < 30_000_000
    finally:
        for wire in sessions:
            wire.close()
    assert spooled(box) == 0


def test_garbage_never_gets_a_traceback(limited: StartServer) -> None:
    port = limited(max_errors=100)
    junk = [b"\xff\xfe\x00\x01", b"MAIL FROM:<\xff@x>", b"RCPT TO:<\x00>", b"EHLO \xc3\x28", b"AUTH PLAIN \xff",
            b"MAIL FROM:<a@b> SIZE=-1", b"MAIL FROM:<a@b> BODY=9BIT", b"RCPT TO:<@@@>", b"DATA x", b"\r",
            b"HELO", b"VRFY", b"EXPN x", b"MAIL FROM:<a@b> SMTPUTF8=1", b"RCPT TO:<a@b> NOTIFY=NEVER"]
    with greet(port) as wire:
        for line in junk:
            code, text = wire.cmd(line)
            assert 200 <= code < 600
            assert "Traceback" not in text, (line, text)
            assert "Error: (" not in text, (line, text)
        assert wire.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_an_auth_response_line_too_long_is_500_5_5_6_and_the_session_goes_on(
        box: BoxHandle, mechanism: str, caplog: pytest.LogCaptureFixture) -> None:
    """A response to a 334 past the reader's 64 KiB was answered 451 with a traceback logged, and the
    rest of the line was then read as commands (the next NOOP's reply was '500 Command line too
    long'), found by attack41. RFC 4954: such a line is 500 5.5.6; 12288 octets are taken."""
    with Wire(box.port("submissions"), tls=box.client_context) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd(f"AUTH {mechanism}")[0] == 334
        if mechanism == "LOGIN":
            assert wire.cmd(base64.b64encode(b"alice@ourdomain.test"))[0] == 334
        assert wire.cmd(b"A" * 100_000) == (500, "5.5.6 Authentication Exchange line is too long")
        assert wire.cmd("NOOP") == (250, "2.0.0 OK")
        assert wire.cmd(f"AUTH {mechanism}")[0] == 334
        if mechanism == "LOGIN":
            assert wire.cmd(base64.b64encode(b"alice@ourdomain.test"))[0] == 334
        code, _ = wire.cmd(base64.b64encode(b"\0alice@ourdomain.test\0" + b"p" * 9000))  # within 12288
        assert code in (501, 535)
        assert wire.cmd("NOOP") == (250, "2.0.0 OK")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_bogus_commands_count_as_errors_not_a_separate_budget(limited: StartServer) -> None:
    # aiosmtpd alone would hang up after 5 unknown commands with a 502; ours counts them as errors.
    port = limited(max_errors=8)
    with greet(port) as wire:
        for _ in range(7):
            assert wire.cmd("BOGUS")[0] == 500
        assert wire.cmd("BOGUS")[0] == 500
        assert wire.reply()[0] == 421


def test_failed_starttls_handshake_just_closes(box: BoxHandle, limited: StartServer) -> None:
    port = limited()
    with greet(port) as wire:
        code, text = wire.cmd("STARTTLS")
        assert (code, text[:5]) == (220, "2.0.0")
        wire.send(b"this is not a TLS client hello\r\n" * 4)
        assert wire.closed()
    with greet(port) as wire:  # the listener is fine afterwards
        assert wire.cmd("NOOP")[0] == 250


def test_plaintext_client_on_the_implicit_tls_port(box: BoxHandle) -> None:
    with Wire(box.port("submissions")) as wire:
        wire.send(b"EHLO client.test\r\n")
        assert wire.closed()
    with Wire(box.port("submissions"), tls=box.client_context) as wire:
        assert wire.reply()[0] == 220


def test_pipelined_transaction(box: BoxHandle, limited: StartServer) -> None:
    port = limited()
    with greet(port) as wire:
        wire.send(f"MAIL FROM:<a@external.test>\r\nRCPT TO:<{FORWARD}>\r\nRCPT TO:<x@external.test>\r\n"
                  f"RCPT TO:<{FORWARD}>\r\nDATA\r\n")
        assert [wire.reply()[0] for _ in range(5)] == [250, 250, 554, 250, 354]
        wire.send(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 221
    assert spooled(box) == 1


def test_mail_from_auth_parameter_is_accepted(limited: StartServer) -> None:
    port = limited()
    with greet(port) as wire:
        assert wire.cmd("MAIL FROM:<a@external.test> AUTH=<>")[0] == 250
        assert wire.cmd("RSET")[0] == 250
        assert wire.cmd("MAIL FROM:<a@external.test> FOO=bar")[0] == 555


def test_closing_the_listener_says_421_to_open_sessions(box: BoxHandle) -> None:
    from appliance.smtp.limits import SmtpLimits

    server = box.run(start_server(box.services, "smtp", "127.0.0.1", 0, limits=SmtpLimits()))
    port = int(server.sockets[0].getsockname()[1])
    with greet(port) as wire:

        async def close() -> None:
            server.close()

        box.run(close())
        code, text = wire.reply()
        assert (code, text.split()[0]) == (421, "4.3.2")
        assert wire.closed()
