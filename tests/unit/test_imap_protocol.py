"""The sans-IO IMAP connection: framing (byte at a time), literals, limits, bad-command budget."""

from __future__ import annotations

import pytest

from appliance.imap.commands import Append, Command, Fetch, Login, Search
from appliance.imap.limits import ImapLimits
from appliance.imap.protocol import (
    NEED_DATA,
    ContinuationRequest,
    Event,
    Fatal,
    ImapConnection,
    RawLine,
    Reject,
    SpoolChunk,
    SpooledCommand,
)
from appliance.imap.responses import Tagged


def feed(conn: ImapConnection, data: bytes, step: int = 1) -> list[Event]:
    """Feed `data` `step` bytes at a time, collecting every event."""
    events: list[Event] = []
    for i in range(0, len(data), step):
        conn.receive_data(data[i:i + step])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def test_simple_commands_byte_at_a_time() -> None:
    events = feed(ImapConnection(), b"a1 CAPABILITY\r\na2 noop\r\na3 LOGOUT\r\n")
    assert events == [Command("a1", "CAPABILITY"), Command("a2", "NOOP"), Command("a3", "LOGOUT")]


def test_nothing_until_the_line_ends() -> None:
    conn = ImapConnection()
    conn.receive_data(b"a1 NOOP")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\r")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\n")
    assert conn.next_event() == Command("a1", "NOOP")


def test_bare_lf_ends_a_line() -> None:
    assert feed(ImapConnection(), b"a1 NOOP\n") == [Command("a1", "NOOP")]


def test_synchronising_literal_asks_for_continuation() -> None:
    conn = ImapConnection()
    events = feed(conn, b"a1 LOGIN {4}\r\n")
    assert len(events) == 1
    assert isinstance(events[0], ContinuationRequest)
    assert events[0].reply.to_bytes() == b"+ Ready for literal data\r\n"
    events = feed(conn, b"us r {3}\r\n")  # the literal is exactly 4 octets, spaces and all
    assert isinstance(events[0], ContinuationRequest)
    events = feed(conn, b"p\"w\r\n")
    assert events == [Login("a1", "LOGIN", "us r", 'p"w')]


def test_non_synchronising_literal_needs_no_continuation() -> None:
    events = feed(ImapConnection(), b"a1 LOGIN {4+}\r\nuser {2+}\r\npw\r\n")
    assert events == [Login("a1", "LOGIN", "user", "pw")]


def test_literal_can_contain_crlf_and_braces() -> None:
    msg = b"Subject: x {5}\r\n\r\nbody {3}\r\n"
    events = feed(ImapConnection(), b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    assert len(events) == 1
    append = events[0]
    assert isinstance(append, Append)
    assert append.message == msg
    assert append.folder == "INBOX"


def test_append_with_flags_and_date_fed_in_chunks() -> None:
    msg = b"From: a@b\r\n\r\nhi\r\n" * 100
    data = b'A003 APPEND saved-messages (\\Seen) " 7-Feb-1994 21:52:25 -0800" {%d}\r\n%s\r\n' % (len(msg), msg)
    for step in (1, 7, 4096):
        events = feed(ImapConnection(), data, step)
        assert isinstance(events[0], ContinuationRequest)
        append = events[1]
        assert isinstance(append, Append)
        assert append.flags == ("\\Seen",)
        assert append.date == 760686745  # 1994-02-08 05:52:25 UTC
        assert not isinstance(append.message, tuple)  # a literal, not CATENATE parts
        assert bytes(append.message) == msg


def test_pipelined_commands() -> None:
    events = feed(ImapConnection(), b"a NOOP\r\nb NOOP\r\nc NOOP\r\n", step=100)
    assert [e.tag for e in events if isinstance(e, Command)] == ["a", "b", "c"]


def test_syntax_error_is_a_tagged_bad_and_the_stream_goes_on() -> None:
    events = feed(ImapConnection(), b"a1 FETCH x FLAGS\r\na2 NOOP\r\n")
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes().startswith(b"a1 BAD ")
    assert events[1] == Command("a2", "NOOP")


def test_untaggable_garbage_is_an_untagged_bad() -> None:
    events = feed(ImapConnection(), b"\x01\x02\r\n")
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes().startswith(b"* BAD ")


def test_empty_line_is_bad() -> None:
    events = feed(ImapConnection(), b"\r\n")
    assert isinstance(events[0], Reject)


def test_line_too_long_is_fatal() -> None:
    conn = ImapConnection(ImapLimits(max_line_octets=100))
    events = feed(conn, b"a1 NOOP " + b"x" * 200, step=50)
    assert len(events) == 1
    assert isinstance(events[0], Fatal)
    assert events[0].reply.to_bytes().startswith(b"* BYE ")
    conn.receive_data(b"\r\na2 NOOP\r\n")
    assert conn.next_event() is NEED_DATA  # nothing more once fatal


def test_too_large_synchronising_literal_is_refused_before_it_is_sent() -> None:
    conn = ImapConnection(ImapLimits(max_literal_octets=10))
    events = feed(conn, b"a1 LOGIN {11}\r\n")
    assert len(events) == 1
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes() == b"a1 NO [TOOBIG] Literal too large\r\n"
    assert feed(conn, b"a2 NOOP\r\n") == [Command("a2", "NOOP")]


def test_too_large_non_synchronising_literal_is_fatal() -> None:
    conn = ImapConnection(ImapLimits(max_literal_octets=10))
    events = feed(conn, b"a1 LOGIN {11+}\r\n")
    assert len(events) == 1
    assert isinstance(events[0], Fatal)


def test_append_literal_has_its_own_limit() -> None:
    conn = ImapConnection(ImapLimits(max_literal_octets=10, max_append_octets=100))
    events = feed(conn, b"a1 APPEND INBOX {50}\r\n")
    assert isinstance(events[0], ContinuationRequest)
    events = feed(ImapConnection(ImapLimits(max_append_octets=100)), b"a1 APPEND INBOX {101}\r\n")
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes() == b"a1 NO [TOOBIG] Message too big: this server takes messages of at most 100 octets\r\n"


def test_command_size_bounded_across_literals() -> None:
    conn = ImapConnection(ImapLimits(max_literal_octets=100, max_command_octets=150))
    events = feed(conn, b"a1 LOGIN {90+}\r\n" + b"u" * 90 + b" {90}\r\n")
    assert isinstance(events[-1], Reject)


def test_too_many_literals_in_one_command() -> None:
    conn = ImapConnection(ImapLimits(max_literals_per_command=3))
    data = b"a1 SEARCH" + b" TEXT {1+}\r\nx" * 5 + b"\r\n"
    events = feed(conn, data, step=1000)
    assert any(isinstance(e, Fatal) for e in events)


def test_bad_command_budget() -> None:
    conn = ImapConnection(ImapLimits(max_bad_commands=3))
    events = feed(conn, b"a BOGUS\r\n" * 5, step=1000)
    assert [type(e) for e in events] == [Reject, Reject, Reject, Fatal]


def test_good_command_resets_budget() -> None:
    conn = ImapConnection(ImapLimits(max_bad_commands=2))
    events = feed(conn, b"a BOGUS\r\na BOGUS\r\nb NOOP\r\na BOGUS\r\na BOGUS\r\n", step=1000)
    assert not any(isinstance(e, Fatal) for e in events)


def test_session_bad_counts_toward_budget() -> None:
    conn = ImapConnection(ImapLimits(max_bad_commands=1))
    assert conn.note_bad_command() is False
    assert conn.note_bad_command() is True


def test_raw_lines_for_authenticate_and_idle() -> None:
    conn = ImapConnection()
    conn.expect_raw_line()
    events = feed(conn, b"dXNlcgB1c2VyAHB3\r\na2 NOOP\r\n")
    assert events == [RawLine(b"dXNlcgB1c2VyAHB3"), Command("a2", "NOOP")]


def test_raw_line_is_not_parsed_or_limited_by_grammar() -> None:
    conn = ImapConnection()
    conn.expect_raw_line()
    assert feed(conn, b"DONE {5}\r\n") == [RawLine(b"DONE {5}")]


def test_discard_buffer_drops_pipelined_plaintext() -> None:
    conn = ImapConnection()
    conn.receive_data(b"a1 STARTTLS\r\na2 LOGIN evil pw\r\n")
    assert conn.next_event() == Command("a1", "STARTTLS")
    conn.discard_buffer()
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


def test_fetch_and_search_survive_byte_feeding() -> None:
    data = (b"a1 UID FETCH 1:*,7 (FLAGS BODY.PEEK[HEADER.FIELDS (From {4}\r\nDate)]<0.100>)\r\n"
            b"a2 SEARCH CHARSET UTF-8 SUBJECT {5+}\r\nJ\xc3\xb6rg OR SEEN NOT 1:3\r\n")
    events = feed(ImapConnection(), data)
    assert isinstance(events[0], ContinuationRequest)
    assert isinstance(events[1], Fetch)
    assert events[1].uid
    assert isinstance(events[2], Search)
    assert events[2].charset == "UTF-8"


@pytest.mark.parametrize("step", [1, 2, 3, 5, 64])
def test_same_events_whatever_the_chunking(step: int) -> None:
    data = (b"a LOGIN {3}\r\nabc def\r\nb APPEND INBOX (\\Seen) {5+}\r\nhello\r\nc SELECT inbox\r\n"
            b"d FETCH 1 BODY[]\r\n")
    assert feed(ImapConnection(), data, step) == feed(ImapConnection(), data, len(data))


def test_append_with_an_impossible_date_is_refused_before_its_literal() -> None:
    conn = ImapConnection()
    events = feed(conn, b'a1 APPEND INBOX (\\Seen) "31-Feb-2024 00:00:00 +0000" {5}\r\n')
    assert len(events) == 1
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes() == b"a1 BAD bad date-time\r\n"
    assert feed(conn, b"a2 NOOP\r\n") == [Command("a2", "NOOP")]


def test_append_with_an_unknown_system_flag_is_refused_before_its_literal() -> None:
    events = feed(ImapConnection(), b"a1 APPEND INBOX (\\Seen \\Bogus) {5}\r\n")
    assert len(events) == 1
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes() == b"a1 BAD invalid system flag \\Bogus\r\n"


def test_append_heads_that_are_fine_or_cannot_be_judged_yet_get_their_continuation() -> None:
    for line in (b'a1 APPEND INBOX (\\Seen $Work) " 1-Jan-2024 01:00:00 +0100" {5}\r\n',
                 b"a1 APPEND {5}\r\n",  # the folder name is the literal
                 b"a1 APPEND INBOX CATENATE (TEXT {5}\r\n"):
        events = feed(ImapConnection(), line)
        assert [type(e) for e in events] == [ContinuationRequest], line


def test_append_with_a_bad_date_in_a_non_synchronising_literal_reads_it_then_refuses() -> None:
    # LITERAL+: the message is already on its way, so it is read and the whole command refused.
    events = feed(ImapConnection(), b'a1 APPEND INBOX "31-Feb-2024 00:00:00 +0000" {5+}\r\nhello\r\na2 NOOP\r\n')
    assert [type(e) for e in events] == [Reject, Command]


def test_append_without_room_on_the_disk_is_refused_before_its_literal() -> None:
    asked: list[int] = []

    def room(octets: int) -> bool:
        asked.append(octets)
        return octets < 1000

    conn = ImapConnection(room=room)
    events = feed(conn, b"a1 APPEND INBOX (\\Seen) {5000}\r\n")
    assert len(events) == 1
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes() == b"a1 NO [OVERQUOTA] Not enough disk space\r\n"
    assert [type(e) for e in feed(conn, b"a2 APPEND INBOX {5}\r\nhello\r\n")] == [ContinuationRequest, Append]
    assert asked == [5000, 5]
    # LITERAL+: the message is already on its way; the session refuses it once received.
    assert [type(e) for e in feed(ImapConnection(room=room), b"a3 APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b"\r\n")] \
        == [Append]


def test_an_append_the_box_cannot_hold_now_is_refused_before_its_message() -> None:
    asked: list[int] = []

    def hold(octets: int) -> bool:
        asked.append(octets)
        return False

    events = feed(ImapConnection(hold=hold), b"a1 APPEND INBOX {500}\r\n")
    assert isinstance(events[0], Reject)
    assert events[0].reply.to_bytes().startswith(b"a1 NO [UNAVAILABLE]")
    events = feed(ImapConnection(hold=hold), b"a2 APPEND INBOX {500+}\r\n" + b"x" * 500 + b"\r\n")
    assert isinstance(events[0], Fatal)  # RFC 7888 4: a non-synchronising literal is on its way already
    assert asked == [500, 500]
    events = feed(ImapConnection(hold=hold), b"a3 SEARCH TEXT {5}\r\n")
    assert isinstance(events[0], ContinuationRequest)  # only APPEND's messages count


class Spooling:
    """The server's side of a spooled APPEND, in memory: what it was told to expect, what it kept."""

    def __init__(self, held: int = 10**9) -> None:
        self.held = held
        self.taken: list[int] = []
        self.expected: list[int] = []
        self.kept: dict[int, bytearray] = {}

    def hold(self, octets: int) -> bool:
        self.taken.append(octets)
        return octets <= self.held

    def run(self, conn: ImapConnection, data: bytes, step: int) -> list[Event]:
        """Feed `data`; keep every SpoolChunk, read each SpooledCommand's literals back; the other events."""
        events: list[Event] = []
        for i in range(0, len(data), step):
            conn.receive_data(data[i:i + step])
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, SpoolChunk):
                    self.kept.setdefault(id(event.literal), bytearray()).extend(event.data)
                elif isinstance(event, SpooledCommand):
                    for literal in event.literals:
                        literal.data = literal.take_head() + self.kept.pop(id(literal))
                    events.append(event)
                else:
                    events.append(event)
        return events


@pytest.mark.parametrize("step", [1, 7, 100, 10_000])
def test_append_literals_past_the_memory_part_are_handed_out_and_put_back(step: int) -> None:
    # Past limits.append_in_memory_octets of a command's APPEND literals their octets are handed to
    # the server (a spool file); the command then is what it would have been in memory.
    limits = ImapLimits(append_in_memory_octets=100)
    server = Spooling()
    conn = ImapConnection(limits, hold=server.hold, spool=server.expected.append)
    first, second = bytes(range(256)) * 2, b"y" * 60
    data = (b"a1 APPEND INBOX {512}\r\n" + first + b" (\\Seen) {60+}\r\n" + second + b"\r\n"
            b"a2 APPEND INBOX {50}\r\n" + b"z" * 50 + b"\r\na3 NOOP\r\n")
    events = server.run(conn, data, step)
    assert [type(e) for e in events] == [ContinuationRequest, SpooledCommand, Append, ContinuationRequest,
                                         Append, Command]
    append = events[2]
    assert isinstance(append, Append)
    assert bytes(append.message) == first  # type: ignore[arg-type]
    [(flags, _, message)] = append.more
    assert (flags, message) == (("\\Seen",), second)  # small: bytes, as a literal kept in memory
    assert server.taken == [100, 50]  # the second command's message is under the bound: as before
    assert server.expected == [412, 60]  # the first's past 100 octets, the second's (the bound spent)
    assert server.kept == {}
    assert isinstance(events[4], Append)
    assert events[4].message == b"z" * 50


def test_a_refused_spooled_append_is_answered_no_and_the_stream_goes_on() -> None:
    limits = ImapLimits(append_in_memory_octets=10)
    conn = ImapConnection(limits, hold=lambda octets: True, spool=lambda octets: None)
    conn.receive_data(b"a1 APPEND INBOX {30}\r\n" + b"x" * 30 + b"\r\n")
    events = [conn.next_event() for _ in range(3)]
    assert [type(e) for e in events] == [ContinuationRequest, SpoolChunk, SpooledCommand]
    conn.refuse_spooled("Not enough disk space", "OVERQUOTA")  # the server's: the spool file found no room
    assert feed(conn, b"a2 NOOP\r\n") == [Reject(Tagged("a1", "NO", "Not enough disk space", "OVERQUOTA")),
                                           Command("a2", "NOOP")]


def test_other_literals_are_never_spooled() -> None:
    limits = ImapLimits(append_in_memory_octets=10)
    expected: list[int] = []
    conn = ImapConnection(limits, hold=lambda octets: True, spool=expected.append,
                          append_allowed=lambda: False)
    events = feed(conn, b"a1 SEARCH TEXT {30}\r\n" + b"x" * 30 + b"\r\n"
                  b"a2 APPEND INBOX {30}\r\n" + b"x" * 30 + b"\r\n")  # not logged in: any literal
    assert [type(e) for e in events] == [ContinuationRequest, Search, ContinuationRequest, Append]  # the session refuses it
    assert expected == []
