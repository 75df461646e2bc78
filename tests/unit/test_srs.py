"""The Sender Rewriting Scheme (appliance/srs.py): addresses made, verified, refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance import srs

NOW = 1_800_000_000.0
DAY = 86400.0


def rewriter(secret: bytes = b"0123456789abcdef0123456789abcdef") -> srs.SenderRewriter:
    return srs.SenderRewriter(secret, clock=lambda: NOW)


def test_a_forward_sender_encodes_the_original_and_verifies() -> None:
    r = rewriter()
    address = r.forward("Bob.Smith@Example.ORG", "ours.test")
    local, _, domain = address.rpartition("@")
    assert domain == "ours.test"
    prefix, digest, stamp, orig_domain, orig_local = local.split("=")
    assert (prefix, orig_domain, orig_local) == ("SRS0", "Example.ORG", "Bob.Smith")
    assert len(digest) == srs.HASH_LENGTH
    assert len(stamp) == 2
    assert r.reverse(address).original == "Bob.Smith@Example.ORG"
    # A relay may change the case of the local part: still ours.
    assert r.reverse(address.upper()).original.lower() == "bob.smith@example.org"


def test_a_local_part_with_separators_survives() -> None:
    r = rewriter()
    address = r.forward("a=b+c@x.test", "ours.test")
    assert r.reverse(address).original == "a=b+c@x.test"


def test_the_null_sender_is_not_rewritten() -> None:
    assert rewriter().forward("", "ours.test") == ""


@pytest.mark.parametrize("mangle", [
    lambda a: a.replace("=x.test=", "=y.test="),  # another original domain
    lambda a: a.replace("=someone@", "=another@"),  # another original local part
    lambda a: "SRS0=aaaaaaaa" + a[len("SRS0=") + srs.HASH_LENGTH:],  # a made-up hash
    lambda a: a.replace("SRS0=", "SRS0=x", 1),
    lambda a: "SRS0=only@ours.test",
    lambda a: "SRS0====@ours.test",
])
def test_a_forged_address_does_not_verify(mangle) -> None:  # type: ignore[no-untyped-def]
    r = rewriter()
    address = r.forward("someone@x.test", "ours.test")
    with pytest.raises(srs.InvalidSrs):
        r.reverse(mangle(address))


def test_another_secret_does_not_verify() -> None:
    address = rewriter().forward("someone@x.test", "ours.test")
    with pytest.raises(srs.InvalidSrs):
        rewriter(b"another secret, just as long as the first").reverse(address)


def test_addresses_expire_after_the_maximum_age() -> None:
    r = rewriter()
    fresh = r.forward("someone@x.test", "ours.test", now=NOW - srs.MAX_AGE_DAYS * DAY)
    assert r.reverse(fresh).original == "someone@x.test"
    old = r.forward("someone@x.test", "ours.test", now=NOW - (srs.MAX_AGE_DAYS + 1) * DAY)
    with pytest.raises(srs.InvalidSrs, match="expired"):
        r.reverse(old)
    future = r.forward("someone@x.test", "ours.test", now=NOW + 3 * DAY)
    with pytest.raises(srs.InvalidSrs, match="expired"):
        r.reverse(future)


def test_an_oversized_address_is_refused_before_hashing() -> None:
    with pytest.raises(srs.InvalidSrs):
        rewriter().reverse("SRS0=" + "a" * 300 + "@ours.test")


def test_the_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / srs.SECRET_FILE
    first = srs.load_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert srs.load_secret(path) == first
    assert len(first) >= 32
    assert [p.name for p in tmp_path.iterdir()] == [srs.SECRET_FILE]  # no temporary file left
    r1, r2 = srs.SenderRewriter(first), srs.SenderRewriter(srs.load_secret(path))
    assert r2.reverse(r1.forward("a@b.test", "ours.test")).original == "a@b.test"
