"""The DKIM record's public key, encoded without cryptography (issue 19: idle memory), is byte for
byte the SubjectPublicKeyInfo cryptography writes, for the keys the box makes and for others."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.dkim_keys import DkimKey, DkimKeyError, generate_key


def cryptography_spki(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def test_the_boxs_own_keys(tmp_path: Path) -> None:
    for n in range(3):
        key = generate_key(tmp_path, "example.org", f"lb2026113{n}")
        assert key.public_key_base64() == cryptography_spki(key.private_pem)
        assert key.txt_record() == f"v=DKIM1; k=rsa; p={cryptography_spki(key.private_pem)}"


@pytest.mark.parametrize(("bits", "exponent", "form"), [
    (1024, 65537, serialization.PrivateFormat.TraditionalOpenSSL),
    (3072, 3, serialization.PrivateFormat.TraditionalOpenSSL),
    (2048, 65537, serialization.PrivateFormat.PKCS8),  # what `openssl genpkey` writes
    (1032, 65537, serialization.PrivateFormat.PKCS8),  # a modulus whose top byte may lack its top bit
])
def test_other_sizes_exponents_and_forms(bits: int, exponent: int, form: serialization.PrivateFormat) -> None:
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    assert DkimKey("example.org", "s", pem).public_key_base64() == cryptography_spki(pem)


@pytest.mark.parametrize("body", [b"AAAA", b"not base64 at all!", b"MAA="])
def test_a_damaged_key_is_a_dkim_key_error(body: bytes) -> None:
    pem = b"-----BEGIN RSA PRIVATE KEY-----\n" + body + b"\n-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(DkimKeyError, match="cannot be read"):
        DkimKey("example.org", "s", pem).public_key_base64()
