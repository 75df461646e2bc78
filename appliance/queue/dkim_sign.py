"""DKIM-sign outgoing mail (RFC 6376) with dkimpy: which domain signs, and the signing itself.

The signing domain is the author's (the From: header's domain), so DMARC (RFC 7489 3.1.1) finds the
signature aligned; a message whose From: domain has no key of ours goes out unsigned. The queue signs
only when the login that submitted the message may send as that From: address (never on the header
alone: a signature of ours vouches for the author).
"""

from __future__ import annotations

import asyncio
import email.policy
import functools
import logging
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dkim
import dkim.crypto

from appliance import dkim_keys, libcrypto
from appliance.address import UnreadableAddresses, header_addresses
from appliance.dkim_keys import DkimKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from appliance.accounts import Accounts
    from appliance.db import Database

log = logging.getLogger("letterbox.queue.dkim")

KEY_TTL = 1.0  # seconds a domain's DKIM key is reused (a rotation is in force within this)
MAX_HEADER_READ = 256 * 1024  # the header section is enough to find the author

# relaxed/relaxed survives the re-wrapping and whitespace changes relays are known for (RFC 6376 3.4).
CANONICALIZATION = (b"relaxed", b"relaxed")


def author_addresses(data: bytes) -> list[str]:
    """The addresses of the one From: field (RFC 5322 3.6.2: several authors are allowed); empty
    when there is no From:, more than one, or one that cannot be read (the message goes unsigned)."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    values = headers.get_all("From") or []
    if len(values) != 1:
        return []
    try:
        return [addr.strip() for addr in header_addresses(str(values[0]))]
    except UnreadableAddresses:
        return []


def author_domain(data: bytes) -> str | None:
    """The domain shared by every From: address, lower-case; None when there is no single one."""
    addresses = author_addresses(data)
    domains = {addr.rpartition("@")[2].strip().lower() for addr in addresses if "@" in addr}
    if len(domains) != 1 or len(addresses) != len([a for a in addresses if "@" in a]):
        return None
    domain = domains.pop().rstrip(".")
    return domain or None


def sign(data: bytes, key: DkimKey) -> bytes:
    """`data` with a DKIM-Signature header on top. Blocking (RSA): run it off the event loop."""
    header = dkim.sign(
        data,
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private_pem,
        canonicalize=CANONICALIZATION,
        logger=log,
        linesep=b"\r\n",
    )
    return bytes(header) + data


def load_and_sign(path: Path, key: DkimKey | None) -> bytes:
    """The spool file's bytes, signed with `key` when there is one. Blocking: run it on a thread."""
    data = path.read_bytes()
    if key is None:
        return data
    try:
        return sign(data, key)
    except Exception:
        # An unsignable message (broken headers) still goes out; the receiver judges it unsigned.
        log.exception("DKIM signing with %s failed; sending unsigned", key.record_name)
        return data


class SigningKeys:
    """Which key signs a queued message, each domain's key read at most once a KEY_TTL."""

    def __init__(self, accounts: Accounts, db: Database, directory: Path) -> None:
        self._accounts = accounts
        self._db = db
        self._directory = directory
        self._keys: dict[str, tuple[float, DkimKey | None]] = {}

    async def for_message(self, message_id: str, auth_user: str | None, path: Path) -> DkimKey | None:
        """The author domain's key for mail our users submitted (RFC 6376; DMARC alignment), and only
        when the login recorded with the message may send as the From: address: a signature of ours
        says the domain vouches for the author, so the header alone must never choose the key
        (submission refuses such a From: too; this is the second, independent check).

        Forwards (an alias's mail to another domain, sent with an SRS sender) are not signed: they
        have no login, their From: is someone else's domain, so a signature of the alias's domain
        would not align for DMARC and would lend our domain's name to whatever the forward carries.
        Their original signatures travel unchanged (only a Received: is added on top)."""
        if not auth_user:
            return None

        def author() -> tuple[str | None, list[str]]:
            with path.open("rb") as f:
                head = f.read(MAX_HEADER_READ)
            return author_domain(head), author_addresses(head)

        domain, authors = await asyncio.to_thread(author)
        if domain is None:
            return None
        for address in authors:
            if not await self._accounts.may_send_as(auth_user, address):
                log.warning("%s: not DKIM-signed: %s may not send as the From: address <%s>",
                            message_id, auth_user, address[:100])
                return None
        cached = self._keys.get(domain)
        if cached is not None and time.monotonic() - cached[0] < KEY_TTL:
            return cached[1]
        key = None
        if await self._accounts.is_local_domain(domain):
            key = await dkim_keys.current_key(self._db, self._directory, domain)
            if key is None:
                log.warning("no DKIM key for %s: its mail goes out unsigned", domain)
        self._keys[domain] = (time.monotonic(), key)
        return key


# --- RSA through OpenSSL ---------------------------------------------------------------------------
# dkimpy builds the DKIM-Signature itself (canonicalization, header selection, folding) but does the
# RSA step in pure Python: ~12 ms per signature on a fast core with the GIL held, far more on a
# Raspberry Pi, stalling every session of the box meanwhile. The same step through OpenSSL takes ~1 ms.
# RSASSA-PKCS1-v1_5 is deterministic, so the signature is byte for byte what dkimpy would have produced
# (tests/unit/test_queue_dkim.py checks exactly that). OpenSSL is the libcrypto the ssl module already
# loaded (appliance/libcrypto.py), not cryptography's: its Rust library is 9-10 MB of RSS that the server
# would keep for good after its first signature (issue 19: idle memory). cryptography only where that
# libcrypto is not OpenSSL 3.

_PREHASHED = ("sha256", "sha1")
_pure_python_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_RSA_FIELDS = ("modulus", "publicExponent", "privateExponent", "prime1", "prime2", "exponent1", "exponent2",
               "coefficient")


@functools.lru_cache(maxsize=32)
def _pkcs1_der(*numbers: int) -> bytes:
    """RFC 8017 A.1.2 RSAPrivateKey (version 0, two primes) of dkimpy's parsed key."""
    return dkim_keys.der_sequence(0, *numbers)


@functools.lru_cache(maxsize=32)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n)).private_key()


def openssl_rsassa_pkcs1_v1_5_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, computed by OpenSSL."""
    name = str(hash.name).lower()
    if name not in _PREHASHED:
        return bytes(_pure_python_sign(hash, private_key))
    numbers = tuple(private_key[field] for field in _RSA_FIELDS)
    if libcrypto.available():
        return libcrypto.rsa_sign_prehashed(_pkcs1_der(*numbers), hash.digest(), name)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    algorithm = hashes.SHA256 if name == "sha256" else hashes.SHA1
    return _openssl_key(*numbers).sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))


# dkimpy calls the primitive through its module global (dkim/__init__.py imports it by name).
dkim.RSASSA_PKCS1_v1_5_sign = openssl_rsassa_pkcs1_v1_5_sign
