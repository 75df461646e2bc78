"""Malformed SMTP commands through a real socket (issue 11 item 10): every one is answered with a
4xx/5xx reply (never a server failure), the session goes on until the error budget, and the log grows
by a bounded amount: no traceback, a few short lines per connection at most."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.smtp.limits import MAX_ERRORS
from tests.conftest import BoxHandle
from tests.support.smtp_wire import Wire

ALICE = "alice@example.test"
VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "VRFY", "EXPN", "DATA", "RSET", "NOOP", "HELP", "AUTH",
         "QUIT2", "BDAT", "MAIL", "RCPT", "MAIL FROM:<> ", "RCPT TO:<alice@example.test> "]
NASTY = ['<a@', '"', '<"', '<', '<@', '@', '<a@[', '<a@[1.2', '<a@[IPv6:', '<a@b', '<"a', '<a"@b>', '\\', '<\\',
         '(', '<(a)@b>', ':', '<<>>', '<a b@c>', '<a@b> SIZE=', '<a@b> =', '<a@b> BODY=X', '<a@b> SMTPUTF8=1',
         '<a@b> SIZE=99999999999999999999', '<a@b> SIZE=²', '<@a,@b:c@d>', '<@a:', '<a@b.c>>', '"\\', '<"\\">', '=?x?q?',
         '<a@-b>', '<.a@b>', '<a..b@c>', '<\x7f@b>', 'é', '<é@b>', '<a@b> X=\x01', ' ', '\t', '<a@b>\t\t',
         'PLAIN', 'PLAIN =', 'LOGIN !!!', 'X' * 400, '<' + 'a' * 300 + '@b>', '""', '<""@b>', '<a@b> ' * 40]


def malformed_commands(rng: random.Random, count: int) -> list[bytes]:
    commands = [f"{verb} {arg}".encode() for verb in VERBS for arg in NASTY]
    commands += [bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 60))).replace(b"\r", b"").replace(
        b"\n", b"") or b"x" for _ in range(count)]
    return commands


def run_session(box: BoxHandle, commands: list[bytes]) -> list[tuple[int, str]]:
    """Send each command (EHLO first), reconnecting when the error budget ends a session; every
    reply is returned. A session must last at least MAX_ERRORS errors."""
    replies: list[tuple[int, str]] = []
    pending = list(commands)
    while pending:
        with Wire(box.port("smtp")) as wire:
            assert wire.reply()[0] == 220
            assert wire.cmd("EHLO fuzz.test")[0] == 250
            errors = 0
            while pending:
                command = pending.pop(0)
                wire.send(command + b"\r\n")
                try:
                    code, text = wire.reply()
                except (ConnectionError, OSError):
                    pytest.fail(f"connection dropped after {command!r}")
                replies.append((code, text))
                if code == 421:
                    assert errors >= MAX_ERRORS - 1, f"closed after {errors} errors at {command!r}: {text}"
                    break
                if code >= 400:
                    errors += 1
                if code == 354:  # DATA accepted (a valid MAIL/RCPT slipped through): end it
                    wire.send(b".\r\n")
                    replies.append(wire.reply())
                if 200 <= code < 300 and command.upper().startswith(b"QUIT"):
                    break
    return replies


def test_malformed_commands_get_syntax_replies_and_a_bounded_log(
    box: BoxHandle, caplog: pytest.LogCaptureFixture
) -> None:
    box.add_user(ALICE, "alice's long password 9")
    commands = malformed_commands(random.Random(11), 300)
    caplog.set_level(logging.INFO)
    replies = run_session(box, commands)
    assert len(replies) >= len(commands)
    for code, text in replies:
        assert code < 600, (code, text)
        assert "Traceback" not in text, (code, text)
        assert "Error: (" not in text, (code, text)
    # No command failed inside the server: a client's bad input is its syntax error, not our 451.
    assert not [t for c, t in replies if c == 451], [t for c, t in replies if c == 451][:3]
    records = [r for r in caplog.records if r.name.startswith(("letterbox", "mail.log"))]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    sent = sum(len(c) + 2 for c in commands)
    logged = sum(len(r.getMessage()) for r in records)
    assert logged < sent, (logged, sent)  # the log grows slower than the attacker sends


@pytest.mark.parametrize("command", [b"MAIL FROM:<a@", b'VRFY "', b'RCPT TO:<a@', b'MAIL FROM:<"'])
def test_the_reported_inputs_are_syntax_errors(box: BoxHandle, command: bytes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with Wire(box.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO fuzz.test")
        if command.startswith(b"RCPT"):
            assert wire.cmd("MAIL FROM:<x@sender.test>")[0] == 250
        for _ in range(5):
            code, text = wire.cmd(command)
            assert code == 501, text
            assert text.startswith("5.5.2"), text
            assert "Error: (" not in text, text
        assert wire.cmd("NOOP")[0] == 250  # the session goes on
    assert not [r for r in caplog.records if r.exc_info]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(st.tuples(
    st.sampled_from(["MAIL FROM:", "RCPT TO:", "VRFY ", "EXPN ", "HELO ", "AUTH ", "NOOP ", "RSET "]),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF, blacklist_characters="\r\n"),
            max_size=60),
), min_size=1, max_size=30))
def test_hypothesis_command_arguments(box: BoxHandle, commands: list[tuple[str, str]]) -> None:
    wire_commands = [b"MAIL FROM:<x@sender.test>"] + [(verb + arg).encode("utf-8") for verb, arg in commands]
    for code, text in run_session(box, wire_commands):
        assert code != 451, (code, text)
        assert code < 600, (code, text)
        assert "Error: (" not in text, (code, text)
