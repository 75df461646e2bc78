"""Sans-IO POP3 server connection in the shape of h11: bytes in, events out, replies through `send`.

    conn = Pop3Connection()
    conn.receive_data(data)
    while (event := conn.next_event()) is not NEED_DATA:
        ...  # a Command, SaslResponse, Reject or Fatal
        out = conn.send(reply)  # bytes to write; moves the state machine

The connection owns the RFC 1939 state machine: AUTHORIZATION until a +OK answers PASS or AUTH,
then TRANSACTION; QUIT there enters UPDATE (the session deletes), and the reply to QUIT ends the
connection (CLOSED). Which commands exist in which state, and with how many arguments, is the
GRAMMAR table; anything else is answered here with -ERR and counted against the bad-command budget,
so the session only ever sees well-formed commands that are valid now.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from appliance.pop3.limits import DEFAULT_LIMITS, Pop3Limits
from appliance.pop3.replies import Continuation, Err, Reply


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Command:
    name: str  # upper case keyword (RFC 1939 3: keywords are case-insensitive)
    args: tuple[str, ...]


@dataclass(frozen=True)
class SaslResponse:
    """A line sent in answer to a "+ " continuation (RFC 5034 4), CRLF removed."""

    data: bytes


@dataclass(frozen=True)
class Reject:
    """A command that is not run (unknown, wrong state, bad syntax): send `reply`, go on."""

    reply: Err


@dataclass(frozen=True)
class Fatal:
    """The connection cannot go on (line without end, too many bad commands): send `reply`, close."""

    reply: Err


Event = Command | SaslResponse | Reject | Fatal | _NeedData


@dataclass(frozen=True)
class Arity:
    least: int
    most: int
    rest: bool = False  # the last argument is the rest of the line, spaces included


# RFC 1939 4-7, RFC 2449 5 (CAPA), RFC 2595 4 (STLS), RFC 5034 4 (AUTH). APOP is not offered: passwords
# are kept as argon2id hashes, and APOP needs the clear text on the server.
GRAMMAR: dict[State, dict[str, Arity]] = {
    State.AUTHORIZATION: {
        "USER": Arity(1, 1),
        # RFC 1939 7: "a server may treat spaces in the argument as part of the password".
        "PASS": Arity(1, 1, rest=True),
        "AUTH": Arity(0, 2),
        "STLS": Arity(0, 0),
        "CAPA": Arity(0, 0),
        "QUIT": Arity(0, 0),
    },
    State.TRANSACTION: {
        "STAT": Arity(0, 0),
        "LIST": Arity(0, 1),
        "RETR": Arity(1, 1),
        "DELE": Arity(1, 1),
        "NOOP": Arity(0, 0),
        "RSET": Arity(0, 0),
        "TOP": Arity(2, 2),
        "UIDL": Arity(0, 1),
        "CAPA": Arity(0, 0),
        "QUIT": Arity(0, 0),
    },
    State.UPDATE: {},
    State.CLOSED: {},
}
KNOWN_COMMANDS = frozenset(name for table in GRAMMAR.values() for name in table) | {"APOP"}
MAX_KEYWORD_OCTETS = 4  # RFC 2449 3: keywords are three or four characters
# Unicode's Cc (C0, DEL, C1): what the password policy refuses (passwords.password_problem). Not
# str.isprintable(), which also refuses the separators and format characters a password may hold
# (a no-break space, an emoji's zero-width joiner) that IMAP LOGIN and AUTH PLAIN take.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class Pop3Connection:
    def __init__(self, limits: Pop3Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.state = State.AUTHORIZATION
        self._buffer = bytearray()
        self._scan_from = 0  # where the search for the next LF resumes
        self._answering: Command | None = None  # the command the next final reply answers
        self._sasl_line = False  # a continuation was sent: the next line is a SaslResponse
        self._bad_commands = 0
        self._fatal = False

    # --- input -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not self._fatal:
            self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def discard_buffer(self) -> None:
        """Forget input not yet parsed: after STLS, plaintext pipelined behind it must not be taken as
        sent over TLS (RFC 2595 4; the command injection of CVE-2011-0411)."""
        self._buffer.clear()
        self._scan_from = 0

    # --- events ------------------------------------------------------------------------------------

    def next_event(self) -> Event:
        if self._fatal or self.state is State.CLOSED:
            return NEED_DATA
        if self._answering is not None and not self._sasl_line:
            # One command at a time: with PIPELINING (RFC 2449 6.6) the rest waits in the buffer.
            raise RuntimeError(f"{self._answering.name} has not been answered yet")
        line = self._take_line()
        if line is None:
            if len(self._buffer) >= self.limits.max_line_octets:
                return self._die("Line too long")
            return NEED_DATA
        if len(line) > self.limits.max_line_octets:
            return self._die("Line too long")
        line = _strip_eol(line)
        if self._sasl_line:
            self._sasl_line = False
            return SaslResponse(line)
        return self._command(line)

    def _take_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", self._scan_from)
        if end < 0:
            self._scan_from = len(self._buffer)
            return None
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        self._scan_from = 0
        return line

    def _command(self, line: bytes) -> Event:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad("Command is not valid UTF-8")
        if not text:
            return self._bad("Empty command")
        if _CONTROL.search(text):
            return self._bad("Control characters in the command")
        keyword, _, rest = text.partition(" ")
        name = keyword.upper()
        if len(name) > MAX_KEYWORD_OCTETS or name not in KNOWN_COMMANDS:
            return self._bad("Unknown command")
        arity = GRAMMAR[self.state].get(name)
        if arity is None:
            if name == "APOP":
                return self._bad("APOP is not supported; use USER/PASS or AUTH PLAIN")
            return self._bad(f"{name} is not valid in the {self.state.value} state")
        if arity.rest:
            args: tuple[str, ...] = (rest,) if rest else ()
        else:
            args = tuple(word for word in rest.split(" ") if word)
        if not arity.least <= len(args) <= arity.most:
            return self._bad(f"Wrong number of arguments to {name}")
        command = Command(name, args)
        self._answering = command
        if self.state is State.TRANSACTION and name == "QUIT":
            self.state = State.UPDATE  # RFC 1939 6: the session deletes, then answers
        return command

    def _bad(self, text: str) -> Event:
        if self.note_bad_command():
            return self._die("Too many invalid commands")
        return Reject(Err(text))

    def note_bad_command(self) -> bool:
        """Count a command refused as invalid (also by the session); True when the budget is spent."""
        self._bad_commands += 1
        return self._bad_commands > self.limits.max_bad_commands

    def _die(self, text: str) -> Fatal:
        self._fatal = True
        self._buffer.clear()
        self.state = State.CLOSED
        return Fatal(Err(text))

    # --- output ------------------------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """The status line (and inline body) of a reply; moves the state machine. A Streamed reply's
        body follows from its own source."""
        if isinstance(reply, Continuation):
            if self._answering is None or self._answering.name != "AUTH":
                raise RuntimeError("a continuation only answers AUTH")
            self._sasl_line = True
            return reply.render()
        command, self._answering = self._answering, None
        self._sasl_line = False
        ok = not isinstance(reply, Err)
        if command is not None:
            if command.name == "QUIT":
                self.state = State.CLOSED
            elif ok and self.state is State.AUTHORIZATION and _logs_in(command):
                self.state = State.TRANSACTION
        return reply.render()

    def close(self) -> None:
        """The session ends without QUIT (timeout, error): nothing more is parsed."""
        self.state = State.CLOSED
        self._buffer.clear()


def _logs_in(command: Command) -> bool:
    """PASS, or AUTH with a mechanism (AUTH alone only lists the mechanisms)."""
    return command.name == "PASS" or (command.name == "AUTH" and bool(command.args))


def _strip_eol(line: bytes) -> bytes:
    # RFC 1939 3 requires CRLF; a bare LF is accepted (scripts and test tools send it).
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line
