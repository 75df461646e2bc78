"""Sans-IO IMAP server connection in the shape of h11: bytes in, events out, no sockets, no store.

    conn = ImapConnection()
    conn.receive_data(data)
    while (event := conn.next_event()) is not NEED_DATA:
        ...  # a Command, ContinuationRequest, Reject, Fatal or RawLine

Framing comes first (RFC 3501 4.3, 7.5): a line ending in {n} announces a synchronising literal (the
server must answer "+" before the client sends it: the ContinuationRequest event), {n+} a
non-synchronising one (RFC 7888 LITERAL+). Once a command's last line is in, the parser sees the whole
command as text pieces and literal payloads. Every size is bounded by ImapLimits; a literal too big
for a synchronising client is refused before it is sent, one too big for a non-synchronising client
ends the connection (RFC 7888 4), as does a line without end.

An APPEND's literals (its messages, CATENATE's texts) are kept in memory up to
limits.append_in_memory_octets per command when the server can keep the rest (`spool`): past that
their octets are handed out as they come (SpoolChunk events, which the server writes to a spool file),
and once the command's last line is in, a SpooledCommand event asks the server for them back
(SpooledLiteral.data) before the command is parsed. No file is touched here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from appliance.disk_full import DISK_FULL_TEXT
from appliance.imap.commands import Command
from appliance.imap.limits import DEFAULT_LIMITS, ImapLimits
from appliance.imap.parser import (
    LiteralPart,
    ParseError,
    Segment,
    TaggedParseError,
    append_head_error,
    parse_command,
    parse_tag,
)
from appliance.imap.responses import Bye, Continuation, Response, Tagged, UntaggedStatus
from appliance.message_memory import BUSY_TEXT
from appliance.sizes import limit_text


def _too_large_text(message: bool, limit: int) -> str:
    """The refusal of a literal over its limit; an APPEND's says the limit, since a mail program shows
    it when it saves a draft or a sent copy ("Literal too large" did not say how big a message may be)."""
    if not message:
        return "Literal too large"
    return f"Message too big: this server takes messages of at most {limit_text(limit)}"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class ContinuationRequest:
    """The client announced a synchronising literal: send `+` (the reply) and it will send the data."""

    reply: Response


@dataclass(frozen=True)
class Reject:
    """A command the server will not run (syntax, sizes): send `reply`, go on with the next command."""

    reply: Response


@dataclass(frozen=True)
class Fatal:
    """The connection cannot go on (framing lost, too many bad commands): send `reply` and close."""

    reply: Response


class SpooledLiteral:
    """An APPEND literal past the command's octets kept in memory: its first octets (`head`) here, the
    rest handed to the server in SpoolChunk events; `data`, the whole, once the server read it back."""

    def __init__(self, octets: int) -> None:
        self.octets = octets
        self.head = bytearray()
        self.data: bytes | bytearray | None = None

    def take_head(self) -> bytearray:
        head, self.head = self.head, bytearray()
        return head


@dataclass(frozen=True, eq=False)
class SpoolChunk:
    """The next octets of `literal` past its head: keep them (a spool file), in order."""

    literal: SpooledLiteral
    data: bytes | bytearray


@dataclass(frozen=True, eq=False)
class SpooledCommand:
    """A command with spooled literals is in: set each one's data (read back) and call next_event() for
    the Command, or refuse_spooled() for the refusal."""

    literals: tuple[SpooledLiteral, ...]


@dataclass(frozen=True)
class RawLine:
    """A line read in raw mode (AUTHENTICATE responses, IDLE's DONE), CRLF removed."""

    data: bytes


Event = Command | ContinuationRequest | Reject | Fatal | RawLine | SpoolChunk | SpooledCommand | _NeedData

# RFC 3501 9 literal = "{" number "}" CRLF; RFC 7888 literal+ = "{" number "+}" CRLF.
# RFC 3516 literal8 (~{n}) is accepted where a literal is: an APPEND of binary content.
_LITERAL_MARKER = re.compile(rb"~?\{(\d{1,20})(\+?)\}\Z")
_APPEND = re.compile(rb"^[^ ]+ (?:APPEND) ", re.IGNORECASE)
LITERAL_CONTINUATION = "Ready for literal data"
SMALL_LITERAL = 64 * 1024


class ImapConnection:
    def __init__(self, limits: ImapLimits = DEFAULT_LIMITS, room: Callable[[int], bool] | None = None,
                 append_allowed: Callable[[], bool] | None = None,
                 hold: Callable[[int], bool] | None = None, spool: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        # Whether an APPEND may come now (the server's: after a login). Before it, APPEND's literal
        # gets the bounds of any other literal: its message limit let a client not logged in have
        # 64 MiB per connection kept in memory, only to be told BAD at the end.
        self._append_allowed = append_allowed
        # Whether an APPEND of so many octets may come in (the server's: the data disk's room, after a
        # login); an APPEND that may not is refused before its synchronising literal is sent.
        self._room = room
        # Whether an APPEND's message of so many octets may be held in memory now (the server's: the
        # box's budget for messages being received, appliance/message_memory.py), taken when it may.
        self._hold = hold
        # Told the octets of an APPEND literal that will come as SpoolChunks, when it is announced (the
        # server's: the disk reserve counts them); None: every literal is kept in memory.
        self._spool = spool
        self._buffer = bytearray()
        self._scan_from = 0  # where the search for the next LF resumes
        self._segments: list[Segment] = []
        self._command_octets = 0
        self._literal: bytearray | None = None
        self._literal_left = 0
        self._to_spool = 0  # of _literal_left, the octets for SpoolChunks (the rest in memory first)
        self._spooling: SpooledLiteral | None = None  # the literal being received, when spooled
        # The command's spooled literals, by their segment's index; its APPEND octets kept in memory.
        self._spooled: list[tuple[int, SpooledLiteral]] = []
        self._append_in_memory = 0
        # A command whose spooled literals are being read back: its segments, and a refusal instead.
        self._waiting: list[Segment] | None = None
        self._refusal: tuple[str, str | None] | None = None
        # Octets of the literals announced so far by the command being received: the server's
        # deadline for one command grows with them (appliance/imap/server.py).
        self.command_literal_octets = 0
        self._raw_lines = 0
        self._bad_in_a_row = 0
        self._closed = False

    # --- input -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Octets received but not yet turned into events."""
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """Everything not yet parsed, removed: after COMPRESS it is compressed and goes through the
        decompressor first (RFC 4978 3)."""
        data = bytes(self._buffer)
        self.discard_buffer()
        return data

    def discard_buffer(self) -> None:
        """Forget everything not yet parsed: after STARTTLS, plaintext pipelined behind it must not be
        taken as sent over TLS (the command injection of CVE-2011-0411)."""
        self._buffer.clear()
        self._scan_from = 0

    def expect_raw_line(self) -> None:
        """The next line is not a command (AUTHENTICATE response, IDLE's DONE): deliver it as RawLine."""
        self._raw_lines += 1

    def cancel_raw_line(self) -> None:
        self._raw_lines = 0

    # --- events ------------------------------------------------------------------------------------

    def next_event(self) -> Event:
        if self._closed:
            return NEED_DATA
        if self._waiting is not None:
            return self._spooled_command()
        while True:
            if self._literal is not None:
                event = self._fill_literal()
                if event is not None:
                    return event
                continue
            line = self._take_line()
            if line is None:
                if len(self._buffer) > self.limits.max_line_octets:
                    return self._fatal("Line too long")
                return NEED_DATA
            if len(line) > self.limits.max_line_octets:
                return self._fatal("Line too long")
            line = _strip_eol(line)
            if self._raw_lines and not self._segments:
                self._raw_lines -= 1
                return RawLine(line)
            event = self._command_line(line)
            if event is not None:
                return event

    def _take_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", self._scan_from)
        if end < 0:
            self._scan_from = len(self._buffer)
            return None
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        self._scan_from = 0
        return line

    def _fill_literal(self) -> Event | None:
        """NEED_DATA or a SpoolChunk while the literal is not all in; None once it is."""
        assert self._literal is not None
        take = min(self._literal_left - self._to_spool, len(self._buffer))
        if take:
            self._literal += self._buffer[:take]
            del self._buffer[:take]
            self._literal_left -= take
        if self._to_spool and self._literal_left == self._to_spool and self._buffer:
            assert self._spooling is not None
            take = min(self._to_spool, len(self._buffer))
            if take == len(self._buffer):
                chunk, self._buffer = self._buffer, bytearray()  # the whole read, not copied
            else:
                chunk = self._buffer[:take]
                del self._buffer[:take]
            self._to_spool -= take
            self._literal_left -= take
            return SpoolChunk(self._spooling, chunk)
        if self._literal_left:
            return NEED_DATA
        if self._spooling is not None:
            self._spooling.head = self._literal
            self._spooled.append((len(self._segments), self._spooling))
            self._segments.append(LiteralPart(b""))  # its octets once read back (_spooled_command)
            self._spooling = None
        else:
            # Small literals become bytes; a big one (an APPEND message) is handed on as the buffer it
            # was read into, so a 50 MB message is held in memory once, not twice.
            data = bytes(self._literal) if len(self._literal) <= SMALL_LITERAL else self._literal
            self._segments.append(LiteralPart(data))
        self._literal = None
        return None

    def refuse_spooled(self, text: str, code: str | None) -> None:
        """After a SpooledCommand: the next event is the command's NO with `text` and `code`."""
        assert self._waiting is not None
        self._refusal = (text, code)

    def _spooled_command(self) -> Event:
        assert self._waiting is not None
        segments, self._waiting = self._waiting, None
        spooled, self._spooled = self._spooled, []
        refusal, self._refusal = self._refusal, None
        first = segments[0]
        assert isinstance(first, bytes)
        if refusal is not None:
            return self._bad(parse_tag(first), refusal[0], status="NO", code=refusal[1])
        for index, literal in spooled:
            if literal.data is None:
                raise RuntimeError("a spooled literal was not read back before next_event()")
            data = literal.data
            literal.data = None  # the command holds it, nothing else
            segments[index] = LiteralPart(bytes(data) if len(data) <= SMALL_LITERAL else data)
        return self._parse(segments)

    def _command_line(self, line: bytes) -> Event | None:
        """One line of a command: either it announces a literal or it ends the command."""
        self._command_octets += len(line) + 2
        marker = _LITERAL_MARKER.search(line)
        first = self._segments[0] if self._segments else line
        assert isinstance(first, bytes)
        if marker is None:
            return self._last_line(line, first)
        size, non_sync = int(marker.group(1)), marker.group(2) == b"+"
        self._segments.append(line[: marker.start()])
        is_append = _APPEND.match(first) is not None and self._logged_in()
        limit = self.limits.max_append_octets if is_append else self.limits.max_literal_octets
        too_many = len(self._segments) // 2 >= self.limits.max_literals_per_command
        # A MULTIAPPEND (RFC 3502) is in memory whole once read: all its messages together within one limit.
        append_total = is_append and self.command_literal_octets + size > limit
        if size > limit or too_many or append_total or (
            not is_append and self._command_octets + size > self._max_command_octets()
        ):
            text = _too_large_text(is_append and not too_many, limit)
            if non_sync:
                # RFC 7888 4: the data is already on its way and cannot be told apart from commands.
                return self._fatal(text)
            # RFC 7888 4 / RFC 4469: refuse before the client sends it; it then drops the command.
            return self._drop_command(first, text, status="NO", code="TOOBIG")
        if is_append and not non_sync and len(self._segments) == 1:
            # A date-time or flag the APPEND would be refused for: say so before the message is sent.
            error = append_head_error(line[: marker.start()])
            if error is not None:
                return self._drop_command(first, error)
        room = self._room
        if is_append and not non_sync and room is not None and not room(self.command_literal_octets + size):
            # The disk is (nearly) full: the session would refuse it after receiving it (Dovecot's words).
            return self._drop_command(first, DISK_FULL_TEXT, status="NO", code="OVERQUOTA")
        in_memory = self._held(size) if is_append else size
        if in_memory is None:
            if non_sync:
                return self._fatal(BUSY_TEXT)  # RFC 7888 4: it is on its way; BYE is the way to refuse it
            return self._drop_command(first, BUSY_TEXT, status="NO", code="UNAVAILABLE")  # RFC 5530 3
        if not is_append:
            self._command_octets += size
        self.command_literal_octets += size
        self._begin_literal(size, in_memory)
        if non_sync:
            return None
        return ContinuationRequest(Continuation(LITERAL_CONTINUATION))

    def _last_line(self, line: bytes, first: bytes) -> Event:
        self._segments.append(line)
        segments, self._segments = self._segments, []
        octets, self._command_octets = self._command_octets, 0
        self.command_literal_octets = 0
        self._append_in_memory = 0
        if octets > self._max_command_octets():
            self._spooled = []
            return self._bad(parse_tag(first), "Command too long")
        if self._spooled:
            self._waiting = segments
            return SpooledCommand(tuple(literal for _, literal in self._spooled))
        return self._parse(segments)

    def _held(self, size: int) -> int | None:
        """How much of an APPEND literal of `size` octets is kept in memory, taken from the server's
        budget (the rest is spooled); None when the budget has not that much now."""
        in_memory = size
        if self._spool is not None:
            in_memory = min(size, max(0, self.limits.append_in_memory_octets - self._append_in_memory))
        if in_memory and self._hold is not None and not self._hold(in_memory):
            return None
        self._append_in_memory += in_memory
        return in_memory

    def _begin_literal(self, size: int, in_memory: int) -> None:
        """The literal of `size` octets comes next: its first `in_memory` octets kept, the rest spooled."""
        self._literal = bytearray()
        self._literal_left = size
        if in_memory < size:
            assert self._spool is not None
            self._spool(size - in_memory)
            self._to_spool = size - in_memory
            self._spooling = SpooledLiteral(size)

    def _logged_in(self) -> bool:
        return self._append_allowed is None or self._append_allowed()

    def _max_command_octets(self) -> int:
        return self.limits.max_command_octets if self._logged_in() else self.limits.max_preauth_command_octets

    def _drop_command(self, first: bytes, text: str, status: str = "BAD", code: str | None = None) -> Event:
        """Refuse the command being received before its literal is sent (no "+" goes out)."""
        self._segments = []
        self._spooled = []
        self._command_octets = 0
        self.command_literal_octets = 0
        self._append_in_memory = 0
        return self._bad(parse_tag(first), text, status=status, code=code)

    def _parse(self, segments: list[Segment]) -> Event:
        try:
            command = parse_command(segments)
        except TaggedParseError as exc:
            return self._bad(exc.tag, str(exc), code=exc.code)
        except ParseError as exc:
            return self._bad(None, str(exc), code=exc.code)
        self._bad_in_a_row = 0
        return command

    def _bad(self, tag: str | None, text: str, status: str = "BAD", code: str | None = None) -> Event:
        self._bad_in_a_row += 1
        if self._bad_in_a_row > self.limits.max_bad_commands:
            return self._fatal("Too many invalid commands")
        if tag is None:
            return Reject(UntaggedStatus("BAD", text, code))
        return Reject(Tagged(tag, "NO" if status == "NO" else "BAD", text, code))

    def note_bad_command(self) -> bool:
        """The session answered BAD (wrong state, bad arguments); True when the budget is spent."""
        self._bad_in_a_row += 1
        return self._bad_in_a_row > self.limits.max_bad_commands

    def _fatal(self, text: str) -> Fatal:
        self._closed = True
        self._buffer.clear()
        self._spooled = []
        return Fatal(Bye(text))


def _strip_eol(line: bytes) -> bytes:
    # RFC 3501 requires CRLF; a bare LF is accepted (some scripts and test tools send it).
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line
