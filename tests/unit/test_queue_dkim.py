"""DKIM keys on disk, selector rotation and signing outgoing mail (RFC 6376, issue 7)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import dkim
import pytest

from appliance import dkim_keys
from appliance.db import Database
from appliance.queue.dkim_sign import author_domain, openssl_rsassa_pkcs1_v1_5_sign, sign

MESSAGE = (b"From: Alice <alice@ours.test>\r\nTo: bob@far.test\r\nSubject: signed\r\n"
           b"Date: Mon, 23 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@ours.test>\r\n\r\nHello Bob.\r\n")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim_keys.DkimKey:
    return dkim_keys.generate_key(tmp_path_factory.mktemp("dkim"), "ours.test", "s1")


def dns_for(*keys: dkim_keys.DkimKey):  # type: ignore[no-untyped-def]
    records = {f"{k.record_name}.".encode(): k.txt_record().encode() for k in keys}

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return get_txt


def test_a_signed_message_verifies_with_the_published_record(key: dkim_keys.DkimKey) -> None:
    signed = sign(MESSAGE, key)
    assert signed.endswith(MESSAGE)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(signed, dnsfunc=dns_for(key))
    signature = dkim.DKIM(signed)
    assert signature.verify(dnsfunc=dns_for(key))
    assert signature.domain == b"ours.test"
    assert signature.selector == b"s1"
    assert b"from" in signature.include_headers
    assert b"subject" in signature.include_headers
    assert not dkim.verify(signed.replace(b"Hello Bob.", b"Hello Eve."), dnsfunc=dns_for(key))


def test_key_files_are_private_and_the_record_is_rfc6376(key: dkim_keys.DkimKey, tmp_path: Path) -> None:
    fresh = dkim_keys.generate_key(tmp_path, "ours.test", "s2")
    path = dkim_keys.key_path(tmp_path, "ours.test", "s2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dkim_keys.load_key(tmp_path, "ours.test", "s2") == fresh
    assert dkim_keys.load_key(tmp_path, "ours.test", "nope") is None
    assert fresh.record_name == "s2._domainkey.ours.test"
    assert fresh.txt_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # a 2048-bit SubjectPublicKeyInfo
    assert "PRIVATE" not in repr(fresh)
    with pytest.raises(dkim_keys.DkimKeyError):
        dkim_keys.generate_key(tmp_path, "ours.test", "s2")  # never overwritten


@pytest.mark.parametrize(("domain", "selector"), [("../etc", "s"), ("ours.test", "../x"), ("ours.test", "a b")])
def test_names_cannot_leave_the_dkim_folder(tmp_path: Path, domain: str, selector: str) -> None:
    with pytest.raises(dkim_keys.DkimKeyError):
        dkim_keys.key_path(tmp_path, domain, selector)


def test_rotation_makes_a_new_selector_and_keeps_the_old_key(tmp_path: Path) -> None:
    async def run() -> tuple[dkim_keys.DkimKey, dkim_keys.DkimKey, dkim_keys.DkimKey, dkim_keys.DkimKey | None]:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            first = await dkim_keys.ensure_key(db, tmp_path / "dkim", "Ours.Test")
            again = await dkim_keys.ensure_key(db, tmp_path / "dkim", "ours.test")
            second = await dkim_keys.rotate_key(db, tmp_path / "dkim", "ours.test")
            current = await dkim_keys.current_key(db, tmp_path / "dkim", "ours.test")
            return first, again, second, current
        finally:
            await db.close()

    first, again, second, current = asyncio.run(run())
    assert first == again
    assert first.domain == "ours.test"
    assert second.selector != first.selector
    assert current == second
    assert dkim_keys.selectors_on_disk(tmp_path / "dkim", "ours.test") == {first.selector, second.selector}


def test_selector_names() -> None:
    day = 1795420800  # 2026-11-23 UTC
    assert dkim_keys.new_selector(set(), day) == "lb20261123"
    assert dkim_keys.new_selector({"lb20261123"}, day) == "lb20261123-2"
    assert dkim_keys.new_selector({"lb20261123", "lb20261123-2"}, day) == "lb20261123-3"


@pytest.mark.parametrize(("header", "expected"), [
    (b"From: Alice <alice@Ours.Test>\r\n", "ours.test"),
    (b"From: alice@ours.test (Alice)\r\n", "ours.test"),
    (b"From: a@ours.test, b@ours.test\r\n", "ours.test"),
    (b"From: a@ours.test, b@far.test\r\n", None),
    (b"From: a@ours.test\r\nFrom: b@ours.test\r\n", None),
    (b"Subject: no author\r\n", None),
])
def test_the_signing_domain_is_the_authors(header: bytes, expected: str | None) -> None:
    assert author_domain(header + b"\r\nbody\r\n") == expected


def test_openssl_signing_is_byte_identical_to_dkimpys_own(key: dkim_keys.DkimKey) -> None:
    import hashlib

    import dkim.crypto

    parsed = dkim.crypto.parse_pem_private_key(key.private_pem)
    for algorithm in (hashlib.sha256, hashlib.sha1):
        digest = dkim.HashThrough(algorithm())
        digest.update(b"the canonicalized headers")
        ours = openssl_rsassa_pkcs1_v1_5_sign(digest, parsed)
        assert ours == bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, parsed))
    assert dkim.RSASSA_PKCS1_v1_5_sign is openssl_rsassa_pkcs1_v1_5_sign


def test_signing_uses_the_libcrypto_already_loaded_and_refuses_a_bad_key(key: dkim_keys.DkimKey) -> None:
    """The RSA step goes through the system's OpenSSL 3 that ssl/hashlib mapped, not cryptography
    (tests/unit/test_import_cost.py checks that a signature leaves cryptography unloaded)."""
    import hashlib

    from appliance import libcrypto

    assert libcrypto.available()
    with pytest.raises(libcrypto.LibcryptoError):
        libcrypto.rsa_sign_prehashed(b"\x30\x03\x02\x01\x00", hashlib.sha256(b"x").digest(), "sha256")
    signed = sign(b"From: <a@ours.test>\r\nSubject: hi\r\n\r\nbody\r\n", key)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
