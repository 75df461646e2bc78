"""A 50 MB message is fetched whole, in sections and in part, streamed from its file with modest memory."""

from __future__ import annotations

import gc
import hashlib
import re
import tracemalloc

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap

pytestmark = pytest.mark.slow

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
SIZE = 50 * 1024 * 1024
MEMORY_BUDGET = 16 * 1024 * 1024  # Python allocations while 50 MB go out: a few chunks, not the message


def big_message() -> tuple[bytes, bytes]:
    """A multipart message of about SIZE octets: a short text part and a large base64 attachment."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
    attachment = line * (SIZE // len(line))
    head = (b"From: big@example.org\r\nTo: alice@example.test\r\nSubject: big one\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=BIG\r\n\r\n--BIG\r\nContent-Type: text/plain\r\n\r\n"
            b"See attachment.\r\n--BIG\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    return head + attachment + b"--BIG--\r\n", attachment[:-2]


def fetch_literal_digest(raw: RawImap, tag: bytes, command: bytes) -> tuple[int, str, list[bytes]]:
    """Send a FETCH whose response has one literal; read it in chunks. (size, sha256, other lines)."""
    raw.send(tag + b" " + command + b"\r\n")
    while b"\r\n" not in raw.buffer:
        raw._fill()
    first, raw.buffer = raw.buffer.split(b"\r\n", 1)
    m = re.search(rb"\{(\d+)\}$", first)
    assert m, first
    size = int(m.group(1))
    digest = hashlib.sha256()
    left = size
    while left:
        if not raw.buffer:
            raw._fill()
        chunk, raw.buffer = raw.buffer[:left], raw.buffer[left:]
        digest.update(chunk)
        left -= len(chunk)
    return size, digest.hexdigest(), raw.until_tagged(tag)


def test_fifty_megabytes_stream_with_modest_memory(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    data, attachment = big_message()
    whole_digest = hashlib.sha256(data).hexdigest()
    attachment_digest = hashlib.sha256(attachment).hexdigest()
    attachment_size = len(attachment)
    result = box.run(box.services.store.deliver([USER], data))[USER]
    assert isinstance(result, int)
    size = len(data)
    del data, attachment
    gc.collect()

    raw = RawImap(box.port("imaps"), box.client_context, timeout=60)
    try:
        raw.login(USER, PASSWORD)
        raw.command(b"s", b"SELECT INBOX")
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            got_size, digest, rest = fetch_literal_digest(raw, b"a", b"UID FETCH 1 BODY.PEEK[]")
            assert (got_size, digest) == (size, whole_digest)
            assert rest[-1].startswith(b"a OK")
            structure = raw.command(b"b", b"FETCH 1 (RFC822.SIZE BODYSTRUCTURE)")
            assert b"RFC822.SIZE %d " % size in structure[0]
            assert b'"application" "octet-stream" NIL NIL NIL "base64" %d ' % attachment_size in structure[0]
            got_size, digest, _ = fetch_literal_digest(raw, b"c", b"FETCH 1 BODY.PEEK[2]")
            assert digest == attachment_digest
            got_size, _, _ = fetch_literal_digest(raw, b"d", b"FETCH 1 BODY.PEEK[2]<1000000.1000>")
            assert got_size == 1000
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        print(f"peak Python allocations while streaming: {peak / 1e6:.1f} MB")
        assert peak < MEMORY_BUDGET, f"peak Python allocations {peak / 1e6:.1f} MB"
        # And the flag changes that come with a non-PEEK fetch.
        got_size, digest, rest = fetch_literal_digest(raw, b"e", b"FETCH 1 BODY[]")
        assert digest == whole_digest
        assert any(b"\\Seen" in line for line in rest)
    finally:
        raw.close()
