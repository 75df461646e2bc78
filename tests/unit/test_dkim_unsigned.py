"""The DKIM check's short cut for unsigned mail (appliance/inbound_auth.py unsigned_as_dkimpy_reads_it):
whenever it says "nothing to verify", dkimpy itself reads the message without error and finds no
DKIM-Signature field, so check_dkim's answer is the one dkimpy's parse would have given."""

from __future__ import annotations

from pathlib import Path

import dkim
import dns.resolver
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.inbound_auth import check_dkim, unsigned_as_dkimpy_reads_it

CORPUS = Path(__file__).parent.parent / "corpus" / "mime"

# Pieces that make dkimpy's parse go each of its ways: fields, folded lines, mbox From lines, lines
# without a colon, names with a space before the colon, bare LFs, the field itself in any case.
PIECES = [b"Subject: hi", b"DKIM-Signature: v=1; d=x", b"dkim-signature:x", b"Dkim-Signature : x", b" folded",
          b"\tfolded", b"From bob Mon Jan 1", b"no colon", b"X-\x80: y", b"A:", b":", b"", b"body text"]


def signatures_dkimpy_finds(data: bytes) -> int | None:
    """How many DKIM-Signature fields dkimpy's own parse finds; None when it fails."""
    try:
        verifier = dkim.DKIM(data)
    except Exception:  # noqa: BLE001  any failure of dkimpy's parse counts as one
        return None
    return sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")


@given(st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from([b"\r\n", b"\n"])), max_size=8))
@example([(b"From bob Mon Jan 1", b"\r\n"), (b" folded", b"\r\n")])  # no field before the continuation
def test_the_short_cut_is_taken_only_where_dkimpy_finds_no_signature(lines: list[tuple[bytes, bytes]]) -> None:
    data = b"".join(text + end for text, end in lines)
    if unsigned_as_dkimpy_reads_it(data):
        assert signatures_dkimpy_finds(data) == 0


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_unsigned_corpus_messages_take_the_short_cut(path: Path) -> None:
    data = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert unsigned_as_dkimpy_reads_it(data) == (signatures_dkimpy_finds(data) == 0)


def test_check_dkim_answers_as_before() -> None:
    resolver = dns.resolver.Resolver(configure=False)  # never asked: nothing here is signed
    assert check_dkim(resolver, b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n") == ()
    # A header line dkimpy cannot read is still its permerror (no short cut taken).
    [result] = check_dkim(resolver, b"From: a@example.org\r\nno colon here\r\n\r\nbody\r\n")
    assert result.result == "permerror"
