"""DKIM keys of the box's domains: `<data>/dkim/<domain>/<selector>.key`, the selector in force in the
settings (`dkim_selector:<domain>`).

Keys are RSA 2048 (RFC 8301 3.2: at least 1024, 2048 recommended) in PKCS#1 PEM, which is what dkimpy
signs with. Rotation writes a key under a new selector and switches to it; old keys stay on disk so
their DNS records can be retired at leisure (mail already signed still verifies while they are
published).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.db import Database
from appliance.durable import replace_file

KEY_BITS = 2048
KEY_SUFFIX = ".key"
SELECTOR_SETTING_PREFIX = "dkim_selector:"
SELECTOR_PREFIX = "lb"
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DOMAIN = re.compile(r"^[a-z0-9.-]{1,253}$")


class DkimKeyError(Exception):
    """A key that cannot be used; the message is one line for a terminal or the console."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_pem: bytes = field(repr=False)

    @property
    def record_name(self) -> str:
        """Where the public key is published (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key_base64(self) -> str:
        """The SubjectPublicKeyInfo (DER, base64) of the key's public half, as DKIM publishes it. Read
        with dkimpy's own key parser and encoded here, not with cryptography: the status checks show
        this record every few hours, and cryptography's Rust library is 9-10 MB of the box's RSS
        (issue 19: idle memory). DER has one encoding per value: the same bytes as cryptography's."""
        from dkim.crypto import UnparsableKeyError, parse_pem_private_key

        try:
            key = parse_pem_private_key(self.private_pem)
        except (UnparsableKeyError, ValueError) as exc:  # ValueError: damaged base64
            raise DkimKeyError(f"the DKIM key of {self.domain} ({self.selector}) cannot be read") from exc
        rsa_public_key = der_sequence(key["modulus"], key["publicExponent"])
        algorithm = _der(0x30, RSA_ENCRYPTION_OID + b"\x05\x00")  # rsaEncryption, NULL parameters
        der = _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_public_key))  # BIT STRING, no unused bits
        return base64.b64encode(der).decode("ascii")

    def txt_record(self) -> str:
        """The TXT value to publish at `record_name` (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k=rsa; p={self.public_key_base64()}"


RSA_ENCRYPTION_OID = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"  # 1.2.840.113549.1.1.1 (RFC 8017 A.1)


def _der(tag: int, body: bytes) -> bytes:
    """One DER element (X.690 8.1.3: the short length form below 128, else the long form)."""
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


def der_sequence(*values: int) -> bytes:
    """A DER SEQUENCE of non-negative INTEGERs (an RSA key's PKCS#1 form)."""
    return _der(0x30, b"".join(_der_integer(value) for value in values))


def _der_integer(value: int) -> bytes:
    """A non-negative INTEGER: big-endian, with a leading zero byte when the top bit is set."""
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def selector_setting(domain: str) -> str:
    return f"{SELECTOR_SETTING_PREFIX}{domain.lower()}"


def _check(domain: str, selector: str) -> None:
    # Both become path components: refuse anything that could climb out of dkim/.
    if not _DOMAIN.match(domain) or ".." in domain or domain.startswith("."):
        raise DkimKeyError(f"not a domain name: {domain!r}")
    if not _SELECTOR.match(selector):
        raise DkimKeyError(f"not a DKIM selector: {selector!r}")


def key_path(dkim_dir: Path, domain: str, selector: str) -> Path:
    domain = domain.lower()
    _check(domain, selector)
    return dkim_dir / domain / f"{selector}{KEY_SUFFIX}"


def new_selector(existing: set[str], now: float | None = None) -> str:
    """'lb20261123', or 'lb20261123-2', 'lb20261123-3'... when rotated more than once a day."""
    base = SELECTOR_PREFIX + time.strftime("%Y%m%d", time.gmtime(now if now is not None else time.time()))
    if base not in existing:
        return base
    for n in range(2, 1000):
        if f"{base}-{n}" not in existing:
            return f"{base}-{n}"
    raise DkimKeyError("too many DKIM rotations today")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_file(path, data)


def generate_key(dkim_dir: Path, domain: str, selector: str, bits: int = KEY_BITS) -> DkimKey:
    """Blocking (RSA generation takes a fraction of a second): call through asyncio.to_thread."""
    path = key_path(dkim_dir, domain, selector)
    if path.exists():
        raise DkimKeyError(f"a DKIM key for {domain} with selector {selector} already exists")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    _write_private(path, pem)
    return DkimKey(domain.lower(), selector, pem)


def generate_key_in_child(dkim_dir: Path, domain: str, selector: str) -> DkimKey:
    """generate_key in a child process (appliance/child.py): RSA generation needs cryptography, whose
    9-10 MB the server would keep for good after a domain's first key (issue 19: idle memory). Blocking."""
    from appliance import child

    pem = child.call("appliance.dkim_keys:_generated_pem", str(dkim_dir), domain, selector, expect=(DkimKeyError,))
    return DkimKey(domain.lower(), selector, pem.encode())


def _generated_pem(dkim_dir: str, domain: str, selector: str) -> str:
    """In the child: generate_key_in_child's answer."""
    return generate_key(Path(dkim_dir), domain, selector).private_pem.decode()


def load_key(dkim_dir: Path, domain: str, selector: str) -> DkimKey | None:
    path = key_path(dkim_dir, domain, selector)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    return DkimKey(domain.lower(), selector, pem)


def selectors_on_disk(dkim_dir: Path, domain: str) -> set[str]:
    folder = dkim_dir / domain.lower()
    if not folder.is_dir():
        return set()
    return {p.name[: -len(KEY_SUFFIX)] for p in folder.iterdir() if p.name.endswith(KEY_SUFFIX)}


async def current_key(db: Database, dkim_dir: Path, domain: str) -> DkimKey | None:
    """The key mail from `domain` is signed with, or None when the domain has none."""
    selector = await db.get_setting(selector_setting(domain))
    if not selector:
        return None
    return await asyncio.to_thread(load_key, dkim_dir, domain, selector)


async def ensure_key(db: Database, dkim_dir: Path, domain: str) -> DkimKey:
    """The current key, generated (and made current) if the domain has none yet."""
    key = await current_key(db, dkim_dir, domain)
    return key if key is not None else await rotate_key(db, dkim_dir, domain)


async def rotate_key(db: Database, dkim_dir: Path, domain: str) -> DkimKey:
    """A new key under a new selector, in force from now on; its TXT record must be published."""
    domain = domain.lower()
    existing = await asyncio.to_thread(selectors_on_disk, dkim_dir, domain)
    selector = new_selector(existing)
    key = await asyncio.to_thread(generate_key_in_child, dkim_dir, domain, selector)
    await db.set_setting(selector_setting(domain), selector)
    return key
