"""ESEARCH (RFC 4731), LIST-STATUS (RFC 5819) and STATUS=SIZE (RFC 8438) over a real session."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.polling import wait_until

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def message(n: int, body: str = "hello") -> bytes:
    return f"From: <s{n}@example.org>\r\nSubject: m{n}\r\n\r\n{body} {n}\r\n".encode()


@pytest.fixture
def raw(box: BoxHandle) -> Iterator[RawImap]:
    box.add_user(USER, PASSWORD)
    for n in range(1, 6):
        result = box.run(box.services.store.deliver([USER], message(n)))[USER]
        assert isinstance(result, int)
    client = RawImap(box.port("imaps"), box.client_context)
    client.login(USER, PASSWORD)
    yield client
    client.close()


def test_capabilities(raw: RawImap) -> None:
    caps = raw.command(b"c", b"CAPABILITY")[0].split()
    for cap in (b"ESEARCH", b"LIST-STATUS", b"STATUS=SIZE", b"SORT", b"MULTIAPPEND", b"THREAD=REFERENCES", b"BINARY", b"COMPRESS=DEFLATE"):
        assert cap in caps


def test_esearch(raw: RawImap) -> None:
    raw.command(b"s", b"SELECT INBOX")
    raw.command(b"t", b"STORE 2,4 +FLAGS (\\Seen)")
    assert raw.command(b"a", b"SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN")[0] == (
        b'* ESEARCH (TAG "a") MIN 1 MAX 5 COUNT 3 ALL 1,3,5\r\n')
    assert raw.command(b"b", b"UID SEARCH RETURN () SEEN")[0] == b'* ESEARCH (TAG "b") UID ALL 2,4\r\n'
    assert raw.command(b"c", b"SEARCH RETURN (COUNT) CHARSET UTF-8 SUBJECT nothing")[0] == (
        b'* ESEARCH (TAG "c") COUNT 0\r\n')
    assert raw.command(b"d", b"SEARCH RETURN (MIN MAX) SUBJECT nothing")[0] == b'* ESEARCH (TAG "d")\r\n'
    assert raw.command(b"e", b"SEARCH RETURN (SAVE) ALL")[-1].startswith(b"e BAD")  # SEARCHRES not offered


def test_status_size_and_list_status(raw: RawImap) -> None:
    size = sum(len(message(n)) for n in range(1, 6))
    assert raw.command(b"s", b"STATUS INBOX (MESSAGES SIZE)")[0] == f"* STATUS INBOX (MESSAGES 5 SIZE {size})\r\n".encode()
    raw.command(b"c", b"CREATE Lists/Work")
    reply = raw.command(b"l", b'LIST "" "*" RETURN (SPECIAL-USE STATUS (MESSAGES UNSEEN))')
    assert reply[-1].startswith(b"l OK"), reply
    at = {line: i for i, line in enumerate(reply)}
    inbox = next(i for line, i in at.items() if line.startswith(b"* LIST") and line.rstrip().endswith(b" INBOX"))
    assert reply[inbox + 1] == b"* STATUS INBOX (MESSAGES 5 UNSEEN 5)\r\n"
    sent = next(i for line, i in at.items() if line.startswith(b"* LIST") and b"\\Sent" in line)
    assert reply[sent + 1] == b"* STATUS Sent (MESSAGES 0 UNSEEN 0)\r\n"
    # "Lists" is only implied (\Noselect... or a folder made as a parent): no STATUS for a
    # \NonExistent or \Noselect name.
    for i, line in enumerate(reply):
        if line.startswith(b"* LIST") and (b"\\Noselect" in line or b"\\NonExistent" in line):
            assert not reply[i + 1].startswith(b"* STATUS"), reply
    work = next(i for line, i in at.items() if line.rstrip().endswith(b"Lists/Work"))
    assert reply[work + 1] == b"* STATUS Lists/Work (MESSAGES 0 UNSEEN 0)\r\n"


def test_sort(box: BoxHandle, raw: RawImap) -> None:
    """RFC 5256 3: base subjects (Re:, [list], (fwd) ignored), first address's mailbox, Date in UTC
    with the internal date standing in, REVERSE per key, message number as the final tie-breaker."""
    letters = [
        ("Re: [list] Zebra (fwd)", "carol@example.org", "Mon, 1 Jan 2024 12:00:00 +0000", "x" * 10),
        ("apple", "Bob <bob@example.org>", "Mon, 1 Jan 2024 13:00:00 +0200", "x" * 300),  # 11:00 UTC
        ("Fwd: Mango", "alice@example.org", None, "x" * 200),
    ]
    for subject, sender, date, body in letters:
        head = f"From: {sender}\r\nSubject: {subject}\r\n" + (f"Date: {date}\r\n" if date else "")
        result = box.run(box.services.store.deliver([USER], f"{head}\r\n{body}\r\n".encode(), folder="Archive"))
        assert isinstance(result[USER], int)
    raw.command(b"s", b"SELECT Archive")
    assert raw.command(b"a", b"SORT (SUBJECT) UTF-8 ALL")[0] == b"* SORT 2 3 1\r\n"
    assert raw.command(b"b", b"SORT (FROM) UTF-8 ALL")[0] == b"* SORT 3 2 1\r\n"
    assert raw.command(b"c", b"SORT (REVERSE SIZE) UTF-8 ALL")[0] == b"* SORT 2 3 1\r\n"
    # Message 3 has no Date: its internal date (now) sorts it last.
    assert raw.command(b"d", b"SORT (DATE) UTF-8 ALL")[0] == b"* SORT 2 1 3\r\n"
    assert raw.command(b"e", b"UID SORT (ARRIVAL) UTF-8 SUBJECT apple")[0].startswith(b"* SORT ")
    assert raw.command(b"f", b"SORT (SUBJECT) KOI8-R ALL")[-1].startswith(b"f NO [BADCHARSET")
    assert raw.command(b"g", b"SORT (REVERSE) UTF-8 ALL")[-1].startswith(b"g BAD")


def test_multiappend(box: BoxHandle, raw: RawImap) -> None:
    reply = raw.command(b"a", b"APPEND Archive (\\Seen) {5+}\r\nfirst (\\Flagged) {6+}\r\nsecond")
    assert re.match(rb"a OK \[APPENDUID \d+ 1:2\]", reply[-1]), reply
    raw.command(b"s", b"SELECT Archive")
    fetched = raw.command(b"f", b"FETCH 1:* (FLAGS)")
    assert b"\\Seen" in fetched[0]
    assert b"\\Flagged" in fetched[1]


def test_multiappend_is_all_or_nothing(box: BoxHandle, raw: RawImap) -> None:
    """RFC 3502 6: the second message is over quota, so the first is not kept either."""
    box.add_user("small@example.test", PASSWORD, quota_bytes=1000)
    client = RawImap(box.port("imaps"), box.client_context)
    client.login("small@example.test", PASSWORD)
    big = b"x" * 900
    reply = client.command(b"a", b"APPEND INBOX {300+}\r\n" + b"y" * 300 + b" {900+}\r\n" + big)
    assert reply[-1].startswith(b"a NO [OVERQUOTA]"), reply
    status = client.command(b"s", b"STATUS INBOX (MESSAGES)")
    assert status[0] == b"* STATUS INBOX (MESSAGES 0)\r\n"
    client.close()


def test_thread_references(box: BoxHandle, raw: RawImap) -> None:
    """RFC 5256 REFERENCES: References/In-Reply-To links, a subject-only reply gathered under its
    original, a missing parent kept as a dummy holding its two children, threads by date."""
    letters = [
        ("<a@x>", "", "Hello"), ("<b@x>", "References: <a@x>", "Re: Hello"), ("<c@x>", "", "Other"),
        ("<d@x>", "References: <a@x>", "Re: Hello"), ("<e@x>", "In-Reply-To: <b@x>", "Re: Hello"),
        ("<f@x>", "", "Re: Other"), ("<g@x>", "References: <gone@x>", "Lost"),
        ("<h@x>", "References: <gone@x>", "Lost too"),
    ]
    for day, (msgid, link, subject) in enumerate(letters, start=1):
        head = (f"Message-ID: {msgid}\r\n" + (f"{link}\r\n" if link else "") +
                f"Subject: {subject}\r\nDate: Mon, {day} Jan 2024 10:00:00 +0000\r\n")
        result = box.run(box.services.store.deliver([USER], f"{head}\r\nbody\r\n".encode(), folder="Trash"))
        assert isinstance(result[USER], int)
    raw.command(b"s", b"SELECT Trash")
    assert raw.command(b"t", b"THREAD REFERENCES UTF-8 ALL")[0] == b"* THREAD (1 (2 5)(4))(3 6)((7)(8))\r\n"
    assert raw.command(b"u", b"UID THREAD REFERENCES UTF-8 SUBJECT other")[0] == b"* THREAD (3 6)\r\n"
    assert raw.command(b"v", b"THREAD REFS UTF-8 ALL")[-1].startswith(b"v BAD")  # not offered
    assert raw.command(b"w", b"THREAD REFERENCES UTF-8 SUBJECT nothing")[0] == b"* THREAD\r\n"


BINARY_MESSAGE = (
    b"From: <s@example.org>\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 =3D ok\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC/w==\r\n"
    b"--b\r\nContent-Type: application/x-odd\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n"
    b"--b--\r\n"
)


def test_binary(box: BoxHandle, raw: RawImap) -> None:
    """RFC 3516: content with its transfer encoding undone; a NUL makes it a literal8."""
    result = box.run(box.services.store.deliver([USER], BINARY_MESSAGE, folder="Junk"))
    assert isinstance(result[USER], int)
    raw.command(b"s", b"SELECT Junk")
    reply = raw.command(b"a", b"FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[2] BINARY.PEEK[2])")
    assert reply[0] == (b"* 1 FETCH (BINARY[1] {10}\r\ncaf\xc3\xa9 = ok BINARY.SIZE[2] 4 "
                        b"BINARY[2] ~{4}\r\n\x00\x01\x02\xff)\r\n"), reply
    assert raw.command(b"b", b"FETCH 1 (BINARY.PEEK[2]<1.2>)")[0] == b"* 1 FETCH (BINARY[2]<1> {2}\r\n\x01\x02)\r\n"
    assert raw.command(b"c", b"FETCH 1 (BINARY.PEEK[3])")[-1].startswith(b"c NO [UNKNOWN-CTE]")
    assert raw.command(b"d", b"FETCH 1 (FLAGS)")[0] == b"* 1 FETCH (FLAGS (\\Recent))\r\n"  # PEEK: not \Seen
    # APPEND with a literal8 (RFC 3516 4.4).
    reply = raw.command(b"e", b"APPEND Junk ~{12+}\r\nSubject: z\r\n\r\n")
    assert reply[-1].startswith(b"e OK"), reply


def test_compress_deflate_over_tls(box: BoxHandle, raw: RawImap) -> None:
    """RFC 4978: raw DEFLATE both ways after the OK, under TLS; a command pipelined behind COMPRESS
    (already compressed) is served; a second COMPRESS is refused."""
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    inflate = zlib.decompressobj(-15)

    def packed(text: bytes) -> bytes:
        return deflate.compress(text) + deflate.flush(zlib.Z_SYNC_FLUSH)

    raw.send(b"z COMPRESS DEFLATE\r\n" + packed(b"n NOOP\r\n"))
    assert raw.line() == b"z OK DEFLATE active\r\n"
    received = inflate.decompress(raw.buffer)
    raw.buffer = b""

    def read_until(marker: bytes) -> bool:
        nonlocal received
        if marker not in received:
            received += inflate.decompress(raw.sock.recv(65536))
        return marker in received

    wait_until(lambda: read_until(b"n OK"), seconds=15, what="the NOOP pipelined behind COMPRESS")
    assert received.startswith(b"n OK"), received
    raw.send(packed(b"s SELECT INBOX\r\nc COMPRESS DEFLATE\r\n"))
    wait_until(lambda: read_until(b"c NO"), seconds=15, what="the second COMPRESS refused")
    assert b"* 5 EXISTS\r\n" in received
    assert b"c NO [COMPRESSIONACTIVE]" in received
