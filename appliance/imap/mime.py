"""The MIME structure of a stored message, with the byte offsets IMAP sections need.

The stdlib `email` package parses header blocks (Content-Type and its parameters, RFC 2231, address
lists) but says nothing about where a part begins and ends in the file, and BODY[1.2] must send the
exact octets of that part. So this module walks the message once, line by line, and only finds the
part boundaries (RFC 2046 5.1.1), handing each header block to `email` to interpret.

Offsets come in two kinds: `file` offsets into the bytes on disk, and `wire` offsets into the message
as IMAP sends it, with every bare LF written as CRLF (RFC 3501 requires CRLF; a Maildir written by
other software may use LF alone). Sizes in BODYSTRUCTURE and RFC822.SIZE are wire sizes.

The walk reads the file with bounded readline calls, so a 50 MB message is scanned in constant
memory; nesting depth and part count are bounded (limits.py) and anything beyond is treated as opaque.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.header
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.policy import Compat32
from email.utils import unquote
from functools import lru_cache
from itertools import chain
from typing import Any, BinaryIO, NamedTuple, NoReturn

from appliance import caches
from appliance.imap.limits import MAX_HEADER_OCTETS, MAX_MIME_DEPTH, MAX_MIME_PARTS

READ_LIMIT = 64 * 1024  # longest piece of a line read at once
# Octets read at once while crossing a body: below the server's mmap threshold (128 KiB,
# heap.fix_mmap_threshold), or every read of a small message mapped and unmapped a buffer
# of this size (1 MiB was: scanning 2,000 corpus files took 189-229 us a message instead of
# 102-105, load 9; issue 19). A 50 MB attachment is 800 reads.
SKIP_BLOCK = 64 * 1024
HEADER_PROBE = 16 * 1024  # octets read at once for a header block (longer ones are read line by line)
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LWSP = b" \t\r\n"


class RawHeaderPolicy(Compat32):
    """compat32, except header values come back as the raw strings (8-bit bytes as surrogate escapes)
    instead of email.header.Header objects: IMAP sends header text as it is on disk."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


RAW_POLICY = RawHeaderPolicy(linesep="\r\n")
# Lines as the stdlib's feed parser cuts them (io.StringIO(newline=""): CRLF, CR or LF ends a line).
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
# email.feedparser.headerRE: a line that can belong to a header block.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
# The usual header block, where parse_header's rules come down to this: every line is a field with
# a name or a continuation line of one. (name, value as compat32 keeps it before the last line end
# is removed); a block that is not all of these is parsed line by line.
# (name, blanks, value): the blanks are kept to tell whether the fields found cover the whole block.
_FIELD = re.compile(r"([\041-\071\073-\176]{1,128}+):([ \t]*)([^\r\n]*(?:\r\n|\r|\n|\Z)(?:[ \t][^\r\n]*(?:\r\n|\r|\n|\Z))*)")


def parses_whole(block: bytes) -> bool:
    """Whether parse_header reads every line of `block` up to its blank line as part of a field:
    no line that ends the fields early, no "From " line, no field without a name."""
    text = block.decode("ascii", "surrogateescape")
    # Without its last line when that is the blank one (it ends the fields).
    fields = text[:-2] if text.endswith("\n\r\n") else text[:-1] if text.endswith("\n\n") else text
    if _plain_fields(fields) is not None:
        return True  # fields only, then the blank line or the end (nearly always)
    for line in _LINES.findall(text):
        if line in ("\r\n", "\n"):
            return True
        if not _HEADER_LINE.match(line) or line.startswith("From ") or line[0] == ":":
            return False
    return True


def parse_header(block: bytes) -> Message:
    """The header fields of `block` as `BytesHeaderParser(policy=RAW_POLICY).parsebytes(block)`
    gives them, in about a tenth of its time (its feed parser, with a defect object per oddity, was
    most of a MIME scan). The same rules, from email.feedparser: a line that is neither a field, a
    continuation nor "From " ends the block; a continuation before any field, a field with no name
    and "From " lines are dropped (and a continuation after them); a field's value is its first
    line's text after the colon, blanks stripped in front, then its continuation lines as they
    are, the last line end removed (compat32's header_source_parse). Octets above 127 are kept as
    surrogate escapes, as the stdlib parser keeps them."""
    text = block.decode("ascii", "surrogateescape")
    found = _plain_fields(text)
    if found is not None:
        return Headers([(name, value.rstrip("\r\n")) for name, _, value in found], whole=True, source=found)
    fields: list[tuple[str, str]] = []
    name = ""
    value: list[str] = []
    for line in _LINES.findall(text):
        if not _HEADER_LINE.match(line):
            break
        if line[0] in " \t":
            if name:
                value.append(line)
            continue
        if name:
            fields.append((name, "".join(value).rstrip("\r\n")))
            name, value = "", []
        if line.startswith("From "):
            continue  # an mbox separator (the unix-from line) or a misplaced one: not a field
        colon = line.find(":")
        if colon <= 0:
            continue  # no field name
        name, value = line[:colon], [line[colon + 1:].lstrip(" \t")]
    if name:
        fields.append((name, "".join(value).rstrip("\r\n")))
    return Headers(fields)


class Headers(Message):
    """A parsed header block: an email.message.Message (RAW_POLICY) whose fields are also indexed
    by lower-cased name, so get() and get_all() are a dict look-up instead of Message's scan that
    lower-cases every field name on every call (an ENVELOPE and a BODYSTRUCTURE ask about thirty
    times per message: a tenth of building a message cache row, issue 19). Read-only: the index
    would not follow a change, so the methods that add or change a field refuse."""

    def __init__(self, fields: list[tuple[str, str]], *, whole: bool = False,
                 source: list[tuple[str, str, str]] | None = None) -> None:
        super().__init__(policy=RAW_POLICY)
        self.whole = whole  # every line of the block was part of a field (what parses_whole says)
        # With `whole`: each field as it is in the block, (name, the blanks after its colon, the rest
        # with its continuation lines and line ends), so the block is these joined by colons.
        self.source = source
        self._headers = fields  # stored as the stdlib parser stores them (set_raw)
        # The first value of each name, for get(): one comprehension, the fields taken backwards so
        # the first one wins (a loop making a list per name was a tenth of scanning a message).
        self._first = {name.lower(): value for name, value in reversed(fields)}
        self._all: dict[str, list[str]] | None = None  # every value by name, made for get_all when a name repeats
        # A leaf's BODYSTRUCTURE text around its size and lines for this media type (fetch._leaf_head_tail).
        self.leaf_text: tuple[tuple[str, str], tuple[bytes, bytes]] | None = None

    def get(self, name: str, failobj: Any = None) -> Any:
        return self._first.get(name.lower(), failobj)

    def first_values(self, names: tuple[str, ...]) -> list[str | None]:
        """get() of each of these lower-case names, in one call."""
        get = self._first.get
        return [get(name) for name in names]

    def get_all(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        if key not in self._first:
            return failobj
        if len(self._first) == len(self._headers):
            return [self._first[key]]  # no name repeats
        if self._all is None:
            index: dict[str, list[str]] = {}
            for field, value in self._headers:
                index.setdefault(field.lower(), []).append(value)
            self._all = index
        return list(self._all[key])

    def get_content_type(self) -> str:
        """Message.get_content_type from the index (it is asked for every part)."""
        value = self._first.get("content-type")
        if value is None:
            return self.get_default_type()
        ctype = value.partition(";")[0].strip().lower()
        return ctype if ctype.count("/") == 1 else "text/plain"

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("parsed header fields are read-only")

    __setitem__ = __delitem__ = set_raw = add_header = replace_header = _read_only


def _plain_fields(text: str) -> list[tuple[str, str, str]] | None:
    """(name, blanks after the colon, the rest with its line ends) of each field when `text` is
    fields only (a field line and its continuation lines, one after the other); the value
    parse_header's rules give is the rest without its last line end. None for anything else."""
    found = _FIELD.findall(text)
    # The fields found follow each other without a gap when their lengths (and a colon each) add
    # up to the text's: summed in C, no string joined.
    if sum(map(len, chain.from_iterable(found))) + len(found) != len(text):
        return None
    return found


class Span(NamedTuple):
    """A region of the message: [start, end) in file octets, and its length in wire octets. A named
    tuple: a scan makes two per part, and a frozen dataclass's __init__ (object.__setattr__ per
    field) cost twice as much (issue 19: 3-4 % of describing a message)."""

    start: int
    end: int
    wire_start: int
    wire_end: int

    @property
    def wire_size(self) -> int:
        return self.wire_end - self.wire_start


@dataclass
class Part:
    """One MIME entity: its header block, its body, and its children.

    For multipart/* the children are the body parts; for message/rfc822 the one child is the
    encapsulated message (whose own header and body spans start at this part's body)."""

    header: Span  # the header block including the blank line that ends it
    body: Span
    headers: Message
    maintype: str
    subtype: str
    lines: int  # line ends in the body (RFC 3501 7.4.2 body-fld-lines)
    children: list[Part] = field(default_factory=list)
    complete: bool = True  # False from scan_header and scan_top: the parts were not walked
    ended: bool = True  # False from scan_header: the body's span is not known (put at the header's end)
    placeholder: bool = False  # the empty part that stands in for the missing parts of a multipart

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart" and bool(self.children)

    @property
    def is_message(self) -> bool:
        return self.maintype == "message" and self.subtype in ("rfc822", "global") and bool(self.children)


_Mark = tuple[int, int, int]  # (file offset, wire offset, line ends read)


class _Reader:
    """Lines of a binary file, with a one-line pushback and both offset kinds tracked."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0
        self.wire = 0
        self.lines = 0  # line ends (LF) read
        self.last_eol = 0  # file octets of the end of the last line read: 2 CRLF, 1 LF, 0 none
        self._at_line_start = True
        self._prev_cr = False
        self._saved: tuple[int, int, int, int, bool, bool] | None = None
        self._pushed: bytes | None = None

    def readline(self) -> tuple[bytes, bool] | None:
        """(piece, starts_a_line), or None at the end. Long lines come in pieces; only a piece at the
        start of a line can be a delimiter or the blank line ending a header block."""
        if self._pushed is not None:
            chunk, self._pushed = self._pushed, None
        else:
            chunk = self._f.readline(READ_LIMIT)
            if not chunk:
                return None
        starts = self._at_line_start
        self._saved = (self.pos, self.wire, self.lines, self.last_eol, self._at_line_start, self._prev_cr)
        self.pos += len(chunk)
        self.wire += len(chunk) + _bare_lfs(chunk, self._prev_cr)
        if chunk.endswith(b"\n"):
            self.lines += 1
            self.last_eol = 2 if chunk.endswith(b"\r\n") or (chunk == b"\n" and self._prev_cr) else 1
            self._at_line_start = True
        else:
            self.last_eol = 0
            self._at_line_start = False
        self._prev_cr = chunk.endswith(b"\r")
        self._last = chunk
        return chunk, starts

    def header_block(self, delimiters: bool) -> bytes | None:
        """At the start of a line: the header block from here, consumed in one read up to and
        including the blank line that ends it (or the end of the file); returned without that
        line. What reading it line by line would give, in a tenth of the time. None, with nothing
        consumed, when that is not certain: the block is longer than HEADER_PROBE, or (with
        `delimiters`: inside a multipart) it holds a line starting with "--" that may be a
        delimiter ending the part early. The caller then reads line by line."""
        if self._pushed is not None or not self._at_line_start:
            return None
        probe = self._f.read(HEADER_PROBE)
        if probe[:1] == b"\n" or probe[:2] == b"\r\n":
            blank, end = 0, 1 if probe[:1] == b"\n" else 2  # no fields: the blank line comes first
        else:
            found = _BLANK_LINE.search(probe)
            if found is not None:
                blank, end = found.start() + 1, found.end()
            elif len(probe) < HEADER_PROBE:
                blank = end = len(probe)  # no blank line: the header runs to the end of the file
            else:
                blank = -1
        header = probe[:blank]
        if blank < 0 or (delimiters and (header.startswith(b"--") or header.find(b"\n--") >= 0)):
            self._f.seek(self.pos)
            return None
        self._consume(probe[:end])
        self._f.seek(self.pos)
        return header

    def skip_lines(self, boundaries: list[bytes]) -> None:
        """Move quickly over text that holds no delimiter line of `boundaries`, reading in blocks: a
        50 MB attachment is crossed without a Python step per line. Stops just before the next
        delimiter line, or a line starting with "--" that is not whole in the block, or at the end.
        Other lines starting with "--" are passed over in the block, by a pattern: stopping at each
        made a body of such lines cost a block's read per line (2 MB of them, 2.6 s of CPU per FETCH
        BODY[1]; a sender can mail 50 MB)."""
        if self._pushed is not None:
            return
        while True:
            block = self._f.read(SKIP_BLOCK)
            if not block:
                return
            stop = self._next_stop(block, boundaries) if boundaries else -1
            if stop >= 0:
                take = block[:stop]
            elif len(block) == SKIP_BLOCK:
                take = block[:-2]  # a "\n-" or "\r\n" may continue in the next block
            else:
                take = block
            self._consume(take)
            self._f.seek(self.pos)
            if stop >= 0 or len(block) < SKIP_BLOCK:
                return

    def _next_stop(self, block: bytes, boundaries: list[bytes]) -> int:
        """Where in `block` skip_lines stops: the first line that is a delimiter of `boundaries`, or
        the last line when it starts with "--" and may run on past the block (-1: none)."""
        at_start, after_lf = _delimiter_lines(tuple(boundaries))
        if self._at_line_start and at_start.match(block):
            return 0
        found = after_lf.search(block)
        if found is not None:
            return found.start() + 1
        tail = block.rfind(b"\n") + 1
        return tail if (tail or self._at_line_start) and block.startswith(b"--", tail) else -1

    def _consume(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._saved = None
        self.pos += len(chunk)
        self.wire += len(chunk) + _bare_lfs(chunk, self._prev_cr)
        self.lines += chunk.count(b"\n")
        if chunk.endswith(b"\n"):
            self.last_eol = 2 if chunk.endswith(b"\r\n") or (chunk == b"\n" and self._prev_cr) else 1
            self._at_line_start = True
        else:
            self.last_eol = 0
            self._at_line_start = False
        self._prev_cr = chunk.endswith(b"\r")

    def push_back(self) -> None:
        """Un-read the line just read (a delimiter that ends the enclosing parts too)."""
        assert self._saved is not None
        self.pos, self.wire, self.lines, self.last_eol, self._at_line_start, self._prev_cr = self._saved
        self._saved = None
        self._pushed = self._last


@lru_cache(maxsize=64)
def _delimiter_lines(boundaries: tuple[bytes, ...]) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """Patterns for a delimiter line of any of `boundaries` (what _Scan.delimiter takes: the
    boundary, perhaps "--", trailing white space) at the start of a block, and after a line end."""
    line = rb"(?:" + rb"|".join(re.escape(b) for b in boundaries) + rb")(?:--)?[ \t\r]*(?:\n|\Z)"
    return re.compile(line), re.compile(rb"\n" + line)


def _bare_lfs(chunk: bytes, prev_cr: bool) -> int:
    lfs = chunk.count(b"\n")
    if not lfs:
        return 0
    bare = lfs - chunk.count(b"\r\n")
    if prev_cr and chunk.startswith(b"\n"):
        bare -= 1
    return bare


class _Scan:
    def __init__(self, f: BinaryIO) -> None:
        self.r = _Reader(f)
        self.parts = 0

    @staticmethod
    def delimiter(item: tuple[bytes, bool], boundaries: list[bytes]) -> tuple[int, bool] | None:
        """(index into `boundaries`, is the close delimiter) when this line is a delimiter line of
        one of the enclosing multiparts (RFC 2046 5.1.1; trailing white space is allowed)."""
        line, starts = item
        if not starts or not boundaries or not line.startswith(b"--"):
            return None
        text = line.rstrip(_LWSP)
        for i in range(len(boundaries) - 1, -1, -1):
            b = boundaries[i]
            if text == b:
                return i, False
            if len(text) == len(b) + 2 and text.startswith(b) and text.endswith(b"--"):
                return i, True
        return None

    def part(self, boundaries: list[bytes], depth: int, default_type: str) -> tuple[Part, bool]:  # noqa: C901  one MIME entity reader (RFC 2046 5.1); its cases are the delimiter states
        """Read one entity up to (not including) the next delimiter of an enclosing multipart, or the
        end. Returns the part and whether a delimiter stopped it (pushed back for the caller)."""
        r = self.r
        self.parts += 1
        h_start, h_wire = r.pos, r.wire
        header = bytearray()
        stopped = False
        block = r.header_block(bool(boundaries))
        while block is None:
            item = r.readline()
            if item is None:
                break
            if self.delimiter(item, boundaries) is not None:
                r.push_back()
                stopped = True
                break
            line, starts = item
            if starts and line in (b"\r\n", b"\n"):
                break
            if len(header) + len(line) <= MAX_HEADER_OCTETS:
                header += line
        header_end = (r.pos, r.wire)
        headers, (maintype, subtype) = part_header(bytes(header) if block is None else block, default_type, depth)
        body_start, body_wire, lines_before = r.pos, r.wire, r.lines
        floor: _Mark = (r.pos, r.wire, r.lines)  # a body never ends before this
        children: list[Part] = []
        room = depth < MAX_MIME_DEPTH and self.parts < MAX_MIME_PARTS
        if stopped:
            pass
        elif maintype == "multipart" and room and (boundary := _boundary(headers)):
            delimiter = b"--" + boundary
            child_default = "message/rfc822" if subtype == "digest" else "text/plain"
            stopped, closed_at = self.multipart(delimiter, boundaries, depth, child_default, children)
            if closed_at is not None:
                # The close delimiter's own line end stays in the body; only an epilogue can give
                # up the line end that precedes an enclosing delimiter (Dovecot agrees).
                floor = closed_at
        elif maintype == "message" and subtype in ("rfc822", "global") and room and not _encoded(headers):
            child, stopped = self.part(boundaries, depth + 1, "text/plain")
            children.append(child)
        else:
            stopped = self.leaf(boundaries)
        # RFC 2046 5.1.1: the line end before a delimiter belongs to the delimiter, so it is not in
        # the body, nor counted as one of its lines (lines are line ends, as Dovecot counts them).
        end, wire_end, lines = r.pos, r.wire, r.lines - lines_before
        if stopped and r.last_eol:
            end, wire_end, lines = r.pos - r.last_eol, r.wire - 2, lines - 1
            if end < floor[0]:
                if floor[0] > body_start:
                    end, wire_end, lines = floor[0], floor[1], floor[2] - lines_before
                else:
                    # An empty body right before a delimiter: the line end was the header's last.
                    header_end = max((end, wire_end), (h_start, h_wire))
                    end, wire_end, lines = header_end[0], header_end[1], 0
                    body_start, body_wire = end, wire_end
        header_span = Span(h_start, header_end[0], h_wire, header_end[1])
        body = Span(body_start, end, body_wire, wire_end)
        return _made_part(header_span, body, headers, (maintype, subtype), lines, children, room), stopped

    def multipart(self, delimiter: bytes, outer: list[bytes], depth: int, child_default: str,
                  children: list[Part]) -> tuple[bool, _Mark | None]:
        """Preamble, body parts, epilogue. Returns whether an enclosing delimiter ended it, and where
        the close delimiter line ended (None when there was none)."""
        r = self.r
        stack = [*outer, delimiter]
        mine = len(outer)
        closed = False
        while not closed:  # the preamble, up to the first delimiter of this multipart
            r.skip_lines(stack)
            item = r.readline()
            if item is None:
                return False, None
            hit = self.delimiter(item, stack)
            if hit is None:
                continue
            if hit[0] < mine:
                r.push_back()
                return True, None
            closed = hit[1]
            break
        while not closed and self.parts < MAX_MIME_PARTS:  # body parts, each ended by a delimiter
            child, stopped = self.part(stack, depth + 1, child_default)
            children.append(child)
            if not stopped:
                return False, None
            item = r.readline()
            assert item is not None
            hit = self.delimiter(item, stack)
            assert hit is not None
            if hit[0] < mine:
                r.push_back()
                return True, None
            closed = hit[1]
        closed_at: _Mark | None = (r.pos, r.wire, r.lines) if closed else None
        return self.leaf(outer), closed_at  # the epilogue, up to an enclosing delimiter or the end

    def leaf(self, boundaries: list[bytes]) -> bool:
        """Skip a body up to the next enclosing delimiter (pushed back) or the end."""
        r = self.r
        while True:
            r.skip_lines(boundaries)
            item = r.readline()
            if item is None:
                return False
            if self.delimiter(item, boundaries) is not None:
                r.push_back()
                return True


def _made_part(header: Span, body: Span, headers: Message, media: tuple[str, str], lines: int,
               children: list[Part], room: bool) -> Part:
    """The Part a scan found, a multipart without parts made one (both scans)."""
    maintype, subtype = media
    if maintype == "multipart" and not children:
        if not room:
            # Past the nesting or part bound: one opaque text leaf (its text is still searched).
            maintype, subtype = "text", "plain"
        else:
            # RFC 2046 5.1.1 needs a boundary and at least one part, and BODYSTRUCTURE cannot
            # describe an empty multipart. Dovecot keeps the multipart with one empty text/plain
            # part (BODY[1] and BODY[1.MIME] empty); clients already know that answer.
            children.append(_empty_part(body))
    return Part(header, body, headers, maintype, subtype, lines, children)


class _Doubtful(Exception):
    """A message _MemoryScan leaves to the line reader (_Scan)."""


class _MemoryScan:
    """_Scan's walk over a message in memory whose lines all end in CRLF, where it comes down to a
    few searches in C per part: file and wire offsets are the same, line ends are counted once per
    part, delimiter lines are found by bytes.find. Only the cases where _Scan reads a header block
    in one probe (_Reader.header_block) are taken; anything else (a header longer than a probe, one
    holding a line that may be a delimiter, a candidate delimiter line longer than a read) raises
    _Doubtful and the message is scanned by _Scan, so the Part tree is always _Scan's own (issue 19:
    the line reader was half of describing a message for the message cache)."""

    def __init__(self, data: bytes, line_ends: int) -> None:
        self.data = data
        self.line_ends = line_ends  # data.count(b"\n")
        self.pos = 0
        self.parts = 0

    def part(self, boundaries: list[bytes], depth: int, default_type: str) -> tuple[Part, bool]:
        """_Scan.part: one entity up to the next enclosing delimiter (self.pos left at its line) or the end."""
        data = self.data
        self.parts += 1
        h_start = self.pos
        header = self.header_block(bool(boundaries))
        headers, (maintype, subtype) = part_header(header, default_type, depth)
        body_start = floor = self.pos
        children: list[Part] = []
        room = depth < MAX_MIME_DEPTH and self.parts < MAX_MIME_PARTS
        if maintype == "multipart" and room and (boundary := _boundary(headers)):
            child_default = "message/rfc822" if subtype == "digest" else "text/plain"
            stopped, closed_at = self.multipart(b"--" + boundary, boundaries, depth, child_default, children)
            if closed_at is not None:
                floor = closed_at  # (see _Scan.part)
        elif maintype == "message" and subtype in ("rfc822", "global") and room and not _encoded(headers):
            child, stopped = self.part(boundaries, depth + 1, "text/plain")
            children.append(child)
        else:
            stopped = self.leaf(boundaries)
        end, header_end = self.pos, body_start
        if stopped:
            # The CRLF before the delimiter line is the delimiter's (RFC 2046 5.1.1); as in _Scan.part.
            end -= 2
            if end < floor:
                if floor > body_start:
                    end = floor
                else:
                    header_end = end = body_start = max(end, h_start)
        # A body to the end (a message's own, nearly always) as the message's line ends less those
        # before it: a count of its header instead of its body (counting was a tenth of describing).
        lines = (self.line_ends - data.count(b"\n", 0, body_start) if end == len(data)
                 else data.count(b"\n", body_start, end))
        return _made_part(Span(h_start, header_end, h_start, header_end), Span(body_start, end, body_start, end),
                          headers, (maintype, subtype), lines, children, room), stopped

    def header_block(self, delimiters: bool) -> bytes:
        """_Reader.header_block from memory: the block without its blank line, self.pos after it."""
        data, pos = self.data, self.pos
        if data.startswith(b"\r\n", pos):
            self.pos = pos + 2
            return b""
        found = data.find(b"\n\r\n", pos, pos + HEADER_PROBE)  # (no bare LF: no "\n\n")
        if found >= 0:
            blank, self.pos = found + 1, found + 3
        elif len(data) - pos < HEADER_PROBE:
            blank = self.pos = len(data)
        else:
            raise _Doubtful
        header = data[pos:blank]
        # (find, not `in`: bytes' `in` first tries its operand as an integer and clears the error.)
        if delimiters and (header.startswith(b"--") or header.find(b"\n--") >= 0):
            raise _Doubtful
        return header

    def multipart(self, delimiter: bytes, outer: list[bytes], depth: int, child_default: str,
                  children: list[Part]) -> tuple[bool, int | None]:
        """_Scan.multipart; the close delimiter's end is a file offset."""
        stack = [*outer, delimiter]
        mine = len(outer)
        found = self.next_delimiter(stack)
        if found is None:
            return False, None
        index, closed, line_end = found
        if index < mine:
            return True, None
        self.pos = line_end
        while not closed and self.parts < MAX_MIME_PARTS:
            child, stopped = self.part(stack, depth + 1, child_default)
            children.append(child)
            if not stopped:
                return False, None
            hit = self.delimiter_at(self.pos, stack)
            assert hit is not None
            index, closed, line_end = hit
            if index < mine:
                return True, None
            self.pos = line_end
        closed_at = self.pos if closed else None
        return self.leaf(outer), closed_at

    def leaf(self, boundaries: list[bytes]) -> bool:
        """Up to the next enclosing delimiter line (self.pos at it) or the end."""
        return self.next_delimiter(boundaries) is not None

    def next_delimiter(self, boundaries: list[bytes]) -> tuple[int, bool, int] | None:
        """The first delimiter line of `boundaries` from self.pos (which is left at it, or at the
        end): (index into `boundaries`, is the close delimiter, where its line ends)."""
        data = self.data
        at = self.pos
        if boundaries:
            if at and data[at - 1] != 10:  # not at a line start: the next one
                at = data.find(b"\n", at) + 1 or len(data)
            while at < len(data):
                hit = self.delimiter_at(at, boundaries)
                if hit is not None:
                    self.pos = at
                    return hit
                at = data.find(b"\n--", at) + 1 or len(data)
        self.pos = len(data)
        return None

    def delimiter_at(self, at: int, boundaries: list[bytes]) -> tuple[int, bool, int] | None:
        """_Scan.delimiter of the line starting at `at`, with where that line ends."""
        data = self.data
        if not data.startswith(b"--", at):
            return None
        end = data.find(b"\n", at) + 1 or len(data)
        if end - at > READ_LIMIT:
            raise _Doubtful  # _Reader would read it in pieces
        # _Scan.delimiter of a whole line, inlined (a call and two tuples a line, issue 19).
        text = data[at:end].rstrip(_LWSP)
        for i in range(len(boundaries) - 1, -1, -1):
            b = boundaries[i]
            if text == b:
                return i, False, end
            if len(text) == len(b) + 2 and text.startswith(b) and text.endswith(b"--"):
                return i, True, end
        return None


def crlf_line_ends(data: bytes) -> int | None:
    """The line ends of `data` when every one is a CRLF (no bare LF), else None."""
    lfs = data.count(b"\n")
    return lfs if lfs == data.count(b"\r\n") else None


def scan_bytes(data: bytes, line_ends: int | None = None, *, counted: bool = False) -> Part:
    """scan() of a message in memory: the same Part tree, mostly by _MemoryScan. With `counted`,
    `line_ends` is crlf_line_ends(data), which the caller knows."""
    if not counted:
        line_ends = crlf_line_ends(data)
    if line_ends is not None:
        try:
            return _MemoryScan(data, line_ends).part([], 0, "text/plain")[0]
        except _Doubtful:
            pass
    return scan(io.BytesIO(data))


def _empty_part(parent_body: Span) -> Part:
    at = Span(parent_body.end, parent_body.end, parent_body.wire_end, parent_body.wire_end)
    return Part(at, at, Message(), "text", "plain", 0, placeholder=True)


def _boundary(headers: Message) -> bytes:
    value: str | tuple[str | None, str | None, str] | None = _plain_boundary(headers.get("Content-Type"))
    if value is None:
        value = headers.get_param("boundary")
    if isinstance(value, tuple):  # RFC 2231 encoded boundary: unusual, but the value is plain
        value = value[2]
    if not isinstance(value, str):
        return b""
    # A folded header keeps its line break inside a quoted value ("foo\r\n bar"); RFC 5322 2.2.3
    # unfolding removes the CRLF and keeps the space, so the delimiter lines read "--foo bar".
    value = unfold(value)
    if not value:
        return b""
    return value.encode("ascii", "surrogateescape")[:200]  # RFC 2046: at most 70 characters


def _plain_boundary(content_type: str | None) -> str | None:
    """get_param("boundary") of the usual Content-Type, "type; boundary=value" (one parameter, no
    quote, "=" or backslash elsewhere), without its general parse: compat32's _parseparam and
    decode_params then come down to email.utils.unquote of the stripped value (decode_params'
    quote and get_param's unquote undo each other without a backslash). None: ask get_param."""
    if content_type is None or "\\" in content_type:
        return None
    kind, semicolon, param = content_type.partition(";")
    if not semicolon or ";" in param or '"' in kind or "=" in kind:
        return None
    name, equals, text = param.partition("=")
    if not equals or name.strip().lower().strip() != "boundary":
        return None
    return unquote(text.strip())


def _encoded(headers: Message) -> bool:
    # RFC 2046 5.2.1: message/rfc822 is 7bit, 8bit or binary; base64 or quoted-printable content
    # (seen in the wild) cannot be walked as a message and is served as an opaque body.
    cte = (headers.get("Content-Transfer-Encoding") or "").strip().lower()
    return cte in ("base64", "quoted-printable")


def part_header(block: bytes, default_type: str, depth: int) -> tuple[Message, tuple[str, str]]:
    """The parsed header block of a part (its default type set) and the media type the scan goes
    by. A body part's short block comes from _shared_header: the same few blocks
    ("Content-Type: text/plain; charset=utf-8") head the parts of message after message, and
    parsing each again was a tenth of describing one (issue 19). A message's own header (depth 0,
    or an encapsulated one's, unique to it) is parsed as it is."""
    if depth and len(block) <= SHARED_HEADER_OCTETS:
        return _shared_header(block, default_type)
    return _parsed_header(block, default_type)


SHARED_HEADER_OCTETS = 256  # longer body part headers are parsed each time (few repeat)


def _parsed_header(block: bytes, default_type: str) -> tuple[Message, tuple[str, str]]:
    headers = parse_header(block)
    headers.set_default_type(default_type)
    return headers, _content_type(headers)


# A short body part header's, kept: a Headers is read-only, so one parse serves every part with the same block.
_shared_header = caches.emptied_with_folders(lru_cache(maxsize=512)(_parsed_header))


def _content_type(headers: Message) -> tuple[str, str]:
    ctype = headers.get_content_type()  # the default (text/plain or message/rfc822) when invalid
    maintype, _, subtype = ctype.partition("/")
    return maintype, subtype


def scan(f: BinaryIO) -> Part:
    """The structure of the message in `f` (read from its current position, which must be 0)."""
    part, _ = _Scan(f).part([], 0, "text/plain")
    return part


def top_header_block(f: BinaryIO) -> bytes | None:
    """The message's own header block with the blank line that ends it (the octets of scan_header's
    `root.header`, which BODY[HEADER.FIELDS ...] reads again), in one read from the start of `f`;
    None when one probe does not hold it (a header longer than HEADER_PROBE): scan the file then.
    The same cases as _Reader.header_block at the top level: a message list (Thunderbird's first
    fetch) asks for nothing else, and locating the block with a reader, then reading it again, was
    a third of answering it (issue 19)."""
    return header_block_of(f.read(HEADER_PROBE))


def header_block_of(probe: bytes) -> bytes | None:
    """top_header_block of a message whose first HEADER_PROBE octets (all of it when shorter) are `probe`."""
    if probe[:1] == b"\n":
        return probe[:1]  # no fields: the blank line comes first
    if probe[:2] == b"\r\n":
        return probe[:2]
    found = _BLANK_LINE.search(probe)
    if found is not None:
        return probe[:found.end()]
    return probe if len(probe) < HEADER_PROBE else None  # (shorter: no blank line, all header)


def scan_header(f: BinaryIO, *, fields: bool = True) -> Part:
    """Only the top-level header block (enough for ENVELOPE and BODY[HEADER.FIELDS ...], what most
    clients fetch for a message list): the body is not walked, `complete` and `ended` are False.
    Without `fields` the block is only located, not parsed (`headers` empty, the type text/plain):
    enough for BODY[HEADER...], which reads the block again from the file."""
    return _top_header(_Reader(f), fields)


def scan_top(f: BinaryIO, *, fields: bool = True) -> Part:
    """scan_header, and the body's span to the end of the file (`ended`), its octets and wire octets
    counted in blocks (skip_lines, no Python step per line) without walking its parts: what BODY[],
    BODY[TEXT], RFC822 and RFC822.TEXT read (fetch.needs_walk). scan() gives the same spans for
    them: at the top no enclosing delimiter can end the body, so it runs to the end of the file.
    A client downloading a message (BODY.PEEK[]) made the whole MIME walk, part headers and a
    delimiter pattern compiled for each multipart's boundary, for two numbers (issue 19)."""
    r = _Reader(f)
    top = _top_header(r, fields)
    r.skip_lines([])
    body = Span(top.body.start, r.pos, top.body.wire_start, r.wire)
    return Part(top.header, body, top.headers, top.maintype, top.subtype, 0, [], complete=False)


def _top_header(r: _Reader, fields: bool) -> Part:
    header = bytearray()
    block = r.header_block(False)
    while block is None:
        item = r.readline()
        if item is None:
            break
        line, starts = item
        if starts and line in (b"\r\n", b"\n"):
            break
        if len(header) + len(line) <= MAX_HEADER_OCTETS:
            header += line
    headers = parse_header(bytes(header) if block is None else block) if fields else Headers([])
    maintype, subtype = _content_type(headers)
    end = Span(r.pos, r.pos, r.wire, r.wire)
    return Part(Span(0, r.pos, 0, r.wire), end, headers, maintype, subtype, 0, [], complete=False, ended=False)


_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def unfold(value: str) -> str:
    """RFC 5322 2.2.3: a folded header value with its line breaks removed."""
    if "\n" not in value and "\r" not in value:
        return value  # most values: one line
    return _UNFOLD.sub("", value).replace("\r", "").replace("\n", "")


def decode_words(value: str) -> str:
    """A header value with folding removed and RFC 2047 encoded words decoded; raw 8-bit text read
    as UTF-8 (what it is in practice)."""
    text = unfold(value)
    if text.isascii():
        if "=?" not in text:
            return text  # no encoded word: what make_header(decode_header(text)) gives, ten times faster
        fast = _utf8_words(text)
        if fast is not None:
            return fast
    if any(codec_name(charset) in NOT_CHARSETS for charset, _, _ in _ENCODED_WORD.findall(text)):
        return text  # the stdlib would raise after it tried: such a word is left as written, as below
    try:
        decoded = str(make_header(decode_header(text)))
    except Exception:  # noqa: BLE001  malformed encoded words: search the text as written
        decoded = text
    return decoded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# Python codecs a message may name as a charset (a body's or an encoded word's) that are no charsets:
# 'undefined' raises whatever the error handler, 'idna' takes no handler but strict, and 'punycode'
# raises too, after quadratic time (1.2 s for 200 KB, hours for the 8 MiB the text index reads).
NOT_CHARSETS = frozenset({"undefined", "idna", "punycode"})


def codec_name(charset: str) -> str | None:
    """The Python codec a charset's name finds, by its own name; None when none (or a NUL in it)."""
    try:
        return codecs.lookup(charset).name
    except (LookupError, ValueError):
        return None


# email.header's own pattern (not in typeshed), so the words found are the ones decode_header finds.
_ENCODED_WORD: re.Pattern[str] = email.header.ecre  # type: ignore[attr-defined]
_HEX = frozenset("0123456789abcdefABCDEF")
_LINE_BREAKS = re.compile(r"[\x0b\x0c\x1c-\x1e]")  # what str.splitlines breaks ASCII at, beyond CR and LF


def _utf8_words(text: str) -> str | None:
    """str(make_header(decode_header(text))) for one line of ASCII whose encoded words are all UTF-8,
    the stdlib's steps without its Header and Charset objects (about 7 us against 20-25 for a
    subject with one encoded word: a seventh of the bench corpus's subjects, 8 % of describing a
    message for the message cache, issue 19). None: anything else (another charset, a base64 or
    UTF-8 error), left to the stdlib."""
    if _LINE_BREAKS.search(text):
        return None
    parts = _ENCODED_WORD.split(text)
    if len(parts) == 1:
        return text  # no encoded word after all: decode_header gives the text as it is
    words = _utf8_encoded_words(parts)
    chunks = _chunks(words) if words is not None else None
    return _joined(chunks) if chunks is not None else None


def _utf8_encoded_words(parts: list[str]) -> list[tuple[str, str | None]] | None:
    """decode_header's (text, encoding) words of ecre.split's `parts`, the first unencoded text
    stripped in front, whitespace between two encoded words dropped; None: a word not in UTF-8."""
    words: list[tuple[str, str | None]] = []
    for n in range(0, len(parts), 4):
        unencoded = parts[n].lstrip() if n == 0 else parts[n]
        if unencoded:
            words.append((unencoded, None))
        if n + 3 < len(parts):
            if parts[n + 1].lower() != "utf-8":
                return None
            words.append((parts[n + 3], parts[n + 2].lower()))
    return [w for n, w in enumerate(words)
            if not (0 < n < len(words) - 1 and w[0].isspace() and words[n - 1][1] and words[n + 1][1])]


def _chunks(words: list[tuple[str, str | None]]) -> list[tuple[str, bool]] | None:
    """decode_header's runs: encoded words decoded and joined into one UTF-8 chunk, unencoded ones
    into one joined by spaces; each as text, with whether it was encoded. None: a base64 or UTF-8
    error (the stdlib raises)."""
    chunks: list[tuple[bytes, bool]] = []
    for word, encoding in words:
        if encoding is None:
            octets = word.encode("ascii")
        elif encoding == "q":
            octets = _q_decoded(word)
        else:
            try:
                octets = binascii.a2b_base64((word + "==="[:(4 - len(word) % 4) % 4]).encode("ascii"))
            except binascii.Error:
                return None
        encoded = encoding is not None
        if chunks and chunks[-1][1] == encoded:
            chunks[-1] = (chunks[-1][0] + (octets if encoded else b" " + octets), encoded)
        else:
            chunks.append((octets, encoded))
    try:
        return [(octets.decode("utf-8" if encoded else "ascii"), encoded) for octets, encoded in chunks]
    except UnicodeDecodeError:
        return None


def _joined(chunks: list[tuple[str, bool]]) -> str:
    """Header.__str__: a space where an encoded chunk meets an unencoded one without a blank (or a
    parenthesis, a backslash) on its side."""
    out: list[str] = []
    last_encoded = False
    last_space: bool | str = False
    for string, encoded in chunks:
        if out:
            if last_encoded:
                if not encoded and not (string and _nonctext(string[0])):
                    out.append(" ")
            elif encoded and not last_space:
                out.append(" ")
        last_space = string and _nonctext(string[-1])
        last_encoded = encoded
        out.append(string)
    return "".join(out)


def _nonctext(char: str) -> bool:
    return char.isspace() or char in "()\\"


_NOT_AN_ESCAPE = re.compile(r"=(?![0-9A-Fa-f]{2})")


def _q_decoded(word: str) -> bytes:
    """email.quoprimime.header_decode's octets: _ a space, each =XX (hex) its octet, anything else
    as it is. In C when every = starts an =XX (binascii's header mode also reads a lone = as a soft
    line break)."""
    if not _NOT_AN_ESCAPE.search(word):
        return binascii.a2b_qp(word.encode("ascii"), header=True)
    pieces = word.replace("_", " ").split("=")
    out = [pieces[0].encode("ascii")]
    for piece in pieces[1:]:
        if len(piece) >= 2 and piece[0] in _HEX and piece[1] in _HEX:
            out.append(bytes((int(piece[:2], 16),)))
            out.append(piece[2:].encode("ascii"))
        else:
            out.append(b"=" + piece.encode("ascii"))
    return b"".join(out)


def _leaves(part: Part) -> Iterator[Part]:
    if part.children:
        for child in part.children:
            yield from _leaves(child)
    elif not part.placeholder:
        yield part


_CTE_FIELD = re.compile(rb"^Content-Transfer-Encoding[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*", re.IGNORECASE | re.MULTILINE)
_BASE64_LINE = 76  # RFC 2045 6.8: encoded lines of at most 76 characters


def base64_for_nul(data: bytes | bytearray) -> bytes | bytearray:
    """The message with every part whose content holds a NUL re-encoded as base64 (RFC 3516 4.4: an
    APPEND of binary content may be stored in another encoding). IMAP cannot send a NUL in a
    literal (RFC 3501 9), so BODY[] would otherwise have no faithful answer; BINARY[] still decodes
    the original octets. Dovecot does the same. Other parts and the header text stay as they are."""
    if b"\0" not in data:
        return data
    out = bytearray()
    done = 0
    for leaf in _leaves(scan(io.BytesIO(data))):
        body = data[leaf.body.start:leaf.body.end]
        if b"\0" not in body:
            continue
        header = _CTE_FIELD.sub(b"", data[leaf.header.start:leaf.header.end])
        cut = len(header) - (2 if header.endswith(b"\r\n") else 1 if header.endswith(b"\n") else 0)
        encoded = base64.b64encode(body)
        out += data[done:leaf.header.start] + header[:cut] + b"Content-Transfer-Encoding: base64\r\n" + header[cut:]
        out += b"\r\n".join(encoded[i:i + _BASE64_LINE] for i in range(0, len(encoded), _BASE64_LINE))
        done = leaf.body.end
    return bytes(out + data[done:])
