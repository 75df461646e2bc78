"""A message holding NUL octets (port 25 takes them as they come; so does a Maildir another program
wrote) is sent over IMAP with each NUL as 0x80, as Dovecot does: an IMAP string (a literal too) cannot
carry a NUL (RFC 3501 4.3 and 9, CHAR8; RFC 9051 the same), and a client reading C strings stops at
one. The octet count stays, so RFC822.SIZE and partial fetches still add up; BINARY (RFC 3516) keeps
the NUL in a literal8, which may carry it."""

from __future__ import annotations

import re
import smtplib

from tests.conftest import BoxHandle
from tests.support.imap_wire import RawImap
from tests.support.smtp_wire import maildir_messages

USER = "alice@example.test"
PASSWORD = "correct horse battery staple 9"
SMALL = (b"From: a\x00b@example.org\r\nTo: alice@example.test\r\nSubject: hidden\x00after the NUL\r\n\r\n"
         b"shown\x00hidden\r\n")
# Past fetch.INLINE_LITERAL (256 KiB): BODY[] is streamed from the file, not read into memory.
BIG = b"From: b@example.org\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n" + b"x" * 300_000 + b"\x00tail\r\n"
ITEMS = (b"(RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)] BODY.PEEK[] BODY.PEEK[TEXT]"
         b" BODY.PEEK[]<0.40> BINARY.PEEK[1])")
_LITERAL = re.compile(rb"(~?)\{(\d+)\}\r\n")


def literals(line: bytes) -> list[tuple[bool, bytes]]:
    """(literal8?, content) of each literal in a response line, in order."""
    out: list[tuple[bool, bytes]] = []
    pos = 0
    while m := _LITERAL.search(line, pos):
        size = int(m.group(2))
        out.append((m.group(1) == b"~", line[m.end():m.end() + size]))
        pos = m.end() + size
    return out


def test_a_nul_goes_out_as_0x80_in_every_imap_string_but_binary(box: BoxHandle) -> None:
    box.add_user(USER, PASSWORD)
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        client.ehlo("mta.test")
        for message in (SMALL, BIG):
            assert client.sendmail("sender@example.org", [USER], message) == {}
    stored = maildir_messages(box.data.mail, USER)
    assert len(stored) == 2
    assert all(b"\x00" in m for m in stored)  # kept as it came, on the disk
    raw = RawImap(box.port("imaps"), box.client_context, timeout=30)
    try:
        raw.login(USER, PASSWORD)
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        reply = raw.command(b"f", b"FETCH 1:2 " + ITEMS)
    finally:
        raw.close()
    assert reply[-1].startswith(b"f OK"), reply[-1]
    fetches = [line for line in reply if line.startswith(b"* ")]
    assert len(fetches) == 2
    for line, file in zip(fetches, stored, strict=True):
        size = int(re.search(rb"RFC822\.SIZE (\d+)", line).group(1))  # type: ignore[union-attr]
        texts = [data for binary, data in literals(line) if not binary]
        assert all(b"\x00" not in data for data in texts), [d[:80] for d in texts if b"\x00" in d]
        body = re.search(rb"BODY\[\] \{(\d+)\}\r\n", line)
        assert body is not None
        assert int(body.group(1)) == size == len(file)
        assert line[body.end():body.end() + size] == file.replace(b"\x00", b"\x80")
        assert re.search(rb"BODY\[\]<0> \{40\}\r\n", line)
        binary = [data for is8, data in literals(line) if is8]
        assert binary == [file.split(b"\r\n\r\n", 1)[1]]  # the NUL, in a literal8
    assert b"hidden\x80after the NUL" in fetches[0]  # the Subject in ENVELOPE and HEADER.FIELDS
