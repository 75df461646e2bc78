"""SORT (RFC 5256 3): message order by sort criteria, with the base subject of RFC 5256 2.1.

Keys come from the index (ARRIVAL, SIZE) and from the header block of each file (CC, DATE, FROM,
SUBJECT, TO); the files are read in a worker thread, once per message, header block only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path

from appliance.imap.fetch import parse_addresses
from appliance.imap.limits import MAX_HEADER_OCTETS
from appliance.imap.mime import RAW_POLICY
from appliance.imap.search import decode_words
from appliance.store.maildir import open_message

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"})
HEADER_KEYS = frozenset({"CC", "DATE", "FROM", "SUBJECT", "TO"})
_PARSER = BytesHeaderParser(policy=RAW_POLICY)


@dataclass(frozen=True)
class SortItem:
    seq: int
    uid: int
    size: int
    internaldate: int
    path: Path


def sort(items: Sequence[SortItem], criteria: Sequence[tuple[str, bool]]) -> list[SortItem]:
    """`criteria`: (key, reversed) pairs. Runs in a worker thread when headers are needed. Ties
    keep message-number order (RFC 5256 3: the final tie-breaker is the sequence number)."""
    headers = {i.uid: _headers(i.path) for i in items} if any(k in HEADER_KEYS for k, _ in criteria) else {}
    ordered = sorted(items, key=lambda i: i.seq)
    for key, reverse in reversed(criteria):  # stable sorts, last criterion first
        ordered.sort(key=lambda i, k=key: _key(k, i, headers.get(i.uid)), reverse=reverse)  # type: ignore[misc]
    return ordered


def _headers(path: Path) -> Message | None:
    try:
        with open_message(path) as f:
            block = bytearray()
            for line in f:
                if line in (b"\r\n", b"\n") or len(block) > MAX_HEADER_OCTETS:
                    break
                block += line
    except OSError:
        return None  # expunged meanwhile: sorted as if it had no header fields
    return _PARSER.parsebytes(bytes(block))


def _key(key: str, item: SortItem, headers: Message | None) -> int | str:
    if key == "ARRIVAL":
        return item.internaldate
    if key == "SIZE":
        return item.size
    if key == "DATE":
        return _sent(headers, item.internaldate)
    if key == "SUBJECT":
        value = headers.get("Subject") if headers is not None else None
        return base_subject(decode_words(str(value))) if value is not None else ""
    # CC, FROM, TO: the mailbox (local part) of the first address, case-folded (RFC 5256 3).
    value = headers.get(key.capitalize() if key != "CC" else "Cc") if headers is not None else None
    if value is None:
        return ""
    for _, address in parse_addresses(str(value)):
        if address:
            return address.rpartition("@")[0].lower() if "@" in address else address.lower()
    return ""


def _sent(headers: Message | None, fallback: int) -> int:
    """RFC 5256 3 DATE: the Date header in UTC; the internal date when it is missing or invalid."""
    value = headers.get("Date") if headers is not None else None
    if value is None:
        return fallback
    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return fallback
    if when.tzinfo is None:
        return fallback
    return int(when.timestamp())


_BLOB = r"\[[^\[\]]*\]"
_LEADER = re.compile(rf"^(?:{_BLOB}\s*)*(?:re|fwd?)\s*(?:{_BLOB})?\s*:\s*", re.IGNORECASE)
_LEADING_BLOB = re.compile(rf"^{_BLOB}\s*")
_TRAILER = re.compile(r"\s*\(fwd\)\s*$", re.IGNORECASE)


def base_subject(subject: str) -> str:
    """RFC 5256 2.1: the subject without Re:, Fwd:, [list] blobs, (fwd) trailers and [fwd: ...]
    wrappers, whitespace collapsed, compared case-insensitively."""
    text = " ".join(subject.split())
    while True:
        while True:  # (2) trailers
            stripped = _TRAILER.sub("", text)
            if stripped == text:
                break
            text = stripped
        while True:  # (3)-(5) leaders and blobs, a blob only when something remains after it
            stripped = _LEADER.sub("", text, count=1)
            if stripped == text:
                blobless = _LEADING_BLOB.sub("", text, count=1)
                stripped = blobless if blobless else text
            if stripped == text:
                break
            text = stripped
        lowered = text.lower()
        if lowered.startswith("[fwd:") and text.endswith("]"):  # (6)
            text = text[5:-1].strip()
            continue
        return text.upper()
