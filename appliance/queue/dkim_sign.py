"""DKIM-sign outgoing mail (RFC 6376) with dkimpy: which domain signs, and the signing itself.

The signing domain is the author's (the From: header's domain), so DMARC (RFC 7489 3.1.1) finds the
signature aligned; a message whose From: domain has no key of ours goes out unsigned. The queue signs
only when the login that submitted the message may send as that From: address (never on the header
alone: a signature of ours vouches for the author).
"""

from __future__ import annotations

import email.policy
import email.utils
import functools
import logging
from email.parser import BytesHeaderParser
from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from appliance.dkim_keys import DkimKey

log = logging.getLogger("letterbox.queue.dkim")

# relaxed/relaxed survives the re-wrapping and whitespace changes relays are known for (RFC 6376 3.4).
CANONICALIZATION = (b"relaxed", b"relaxed")


def author_addresses(data: bytes) -> list[str]:
    """The addresses of the one From: field (RFC 5322 3.6.2: several authors are allowed); empty
    when there is no From: or more than one."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    values = headers.get_all("From") or []
    if len(values) != 1:
        return []
    return [addr.strip() for _, addr in email.utils.getaddresses([str(values[0])]) if addr]


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


# --- RSA through OpenSSL ---------------------------------------------------------------------------
# dkimpy builds the DKIM-Signature itself (canonicalization, header selection, folding) but does the
# RSA step in pure Python: ~12 ms per signature on a fast core with the GIL held, far more on a
# Raspberry Pi, stalling every session of the box meanwhile. The same step through OpenSSL
# (cryptography) takes ~1 ms. RSASSA-PKCS1-v1_5 is deterministic, so the signature is byte for byte
# what dkimpy would have produced (tests/unit/test_queue_dkim.py checks exactly that).

_PREHASHED: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_pure_python_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign


@functools.lru_cache(maxsize=32)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int) -> rsa.RSAPrivateKey:
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n)).private_key()


def openssl_rsassa_pkcs1_v1_5_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, computed by OpenSSL."""
    algorithm = _PREHASHED.get(str(hash.name).lower())
    if algorithm is None:
        return bytes(_pure_python_sign(hash, private_key))
    key = _openssl_key(
        private_key["modulus"], private_key["publicExponent"], private_key["privateExponent"],
        private_key["prime1"], private_key["prime2"], private_key["exponent1"], private_key["exponent2"],
        private_key["coefficient"],
    )
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))


# dkimpy calls the primitive through its module global (dkim/__init__.py imports it by name).
dkim.RSASSA_PKCS1_v1_5_sign = openssl_rsassa_pkcs1_v1_5_sign
