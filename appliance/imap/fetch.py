"""What FETCH sends for one message: ENVELOPE, BODY/BODYSTRUCTURE and BODY[section]<partial>.

Pure functions over a scanned structure (mime.py) and the open message file; no store, no asyncio.
Section contents that are large stay in the file and go out as FileSlice literals, read in chunks
while the server writes them (RFC 3501 6.4.5, 7.4.2).
"""

from __future__ import annotations

import binascii
import datetime as dt
import re
from collections.abc import Callable, Iterator, Sequence
from email.message import Message
from functools import lru_cache
from typing import BinaryIO, NamedTuple, Protocol

from appliance import address_list, caches
from appliance.imap.commands import BinarySection, BodySection, FetchAttribute, FetchItem, Section
from appliance.imap.limits import MAX_HEADER_OCTETS
from appliance.imap.mime import Headers, Part, Span, scan, scan_header, scan_top, unfold
from appliance.imap.responses import (
    MAX_QUOTED_OCTETS,
    Atom,
    Literal8Bytes,
    LiteralBytes,
    Raw,
    Streamed,
    Value,
    render_value,
    without_nul,
)

CHUNK = 256 * 1024  # octets read from the file per write
INLINE_LITERAL = 256 * 1024  # section contents up to this size are read into memory at once
_BARE_LF = re.compile(rb"(?<!\r)\n")
_ATTRIBUTE_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&+^`|")
MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MISSING_MAILBOX = "MISSING_MAILBOX"  # Dovecot's placeholders, which clients already know
MISSING_DOMAIN = "MISSING_DOMAIN"


def to_crlf(chunk: bytes, prev_cr: bool) -> bytes:
    """Bare LF written as CRLF; `prev_cr` says the previous chunk ended in CR (a CRLF cut in two)."""
    if chunk.count(b"\n") == chunk.count(b"\r\n") and not (prev_cr and chunk.startswith(b"\n")):
        return chunk  # CRLF already (nearly always): two counts in C instead of a regex pass
    out = _BARE_LF.sub(b"\r\n", chunk)
    if prev_cr and chunk.startswith(b"\n"):
        out = out[1:]
    return out


def raw(value: str) -> bytes:
    """A header value as the octets on disk (the parser kept 8-bit octets as surrogate escapes)."""
    return value.encode("utf-8", "surrogateescape")


# --- reading regions -------------------------------------------------------------------------------

class Readable(Protocol):
    def seek(self, pos: int, whence: int = 0, /) -> int: ...
    def read(self, n: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


class FileSlice:
    """A region of a message file as IMAP literal content: CRLF line ends, optionally a partial.

    Owns the open file (the message's path changes with its flags, an open file does not) and closes
    it when the content has been read or `close()` is called."""

    def __init__(self, f: Readable, span: Span, partial: tuple[int, int] | None = None, *, text: bool = False) -> None:
        self._f = f
        self._span = span
        self._text = text  # a literal's content, not a literal8's: NUL as 0x80 (responses.without_nul)
        self._skip = 0
        size = span.wire_size
        if partial is not None:
            origin, count = partial
            self._skip = min(origin, size)
            size = max(0, min(count, size - origin))
        self._length = size

    @property
    def length(self) -> int:
        return self._length

    def chunks(self) -> Iterator[bytes]:
        try:
            chunks = _read_wire(self._f, self._span, self._skip, self._length)
            yield from map(without_nul, chunks) if self._text else chunks
        finally:
            self.close()

    def close(self) -> None:
        self._f.close()


def _read_wire(f: Readable, span: Span, skip: int, length: int) -> Iterator[bytes]:
    """`length` wire octets of `span`, starting `skip` wire octets in."""
    if length <= 0:
        return
    left = length
    if span.wire_size == span.end - span.start:
        # No bare LF in the region: wire octets are file octets, seek straight to them.
        f.seek(span.start + skip)
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError("message file shorter than its index says")
            left -= len(chunk)
            yield chunk
        return
    f.seek(span.start)
    file_left = span.end - span.start
    prev_cr = False
    while left:
        chunk = f.read(min(CHUNK, file_left))
        if not chunk:
            raise OSError("message file shorter than its index says")
        file_left -= len(chunk)
        wire = to_crlf(chunk, prev_cr)
        prev_cr = chunk.endswith(b"\r")
        if skip:
            cut = min(skip, len(wire))
            wire = wire[cut:]
            skip -= cut
        if wire:
            wire = wire[:left]
            left -= len(wire)
            yield wire


class _Unclosable:
    """A view of a file that FileSlice may 'close' without closing the file under it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def seek(self, pos: int, whence: int = 0, /) -> int:
        return self._f.seek(pos, whence)

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        pass


Reopen = Callable[[], BinaryIO]


def section_literal(f: BinaryIO, span: Span, partial: tuple[int, int] | None, reopen: Reopen | None) -> Value:
    """Small content inline; large content as a FileSlice on a handle from `reopen`, which the slice
    owns (so the caller's file can be closed independently of the write)."""
    probe = FileSlice(_Unclosable(f), span, partial)
    if probe.length <= INLINE_LITERAL or reopen is None:
        return LiteralBytes(b"".join(probe.chunks()))  # (its NUL replaced as it is sent)
    return Streamed(FileSlice(reopen(), span, partial, text=True))


# --- sections (RFC 3501 6.4.5) -----------------------------------------------------------------------

def locate(root: Part, path: tuple[int, ...]) -> tuple[Part, bool] | None:
    """The part a section path names, and whether it is a whole message (the top level or the
    message inside a message/rfc822 part). Part 1 of a non-multipart message is its body."""
    node, is_message = root, True
    for i, number in enumerate(path):
        if i and node.is_message and not is_message:
            node, is_message = node.children[0], True  # numbers after a message/rfc822 part go inside
        if node.is_multipart:
            if number > len(node.children):
                return None
            node, is_message = node.children[number - 1], False
        elif is_message and number == 1:
            is_message = False
        else:
            return None
    return node, is_message


def section_span(root: Part, section: Section) -> Span | None:
    """The region of the file a section names (None for HEADER.FIELDS, which is built, and for a
    part that does not exist)."""
    found = locate(root, section.part)
    if found is None:
        return None
    node, is_message = found
    text = section.text
    if text == "":
        if not section.part:
            return whole_message(root)  # BODY[]: the entire message
        return node.body
    if text == "MIME":
        return node.header
    # HEADER, TEXT and HEADER.FIELDS name a message: the top, or the one inside a message/rfc822 part.
    if section.part:
        if is_message or not node.is_message:
            return None
        node = node.children[0]
    if text == "HEADER" or text.startswith("HEADER.FIELDS"):
        return node.header
    return node.body


def whole_message(root: Part) -> Span:
    return Span(root.header.start, root.body.end, root.header.wire_start, root.body.wire_end)


def header_fields(header: bytes, fields: tuple[str, ...], exclude: bool) -> bytes:
    """RFC 3501 6.4.5 HEADER.FIELDS (.NOT): the named fields of a header block, in their order, with
    their continuation lines, then the blank line. Line ends are CRLF."""
    wanted = _wanted_names(fields)
    crlf = header.count(b"\r\n")
    if crlf == header.count(b"\n") == header.count(b"\r") and header.endswith(b"\r\n"):
        found = _crlf_header_fields(header, wanted, exclude)
        if found is not None:
            return found
    return _line_header_fields(header, wanted, exclude)


def _line_header_fields(header: bytes, wanted: frozenset[bytes], exclude: bool) -> bytes:
    """header_fields line by line: any line ends (bare CR or LF, a last line without one)."""
    out = bytearray()
    keep = False
    ended = False  # the block ends with its blank line (a message may have no body and no blank line)
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            ended = True
            break
        if not line.endswith(b"\n"):
            line += b"\r\n"
        if line[:1] in (b" ", b"\t"):
            if keep:
                out += line
            continue
        colon = line.find(b":")
        # A name with an octet above 127 matches no requested name (all ASCII, _wanted_names).
        keep = colon >= 0 and (line[:colon].strip().lower() in wanted) != exclude
        if keep:
            out += line
    if ended:
        out += b"\r\n"
    return to_crlf(bytes(out), False)


def _crlf_header_fields(header: bytes, wanted: frozenset[bytes], exclude: bool) -> bytes | None:
    """header_fields of a block with CRLF line ends only (no bare CR or LF) that ends in one, when
    not `exclude`: the wanted fields found with their continuation lines by one regex in C instead
    of a Python loop over the lines (issue 19: Thunderbird's first header list). None: ask the loop."""
    if exclude:
        return None
    if header.startswith(b"\r\n"):
        return b"\r\n"  # the blank line first: no fields
    blank = header.find(b"\r\n\r\n")
    ended = blank >= 0
    found = _fields_pattern(wanted).findall(header[:blank + 2] if ended else header)
    if ended:
        found.append(b"\r\n")
    return b"".join(found)


@lru_cache(maxsize=64)
def _fields_pattern(wanted: frozenset[bytes]) -> re.Pattern[bytes]:
    """The lines of the fields named in `wanted` and their continuation lines, in a block of CRLF
    lines: a field line does not start with a blank (that is a continuation), its name is what
    comes before its first colon, blanks around it aside as bytes.strip() drops them (a line's
    only other ones: VT and FF), compared case-insensitively (ASCII). A wanted name that no
    stripped name without a colon can be matches nothing, as in the loop."""
    names = sorted((name for name in wanted if name == name.strip() and b":" not in name), key=len, reverse=True)
    if not names:
        return re.compile(rb"(?!)")
    alternatives = b"|".join(re.escape(name) for name in names)
    return re.compile(rb"^(?![ \t])[ \t\x0b\x0c]*(?:" + alternatives + rb")[ \t\x0b\x0c]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                      re.MULTILINE | re.IGNORECASE)


@lru_cache(maxsize=64)
def _wanted_names(fields: tuple[str, ...]) -> frozenset[bytes]:
    """The requested field names, lower-cased as str.lower() does (which may turn a non-ASCII
    name into an ASCII one), as octets; a name that stays non-ASCII can match no field."""
    return frozenset(name.encode("ascii") for name in (f.lower() for f in fields) if name.isascii())


def body_section(f: BinaryIO, root: Part, item: BodySection, reopen: Reopen | None) -> Value:
    section = item.section
    span = section_span(root, section)
    if span is None:
        return LiteralBytes(b"")  # a part that does not exist is empty (as Dovecot answers)
    if section.text.startswith("HEADER.FIELDS"):
        return _fields_value(_read_header_block(f, span), item)
    return section_literal(f, span, item.partial, reopen)


def _fields_value(block: bytes, item: BodySection) -> LiteralBytes:
    """BODY[...HEADER.FIELDS (.NOT) ...]<partial> from the header block it names."""
    section = item.section
    data = header_fields(block, section.fields, section.text.endswith(".NOT"))
    if item.partial is not None:
        origin, count = item.partial
        data = data[origin:origin + count]
    return LiteralBytes(data)


def header_list_only(items: Sequence[FetchItem]) -> bool:
    """Whether every item is an index item or BODY[HEADER.FIELDS (.NOT) ...] of the message itself
    (not of a part): what a client's message list asks for, answered by header_list_values from
    the top header block alone (mime.top_header_block)."""
    return all((isinstance(i, BodySection) and not i.section.part and i.section.text.startswith("HEADER.FIELDS"))
               or (isinstance(i, FetchAttribute) and i.name in INDEX_ITEMS) for i in items)


def header_list_values(items: Sequence[FetchItem], facts: MessageFacts, block: bytes) -> list[tuple[str, Value]]:
    """item_values for items that are header_list_only, from the message's header block (with its
    blank line) instead of the file and its scan: the same values."""
    out: list[tuple[str, Value]] = []
    for item in items:
        if isinstance(item, BodySection):
            out.append((item.response_name(), _fields_value(block, item)))
        else:
            assert isinstance(item, FetchAttribute), "not a header list item"
            out.append((item.name, index_value(item.name, facts)))
    return out


def _read_header_block(f: BinaryIO, span: Span) -> bytes:
    f.seek(span.start)
    return f.read(min(span.end - span.start, MAX_HEADER_OCTETS))


# --- ENVELOPE (RFC 3501 7.4.2) ---------------------------------------------------------------------

def _nstring(headers: Message, name: str) -> Value:
    return _nstring_of(headers.get(name))


def _nstring_of(value: str | None) -> Value:
    return None if value is None else raw(unfold(value).strip())


def envelope(headers: Message) -> Value:
    from_ = addresses(headers, "From")
    sender = addresses(headers, "Sender") or from_
    reply_to = addresses(headers, "Reply-To") or from_
    return [
        _nstring(headers, "Date"),
        _nstring(headers, "Subject"),
        from_,
        sender,
        reply_to,
        addresses(headers, "To"),
        addresses(headers, "Cc"),
        addresses(headers, "Bcc"),
        _nstring(headers, "In-Reply-To"),
        _nstring(headers, "Message-ID"),
    ]


def envelope_text(headers: Message) -> bytes:
    """render_value(envelope(headers)), each value rendered as it is found instead of making the
    list first (every message cache row renders one, issue 19)."""
    from_ = _addresses_text(headers, "From")
    sender = _addresses_text(headers, "Sender")
    reply_to = _addresses_text(headers, "Reply-To")
    return b"(" + b" ".join([
        _nstring_text(headers, "Date"), _nstring_text(headers, "Subject"), from_,
        from_ if sender == b"NIL" else sender, from_ if reply_to == b"NIL" else reply_to,
        _addresses_text(headers, "To"), _addresses_text(headers, "Cc"), _addresses_text(headers, "Bcc"),
        _nstring_text(headers, "In-Reply-To"), _nstring_text(headers, "Message-ID"),
    ]) + b")"


def _nstring_text(headers: Message, name: str) -> bytes:
    value = headers.get(name)
    if value is None:
        return b"NIL"
    text = unfold(value).strip()
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text and len(text) <= MAX_QUOTED_OCTETS:
        # render_value's quoted string, without its regex and escaping passes: printable ASCII has
        # no octet a quoted string cannot carry (Date, Subject, Message-ID of nearly every message).
        return b'"' + text.encode("ascii") + b'"'
    return render_value(raw(text))


def _addresses_text(headers: Message, name: str) -> bytes:
    """render_value(addresses(headers, name)), without the Raw between (a field that is absent, the
    usual Sender, Reply-To, Cc and Bcc, is one look-up)."""
    values = headers.get_all(name)
    if not values:
        return b"NIL"
    if len(values) == 1:
        rendered = _address_list(unfold(values[0]))
    else:
        rendered = b"".join([_address_list(unfold(value)) for value in values])
    return b"(" + rendered + b")" if rendered else b"NIL"


def addresses(headers: Message, name: str) -> Value:
    """An address list as ENVELOPE wants it: ((name adl mailbox host)(...)) or NIL when empty
    (RFC 3501 9: the addresses follow each other without spaces)."""
    text = _addresses_text(headers, name)
    return None if text == b"NIL" else Raw(text)


@caches.emptied_with_folders
@lru_cache(maxsize=8192)
def _address_list(text: str) -> bytes:
    """The rendered addresses of one header value. Cached: a mailbox has the same From and To
    values over and over."""
    return b"".join([_envelope_address(entry) for entry in address_list.parse(text)])


def _envelope_address(entry: address_list.Entry) -> bytes:
    """One address structure as ENVELOPE renders it (RFC 3501 7.4.2), with Dovecot's placeholders
    for a missing mailbox or domain (the null address of bounces, "<joerg>"); rendered here rather
    than as a list through render_value, which was half the cost of a long address list."""
    name, route, mailbox, domain = entry
    if domain is None:  # a group's start (its name as the mailbox) or end
        return _GROUP_END if mailbox is None else b"(NIL NIL " + render_value(raw(mailbox)) + b" NIL)"
    return b"".join([b"(", render_value(raw(name)) if name else b"NIL", b" ",
                     b"NIL" if route is None else render_value(raw(route)), b" ",
                     _MISSING_MAILBOX if mailbox is None else render_value(raw(mailbox)), b" ",
                     render_value(raw(domain)) if domain else _MISSING_DOMAIN, b")"])


_GROUP_END = b"(NIL NIL NIL NIL)"
_MISSING_MAILBOX = render_value(MISSING_MAILBOX)
_MISSING_DOMAIN = render_value(MISSING_DOMAIN)


def first_mailbox(text: str) -> str:
    """The mailbox of the first address of an address list as ENVELOPE shows it, which for a group
    is the group's name (RFC 3501 7.4.2 group start): what SORT's FROM, TO and CC keys compare
    (RFC 5256 3), as Dovecot does."""
    found = address_list.parse(text, first=True)
    if found and not found[0].mailbox:  # a null address ("<>") or a group without a name
        found = address_list.parse(text)
    return next((entry.mailbox for entry in found if entry.mailbox), "")


def first_display(text: str) -> tuple[str, bool]:
    """RFC 5957 DISPLAYFROM/DISPLAYTO: of the first address, its display name, else its address
    (mailbox@host); a group gives its name as ENVELOPE's group start does. Raw header text (the
    caller decodes encoded words) and whether it is a display name."""
    found = address_list.parse(text, first=True)
    if not found:
        return "", False
    name, _, mailbox, domain = found[0]
    if domain is None:  # RFC 3501 7.4.2 group start: [NIL NIL name NIL]
        return mailbox or "", False
    if name and name.strip():
        return name, True
    mailbox = mailbox or MISSING_MAILBOX
    return (f"{mailbox}@{domain}" if domain else mailbox), False


def _text(value: Value) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value or "")


def strip_comments(text: str) -> str:
    """RFC 5322 3.2.2 comments removed (nested ones too, in one pass), quoted strings kept."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if not depth:
                out.append(ch)
            continue
        if quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


# --- BODY and BODYSTRUCTURE (RFC 3501 7.4.2) -------------------------------------------------------

def body_structure(part: Part, extensible: bool) -> Value:
    extended, basic = body_structures(part)
    return extended if extensible else basic


def body_structures(part: Part) -> tuple[Raw, Raw]:
    """BODYSTRUCTURE and BODY of a part in one walk (the message cache keeps both; they share the
    type, the parameters and every part's fields), each rendered (Raw)."""
    extended, basic = structure_texts(part)
    return Raw(extended), Raw(basic)


def structure_texts(part: Part) -> tuple[bytes, bytes]:
    """body_structures' texts (what the message cache keeps)."""
    if part.is_multipart:
        # Rendered as each child's answer is found: the children's texts joined, then the
        # multipart's own fields, with no list of values rendered again (issue 19).
        pairs = [structure_texts(c) for c in part.children]
        headers = part.headers
        subtype = render_value(_spelled_type(part)[1])
        extension = b" ".join([render_value(_params(headers) or None), render_value(_disposition(headers)),
                               render_value(_language(headers)), _nstring_text(headers, "Content-Location")])
        return (b"(" + b"".join([e for e, _ in pairs]) + b" " + subtype + b" " + extension + b")",
                b"(" + b"".join([b for _, b in pairs]) + b" " + subtype + b")")
    if part.maintype != "message" or part.subtype not in ("rfc822", "global"):
        # A leaf's answer is its size and lines between text that only its type and these fields
        # decide, and that repeats from message to message (text/plain; charset=utf-8): it is
        # rendered once (issue 19: the leaves' fields and their rendering were a fifth of describing
        # a message for the message cache).
        head, tail = _leaf_head_tail(part)
        counts = b"%d %d" % (part.body.wire_size, part.lines) if part.maintype == "text" else b"%d" % part.body.wire_size
        return head + counts + tail, head + counts + b")"
    extended, basic = _part_structures(part)
    return render_value(extended), render_value(basic)


def _leaf_head_tail(part: Part) -> tuple[bytes, bytes]:
    """_leaf_text of a leaf. A body part's parsed header is shared by every part with the same
    block (mime.part_header), so its text is kept on it: the next such part looks up no field."""
    headers = part.headers
    media = part.maintype, part.subtype
    if isinstance(headers, Headers):
        kept = headers.leaf_text
        if kept is not None and kept[0] == media:
            return kept[1]
        values = headers.first_values(_LEAF_FIELDS)
    else:
        values = [headers.get(name) for name in _LEAF_FIELDS]
    text = _leaf_text if sum(len(v) for v in values if v) <= LEAF_TEXT_KEY else _leaf_text.__wrapped__
    found = text(part.maintype, part.subtype, *values)
    if isinstance(headers, Headers):
        headers.leaf_text = media, found
    return found


# What a leaf's BODYSTRUCTURE says besides its size and lines (_part_structures); fields longer
# than LEAF_TEXT_KEY together are not kept in _leaf_text's memory.
_LEAF_FIELDS = ("content-type", "content-transfer-encoding", "content-id", "content-description", "content-md5",
                "content-disposition", "content-language", "content-location")
LEAF_TEXT_KEY = 1024


@caches.emptied_with_folders
@lru_cache(maxsize=1024)
def _leaf_text(maintype: str, subtype: str, *values: str | None) -> tuple[bytes, bytes]:
    """The BODYSTRUCTURE of a leaf of this type whose _LEAF_FIELDS have these (first) values, as
    _part_structures renders it, around its size (and lines): the text before them, and after."""
    before, after = _leaf_fields(maintype, subtype, *values)
    return (b"(" + b" ".join([render_value(v) for v in before]) + b" ",
            b" " + b" ".join([render_value(v) for v in after]) + b")")


def _leaf_fields(maintype: str, subtype: str, content_type: str | None, encoding: str | None, content_id: str | None,
                 description: str | None, md5: str | None, disposition: str | None, language: str | None,
                 location: str | None) -> tuple[list[Value], list[Value]]:
    """A part's BODYSTRUCTURE fields before its size (type, subtype, parameters, id, description,
    encoding) and at its end (MD5, disposition, language, location), from its _LEAF_FIELDS' first
    values: no parsed header or Part needed (a leaf text _leaf_text does not know yet, such as an
    attachment's with its name, cost more than the rest of its message's BODYSTRUCTURE, issue 19)."""
    params = _params_of(content_type)
    if maintype == "text" and not any(isinstance(n, bytes) and n.lower() == b"charset" for n in params[::2]):
        params += [b"charset", b"us-ascii"]  # RFC 2045 5.2 default; Dovecot appends it after the others
    spelled_type, spelled_subtype = _spelled_of(content_type, maintype, subtype)
    return ([spelled_type, spelled_subtype, params or None, _nstring_of(content_id), _nstring_of(description),
             raw(unfold(encoding).strip()) if encoding else "7bit"],
            [_nstring_of(md5), _disposition_of(disposition), _language_of(language), _nstring_of(location)])


def _part_structures(part: Part) -> tuple[Value, Value]:
    """body_structures of a part that is not a multipart."""
    headers = part.headers
    before, after = _leaf_fields(part.maintype, part.subtype, *[headers.get(name) for name in _LEAF_FIELDS])
    fields: list[Value] = [*before, part.body.wire_size]
    basic = fields
    if part.is_message:
        inner = part.children[0]
        inner_extended, inner_basic = body_structures(inner)
        message_envelope = Raw(envelope_text(inner.headers))
        basic = [*fields, message_envelope, inner_basic, part.lines]
        fields += [message_envelope, inner_extended, part.lines]
    elif part.maintype == "message" and part.subtype in ("rfc822", "global"):
        # RFC 3501 9 body-type-msg always has an envelope and a body; an encapsulated message we
        # could not walk (base64-encoded, too deep) gets empty ones, as Dovecot does.
        basic = [*fields, [None] * 10, _EMPTY_BASIC, part.lines]
        fields += [[None] * 10, _EMPTY_EXTENSIBLE, part.lines]
    elif part.maintype == "text":
        fields.append(part.lines)
        basic = fields[:]
    else:
        basic = fields[:]
    fields += after
    return fields, basic


_EMPTY_BASIC: list[Value] = ["text", "plain", [b"charset", b"us-ascii"], None, None, "7bit", 0, 0]
_EMPTY_EXTENSIBLE: list[Value] = [*_EMPTY_BASIC, None, None, None, None]


def _spelled_type(part: Part) -> tuple[Value, Value]:
    """The media type and subtype in the case the message spells them ("Text" "X-MyOwn"), as Dovecot
    sends them (RFC 2045 5.1: they are case-insensitive, so either is right; clients compare
    without case). A defaulted or replaced type (no header, an invalid one, an opaque part past the
    nesting bound) is sent as the scan decided it."""
    return _spelled_of(part.headers.get("Content-Type"), part.maintype, part.subtype)


def _spelled_of(value: str | None, scanned_type: str, scanned_subtype: str) -> tuple[Value, Value]:
    """_spelled_type of a part whose Content-Type is `value` and whose type the scan decided."""
    if value is not None:
        maintype, slash, subtype = unfold(value).split(";", 1)[0].partition("/")
        maintype, subtype = maintype.strip(), subtype.strip()
        if slash and maintype.lower() == scanned_type and subtype.lower() == scanned_subtype:
            return raw(maintype), raw(subtype)
    return scanned_type, scanned_subtype


# The usual parameter list, where parse_params' loop comes down to these matches (no comment, so no
# "(" anywhere): each parameter a plain name, "=", and a quoted string without backslashes or a
# token without white space (what the loop's strip() would take off) or quotes, a ";" before each,
# spaces and tabs around; nothing else after the type. (name, quoted text, token).
_SIMPLE_PARAMS = re.compile(r'[^;"=\\]*(?:;[ \t]*[A-Za-z0-9_.!#$%&\'+^`|~-]+[ \t]*=[ \t]*(?:"[^"\\]*"|[^;"\\\s]+)[ \t]*)+')
_SIMPLE_PARAM = re.compile(r';[ \t]*([A-Za-z0-9_.!#$%&\'+^`|~-]+)[ \t]*=[ \t]*(?:"([^"\\]*)"|([^;"\\\s]+))')


def parse_params(value: str) -> list[tuple[str, str]]:
    """The parameters after the first ";" of a Content-Type or Content-Disposition value, names as
    sent, quoted strings unquoted (RFC 2045 5.1). Tolerant: what does not parse is skipped. The
    usual list by two regular expressions (_SIMPLE_PARAMS), anything else by the character loop
    (issue 19: the loop was 4 % of describing a message, its attachments' names unique to it)."""
    text = unfold(value)
    if "(" not in text and _SIMPLE_PARAMS.fullmatch(text):
        return [(name, quoted + token) for name, quoted, token in _SIMPLE_PARAM.findall(text)]
    return _scanned_params(text)


def _scanned_params(text: str) -> list[tuple[str, str]]:  # noqa: C901  a tolerant RFC 2045 5.1 parameter scanner: quoting and skipping in one loop
    """parse_params of an unfolded value, character by character."""
    if "(" in text:
        text = strip_comments(text)
    pos = text.find(";")
    if pos < 0:
        return []
    out: list[tuple[str, str]] = []
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in "; \t":
            pos += 1
        start = pos
        while pos < n and text[pos] not in "=;":
            pos += 1
        name = text[start:pos].strip()
        if pos >= n or text[pos] != "=":
            continue  # a name without a value
        pos += 1
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == '"':
            pos += 1
            chars: list[str] = []
            while pos < n and text[pos] != '"':
                if text[pos] == "\\" and pos + 1 < n:
                    pos += 1
                chars.append(text[pos])
                pos += 1
            pos += 1
            found = "".join(chars)
        else:
            start = pos
            while pos < n and text[pos] != ";":
                pos += 1
            found = text[start:pos].strip()
        if name and " " not in name:
            out.append((name, found))
    return out


def _params(headers: Message, header: str = "Content-Type") -> list[Value]:
    """Parameters of Content-Type or Content-Disposition as a flat (name value ...) list, names as
    sent. RFC 2231 parameters (name*=charset'lang'text, possibly continued as name*0*, name*1...)
    come after the plain ones, continuations joined into one name* value that keeps the charset and
    language (Dovecot's form): plain segments are %-encoded to fit the extended value."""
    return _params_of(headers.get(header))


def _params_of(value: str | None) -> list[Value]:
    """_params of a field whose value is `value`."""
    if value is None:
        return []
    plain: list[Value] = []
    extended: dict[str, list[tuple[int, bool, str, str]]] = {}  # lower name -> segments
    for name, text in parse_params(value):
        if "*" not in name:
            plain += [raw(name), raw(text)]
            continue
        base, _, rest = name.partition("*")
        is_extended = rest.endswith("*") or rest == ""
        number = rest.rstrip("*")
        index = int(number) if number.isdigit() and len(number) < 5 else 0
        extended.setdefault(base.lower(), []).append((index, is_extended, base, text))
    for segments in extended.values():
        segments.sort(key=lambda s: s[0])
        base = segments[0][2]
        if not any(s[1] for s in segments):
            plain += [raw(base), raw("".join(s[3] for s in segments))]
            continue
        pieces = []
        for i, (_, is_ext, _, text) in enumerate(segments):
            if is_ext:
                pieces.append(text)
            else:
                escaped = "".join(c if c in _ATTRIBUTE_SAFE else f"%{b:02X}" for c in text for b in c.encode())
                pieces.append(("''" if i == 0 else "") + escaped)
        plain += [raw(base + "*"), raw("".join(pieces))]
    return plain


def _disposition(headers: Message) -> Value:
    return _disposition_of(headers.get("Content-Disposition"))


def _disposition_of(value: str | None) -> Value:
    if value is None:
        return None
    kind = unfold(value).split(";", 1)[0].strip()
    if not kind:
        return None
    params = _params_of(value)
    return [raw(kind), params or None]


def _language(headers: Message) -> Value:
    return _language_of(headers.get("Content-Language"))


def _language_of(value: str | None) -> Value:
    if value is None:
        return None
    tags = [t.strip() for t in unfold(value).split(",") if t.strip()]
    if not tags:
        return None
    return [raw(t) for t in tags]


# --- one message's FETCH items ---------------------------------------------------------------------

class MessageFacts(NamedTuple):
    """What the index knows of a message (no file needed for these FETCH items). A named tuple:
    one is made per message of every FETCH that reads files or the message cache."""

    uid: int
    flags: tuple[str, ...]  # in the order they are sent, \Recent included when it applies
    size: int
    internaldate: int
    modseq: int = 0


INDEX_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})


def needs_file(item: FetchItem) -> bool:
    return isinstance(item, BodySection | BinarySection) or item.name not in INDEX_ITEMS


def needs_structure(item: FetchItem) -> bool:
    """Whether an item needs the whole MIME walk, not only the top-level header block."""
    if isinstance(item, BinarySection):
        return True
    if isinstance(item, BodySection):
        return bool(item.section.part) or not item.section.text.startswith("HEADER")
    return item.name in ("BODY", "BODYSTRUCTURE", "RFC822", "RFC822.TEXT")


def needs_walk(item: FetchItem) -> bool:
    """Whether an item needs the parts walked (mime.scan), not only the top header block and where
    the message ends (mime.scan_top: BODY[], BODY[TEXT], RFC822, RFC822.TEXT)."""
    if isinstance(item, BinarySection):
        return True
    if isinstance(item, BodySection):
        return bool(item.section.part) or (item.section.text not in ("", "TEXT") and not item.section.text.startswith("HEADER"))
    return item.name in ("BODY", "BODYSTRUCTURE")


def needs_fields(items: Sequence[FetchItem]) -> bool:
    """Whether the items need the parsed header fields, not only the header block's place (which
    is all that BODY[HEADER], BODY[HEADER.FIELDS (...)] and RFC822.HEADER read, and BODY[] and
    BODY[TEXT] with the end of the message)."""
    return any(needs_walk(i) or (isinstance(i, FetchAttribute) and i.name == "ENVELOPE") for i in items)


def scan_for(f: BinaryIO, walk: bool, full: bool, fields: bool) -> Part:
    """The scan of `f` that items need: `walk` (any needs_walk) the parts walked, else `full` (any
    needs_structure) the top header and the message's end, else the top header alone."""
    if walk:
        return scan(f)
    return scan_top(f, fields=fields) if full else scan_header(f, fields=fields)


def index_value(name: str, facts: MessageFacts) -> Value:
    if name == "UID":
        return facts.uid
    if name == "FLAGS":
        return Atom("(" + " ".join(facts.flags) + ")")
    if name == "INTERNALDATE":
        return internaldate_atom(facts.internaldate)
    if name == "RFC822.SIZE":
        return facts.size
    if name == "MODSEQ":
        return Atom(f"({facts.modseq})")  # RFC 7162 3.1.4.1: a parenthesised list of one value
    raise ValueError(f"{name} needs the message file")


def item_values(
    items: Sequence[FetchItem], facts: MessageFacts, f: BinaryIO | None, root: Part | None,
    reopen: Reopen | None = None,
) -> list[tuple[str, Value]]:
    """(response name, value) for each FETCH item, in the order asked (RFC 3501 7.4.2). `f` and `root`
    are the open message and its structure, needed unless every item is an index item."""
    out: list[tuple[str, Value]] = []
    for item in items:
        assert root is None or root.complete or not needs_structure(item) or (root.ended and not needs_walk(item)), \
            "header-only scan used for a body item"
        if isinstance(item, BodySection):
            assert f is not None
            assert root is not None
            out.append((item.response_name(), body_section(f, root, item, reopen)))
            continue
        if isinstance(item, BinarySection):
            assert f is not None
            assert root is not None
            out.append((item.response_name(), binary_value(f, root, item, reopen)))
            continue
        name = item.name
        if name in INDEX_ITEMS:
            out.append((name, index_value(name, facts)))
            continue
        assert f is not None
        assert root is not None
        if name == "ENVELOPE":
            value = envelope(root.headers)
        elif name == "BODYSTRUCTURE":
            value = body_structure(root, extensible=True)
        elif name == "BODY":
            value = body_structure(root, extensible=False)
        elif name == "RFC822":
            value = section_literal(f, whole_message(root), None, reopen)
        elif name == "RFC822.HEADER":
            value = section_literal(f, root.header, None, reopen)
        elif name == "RFC822.TEXT":
            value = section_literal(f, root.body, None, reopen)
        else:
            raise ValueError(f"unknown FETCH item {name}")
        out.append((name, value))
    return out


# --- BINARY (RFC 3516) ------------------------------------------------------------------------------

class UnknownCte(Exception):
    """A part whose Content-Transfer-Encoding this server cannot undo (RFC 3516 4.3 UNKNOWN-CTE)."""


class NoSuchPart(Exception):
    """BINARY of a part that does not exist or is not a single part."""


def binary_value(f: BinaryIO, root: Part, item: BinarySection, reopen: Reopen | None = None) -> Value:
    """The decoded content (RFC 3516 4.2): a literal8 when it holds a NUL, its size for BINARY.SIZE.
    Large content is decoded again as it is sent (Decoded), as BODY[] streams from the file: held
    whole, ten sessions' FETCH BINARY of a 22 MB attachment to clients that read slowly kept 300 MB."""
    span, cte = _binary_source(root, item.part)
    total, nul = _decoded_facts(f, span, cte)
    origin, count = item.partial if item.partial is not None else (0, total)
    length = max(0, min(count, total - origin))
    if item.size:
        return length
    if length > INLINE_LITERAL and reopen is not None:
        return Streamed(Decoded(reopen(), span, cte, origin, length), eight=nul)
    data = b"".join(_window(_decoded_blocks(f, span, cte), origin, length))
    return Literal8Bytes(data) if b"\0" in data else LiteralBytes(data)


def binary_content(f: BinaryIO, root: Part, path: tuple[int, ...]) -> bytes:
    span, cte = _binary_source(root, path)
    return b"".join(_decoded_blocks(f, span, cte))


def _binary_source(root: Part, path: tuple[int, ...]) -> tuple[Span, str]:
    """The region BINARY[path] decodes and its transfer encoding ('' for the message as it is)."""
    if not path:
        return whole_message(root), ""  # BINARY[]: the message as it is
    found = locate(root, path)
    if found is None:
        raise NoSuchPart
    node, _ = found
    if node.is_multipart:
        raise NoSuchPart  # RFC 3516 4.2: only a single part has content to decode
    cte = str(node.headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte in ("7bit", "8bit", "binary"):
        return node.body, ""
    if cte in ("base64", "quoted-printable"):
        return node.body, cte
    raise UnknownCte(cte)


BINARY_BLOCK = 1024 * 1024
# A quoted-printable line is decoded whole (its trailing white space goes, "=" at its end is a soft
# break): one longer than this (RFC 2045 allows 76 octets; a crafted part has no line end at all) is
# cut where the rest of the line cannot change what comes before (_qp_seam), or the part sat whole
# in the carry and a slow reader's FETCH BINARY held it, as before Decoded.
QP_LINE_CARRY = BINARY_BLOCK


def _decoded_blocks(f: BinaryIO, span: Span, cte: str) -> Iterator[bytes]:
    """The decoded content in blocks of about BINARY_BLOCK: what _unbase64 and decode_quoted_printable
    give for the whole, without holding it."""
    if not cte:
        yield from FileSlice(_Unclosable(f), span).chunks()  # CRLF line ends; the file stays open
        return
    f.seek(span.start)
    left = span.end - span.start
    carry = bytearray()  # base64: the last incomplete group; quoted-printable: the last incomplete line
    while left:
        block = f.read(min(BINARY_BLOCK, left))
        if not block:
            raise OSError("message file shorter than its index says")
        left -= len(block)
        if cte == "base64":
            carry += block.translate(None, _NOT_BASE64)
            cut = len(carry) - len(carry) % 4
        else:
            start = len(carry)
            carry += block
            cut = carry.rfind(b"\n", start) + 1  # a line longer than a block grows the carry
            if not cut and len(carry) > QP_LINE_CARRY:
                cut = _qp_seam(carry)
        if cut:
            whole = bytes(carry[:cut])
            del carry[:cut]
            yield binascii.a2b_base64(whole) if cte == "base64" else _decode_qp_lines(whole, last=False)
    if cte == "base64":
        yield _unbase64(bytes(carry))
    elif carry:
        yield _decode_qp_lines(bytes(carry), last=True)


def _qp_seam(line: bytearray) -> int:
    """Where a quoted-printable line with no LF yet may be cut so both sides decode as the whole does:
    after an octet that is no white space (trailing, it would go) and neither "=" nor the first digit
    after one (an escape, "==" or a soft break across the seam). Looked for in the last 64 octets; crafted
    text with none there (blanks or "=" throughout) is cut at its end: an octet or two at that seam may
    decode otherwise than whole (BINARY.SIZE and the content alike, both read these blocks)."""
    for end in range(len(line), max(0, len(line) - 64), -1):
        if line[end - 1] not in b" \t\r=" and (end < 2 or line[end - 2] != ord("=")):
            return end
    return len(line)


def _decoded_facts(f: BinaryIO, span: Span, cte: str) -> tuple[int, bool]:
    """The decoded content's length, and whether it holds a NUL: a first pass that keeps nothing."""
    total, nul = 0, False
    for block in _decoded_blocks(f, span, cte):
        total += len(block)
        nul = nul or b"\0" in block
    return total, nul


def _window(blocks: Iterator[bytes], origin: int, length: int) -> Iterator[bytes]:
    """`length` octets of the blocks from `origin` on."""
    for block in blocks:
        if length <= 0:
            return
        if origin >= len(block):
            origin -= len(block)
            continue
        piece = block[origin:origin + length]
        origin = 0
        length -= len(piece)
        yield piece


class Decoded:
    """BINARY content as a streamed literal: decoded again, block by block, as the client reads it.
    Owns the open file, as FileSlice does."""

    def __init__(self, f: BinaryIO, span: Span, cte: str, origin: int, length: int) -> None:
        self._f = f
        self._span = span
        self._cte = cte
        self._origin = origin
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def chunks(self) -> Iterator[bytes]:
        try:
            got = 0
            for piece in _window(_decoded_blocks(self._f, self._span, self._cte), self._origin, self._length):
                got += len(piece)
                yield piece
            if got != self._length:
                raise OSError("message file changed while it was sent")
        finally:
            self._f.close()

    def close(self) -> None:
        self._f.close()


# In the reversed text a line's trailing white space follows its LF, where a match can only start:
# linear, where "[ \t\r]+\n" forwards tries again from each blank of a long run with no LF after it.
_QP_TRAILING_BLANKS_REVERSED = re.compile(rb"\n[ \t\r]+")
# "=" and one hex digit before a soft break: text, which the break's removal would make an escape.
_QP_HALF_ESCAPE = re.compile(rb"=(?=[0-9A-Fa-f]=\n)")
QP_SLICE = 1024 * 1024


def decode_quoted_printable(raw: bytes) -> bytes:
    """RFC 2045 6.7 decoding, with CRLF line ends: white space at the end of an encoded line is
    deleted (rule 3), and "=" ending a line, even with white space after it, is a soft line break
    (rule 5 and its robustness note); an "=" not followed by two hex digits is kept as it is.
    (quopri keeps trailing white space and takes "= " as text.)

    Whole-text passes in C over slices of whole lines: a loop over lines cost 0.5 us and ~10 octets
    of memory per input octet, so FETCH BINARY of a message of 20 MB of empty lines took 11 s of CPU
    holding the GIL and 215 MB (so one of 64 MiB, an APPEND's limit, ~35 s), per command."""
    out = []
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start + QP_SLICE)
        end = len(raw) if end < 0 else end + 1
        out.append(_decode_qp_lines(raw[start:end], last=end == len(raw)))
        start = end
    return b"".join(out)


def _decode_qp_lines(text: bytes, last: bool) -> bytes:
    """Whole lines of quoted-printable (the text's last line ends with LF unless `last`)."""
    text = _QP_TRAILING_BLANKS_REVERSED.sub(b"\n", b"\n" + text[::-1])[:0:-1]
    # a2b_qp takes "==" as one "=" and "=" before a CR as a soft break; here such an "=" is text, so
    # it is escaped first (a run of them in a few passes), as is one the soft breaks' removal would
    # join to the next line's first octets; then the soft breaks go.
    while b"==" in text:
        text = text.replace(b"==", b"=3D=")
    text = _QP_HALF_ESCAPE.sub(b"=3D", text.replace(b"=\r", b"=3D\r")).replace(b"=\n", b"")
    if last and text.endswith(b"="):
        text = text[:-1]  # a soft break on the last line, which has no LF
    # An "=" left starts an escape (a2b_qp decodes it) or is text (kept as it is); the line ends are
    # the text's LFs, not the ones escapes (=0A) make.
    return binascii.a2b_qp(text.replace(b"\n", b"\r\n"))


_NOT_BASE64 = bytes(sorted(set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")))


def _unbase64(raw: bytes) -> bytes:
    """Tolerant base64: characters outside the alphabet skipped, a short last group dropped."""
    cleaned = raw.translate(None, _NOT_BASE64)  # a regex's substitution cost 90 ns per octet skipped
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
    try:
        return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
    except binascii.Error:
        return b""


def span_bytes(f: BinaryIO, span: Span, partial: tuple[int, int] | None = None) -> bytes:
    """A region of an open message file (or its partial range) as IMAP sends it (CRLF line ends); the
    file stays open."""
    return b"".join(FileSlice(_Unclosable(f), span, partial).chunks())


# --- INTERNALDATE (RFC 3501 9 date-time) -----------------------------------------------------------

def internaldate(seconds: int) -> bytes:
    """RFC 3501 9 date-time in the server's time zone ("dd-Mon-yyyy hh:mm:ss +zzzz"), quoted."""
    when = dt.datetime.fromtimestamp(seconds, dt.UTC).astimezone()
    offset = when.utcoffset() or dt.timedelta()
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    month = MONTH_NAMES[when.month - 1]  # not strftime("%b"): that follows the locale
    return (f'"{when.day:2d}-{month}-{when.year:04d} {when.hour:02d}:{when.minute:02d}:{when.second:02d} '
            f'{sign}{minutes // 60:02d}{minutes % 60:02d}"').encode("ascii")


def internaldate_atom(seconds: int) -> Atom:
    return Atom(internaldate(seconds).decode("ascii"))
