"""The DATA phase: the message after 354, read up to the lone dot (RFC 5321 4.5.2).

aiosmtpd's own reader refuses any line longer than its stream reader's limit, and while it drains one it
keeps every fragment until the line ends (an endless line grew without bound). Here the reader's limit
only sizes each read: a message is read in pieces of up to that size, each searched for the end (a
CRLF, a dot, a CRLF) by the stream reader itself, and kept in one buffer; its lines are measured from
where their LFs are, and the dots of transparency (RFC 5321 4.5.2) are taken out at the end by one
replace. A message that breaks a bound is drained to its dot keeping nothing, then refused (RFC 5321
4.2.5: the reply comes after the dot, and the session goes on).

Past SPOOL_AFTER_OCTETS the rest of a message goes to a spool file (appliance/message_spool.py,
a Spill): a slow sender holds that much of the box's memory, not its whole message. It is read back
once the dot has come (read_back).

Read a line at a time, a message of 36 MiB of empty lines was 18 million reads and a bytes object
each: 11 s of the event loop's CPU for 20 MB, and ~40 octets of memory per octet sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from appliance.message_memory import BUSY_TEXT
from appliance.message_spool import Spill, SpoolRefusal
from appliance.smtp.policy import INSUFFICIENT_STORAGE

# aiosmtpd's texts, so the rewording (server.REWORDED) and LMTP's per-recipient replies apply.
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
# The box's memory for messages being received is taken (appliance/message_memory.py).
BUSY = f"452 4.3.1 {BUSY_TEXT}"
# A Spill's: the disk keeps too little (appliance/disk_full.py), or the spool file could not be written.
DISK_FULL = str(INSUFFICIENT_STORAGE)
SPOOL_FAILED = "451 4.3.0 Local error in keeping the message, try again later"
SPOOL_REFUSALS = {SpoolRefusal.BUSY: BUSY, SpoolRefusal.DISK_FULL: DISK_FULL, SpoolRefusal.FAILED: SPOOL_FAILED}
END = b"\r\n.\r\n"  # the CRLF ending the last line, the dot, its CRLF
CRLF = b"\r\n"


def _separator(tail: bytes, buffered: bytes | bytearray) -> bytes:
    """What to search the stream for, given the last octets read, so that an end begun in them is found.

    Each search's separator is a suffix of END, so an END wholly in the reader's buffer is always
    found; one begun in octets already read can only begin in their last two (a search that gives up
    leaves len(separator) - 1 octets unread), and is found by searching for its rest, unless what is
    buffered shows the stream does not begin with that rest: a search for ".\r\n" after each line
    ending in a full stop would be a read per line of prose."""
    if tail.endswith(CRLF):
        rest = END[2:]  # at a line's start: ".\r\n"
    elif tail.endswith(b"\r"):
        rest = END[1:]  # "\n.\r\n"
    else:
        return END
    return rest if rest.startswith(bytes(buffered[: len(rest)])) else END


def _longest_line(carried: int, chunk: bytes, max_line: int) -> tuple[int, bool]:
    """The octets of the line still open after `chunk` (with `carried` before it), and whether a line
    ended in it is longer than max_line. Any LF ends a line, as it does once the message is stored (its
    bare LFs become CRLFs, headers.normalise_line_ends, as Postfix's normalize): a file with Unix line
    ends sent as it is (curl -T) was one "line too long" once over 1 MiB."""
    first = chunk.find(b"\n")
    if first < 0:
        carried += len(chunk)
        return carried, carried > max_line
    if carried + first + 1 > max_line:
        return 0, True
    last = chunk.rfind(b"\n")
    if len(chunk) > max_line and first != last:  # a line between the two could be too long (small limits)
        start = first + 1
        while (end := chunk.find(b"\n", start)) >= 0:
            if end + 1 - start > max_line:
                return 0, True
            start = end + 1
    carried = len(chunk) - (last + 1)
    return carried, carried > max_line


class Spooled:
    """A message past its Spill's `after`: the first octets in memory, the rest in its file (as sent,
    dot-stuffed)."""

    def __init__(self, head: bytearray, spill: Spill) -> None:
        assert spill.file is not None
        self.head = head
        self.file = spill.file
        self.octets = len(head) + spill.file.octets

    def whole(self) -> bytearray:
        """Its octets in one buffer (the memory part let go)."""
        head, self.head = self.head, bytearray()
        return self.file.read_after(head)


async def read_back(spill: Spill, message: Spooled) -> bytes:
    """The whole spooled message, dot-unstuffed."""
    return await spill.in_thread(partial(_read_back, message))


def _read_back(message: Spooled) -> bytes:
    return _unstuffed(message.whole())


def _unstuffed(kept: bytearray) -> bytes:
    """The message without its transparency dots; `kept` must be referenced nowhere else, so that it
    is let go before the bytes are made (the message twice in memory at the peak, not three times)."""
    if kept[:1] == b".":
        del kept[:1]
    unstuffed = kept.replace(b"\r\n.", CRLF)
    del kept
    return bytes(unstuffed)


class _Kept:
    """What is kept of a message as it is read: its octets in memory, past spill.after in `spill`."""

    def __init__(self, hold: Callable[[int], bool] | None, spill: Spill | None) -> None:
        self.memory = bytearray()
        self.hold = hold
        self.spill = spill
        self.spooling = False

    def in_memory(self, chunk: bytes) -> bool:
        """Whether `chunk` is for memory (else for the spill)."""
        return self.spill is None or (not self.spooling and len(self.memory) + len(chunk) <= self.spill.after)

    def keep(self, chunk: bytes) -> str | None:
        """None once `chunk` is kept in memory, else the refusal."""
        if self.hold is not None and not self.hold(len(chunk)):
            return BUSY
        self.memory += chunk
        return None

    async def spool(self, chunk: bytes) -> str | None:
        """None once `chunk` is in the spill's file, else the refusal."""
        assert self.spill is not None
        self.spooling = True
        refusal = await self.spill.write(chunk)
        return None if refusal is None else SPOOL_REFUSALS[refusal]

    def drop(self) -> None:
        self.memory = bytearray()
        if self.spill is not None:
            self.spill.close()

    def message(self) -> bytes | Spooled:
        if self.spill is not None and self.spooling:
            return Spooled(self._taken(), self.spill)
        return _unstuffed(self._taken())

    def _taken(self) -> bytearray:
        memory, self.memory = self.memory, bytearray()
        return memory


async def read_message(reader: asyncio.StreamReader, *, max_line: int, max_octets: int,
                       hold: Callable[[int], bool] | None = None,
                       spill: Spill | None = None) -> bytes | Spooled | str:
    """The message, dot-unstuffed, or the refusal (LINE_TOO_LONG / TOO_MUCH_DATA / BUSY, or a Spill's)
    once it has all been read. max_line counts a line with its CRLF and any transparency dot; max_octets
    the whole DATA; hold(n) says whether n more octets may be kept in memory (and takes them); past
    spill.after they go to `spill` instead, and the message is Spooled."""
    kept = _Kept(hold, spill)
    tail = CRLF  # the last octets read (at most 4); the message begins at a line's start
    line_octets = 0  # of the line not yet ended
    total = 0
    refusal: str | None = None
    while True:
        # The stream reader's buffer, looked at, not taken (the server's greeting checks look at it too).
        separator = _separator(tail, getattr(reader, "_buffer", b""))
        try:
            chunk = await reader.readuntil(separator)
            found = True
        except asyncio.LimitOverrunError as overrun:
            chunk = await reader.read(overrun.consumed)  # leaves an END begun in it findable (_separator)
            found = False
        seen = tail + chunk
        if found and seen.endswith(END):
            chunk = chunk[:-3]  # the CRLF before the dot ends the message's last line
        total += len(chunk)
        if refusal is None:
            line_octets, too_long = _longest_line(line_octets, chunk, max_line)
            if total > max_octets:
                refusal = TOO_MUCH_DATA
            elif too_long:
                refusal = LINE_TOO_LONG
            elif kept.in_memory(chunk):
                refusal = kept.keep(chunk)
            else:
                refusal = await kept.spool(chunk)
            if refusal is not None:
                kept.drop()
        if found and seen.endswith(END):
            break
        tail = seen[-4:]
    return refusal if refusal is not None else kept.message()
