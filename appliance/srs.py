"""Sender Rewriting Scheme (SRS) for mail an alias forwards to another domain.

A forward keeps the original envelope sender, so the receiving server's SPF check (RFC 7208) asks the
*sender's* domain whether our address may send for it, and the answer is no. Like Postfix with
postsrsd, the forward goes out with a sender of our own domain that encodes the original one:

    SRS0=HHHHHHHH=TT=orig-domain=orig-local@<the alias's domain>

- `TT`: the day it was made (days since the epoch, mod 1024) in two base32 characters, as libsrs2
  does; an address older than MAX_AGE_DAYS is refused, so a harvested one stops working.
- `HHHHHHHH`: HMAC-SHA256 over `TT=orig-domain=orig-local` (lower-cased) with a secret made once
  and kept in the data dir (mode 0600), in base32 (case-insensitive: some relays change the case
  of local parts). Only we can make an address that verifies, so the MX relays mail to an SRS0
  address of ours (a bounce of a forward) to the original sender and refuses every other one: the
  only relaying the box does for anyone who has not logged in.

The null sender is never rewritten (there is nothing to bounce to). A sender that already is an SRS0
address of another forwarder is wrapped once more (the SRS1 short form is not used): a bounce goes
back to that forwarder, which verifies its own address. Hand-made with hmac/base64: the PyPI
packages for SRS are unmaintained.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("letterbox.srs")

SECRET_FILE = "srs.secret"  # noqa: S105  a file name, not a secret; in the data dir
PREFIX = "SRS0"
SEPARATOR = "="
HASH_LENGTH = 8  # base32 characters = 40 bits; postsrsd's default is 4 base64 characters (24 bits)
MAX_AGE_DAYS = 21  # as postsrsd: longer than any retry schedule, short enough to expire harvests
TIME_PRECISION = 86400  # one day per tick (libsrs2)
TIME_SLOTS = 1024  # two base32 characters
MAX_PATH = 256  # RFC 5321 4.5.3.1.3: a path is at most 256 octets, brackets included
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@dataclass(frozen=True)
class SrsAddress:
    """A verified SRS0 address of ours, taken apart."""

    original: str  # the sender the bounce goes back to
    day: int  # the TT field, decoded


class InvalidSrs(Exception):
    """An SRS0 address of one of our domains that does not verify (forged, mangled or expired)."""


def is_srs(local_part: str) -> bool:
    return local_part[: len(PREFIX) + 1].upper() == PREFIX + SEPARATOR


def _timestamp(now: float) -> str:
    day = int(now // TIME_PRECISION) % TIME_SLOTS
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _decode_timestamp(text: str) -> int | None:
    text = text.upper()
    if len(text) != 2 or any(ch not in _BASE32 for ch in text):
        return None
    return (_BASE32.index(text[0]) << 5) | _BASE32.index(text[1])


def load_secret(path: Path) -> bytes:
    """The secret at `path`, made on first use: 32 random bytes, hex, mode 0600, never replaced (every
    SRS address in flight depends on it)."""
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a secret another process made first
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_bytes().strip()
    if len(text) < 32:
        raise ValueError(f"{path} holds no usable SRS secret; remove it to make a new one")
    return text


class SenderRewriter:
    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def _hash(self, timestamp: str, domain: str, local: str) -> str:
        data = SEPARATOR.join((timestamp, domain, local)).lower().encode("utf-8")
        digest = hmac.new(self._secret, data, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii")[:HASH_LENGTH].lower()

    def forward(self, sender: str, our_domain: str, *, now: float | None = None) -> str:
        """The envelope sender for a forward of mail from `sender` by an alias of `our_domain`
        ('' stays ''; a sender of one of our domains needs no rewriting: the caller keeps it)."""
        if not sender:
            return ""
        local, at, domain = sender.rpartition("@")
        if not at or not local or not domain:
            return sender
        timestamp = _timestamp(self._clock() if now is None else now)
        digest = self._hash(timestamp, domain, local)
        return f"{PREFIX}{SEPARATOR}{digest}{SEPARATOR}{timestamp}{SEPARATOR}{domain}{SEPARATOR}{local}@{our_domain}"

    def reverse(self, address: str, *, now: float | None = None) -> SrsAddress:
        """The original sender of an SRS0 address of ours; raises InvalidSrs unless its hash and age
        verify. Case-insensitive in the SRS fields (a relay may have changed the case)."""
        local = address.rpartition("@")[0]
        if not is_srs(local) or len(address) > MAX_PATH:
            raise InvalidSrs("not an SRS0 address")
        fields = local[len(PREFIX) + 1:].split(SEPARATOR, 3)
        if len(fields) != 4 or not all(fields):
            raise InvalidSrs("malformed SRS0 address")
        digest, timestamp, domain, original_local = fields
        day = _decode_timestamp(timestamp)
        if day is None:
            raise InvalidSrs("malformed SRS0 timestamp")
        expected = self._hash(timestamp, domain, original_local)
        if not hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("utf-8", "replace")):
            raise InvalidSrs("SRS0 hash does not verify")
        today = int((self._clock() if now is None else now) // TIME_PRECISION) % TIME_SLOTS
        if (today - day) % TIME_SLOTS > MAX_AGE_DAYS:
            raise InvalidSrs("SRS0 address expired")
        return SrsAddress(f"{original_local}@{domain}", day)

