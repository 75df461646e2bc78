"""SEARCH (RFC 3501 6.4.4): which messages of the selected folder match a key.

Keys on flags, sizes, dates and numbers use the index alone; header and text keys open the message
(lazily, once per message, only when the cheaper keys of an AND have not already failed). Matching is
case-insensitive substring matching on decoded text: RFC 2047 header words, transfer encodings and
charsets are undone, so a search for "Jörg" finds =?utf-8?q?J=C3=B6rg?=. Very large messages are
searched as raw octets instead of being decoded in memory.
"""

from __future__ import annotations

import binascii
import datetime as dt
import functools
import io
import quopri
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, NamedTuple

from appliance import address_list
from appliance.address import is_dot_atom
from appliance.imap.commands import (
    AndKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    NewKey,
    NotKey,
    OrKey,
    SearchAll,
    SearchKey,
    SetKey,
    SizeKey,
    TextKey,
    in_ranges,
)
from appliance.imap.fetch_cache import CACHED_FIELDS, CachedFields, HeaderLookup
from appliance.imap.limits import MAX_DECODED_SEARCH_OCTETS, MAX_HEADER_OCTETS
from appliance.imap.mime import NOT_CHARSETS, Part, codec_name, decode_words, parse_header, scan, unfold
from appliance.store.maildir import open_message

SUPPORTED_CHARSETS = ("US-ASCII", "UTF-8")
ADDRESS_FIELDS = frozenset({"FROM", "TO", "CC", "BCC", "SENDER", "REPLY-TO"})
RAW_SEARCH_CHUNK = 1024 * 1024
MIN_INDEXED_NEEDLE = 3  # the full-text index's trigrams: a shorter needle cannot be looked up


class Candidate(NamedTuple):
    """What the index knows about one message of the selected folder (a named tuple: a SEARCH makes
    one per message, and a frozen dataclass's init was half of the server's samples in a SEARCH SUBJECT at 10k, issue 19)."""

    seq: int
    uid: int
    flags: frozenset[str]  # \Recent included when this session has it as recent
    size: int
    internaldate: int  # UNKNOWN_DATE (never read) when the key compares no date (Searcher.reads_dates)
    modseq: int = 0


class CachedSubject:
    """A message's SEARCH SUBJECT text from the message cache (fetch_cache.known_subjects): its
    Subject values decoded and casefolded, joined by NUL. It answers SUBJECT keys whose needle is
    not empty and holds no NUL (Searcher.subject_only) and nothing else: the raw values are not
    kept, so any other use of the header reads the file."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def get(self, name: str, failobj: None = None) -> str | None:
        raise TypeError("a cached subject holds no raw field values")

    def get_all(self, name: str, failobj: None = None) -> list[str] | None:
        raise TypeError("a cached subject holds no raw field values")


def answerable(needle: str) -> bool:
    """Whether the full-text index (fts.py) can look up this casefolded needle: one trigram at least."""
    return len(needle) >= MIN_INDEXED_NEEDLE and "\0" not in needle


def _subject_text_answers(needle: str) -> bool:
    """Whether a cached subject text (CachedSubject: values joined by NUL) answers a SUBJECT key with
    this casefolded needle: not empty, and no NUL that could match across two values."""
    return bool(needle) and "\0" not in needle


class _Content:
    """The text of one message, read once on first need. `cached`: the message's header fields kept
    in the message cache (fetch_cache.exact_headers), which answer keys on those fields."""

    def __init__(self, opener: Callable[[], BinaryIO], size: int, cached: HeaderLookup | None = None) -> None:
        self._opener = opener
        self._size = size
        self._headers: Message | None = None
        self._cached = cached
        self._parts: list[str] | None = None
        self._part_source: Iterator[str] | None = None
        self._header_text: str | None = None
        self._searched: dict[tuple[str, bool], tuple[str, ...]] = {}
        self._texts: dict[tuple[str, bool], str] = {}
        self._sent_day: dt.date | None = None
        self._text_checked = False
        self._lowered: bytes | None = None
        self._sent_read = False

    def headers(self) -> Message:
        if self._headers is None:
            with self._opener() as f:
                block = bytearray()
                for line in f:
                    if line in (b"\r\n", b"\n") or len(block) > MAX_HEADER_OCTETS:
                        break
                    block += line
            self._headers = parse_header(bytes(block))
        return self._headers

    def field(self, name: str) -> HeaderLookup:
        """Headers holding every `name` field of the message: the cached ones when they do."""
        cached = self._cached
        if cached is not None and not isinstance(cached, CachedSubject) and name.lower() in CACHED_FIELDS:
            return cached
        return self.headers()

    def may_contain(self, name: str, needle: str) -> bool:
        """False when the cached fields answer for `name` and none can hold `needle`
        (CachedFields.may_contain); True: look at the values."""
        cached = self._cached
        if isinstance(cached, CachedFields) and name.lower() in CACHED_FIELDS:
            return cached.may_contain(needle)
        return True

    def sent_day(self) -> dt.date | None:
        """sent_date, read once per message for all the SENT* keys of a program."""
        if not self._sent_read:
            self._sent_day, self._sent_read = sent_date(self), True
        return self._sent_day

    def searched_values(self, name: str, addresses: bool) -> tuple[str, ...]:
        """The values a header key on `name` (lower case) compares, casefolded: address_values for an
        address field's key, else header_values. Made once per message and field: a program of a
        thousand keys on a field decoded it (and parsed its addresses) once per key."""
        found = self._searched.get((name, addresses))
        if found is None:
            values = self.address_values(name) if addresses else self.header_values(name)
            found = self._searched[name, addresses] = tuple(v.casefold() for v in values)
        return found

    def searched_text(self, name: str, addresses: bool) -> str:
        """searched_values joined by NUL (a needle without NUL is in it when it is in one of them); for
        the subject, the cached subject text when there is one (the same text, CachedSubject)."""
        found = self._texts.get((name, addresses))
        if found is None:
            cached = self._cached
            if name == "subject" and isinstance(cached, CachedSubject):
                found = cached.text
            else:
                found = "\0".join(self.searched_values(name, addresses))
            self._texts[name, addresses] = found
        return found

    def holds(self, name: str, needle: str, addresses: bool = False) -> bool:
        """Whether a value of the field `name` (lower case) holds `needle` (casefolded), as one header
        key asks; the cached fields' quick no (may_contain) while the field's text is not yet made."""
        if not needle or "\0" in needle:  # ("" is in any value: the field is there)
            return any(needle in value for value in self.searched_values(name, addresses))
        text = self._texts.get((name, addresses))
        if text is None:
            if not addresses and not self.may_contain(name, needle):
                return False
            text = self.searched_text(name, addresses)
        return needle in text

    def header_values(self, name: str) -> list[str]:
        return [decode_words(v) for v in self.field(name).get_all(name) or []]

    def address_values(self, name: str) -> list[str]:
        """The addresses of an address field as "Display Name <local@domain>" (and group names):
        RFC 3501 6.4.4 FROM/TO/CC/BCC search the address, so comments and folding inside the
        address do not hide it, as in Dovecot. A value that yields no address is searched as text."""
        out: list[str] = []
        for value in self.field(name).get_all(name) or []:
            found = address_texts(value)
            out += found if found else [decode_words(value)]
        return out

    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = "\n".join(f"{k}: {decode_words(v)}" for k, v in self.headers().items()).casefold()
        return self._header_text

    def body_contains(self, needle: str) -> bool:
        if not needle:
            return True  # "" is in every text: nothing to read
        if self._size > MAX_DECODED_SEARCH_OCTETS:
            return self._raw_contains(needle, body_only=True)
        if self._parts is None and "\n" not in needle and _absent(self._text_octets(), needle):
            return False
        if "\n" in needle:
            # Parts are joined with a line end: a needle with one may span two of them.
            return needle in "\n".join(self._decoded_parts())
        return any(needle in text for text in self._decoded_parts())

    def _text_octets(self) -> bytes | None:
        """_text_octets of the message, found once for all the BODY and TEXT keys of a program (each
        key lowercased and searched the whole message again: 1,000 keys, 8 s per 500 messages)."""
        if not self._text_checked:
            self._text_checked = True
            self._lowered = _text_octets(self._whole())
        return self._lowered

    def _whole(self) -> bytes:
        """The message's octets (it is small enough to be decoded in memory), read once: the file
        is not opened again for its headers or parts."""
        with self._opener() as f:
            data = f.read()
        self._opener = lambda: io.BytesIO(data)
        return data

    def _decoded_parts(self) -> Iterator[str]:
        """The casefolded text of each text part, decoded once on first need and kept for the next
        key of the same search: a match in the first part never decodes the others."""
        if self._parts is None:
            self._parts = []
            self._part_source = _decoded_leaves(self._opener)
        yield from self._parts
        while self._part_source is not None:
            text = next(self._part_source, None)
            if text is None:
                self._part_source = None
                return
            self._parts.append(text)
            yield text

    def body_text(self) -> str:
        """The whole decoded body text, casefolded (what BODY searches): the full-text index's
        body column holds exactly this, so the index and the scan give the same answers."""
        return "\n".join(self._decoded_parts())

    def _raw_contains(self, needle: str, body_only: bool) -> bool:
        target = needle.encode("utf-8")
        overlap = max(len(target) - 1, 0)
        tail = b""
        in_body = not body_only
        with self._opener() as f:
            while True:
                chunk = f.read(RAW_SEARCH_CHUNK)
                if not chunk:
                    return False
                data = (tail + chunk).lower()
                if not in_body:
                    cut = re.search(rb"\r?\n\r?\n", data)
                    if cut is None:
                        tail = data[-3:]
                        continue
                    data, in_body = data[cut.end():], True
                if target in data:
                    return True
                tail = data[-overlap:] if overlap else b""


def searched_texts(data: bytes) -> tuple[str, str]:
    """(header text, body text) of a message, casefolded: the strings TEXT and BODY search in it
    (what the full-text index stores for it)."""
    content = _Content(lambda: io.BytesIO(data), len(data))
    return content.header_text(), content.body_text()


def address_texts(value: str) -> list[str]:
    """Each address of an address-list header as one searchable string: "Display Name <local@domain>"
    (comments inside <...> gone), and each group's name."""
    out: list[str] = []
    for name, _, mailbox, domain in address_list.parse(unfold(value)):
        if domain is None:  # RFC 5322 3.4 group: "name: a@b, c@d;" (the name is searchable too)
            if mailbox is not None:
                out.append(decode_words(mailbox).strip())
            continue
        display = decode_words(name).strip() if name else ""
        if mailbox and not is_dot_atom(mailbox):  # written as the sender quoted it (RFC 5322 3.4.1)
            mailbox = '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'
        address = f"{mailbox or ''}@{domain}" if domain else mailbox or ""
        if address:
            out.append(f"{display} <{address}>" if display else address)
        elif display:
            out.append(display)
    return out


def decoded_text(f: BinaryIO) -> str:
    """The text parts of the message in `f`, transfer encoding and charset undone, joined."""
    return "\n".join(_decoded_parts(f))


def _decoded_parts(f: BinaryIO) -> Iterator[str]:
    """The text of each text part of the message in `f`, decoded, one at a time.

    The structure comes from mime.scan, which bounds nesting depth and part count (the stdlib parser
    recurses once per level: a message nested a thousand levels deep raised RecursionError). Parts
    past the bound are opaque leaves and are searched as the text they are, as Dovecot does."""
    root = scan(f)
    for part in _leaves(root):
        # Text parts, and opaque bodies that may hold text: an encapsulated message we did not walk,
        # a multipart without parts.
        opaque = not part.children or part.children[0].placeholder
        if part.maintype != "text" and not (part.maintype in ("message", "multipart") and opaque):
            continue
        f.seek(part.body.start)
        data = f.read(part.body.end - part.body.start)
        yield _decode_body(part.headers, data)


# Charsets that decode each ASCII octet to the same character (_decode_body): the text of an ASCII
# message in one of them is its octets as they are.
_ASCII_CHARSETS = re.compile(rb"(?:us-ascii|ascii|utf-8|utf8|iso-8859-\d{1,2}|iso8859-\d{1,2}|latin-?1|windows-125\d"
                             rb"|cp125\d)")
_CHARSET_PARAM = re.compile(rb'charset\s*(\*)?\s*=\s*"?([^\s";]*)')


def _surely_not_in_body(data: bytes, needle: str) -> bool:
    """True when the decoded body text of this message cannot hold `needle` (casefolded, without a
    line end), decided on its octets without parsing it: the scan of a folder not yet indexed is
    then one `in` per message for most mail. It decides only when the octets are the text
    (_text_octets); otherwise False: the parts are decoded and looked at."""
    return "\n" not in needle and _absent(_text_octets(data), needle)


def _absent(lowered: bytes | None, needle: str) -> bool:
    """_surely_not_in_body given the message's _text_octets."""
    return lowered is not None and (not needle.isascii() or needle.encode("ascii") not in lowered)


def _text_octets(data: bytes) -> bytes | None:
    """The message's octets lowercased when they are its text: all ASCII, no base64 or
    quoted-printable part, every charset one that leaves ASCII as it is. Then each decoded part is a
    stretch of the octets, and casefolding ASCII is lowercasing it, so a needle absent from them is
    in no part (and a needle beyond ASCII in none). None when they are not."""
    if not data.isascii():
        return None  # octets beyond ASCII are decoded by charset
    lowered = data.lower()
    if b"base64" in lowered or b"quoted-printable" in lowered:
        return None
    for star, charset in _CHARSET_PARAM.findall(lowered):
        if star or not _ASCII_CHARSETS.fullmatch(charset):
            return None  # RFC 2231 parameters, or a charset that maps ASCII octets elsewhere (UTF-7, UTF-16)
    return lowered


def _decoded_leaves(opener: Callable[[], BinaryIO]) -> Iterator[str]:
    """_decoded_parts casefolded, the file open only while they are read."""
    with opener() as f:
        for text in _decoded_parts(f):
            yield text.casefold()


def _leaves(root: Part) -> Iterator[Part]:
    """Leaf parts in order, without recursion (the scan already bounds how many there are)."""
    stack = [root]
    while stack:
        part = stack.pop()
        if part.children and not part.children[0].placeholder:
            stack.extend(reversed(part.children))
        else:
            yield part


def _decode_body(headers: Message, data: bytes) -> str:
    cte = unfold(headers.get("Content-Transfer-Encoding") or "").strip().lower()
    try:
        if cte == "base64":
            data = binascii.a2b_base64(data)  # ignores line ends and stray characters
        elif cte == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        pass  # malformed encoding: search the octets as they are
    return decode_charset(data, headers.get_content_charset() or "utf-8")


def decode_charset(data: bytes, charset: str) -> str:
    """A body's text in its charset, UTF-8 when that is unknown or no charset (RFC 2046 4.1.2 lets a
    reader treat an unknown charset's text as it can); never raises."""
    name = codec_name(charset)
    if name is None or name in NOT_CHARSETS:  # SEARCH BODY over such a body ended its session with BYE
        name = "utf-8"
    try:
        return data.decode(name, "replace")
    except (LookupError, UnicodeError):  # LookupError: a codec that is no text encoding (base64, zlib)
        return data.decode("utf-8", "replace")


def sent_date(content: _Content) -> dt.date | None:
    value = content.field("Date").get("Date")
    if not value:
        return None
    try:
        # RFC 3501 6.4.4: SENT* compare the date of the Date: header, "disregarding time and timezone".
        return parsedate_to_datetime(unfold(value)).date()
    except (TypeError, ValueError, IndexError):
        return None



def _compare(day: dt.date, relation: str, target: dt.date) -> bool:
    if relation == "BEFORE":
        return day < target
    if relation == "ON":
        return day == target
    return day >= target  # SINCE: on or after


Predicate = Callable[[Candidate, "_Content"], bool]
Term = tuple[str, str]  # (BODY or TEXT, casefolded needle): one lookup in the full-text index


@dataclass(frozen=True)
class TextHits:
    """What the full-text index (appliance/imap/fts.py) answered for the BODY and TEXT keys of a
    search: the messages it holds, and for each term the ones among them that contain it. A message
    outside `indexed` (not yet indexed, or too large to be) is read and scanned instead."""

    indexed: frozenset[int]  # UIDs
    found: dict[Term, frozenset[int]]

    def narrowed(self, uids: set[int]) -> TextHits:
        """The same answer for only these UIDs (a chunk sent to the worker process)."""
        return TextHits(self.indexed & uids, {t: hits & uids for t, hits in self.found.items()})


class Searcher:
    """Evaluates one SEARCH key over the candidates of a folder. The key is compiled once into nested
    closures, so a 100,000-message folder costs one call chain per message, not a tree walk."""

    def __init__(self, key: SearchKey, largest_seq: int, largest_uid: int, hits: TextHits | None = None) -> None:
        self.key = key
        self.largest_seq = largest_seq
        self.largest_uid = largest_uid
        self.hits = hits
        self._terms: set[Term] = set()
        self._header_fields: set[str] = set()
        self._subject_needles: set[str] = set()
        _any_leaf(key, self._note_fields)
        self._predicate = self._compile(key)

    def needs_content(self) -> bool:
        return _needs_content(self.key)

    def _note_fields(self, leaf: SearchKey) -> bool:
        """Collect the header fields a criterion reads (for needs_file); never stops the walk."""
        if isinstance(leaf, HeaderKey):
            self._header_fields.add(leaf.field.lower())
        elif isinstance(leaf, DateKey) and leaf.sent:
            self._header_fields.add("date")
        return False

    def reads_headers(self) -> bool:
        return bool(self._header_fields)

    def reads_dates(self) -> bool:
        """Whether a criterion compares the internal date (BEFORE, ON, SINCE, and SENT* for a message
        without a usable Date field): otherwise Candidate.internaldate is never read."""
        return _any_leaf(self.key, lambda leaf: isinstance(leaf, DateKey))

    def lone_subject(self) -> str | None:
        """The needle (casefolded) when the whole key is one SUBJECT key a cached subject answers:
        `needle in CachedSubject.text` is then the answer (a SEARCH SUBJECT over a 10k folder)."""
        key = self.key
        if (isinstance(key, HeaderKey) and key.field.lower() == "subject" and self.subject_only()):
            return key.value.casefold()
        return None

    def lone_term(self) -> Term | None:
        """The term when the whole key is one BODY or TEXT key the full-text index can answer (a
        needle it can look up, `answerable`): the index's rows then decide every message it holds,
        and only the others need their file read."""
        key = self.key
        if isinstance(key, TextKey) and answerable(needle := key.value.casefold()):
            return (key.where, needle)
        return None

    def subject_only(self) -> bool:
        """Whether every header key is SUBJECT with a needle a cached subject answers (not empty, no
        NUL): the message cache's subject text (CachedSubject) is then all the headers needed."""
        return self._header_fields == {"subject"} and all(map(_subject_text_answers, self._subject_needles))

    def terms(self) -> set[Term]:
        """The BODY and TEXT keys' needles, casefolded: what the full-text index can answer."""
        return self._terms

    def needs_file(self, c: Candidate, cached: bool = False) -> bool:
        """Whether deciding this message may read its file: a header or SENT* key (unless `cached`:
        the message cache holds every field they name, fetch_cache.exact_headers), or a BODY/TEXT
        key the index did not answer for it (an empty needle is in every message: no file)."""
        if self._header_fields and not (cached and self._header_fields <= CACHED_FIELDS):
            return True
        needles = [t for t in self._terms if t[1]]
        if not needles:
            return False
        hits = self.hits
        if hits is None or any(t not in hits.found for t in needles):
            return True
        return c.uid not in hits.indexed

    def matches(self, c: Candidate, opener: Callable[[], BinaryIO], cached: HeaderLookup | None = None) -> bool:
        return self._predicate(c, _Content(opener, c.size, cached))

    def _compile(self, key: SearchKey) -> Predicate:  # noqa: C901  one branch per SEARCH key class of RFC 3501 6.4.4
        if isinstance(key, SearchAll):
            return lambda c, content: True
        if isinstance(key, FlagKey):
            flag, present = key.flag, key.present
            if flag.startswith("\\"):
                return lambda c, content: (flag in c.flags) == present
            lowered = flag.lower()  # keywords match case-insensitively

            def keyword(c: Candidate, content: _Content) -> bool:
                return (flag in c.flags or any(f.lower() == lowered for f in c.flags)) == present

            return keyword
        if isinstance(key, NewKey):
            return lambda c, content: "\\Recent" in c.flags and "\\Seen" not in c.flags
        if isinstance(key, SetKey):
            ranges = key.set.merged(self.largest_uid if key.uid else self.largest_seq)
            if key.uid:
                return lambda c, content: in_ranges(c.uid, ranges)
            return lambda c, content: in_ranges(c.seq, ranges)
        if isinstance(key, ModSeqKey):
            least = key.modseq  # RFC 7162 3.1.5: mod-sequence equal or greater
            return lambda c, content: c.modseq >= least
        if isinstance(key, SizeKey):
            size = key.size
            if key.relation == "LARGER":
                return lambda c, content: c.size > size
            return lambda c, content: c.size < size
        if isinstance(key, DateKey):
            relation, target = key.relation, key.date
            if key.sent:
                def sent(c: Candidate, content: _Content) -> bool:
                    day = content.sent_day()
                    if day is None:
                        # No usable Date header: the internal date stands in, as in Dovecot (where
                        # a message without a date would otherwise match no SENT* key at all).
                        day = dt.datetime.fromtimestamp(c.internaldate).date()
                    return _compare(day, relation, target)

                return sent
            return lambda c, content: _compare(dt.datetime.fromtimestamp(c.internaldate).date(), relation, target)
        if isinstance(key, HeaderKey):
            field_name, needle = key.field.lower(), key.value.casefold()
            if field_name == "subject":
                self._subject_needles.add(needle)
            addresses = field_name.upper() in ADDRESS_FIELDS and bool(needle)
            return lambda c, content: content.holds(field_name, needle, addresses)
        if isinstance(key, TextKey):
            needle, everywhere = key.value.casefold(), key.where == "TEXT"

            term = (key.where, needle)
            self._terms.add(term)

            def text(c: Candidate, content: _Content) -> bool:
                if not needle:
                    return True  # "" is in every text
                hits = self.hits
                if hits is not None and c.uid in hits.indexed and term in hits.found:
                    return c.uid in hits.found[term]
                if everywhere and needle in content.header_text():
                    return True
                return content.body_contains(needle)

            return text
        if isinstance(key, NotKey):
            inner = self._compile(key.key)
            return lambda c, content: not inner(c, content)
        if isinstance(key, OrKey | AndKey):
            return self._compile_list(key)
        raise TypeError(f"unknown search key {key!r}")

    def _compile_list(self, key: OrKey | AndKey) -> Predicate:
        """An AND or an OR, nested ones of the same kind taken as one list. Its header keys (and NOTs
        of them) on the same field are checked together, in one loop over their needles in the field's
        text made once (_Content.searched_text): a program of a thousand such keys cost a thousand
        calls per message, each decoding the field again (24 s of CPU over 5,000 messages)."""
        every = isinstance(key, AndKey)
        keys = _flattened(key)
        groups: dict[tuple[str, bool], tuple[list[str], list[str]]] = {}
        others: list[SearchKey] = []
        for k in keys:
            found = self._substring(k)
            if found is None:
                others.append(k)
                continue
            where, needle, wanted = found
            groups.setdefault(where, ([], []))[0 if wanted else 1].append(needle)
        # Cheap keys first: an index-only key that decides saves opening the message.
        parts = [self._compile(k) for k in sorted(others, key=_needs_content)]
        parts += [_field_test(field, addresses, present, absent, every)
                  for (field, addresses), (present, absent) in groups.items()]
        if len(parts) == 1:
            return parts[0]
        if every:
            return lambda c, content: all(p(c, content) for p in parts)
        return lambda c, content: any(p(c, content) for p in parts)

    def _substring(self, key: SearchKey) -> tuple[tuple[str, bool], str, bool] | None:
        """((field, addresses), needle, wanted) for a header key, or a NOT of one, that asks whether a
        needle (not empty, no NUL) is in the field's text (wanted False: that it is not); else None."""
        wanted = True
        while isinstance(key, NotKey):
            key, wanted = key.key, not wanted
        if not isinstance(key, HeaderKey):
            return None
        field_name, needle = key.field.lower(), key.value.casefold()
        if not needle or "\0" in needle:
            return None
        if field_name == "subject":
            self._subject_needles.add(needle)
        return (field_name, field_name.upper() in ADDRESS_FIELDS), needle, wanted


def _flattened(key: OrKey | AndKey) -> list[SearchKey]:
    """The keys of an AND, or the alternatives of an OR, with those of nested ANDs (ORs) among them."""
    every = isinstance(key, AndKey)
    out: list[SearchKey] = []
    pending: list[SearchKey] = [key]
    while pending:
        k = pending.pop()
        if every and isinstance(k, AndKey):
            pending.extend(reversed(k.keys))
        elif not every and isinstance(k, OrKey):
            pending.extend((k.right, k.left))
        else:
            out.append(k)
    return out


def _field_test(field_name: str, addresses: bool, present: list[str], absent: list[str], every: bool) -> Predicate:
    """Header keys on one field of an AND (`every`) or an OR: needles that must be (`present`) or must
    not be (`absent`) in the field's text, each compared once (duplicates dropped)."""
    if len(present) + len(absent) == 1:
        if present:
            needle = present[0]
            return lambda c, content: content.holds(field_name, needle, addresses)
        needle = absent[0]
        return lambda c, content: not content.holds(field_name, needle, addresses)
    wanted, unwanted = tuple(dict.fromkeys(present)), tuple(dict.fromkeys(absent))
    if every:
        def all_of(c: Candidate, content: _Content) -> bool:
            text = content.searched_text(field_name, addresses)
            return all(needle in text for needle in wanted) and not any(needle in text for needle in unwanted)

        return all_of

    def any_of(c: Candidate, content: _Content) -> bool:
        text = content.searched_text(field_name, addresses)
        return any(needle in text for needle in wanted) or not all(needle in text for needle in unwanted)

    return any_of


def uses_modseq(key: SearchKey) -> bool:
    """Whether the key has a MODSEQ criterion: the answer then carries (MODSEQ n) (RFC 7162 3.1.5)."""
    return _any_leaf(key, lambda leaf: isinstance(leaf, ModSeqKey))


def _needs_content(key: SearchKey) -> bool:
    return _any_leaf(key, _reads_content)


def _reads_content(leaf: SearchKey) -> bool:
    return isinstance(leaf, TextKey) or _reads_headers(leaf)


def _reads_headers(leaf: SearchKey) -> bool:
    if isinstance(leaf, HeaderKey):
        return True
    if isinstance(leaf, DateKey):
        return leaf.sent
    return False


def _any_leaf(key: SearchKey, test: Callable[[SearchKey], bool]) -> bool:
    """Whether `test` holds for any criterion under the NOT, OR and AND of a search key."""
    if isinstance(key, NotKey):
        return _any_leaf(key.key, test)
    if isinstance(key, OrKey):
        return _any_leaf(key.left, test) or _any_leaf(key.right, test)
    if isinstance(key, AndKey):
        return any(_any_leaf(k, test) for k in key.keys)
    return test(key)


def search_files(key: SearchKey, largest_seq: int, largest_uid: int, hits: TextHits | None,
                 items: Sequence[tuple[Candidate, str, HeaderLookup | None]]) -> list[int]:
    """The sequence numbers of the messages among `items` (each with its file and its cached header
    fields, if any) that match `key`.

    Runs in the CPU pool's worker process (appliance/cpu_pool.py), one bounded chunk of a folder at a
    time, so a long search holds neither the event loop nor the server's GIL."""
    searcher = Searcher(key, largest_seq, largest_uid, hits)
    found = []
    for c, path, cached in items:
        try:
            if searcher.matches(c, functools.partial(open_message, Path(path)), cached):
                found.append(c.seq)
        except FileNotFoundError:
            continue  # expunged meanwhile
    return found
