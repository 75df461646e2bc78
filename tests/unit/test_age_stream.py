"""The streamed age and tar layers under backups (appliance/age_stream.py, appliance/backup_stream.py):
what they write opens with the reference implementation (pyrage, and tarfile), what the reference
writes opens with them, at every chunk boundary; damage and cut files are refused."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import IO

import pyrage
import pytest

from appliance import age_stream, backup_stream

SIZES = [0, 1, age_stream.CHUNK - 1, age_stream.CHUNK, age_stream.CHUNK + 1, 17 * age_stream.CHUNK,
         17 * age_stream.CHUNK + 5]


def _identity() -> tuple[str, str]:
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())


def _encrypt(plain: bytes, recipient: str) -> bytes:
    sink = io.BytesIO()
    with age_stream.writer(sink, recipients=(recipient,)) as w:
        w.write(plain)
    return sink.getvalue()


def _decrypt(data: bytes, identity: str) -> bytes:
    with age_stream.reader(io.BytesIO(data), identity=identity) as r:
        return r.read()


@pytest.mark.parametrize("size", SIZES)
def test_both_ways_with_the_reference(size: int) -> None:
    identity, recipient = _identity()
    plain = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    ours = _encrypt(plain, recipient)
    assert pyrage.decrypt(ours, [pyrage.x25519.Identity.from_str(identity)]) == plain
    theirs = pyrage.encrypt(plain, [pyrage.x25519.Recipient.from_str(recipient)])
    assert _decrypt(theirs, identity) == plain
    # The payload as blocks (what the restore's pipeline reads) is the same plaintext.
    source = io.BytesIO(theirs)
    key = age_stream.read_header(source, identity=identity)
    assert b"".join(age_stream.Decryptor(source, key).blocks()) == plain


def test_several_recipients_and_the_wrong_key() -> None:
    first, second, other = _identity(), _identity(), _identity()
    data = pyrage.encrypt(b"hello", [pyrage.x25519.Recipient.from_str(first[1]),
                                     pyrage.x25519.Recipient.from_str(second[1])])
    assert _decrypt(data, second[0]) == b"hello"
    with pytest.raises(age_stream.AgeError) as refused:
        _decrypt(data, other[0])
    assert refused.value.wrong_key


@pytest.mark.parametrize("cut", [age_stream.SEALED, age_stream.SEALED * 2, 100])
def test_a_cut_or_altered_payload_is_refused(cut: int) -> None:
    identity, recipient = _identity()
    data = _encrypt(b"m" * (4 * age_stream.CHUNK), recipient)
    header = len(data) - 4 * age_stream.SEALED - age_stream.TAG
    for broken in (data[: header + cut], data[:-30] + bytes([data[-30] ^ 1]) + data[-29:]):
        with pytest.raises(age_stream.AgeError) as refused:
            _decrypt(broken, identity)
        assert refused.value.damaged


def test_a_mistyped_key_is_refused() -> None:
    _identity_text, recipient = _identity()
    with pytest.raises(age_stream.AgeError, match="checksum"):
        age_stream.recipient_key(recipient[:-1] + ("q" if recipient[-1] != "q" else "p"))


def test_tar_headers_read_by_tarfile_and_back() -> None:
    long_name = "mail/example.org/someone/.Some Folder/cur/" + "1700000000.M1P2.a-very-long-host-name" * 3 + ":2,S"
    entries = [("mail", b"", backup_stream.DIRTYPE), ("mail/short", b"abc", backup_stream.REGTYPE),
               (long_name, b"x" * 700, backup_stream.REGTYPE), ("mail/Entwürfe", b"", backup_stream.REGTYPE)]
    stream = b"".join(backup_stream.header(n, len(d), mtime=1, kind=k) + d + backup_stream.padding(len(d))
                      for n, d, k in entries) + backup_stream.END
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as tar:
        seen = [(m.name, m.size, m.isdir()) for m in tar]
    assert seen == [(n, len(d), k == backup_stream.DIRTYPE) for n, d, k in entries]
    # Our reader, on tarfile's own output (pax headers, 10 KB records) and on ours, in odd block sizes.
    made = io.BytesIO()
    with tarfile.open(fileobj=made, mode="w|") as tar:
        for n, d, k in entries:
            info = tarfile.TarInfo(n)
            info.type, info.size = k, len(d)
            tar.addfile(info, io.BytesIO(d) if d else None)
    for data in (stream, made.getvalue()):
        reader = backup_stream.TarReader(iter([data[i:i + 333] for i in range(0, len(data), 333)]))
        got = [(n.rstrip("/"), b"".join(reader.data(s)) if k == backup_stream.REGTYPE else b"", k)
               for n, k, s in reader.members()]  # tarfile ends a directory's name with '/'

        assert got == entries


def test_a_damaged_tar_header_is_refused() -> None:
    data = bytearray(backup_stream.header("mail/a", 3) + b"abc" + backup_stream.padding(3) + backup_stream.END)
    data[10] ^= 1
    with pytest.raises(backup_stream.TarFormatError):
        list(backup_stream.TarReader(iter([bytes(data)])).members())


def _archive(path: Path, entries: list[tuple[str, bytes, bytes]], recipient: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sink = backup_stream.Sink(fd, recipient=recipient)
        for name, data, kind in entries:
            sink.write(backup_stream.header(name, len(data), mtime=1, kind=kind) + data
                       + backup_stream.padding(len(data)))
        sink.write(backup_stream.END)
        sink.close()
    finally:
        os.close(fd)


def _read_back(path: Path, identity: str, *, in_memory: bool) -> list[tuple[str, bytes, bytes, bytes]]:
    """Each member's data and SHA-256, taken with data() and digest()."""
    with path.open("rb") as file:
        source: IO[bytes] = io.BytesIO(file.read()) if in_memory else file
        child = backup_stream.unpack_child(source)
        key = age_stream.read_header(source, identity=identity)
        reader, blocks = backup_stream.plain_tar(source, key, child)
        try:
            got = []
            for name, kind, size in reader.members():
                if kind != backup_stream.REGTYPE or name == "skipped":
                    got.append((name, b"", kind, b""))
                else:
                    got.append((name, b"".join(reader.data(size)), kind, reader.digest()))
            reader.drain()
            return got
        finally:
            blocks.close()


@pytest.mark.parametrize("in_memory", [False, True])
def test_restore_pipeline_from_a_file_and_from_memory(in_memory: bool, tmp_path: Path) -> None:
    """A backup read back from a file (through the `unpack` child, which sends the members in
    batches, their data in shared memory) and from a stream without a file descriptor (all in this
    process): each file's data and its SHA-256, a member left unread skipped. Many small files make
    many batches, and the ones after a large (streamed) file keep their order. A damaged payload is
    refused either way."""
    identity, recipient = _identity()
    big = os.urandom(3 * backup_stream.BLOCK + 7)  # spans several pipe blocks
    small = [(f"mail/cur/{n}", os.urandom(n * 37 % 3000), backup_stream.REGTYPE) for n in range(400)]
    entries = [("mail", b"", backup_stream.DIRTYPE), ("mail/a", b"abc", backup_stream.REGTYPE),
               ("skipped", b"s" * 5000, backup_stream.REGTYPE), ("mail/empty", b"", backup_stream.REGTYPE),
               *small[:200], ("mail/" + "long-name-" * 20 + "Entwürfe", big, backup_stream.REGTYPE), *small[200:]]
    path = tmp_path / "b.tar.zst.age"
    _archive(path, entries, recipient)
    got = _read_back(path, identity, in_memory=in_memory)
    assert [(n.rstrip("/"), k) for n, _d, k, _s in got] == [(n, k) for n, _d, k in entries]
    for (name, data, kind), (_n, read, _k, digest) in zip(entries, got, strict=True):
        if kind == backup_stream.REGTYPE and name != "skipped":  # a member's digest is of the data taken
            assert digest == hashlib.sha256(data).digest(), name
            assert read == data, name
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises((age_stream.AgeError, backup_stream.TarFormatError)) as refused:
        _read_back(path, identity, in_memory=in_memory)
    assert not isinstance(refused.value, age_stream.AgeError) or refused.value.damaged
