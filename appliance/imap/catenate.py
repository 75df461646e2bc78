"""RFC 4469 CATENATE: the IMAP URLs (RFC 5092) an APPEND may take parts of its message from.

Only this user's own messages are reachable: a URL names a folder, optionally its UIDVALIDITY, a UID,
and optionally a section and a partial range. Pure parsing here and the file work in `locate` and
`read` (called in a worker thread); the session checks the folder, the UIDVALIDITY and the message,
and holds the octets `locate` counted in the box's message memory before `read` reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from appliance.imap.commands import BodySection, Fetch, Section
from appliance.imap.fetch import section_span, span_bytes, whole_message
from appliance.imap.mime import Span, scan
from appliance.imap.parser import ParseError, parse_command
from appliance.store.maildir import open_message

# RFC 5092 3: [imap://authority]/enc-mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=o[.l]]
_URL = re.compile(
    r"^(?:imap://[^/]*)?/(?P<folder>[^;?]*?)(?:;UIDVALIDITY=(?P<uidvalidity>\d{1,10}))?"
    r"/;UID=(?P<uid>\d{1,10})(?:/;SECTION=(?P<section>[^/;]*))?"
    r"(?:/;PARTIAL=(?P<origin>\d{1,10})(?:\.(?P<length>\d{1,10}))?)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ImapUrl:
    folder: str  # as sent in IMAP (modified UTF-7), percent-decoded
    uidvalidity: int | None
    uid: int
    section: Section | None  # None: the whole message
    partial: tuple[int, int | None] | None


def parse_url(url: str) -> ImapUrl | None:
    """The parts of an IMAP URL that names one of this user's messages, or None when it is not one."""
    found = _URL.match(url)
    if found is None:
        return None
    section = None
    if found["section"] is not None:
        try:  # the section grammar is FETCH's: BODY[<section>]
            command = parse_command([f"x FETCH 1 BODY.PEEK[{unquote(found['section'])}]".encode()])
        except (ParseError, UnicodeEncodeError):
            return None
        if not isinstance(command, Fetch) or not isinstance(command.items[0], BodySection):
            return None
        section = command.items[0].section
    partial = None
    if found["origin"] is not None:
        partial = (int(found["origin"]), int(found["length"]) if found["length"] is not None else None)
    uidvalidity = int(found["uidvalidity"]) if found["uidvalidity"] is not None else None
    return ImapUrl(unquote(found["folder"]), uidvalidity, int(found["uid"]), section, partial)


@dataclass(frozen=True)
class Located:
    """Where in its message file the octets a URL names are, and how many they are (wire octets)."""

    span: Span
    partial: tuple[int, int] | None  # (origin, count), as FileSlice takes it
    octets: int


def locate(path: Path, url: ImapUrl) -> Located | None:
    """The region the URL names in the message file, None for a section that does not exist. Only
    the message's structure is read here: its octets are counted (and held) before `read` reads them."""
    with open_message(path) as f:
        root = scan(f)
    span = whole_message(root) if url.section is None else section_span(root, url.section)
    if span is None:
        return None
    size = span.wire_size
    if url.partial is None:
        return Located(span, None, size)
    origin, count = url.partial
    count = size if count is None else count
    return Located(span, (origin, count), max(0, min(count, size - origin)))


def read(path: Path, located: Located) -> bytes:
    """The octets `locate` found, as FETCH BODY[section]<partial> sends them (a partial reads only its
    range, not the whole section)."""
    with open_message(path) as f:
        return span_bytes(f, located.span, located.partial)
