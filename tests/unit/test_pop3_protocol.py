"""The sans-IO POP3 core: framing fed byte by byte, the grammar per state, the state machine, limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.pop3.limits import Pop3Limits
from appliance.pop3.protocol import (
    GRAMMAR,
    NEED_DATA,
    Command,
    Event,
    Fatal,
    Pop3Connection,
    Reject,
    SaslResponse,
    State,
)
from appliance.pop3.replies import Continuation, Err, Ok


def feed_bytewise(conn: Pop3Connection, data: bytes) -> list[Event]:
    """Feed one byte at a time, collecting every event; commands are answered +OK at once."""
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Command):
                conn.send(Ok())
            if isinstance(event, Fatal):
                return events
    return events


def commands(events: list[Event]) -> list[Command]:
    return [e for e in events if isinstance(e, Command)]


def test_commands_byte_by_byte_case_insensitive_crlf_and_bare_lf() -> None:
    conn = Pop3Connection()
    events = feed_bytewise(conn, b"capa\r\nUser alice@example.test\r\nQUIT\n")
    assert events == [
        Command("CAPA", ()),
        Command("USER", ("alice@example.test",)),
        Command("QUIT", ()),
    ]
    assert conn.state is State.CLOSED  # +OK to QUIT in AUTHORIZATION ends the connection


def test_pass_keeps_spaces_in_the_password() -> None:
    conn = Pop3Connection()
    [event] = feed_bytewise(conn, b"PASS  two  spaces here \r\n")
    assert event == Command("PASS", (" two  spaces here ",))


def test_successful_pass_moves_to_transaction_and_quit_to_update_then_closed() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"PASS secret\r\n")
    assert conn.next_event() == Command("PASS", ("secret",))
    conn.send(Err("Authentication failed", "AUTH"))
    assert conn.state is State.AUTHORIZATION
    conn.receive_data(b"PASS secret\r\n")
    conn.next_event()
    conn.send(Ok("Logged in"))
    assert conn.state is State.TRANSACTION  # type: ignore[comparison-overlap]  # mypy keeps the narrowing across send()
    conn.receive_data(b"STAT\r\nQUIT\r\n")
    assert conn.next_event() == Command("STAT", ())
    conn.send(Ok("0 0"))
    assert conn.next_event() == Command("QUIT", ())
    assert conn.state is State.UPDATE  # RFC 1939 6: deletions happen before the reply
    conn.send(Ok("bye"))
    assert conn.state is State.CLOSED
    assert conn.next_event() is NEED_DATA


def test_pipelined_commands_wait_for_their_reply() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"CAPA\r\nCAPA\r\n")
    assert conn.next_event() == Command("CAPA", ())
    with pytest.raises(RuntimeError):
        conn.next_event()
    conn.send(Ok("caps", ("TOP",)))
    assert conn.next_event() == Command("CAPA", ())


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"STAT\r\n", "STAT is not valid in the authorization state"),
        (b"XYZZY\r\n", "Unknown command"),
        (b"APOP alice 0123456789abcdef\r\n", "APOP is not supported; use USER/PASS or AUTH PLAIN"),
        (b"USER\r\n", "Wrong number of arguments to USER"),
        (b"CAPA now\r\n", "Wrong number of arguments to CAPA"),
        (b"\r\n", "Empty command"),
        (b"US\x00R x\r\n", "Control characters in the command"),
        (b"USER a\tb\r\n", "Control characters in the command"),
        (b"USER a\xc2\x85b\r\n", "Control characters in the command"),
        (b"USER \xff\xfe\r\n", "Command is not valid UTF-8"),
        (b"AUTH PLAIN a b\r\n", "Wrong number of arguments to AUTH"),
    ],
)
def test_invalid_commands_are_rejected_here(line: bytes, text: str) -> None:
    conn = Pop3Connection()
    [event] = feed_bytewise(conn, line)
    assert event == Reject(Err(text))
    assert conn.state is State.AUTHORIZATION


def test_transaction_grammar() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"USER a\r\n")
    conn.next_event()
    conn.send(Ok())
    conn.receive_data(b"PASS b\r\n")
    conn.next_event()
    conn.send(Ok())
    events = feed_bytewise(conn, b"TOP 1\r\nTOP 1 10\r\nLIST\r\nLIST 3\r\nUIDL 1 2\r\nUSER x\r\nRETR  2\r\n")
    assert events == [
        Reject(Err("Wrong number of arguments to TOP")),
        Command("TOP", ("1", "10")),
        Command("LIST", ()),
        Command("LIST", ("3",)),
        Reject(Err("Wrong number of arguments to UIDL")),
        Reject(Err("USER is not valid in the transaction state")),
        Command("RETR", ("2",)),
    ]


def test_bad_command_budget_ends_the_connection() -> None:
    conn = Pop3Connection(Pop3Limits(max_bad_commands=3))
    events = feed_bytewise(conn, b"NOPE\r\n" * 3 + b"CAPA\r\n" + b"NOPE\r\nCAPA\r\n")
    assert [type(e) for e in events] == [Reject, Reject, Reject, Command, Fatal]
    assert events[-1] == Fatal(Err("Too many invalid commands"))
    assert conn.state is State.CLOSED
    conn.receive_data(b"CAPA\r\n")
    assert conn.next_event() is NEED_DATA


def test_line_too_long_is_fatal_without_waiting_for_its_end() -> None:
    conn = Pop3Connection(Pop3Limits(max_line_octets=64))
    events = feed_bytewise(conn, b"USER " + b"x" * 200)
    assert events == [Fatal(Err("Line too long"))]
    assert conn.buffered == 0


def test_line_at_the_limit_is_accepted() -> None:
    conn = Pop3Connection(Pop3Limits(max_line_octets=16))
    line = b"USER " + b"x" * 9 + b"\r\n"
    assert len(line) == 16
    assert feed_bytewise(conn, line) == [Command("USER", ("x" * 9,))]
    assert feed_bytewise(conn, b"USER " + b"x" * 10 + b"\r\n") == [Fatal(Err("Line too long"))]


def test_sasl_continuation_turns_the_next_line_into_a_response() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"AUTH PLAIN\r\n")
    assert conn.next_event() == Command("AUTH", ("PLAIN",))
    assert conn.send(Continuation()) == b"+ \r\n"
    line = b"AGFsaWNlAHNlY3JldA==\r\n"
    for i in range(len(line) - 1):
        conn.receive_data(line[i : i + 1])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(line[-1:])
    assert conn.next_event() == SaslResponse(b"AGFsaWNlAHNlY3JldA==")
    conn.send(Ok("Logged in"))
    assert conn.state is State.TRANSACTION


def test_a_continuation_only_answers_auth() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"CAPA\r\n")
    conn.next_event()
    with pytest.raises(RuntimeError):
        conn.send(Continuation())


def test_discard_buffer_drops_pipelined_plaintext() -> None:
    conn = Pop3Connection()
    conn.receive_data(b"STLS\r\nUSER injected\r\n")
    assert conn.next_event() == Command("STLS", ())
    conn.discard_buffer()
    conn.send(Ok("Begin TLS negotiation"))
    assert conn.next_event() is NEED_DATA


def test_reply_rendering() -> None:
    assert Ok().render() == b"+OK\r\n"
    assert Ok("2 320").render() == b"+OK 2 320\r\n"
    assert Err("Too many sessions", "IN-USE").render() == b"-ERR [IN-USE] Too many sessions\r\n"
    assert Ok("list", ("1 120", ".odd", "")).render() == b"+OK list\r\n1 120\r\n..odd\r\n\r\n.\r\n"
    assert Ok("empty", ()).render() == b"+OK empty\r\n.\r\n"
    # Text from the network never breaks a reply into two.
    assert Err("bad\r\n+OK forged").render() == b"-ERR bad  +OK forged\r\n"


def test_every_state_with_commands_has_a_grammar() -> None:
    assert set(GRAMMAR) == set(State)
    for table in GRAMMAR.values():
        for name, arity in table.items():
            assert 3 <= len(name) <= 4
            assert name.isupper()
            assert 0 <= arity.least <= arity.most


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_arbitrary_input_never_raises_and_stays_bounded(data: bytes, step: int) -> None:
    conn = Pop3Connection(Pop3Limits(max_line_octets=80, max_bad_commands=5))
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Command | Reject | Fatal)
            if isinstance(event, Command):
                conn.send(Ok())
            assert conn.buffered <= 80 + step
        if conn.state is State.CLOSED:
            break
