"""Sizes typed by people (a mailbox quota): the one parser the CLI and the web console share; and a
limit as the protocols' refusals say it.

One rule: a number, whole or with a decimal point, then an optional unit K, M, G or T, each 1024 times
the one before (as Dovecot's quota settings count), optionally written KiB/KB/K and in any case; no
unit means bytes. '1.5G' is 1610612736 bytes; a fraction of a byte is dropped, and a size
above 0 but under one byte is refused (0 would be no limit). Bounded: the text is
short and the result fits the database's 64-bit integer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MAX_SIZE_TEXT = 40
MAX_BYTES = 2**63 - 1  # SQLite INTEGER
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE | re.ASCII)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HINT = "a size like 1.5G, 500M or 2G, where K, M, G and T count in 1024s; 0 for no limit"


def parse_size(text: str) -> int:
    """'500M', '1.5G', '2 GiB', '1024', '0' -> bytes. ValueError with a one-line reason otherwise."""
    value = text.strip()
    m = _SIZE.fullmatch(value) if len(value) <= MAX_SIZE_TEXT else None
    if not m:
        raise ValueError(f"not a size: {text[:MAX_SIZE_TEXT]!r}: use {SIZE_HINT}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise ValueError(f"not a size: {text[:MAX_SIZE_TEXT]!r}: use {SIZE_HINT}") from None
    size = int(number * 1024 ** _UNITS[(m.group(2) or "").lower()])
    if size == 0 and number:
        # Its fraction dropped, '0.5' (meant as half a gigabyte) would be 0: no limit at all.
        raise ValueError(f"less than one byte: {text[:MAX_SIZE_TEXT]!r}: use {SIZE_HINT}")
    if size > MAX_BYTES:
        raise ValueError(f"too large a size: {text[:MAX_SIZE_TEXT]!r}")
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling parse_size reads back: 1610612736 -> '1.5G'; '' for 0 (no limit)."""
    if size == 0:
        return ""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        scaled = Decimal(size) / 1024**power
        if scaled >= 1 and scaled == scaled.quantize(Decimal("0.01")):
            return f"{scaled.normalize():f}{unit}"
    return str(size)


def limit_text(size: int) -> str:
    """A size limit as a refusal says it, so a user knows how far to shrink an attachment:
    37748736 -> '36 MiB (37748736 octets)'; '10000 octets' when it is no whole-ish K, M, G or T."""
    spelled = format_size(size)
    if not spelled[-1:].isalpha():
        return f"{size} octets"
    return f"{spelled[:-1]} {spelled[-1]}iB ({size} octets)"
