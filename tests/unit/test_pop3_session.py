"""The session's dispatch tables against the grammar, CAPA per state."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from appliance.account_sessions import AccountSessions
from appliance.pop3.protocol import GRAMMAR, Command, Pop3Connection, State
from appliance.pop3.replies import Err, Ok, Reply
from appliance.pop3.session import Pop3Session


class RecordingIO:
    """A SessionIO that keeps the rendered replies instead of writing them to a socket."""

    def __init__(self, conn: Pop3Connection, *, tls: bool, stls: bool) -> None:
        self.conn = conn
        self.peer = "127.0.0.1"
        self.tls_active = tls
        self.stls_available = stls
        self.out: list[bytes] = []

    async def send(self, reply: Reply) -> None:
        self.out.append(self.conn.send(reply))

    async def read_sasl_line(self) -> bytes | None:
        return None

    def prepare_tls(self) -> None:
        self.conn.discard_buffer()

    async def start_tls(self) -> None:
        self.tls_active, self.stls_available = True, False


def session(*, tls: bool, stls: bool) -> tuple[Pop3Session, RecordingIO, Pop3Connection]:
    # Only what these tests touch: no command here reaches the store or the auth service.
    services = cast(Any, SimpleNamespace(store=None, pop3_sessions=AccountSessions(), hostname="mail.example.test"))
    conn = Pop3Connection()
    io = RecordingIO(conn, tls=tls, stls=stls)
    return Pop3Session(services, io, conn), io, conn


def run(s: Pop3Session, conn: Pop3Connection, line: bytes) -> None:
    conn.receive_data(line)
    event = conn.next_event()
    assert isinstance(event, Command)
    asyncio.run(s.handle(event))


def test_dispatch_tables_cover_the_grammar_exactly() -> None:
    s, _, _ = session(tls=True, stls=False)
    tables = s._dispatch
    assert set(tables[State.AUTHORIZATION]) == set(GRAMMAR[State.AUTHORIZATION])
    # QUIT from TRANSACTION is handed out in UPDATE (RFC 1939 6).
    assert set(tables[State.TRANSACTION]) | set(tables[State.UPDATE]) == set(GRAMMAR[State.TRANSACTION])
    assert set(tables[State.UPDATE]) == {"QUIT"}
    for table in tables.values():
        for name, handler in table.items():
            assert handler.__name__ in (f"cmd_{name.lower()}", "cmd_update")


def test_capa_before_and_after_tls() -> None:
    s, io, conn = session(tls=False, stls=True)
    run(s, conn, b"CAPA\r\n")
    assert io.out[-1] == (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
                          b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION Letterbox\r\n.\r\n")
    run(s, conn, b"STLS\r\n")
    assert io.out[-1] == b"+OK Begin TLS negotiation\r\n"
    assert io.tls_active
    run(s, conn, b"CAPA\r\n")
    assert b"\r\nUSER\r\nSASL PLAIN\r\n" in io.out[-1]
    assert b"STLS" not in io.out[-1]


def test_user_before_tls_is_refused_and_counted() -> None:
    s, io, conn = session(tls=False, stls=True)
    run(s, conn, b"USER alice\r\n")
    assert io.out[-1].startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert s._user is None


def test_quit_in_authorization_closes_without_update() -> None:
    s, io, conn = session(tls=True, stls=False)
    run(s, conn, b"QUIT\r\n")
    assert io.out[-1] == b"+OK Letterbox POP3 server signing off\r\n"
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("reply", [Ok("x"), Err("y", "SYS/TEMP")])
def test_replies_render_one_line(reply: Reply) -> None:
    assert reply.render().count(b"\r\n") == 1
