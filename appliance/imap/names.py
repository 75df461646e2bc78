"""Folder names (RFC 3501 says mailbox names) as clients see them: '/' hierarchy, modified UTF-7
(RFC 3501 5.1.3), LIST patterns.

Names travel between client and store unchanged (the store keeps the modified UTF-7 form, as Dovecot
does on disk), so this module only checks them and matches them against LIST patterns.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

SEPARATOR = "/"
MAX_NAME_LENGTH = 255  # octets of one full folder name
MAX_NAME_DEPTH = 16  # levels of hierarchy
_MUTF7_SHIFT = re.compile(r"&([A-Za-z0-9+,]*)-")


def is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def canonical(name: str) -> str:
    """INBOX in any case is INBOX (RFC 3501 5.1); other names are case-sensitive."""
    if is_inbox(name):
        return "INBOX"
    if name.upper().startswith("INBOX" + SEPARATOR):
        return "INBOX" + name[5:]
    return name


def invalid_reason(name: str) -> str | None:
    """Why a name cannot be created, or None when it is fine."""
    if not name:
        return "Empty mailbox name"
    if len(name.encode("utf-8")) > MAX_NAME_LENGTH:
        return "Mailbox name too long"
    if any(not (0x20 <= ord(c) <= 0x7E) for c in name):
        return "Mailbox names are modified UTF-7 (RFC 3501 5.1.3)"
    if "*" in name or "%" in name:
        return "Mailbox names cannot contain wildcards"
    parts = name.split(SEPARATOR)
    if any(p == "" for p in parts):
        return "Empty level in mailbox name"
    if len(parts) > MAX_NAME_DEPTH:
        return "Mailbox hierarchy too deep"
    if any(p in (".", "..") or p.startswith(".") for p in parts):
        return "Mailbox name levels cannot start with a dot"
    if "." in name:
        # Maildir++ keeps hierarchy as dots in directory names (DESIGN.md), so a dot inside a name
        # would read back as a level separator (Dovecot refuses it too).
        return "Mailbox names cannot contain a dot"
    rest = _MUTF7_SHIFT.sub("", name)
    if "&" in rest or not _canonical_shifts(name):
        return "Bad modified UTF-7 in mailbox name"
    return None


def _canonical_shifts(name: str) -> bool:
    """Whether every shift of `name` is in its one spelling (_canonical_shift), and no shift follows
    another at once: "&U,BTFw-&ZeVnLIqe-" is one run of characters spelt as two, beside the folder
    "&U,BTF2XlZyyKng-" every client shows by the same name (Dovecot refuses it too). "&-" is "&"."""
    last_end = -1
    for shift in _MUTF7_SHIFT.finditer(name):
        if shift.group(1):
            if shift.start() == last_end or not _canonical_shift(shift.group(1)):
                return False
            last_end = shift.end()
    return True


def _canonical_shift(text: str) -> bool:
    """Whether `text` (between "&" and "-") is modified BASE64 as RFC 3501 5.1.3 has it: UTF-16 in whole
    characters, with zero padding bits, encoding nothing that spells itself in printable ASCII (nor a
    control character, which a plain name cannot hold either). Any other spelling is a second name for
    what a client shows: "&AEkATgBCAE8AWA-" is shown as INBOX, "a&AC8-b" as "a/b" in one level, "&AGE-"
    beside "a"."""
    if not text:
        return True  # "&-" is "&"
    try:
        raw = base64.b64decode(text.replace(",", "/") + "=" * (-len(text) % 4), validate=True)
        decoded = raw.decode("utf-16-be")  # strict: no lone surrogate, no odd octet
    except (binascii.Error, UnicodeDecodeError):
        return False
    encoded = base64.b64encode(decoded.encode("utf-16-be")).rstrip(b"=").replace(b"/", b",").decode()
    return encoded == text and not any(ord(c) <= 0x7E or 0x7F <= ord(c) <= 0x9F for c in decoded)


class Wildcards:
    """An IMAP wildcard pattern matched in time linear in the name (no backtracking).

    '*' matches anything and '%' anything but the hierarchy separator (RFC 3501 6.3.8). A regex built
    from the pattern backtracks: "*%*%*%...x" against a long name took seconds on the event loop and
    froze every session. Here runs of wildcards collapse to one ('*' if the run holds a '*', since
    "*%" matches what "*" does) and the name is fed once through a bit-parallel NFA: one integer holds
    every pattern position reached so far, each name character costs a few integer operations.
    """

    def __init__(self, pattern: str, ignore_case: bool = False) -> None:
        self._ignore_case = ignore_case
        tokens: list[str] = []  # one character each; "*" and "%" are wildcards
        for ch in pattern:
            if ch in "*%" and tokens and tokens[-1] in "*%":
                if ch == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(ch.lower() if ignore_case else ch)
        self._length = len(tokens)
        # A literal character consumes one name character: a name shorter than the literals of the
        # pattern cannot match (this also keeps the integers small for any name that might).
        self._literals = sum(1 for t in tokens if t not in "*%")
        star = anysep = 0
        masks: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t == "*":
                star |= 1 << i
            elif t == "%":
                anysep |= 1 << i
            else:
                masks[t] = masks.get(t, 0) | (1 << (i + 1))  # reading t at position i reaches i + 1
        self._star, self._percent, self._masks = star, anysep, masks
        self._wild = star | anysep
        self._accept = 1 << self._length

    def _close(self, states: int) -> int:
        # A wildcard also matches nothing: reaching it reaches the position after it. Wildcards never
        # follow each other, so one step closes the set.
        return states | ((states & self._wild) << 1)

    def match(self, name: str) -> bool:
        if len(name) < self._literals:
            return False
        if self._ignore_case:
            name = name.lower()
        states = self._close(1)
        masks, star, percent = self._masks, self._star, self._percent
        for ch in name:
            stay = states & star if ch == SEPARATOR else states & (star | percent)
            states = self._close(((states << 1) & masks.get(ch, 0)) | stay)
            if not states:
                return False
        return bool(states & self._accept)


class Pattern:
    """RFC 3501 6.3.8: reference and pattern joined; '*' matches anything, '%' anything but the
    hierarchy separator. INBOX is case-insensitive (RFC 3501 5.1), so it matches "inbox" or "In%"."""

    def __init__(self, reference: str, pattern: str) -> None:
        if pattern.startswith(SEPARATOR) or not reference:
            full = pattern
        elif reference.endswith(SEPARATOR):
            full = reference + pattern
        else:
            full = reference + SEPARATOR + pattern if pattern else reference
        self._exact = Wildcards(full)
        self._inbox = Wildcards(full, ignore_case=True)
        # Children of INBOX ("INBOX/x") when the pattern spells INBOX in another case.
        self._inbox_children = None
        if full[:5].upper() == "INBOX" and full[5:6] in ("/", "*", "%"):
            self._inbox_children = Wildcards("INBOX" + full[5:])

    def match(self, name: str) -> bool:
        if name == "INBOX":
            return self._inbox.match(name)
        if self._exact.match(name):
            return True
        return self._inbox_children is not None and name.startswith("INBOX/") and self._inbox_children.match(name)


def pattern_regex(reference: str, pattern: str) -> Pattern:
    return Pattern(reference, pattern)


def with_parents(names: Iterable[str]) -> dict[str, bool]:
    """Every name and every level above it; True for names that exist, False for implied parents
    (listed with \\Noselect when a '%' pattern reaches them, RFC 3501 6.3.8)."""
    found: dict[str, bool] = {}
    for name in names:
        found[name] = True
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts)):
            found.setdefault(SEPARATOR.join(parts[:i]), False)
    return found


def has_children(name: str, names: Iterable[str]) -> bool:
    prefix = name + SEPARATOR
    return any(n.startswith(prefix) for n in names)
