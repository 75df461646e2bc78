"""The byte pipelines under appliance/backup.py: tar written and read by hand, zstd, age, threads.

Why by hand: measured on 20k messages / 505 MB (2 cores), a backup spent most of its time in
Python's per-file overhead rather than in the codecs: tarfile's `TarInfo.tobuf` (a pax header
computed for every member) and its stream reader (10 KB records through several Python layers), and
pyrage's file-object adapters, which hold the interpreter lock. Here a tar header is one bytes
template filled in, a member's data is handed on as slices of large blocks, and the codecs run in
their own thread: hashlib, zstandard and cryptography release the lock while they work, so the
walking thread (open, read, hash) and the compress+encrypt+write thread use both cores, like
`tar | zstd | age` does with three processes.

The format is unchanged: a POSIX (pax) tar stream, one zstd frame, age v1: `age -d | zstd -d |
tar -x` unpacks it. Memory is bounded by the queues between the threads (a few MiB each).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import struct
import subprocess
import sys
from collections.abc import Generator, Iterator
from typing import IO, cast

import zstandard

from appliance import age_stream

BLOCK = 1024 * 1024  # a pipe's size, and the most read from it at once
# What is written into a pipe at once: a quarter of it, so that the slower side of a pipe always
# finds work waiting and never sleeps (on a loaded machine each wake-up waits for a time slice).
PIECE = BLOCK // 4
BLOCKSIZE = 512
ZERO_BLOCK = bytes(BLOCKSIZE)
MAX_PAX = 1024 * 1024
# Level 1: measured here, python-zstandard's level 3 ran at half the speed of level 1 for 0.5% less
# output on mail (text plus base64 attachments, which no level shrinks much).
ZSTD_LEVEL = 1

DIRTYPE = b"5"
REGTYPE = b"0"


class TarFormatError(Exception):
    """The tar stream is damaged or holds something a backup never does (reported by the caller)."""


# --- tar headers (POSIX.1-2001 pax / ustar) -------------------------------------------------------

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar(name: bytes, size: int, mode: int, mtime: int, kind: bytes) -> bytes:
    head = (name.ljust(100, b"\0") + _octal(mode, 8) + _octal(0, 8) + _octal(0, 8) + _octal(size, 12)
            + _octal(mtime, 12))
    tail = kind + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
    # The checksum is the sum of the header's octets with its own field read as eight spaces.
    chksum = sum(head) + sum(tail) + 8 * 32
    return head + b"%06o\0 " % chksum + tail


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:  # the length counts its own digits
        n += 1
    return str(n).encode() + body


def header(name: str, size: int = 0, *, mode: int = 0o600, mtime: int = 0, kind: bytes = REGTYPE) -> bytes:
    """A member's header (and the pax header before it when the name is long or not ASCII, or the
    size does not fit the 11 octal digits of ustar), as tarfile's PAX_FORMAT writes them."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 100 and raw.isascii() and size < 8**11:
        return _ustar(raw, size, mode, mtime, kind)
    records = _pax_record("path", raw)
    if size >= 8**11:
        records += _pax_record("size", str(size).encode())
    pax = _ustar(b"././@PaxHeader", len(records), 0o644, mtime, b"x") + records + padding(len(records))
    return pax + _ustar(raw[:100], 0 if size >= 8**11 else size, mode, mtime, kind)


def padding(size: int) -> bytes:
    return ZERO_BLOCK[: -size % BLOCKSIZE]


END = ZERO_BLOCK * 2  # the end of an archive


# --- reading tar --------------------------------------------------------------------------------

def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large values; negative ones are refused
        if field[0] == 0xFF:
            raise TarFormatError("a negative number in a tar header")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("a tar header is damaged") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at, at + 20)
        if space < 0:
            raise TarFormatError("a pax header is damaged")
        try:
            length = int(data[at:space])
        except ValueError:
            raise TarFormatError("a pax header is damaged") from None
        record = data[space + 1: at + length]
        if length <= 0 or at + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("a pax header is damaged")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value
        at += length
    return records


class TarReader:
    """Members of a tar stream given as an iterator of byte blocks. `members()` yields (name, type,
    size); the caller then takes exactly `size` bytes with `data(size)` (or leaves them: they are
    skipped), after which `digest()` is their SHA-256. Names are decoded as UTF-8 with
    surrogateescape, as tarfile does on Linux."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks = blocks
        self.buf = b""
        self.at = 0
        self.left = 0  # data of the current member not yet taken
        self.sha = b""  # the SHA-256 of the last member's data taken

    def _fill(self) -> bool:
        for block in self.blocks:
            if block:
                self.buf, self.at = block, 0
                return True
        return False

    def read(self, n: int) -> bytes:
        """Exactly n bytes (fewer only at the end of the stream)."""
        if self.at + n <= len(self.buf):
            self.at += n
            return self.buf[self.at - n: self.at]
        parts = [self.buf[self.at:]]
        got = len(parts[0])
        self.at = len(self.buf)
        while got < n and self._fill():
            take = min(n - got, len(self.buf))
            parts.append(self.buf[:take])
            self.at = take
            got += take
        return b"".join(parts)

    def pieces(self, n: int) -> Iterator[memoryview]:
        """n bytes as views into the blocks, without copying them."""
        while n:
            if self.at >= len(self.buf) and not self._fill():
                raise TarFormatError("the tar stream ends inside a member (truncated)")
            take = min(n, len(self.buf) - self.at)
            yield memoryview(self.buf)[self.at: self.at + take]
            self.at += take
            n -= take

    def raw(self, size: int) -> Iterator[memoryview]:
        """The member's data like data(), without hashing it."""
        self.left = 0
        return self.pieces(size)

    def data(self, size: int) -> Iterator[memoryview]:
        self.left = 0
        sha = hashlib.sha256()
        for piece in self.pieces(size):
            sha.update(piece)
            yield piece
        self.sha = sha.digest()

    def digest(self) -> bytes:
        return self.sha

    def _skip(self, n: int) -> None:
        for _ in self.pieces(n):
            pass

    def _header(self) -> bytes | None:
        block = self.read(BLOCKSIZE)
        if len(block) < BLOCKSIZE:
            raise TarFormatError("the tar stream ends early (truncated)")
        if block == ZERO_BLOCK:
            return None
        stored = _number(block[148:156])
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != unsigned:  # some old writers summed signed octets
            signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 128)
            if stored != signed:
                raise TarFormatError("a tar header is damaged (bad checksum)")
        return block

    def members(self) -> Iterator[tuple[str, bytes, int]]:
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        while True:
            block = self._header()
            if block is None:
                return
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (b"x", b"L"):
                if size > MAX_PAX:
                    raise TarFormatError("a tar extension header is too large")
                data = self.read(size)
                self._skip(-size % BLOCKSIZE)
                if kind == b"x":
                    pax = _parse_pax(data)
                else:
                    long_name = data.split(b"\0", 1)[0]
                continue
            raw = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:346] != b"\0":
                raw = block[345:500].split(b"\0", 1)[0] + b"/" + raw
            raw = pax.get("path", long_name if long_name is not None else raw)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise TarFormatError("a pax header is damaged") from None
            pax, long_name = {}, None
            if kind == b"\0":
                kind = REGTYPE
            self.left = size if kind == REGTYPE else 0
            yield raw.decode("utf-8", "surrogateescape"), kind, size
            self._skip(self.left + (-size % BLOCKSIZE if kind == REGTYPE else 0))
            self.left = 0

    def drain(self) -> None:
        """Read what follows the end of the archive (so the layers below authenticate it all)."""
        self.buf, self.at = b"", 0
        for _ in self.blocks:
            pass


# Between the child that unpacks a restore and the reader of that restore, each member is a header
# (type, length of the name, size), the name, and for a file its data: the tar stream already
# decrypted, decompressed and parsed. The reader hashes each file's data as it writes it
# (TarReader.data): measured on 20k messages / 505 MB, the child was the slower of the two processes
# by about the SHA-256's 0.55 s of CPU, so the hashing sits with the writing.
FRAME = struct.Struct("<cIQ")
FRAME_END = bytes(FRAME.size)


class FrameReader(TarReader):
    """The members of a restore as the `unpack` child sends them (same interface as TarReader)."""

    def _exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise TarFormatError("the tar stream ends early (truncated)")
        return data

    def members(self) -> Iterator[tuple[str, bytes, int]]:
        while (head := self._exact(FRAME.size)) != FRAME_END:
            kind, name_size, size = FRAME.unpack(head)
            if name_size > MAX_PAX:
                raise TarFormatError("a member's name is too long")
            name = self._exact(name_size).decode("utf-8", "surrogateescape")
            self.left = size if kind == REGTYPE else 0  # nothing follows the name of a directory
            yield name, kind, size
            self._skip(self.left)  # what the caller left of the data
            self.left = 0


# --- the codec process ---------------------------------------------------------------------------
#
# zstd and age run in a child process (this module run with -m), fed or drained through a pipe, the
# way `tar | zstd | age` splits the work; for a restore the child parses the tar stream too. Threads were tried first: each message file costs the
# walking thread several releases of the interpreter lock (open, read, hash, write), and on a
# loaded 2-core machine every release let the codec thread in and then waited for the OS to hand
# the lock back, so a restore ran at a fifth of its CPU time. Two processes share no lock. The
# payload key goes to the child through a pipe, never its arguments or environment.

DAMAGED_EXIT = 3


def _child(mode: str, stdin: int | IO[bytes], stdout: int | IO[bytes], key_fd: int = -1) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603  our own interpreter running this module
        [sys.executable, "-m", "appliance.backup_stream", mode, str(key_fd)],
        stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, pass_fds=(key_fd,) if key_fd >= 0 else (),
        close_fds=True)


def _key_pipe(key: bytes) -> int:
    r, w = os.pipe()
    os.write(w, key)  # 32 bytes: far below a pipe's buffer
    os.close(w)
    return r


def _big_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):  # 1 MiB instead of 64 KiB: fewer, larger reads and writes
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BLOCK)


def _finish(proc: subprocess.Popen[bytes], what: str) -> None:
    err = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
    code = proc.wait()
    if proc.stderr:
        proc.stderr.close()
    if code == DAMAGED_EXIT:
        raise age_stream.AgeError(err or "damaged", damaged=True)
    if code != 0:
        raise OSError(f"the {what} process failed ({err.splitlines()[-1] if err else f'exit {code}'})")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Sink:
    """A writable end whose bytes are compressed (zstd), encrypted (age) and written to `fd` by a
    child process. The writer keeps small pieces in a list and hands them over a block at a time."""

    def __init__(self, fd: int, *, recipient: str = "", passphrase: str = "") -> None:
        head, key = age_stream.new_header(recipients=(recipient,) if recipient else (), passphrase=passphrase)
        _write_all(fd, head)
        key_fd = _key_pipe(key)
        try:
            self.proc = _child("compress", subprocess.PIPE, fd, key_fd)
        finally:
            os.close(key_fd)
        assert self.proc.stdin is not None
        self.pipe = self.proc.stdin.fileno()
        _big_pipe(self.pipe)
        self.pieces: list[bytes | memoryview] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.pieces.append(data)
        self.size += len(data)
        if self.size >= PIECE:
            self._flush()

    def _flush(self) -> None:
        try:
            _write_all(self.pipe, b"".join(self.pieces))
        except BrokenPipeError:
            _finish(self.proc, "compression")  # says why the child stopped
            raise
        self.pieces, self.size = [], 0

    def close(self) -> None:
        self._flush()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        _finish(self.proc, "compression")

    def abort(self) -> None:
        self.pieces, self.size = [], 0
        _kill(self.proc)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def plain_tar(source: IO[bytes], key: bytes) -> tuple[TarReader, Generator[bytes, None, None]]:
    """A reader of the tar stream inside an age file whose header was read (`key` from
    age_stream.read_header), and the generator of blocks under it (close it when done). From a file,
    the work is split over two processes, balanced by their CPU time: a child decrypts, decompresses
    and parses the tar stream (FrameReader), and this one checks each member, hashes it and writes
    it. Else all of it here.

    Why two and not three like `age -d | zstd -d | tar -x`: measured on 20k messages / 505 MB on 2
    cores, a third process (a child that parsed and hashed between the codec child and this one)
    cost about 1 s more CPU than it saved (one more copy of every byte through a pipe, one more
    interpreter), and restored more slowly, loaded or not."""
    try:
        fd = source.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        here = _plain_here(source, key)
        return TarReader(here), here
    framed = _unpacked_from(fd, source.tell(), key)
    return FrameReader(framed), framed


def _unpacked_from(fd: int, offset: int, key: bytes) -> Generator[bytes, None, None]:
    """The output of the `unpack` child reading the age file's body from `fd` (the members, framed)."""
    os.lseek(fd, offset, os.SEEK_SET)  # the child reads on from the end of the header
    key_fd = _key_pipe(key)
    try:
        child = _child("unpack", fd, subprocess.PIPE, key_fd)
    finally:
        os.close(key_fd)
    try:
        assert child.stdout is not None
        out = child.stdout.fileno()
        _big_pipe(out)
        while block := os.read(out, BLOCK):
            yield block
        _finish(child, "unpacking")
    finally:
        _kill(child)


class _Blocks:
    """The read(n) that zstandard calls, served from the decrypted blocks as they come: no copy
    through io.RawIOBase.readinto (measured: 0.1-0.2 s of CPU less on 505 MB)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks = blocks
        self.buf = b""
        self.at = 0

    def read(self, n: int) -> bytes:
        if self.at >= len(self.buf):
            self.buf, self.at = next(self.blocks, b""), 0
        self.at += n
        return self.buf[self.at - n: self.at]


def _plain_here(source: IO[bytes], key: bytes) -> Generator[bytes, None, None]:
    decrypted = age_stream.Decryptor(source, key).blocks()
    stream = cast(IO[bytes], _Blocks(decrypted))
    with zstandard.ZstdDecompressor().stream_reader(stream, read_size=BLOCK, read_across_frames=True) as z:
        while block := z.read(BLOCK):
            yield block
    for _ in decrypted:  # past the last frame: age authenticates the rest too
        pass


def _compress(key: bytes) -> None:
    stdout = sys.stdout.fileno()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    enc = age_stream.Encryptor(key)
    while data := os.read(0, BLOCK):  # whatever is there: waiting for a full block would stall the writer
        out = compressor.compress(data)
        if out:
            _write_all(stdout, enc.update(out))
    _write_all(stdout, enc.update(compressor.flush()) + enc.finish())


def _unpack(key: bytes) -> None:
    """The age file's body on stdin, the members of the tar stream inside framed on stdout
    (FrameReader)."""
    stdout = sys.stdout.fileno()
    tar = TarReader(_plain_here(sys.stdin.buffer, key))
    pending: list[bytes | memoryview] = []
    size = 0
    for name, kind, length in tar.members():
        raw = name.encode("utf-8", "surrogateescape")
        if kind != REGTYPE:
            pending.append(FRAME.pack(kind, len(raw), 0) + raw)
            continue
        pending.append(FRAME.pack(kind, len(raw), length) + raw)
        size += length
        pending.extend(tar.raw(length))
        if size >= PIECE:  # handed on a quarter of a pipe at a time, as Sink does
            _write_all(stdout, b"".join(pending))
            pending, size = [], 0
    tar.drain()
    pending.append(FRAME_END)
    _write_all(stdout, b"".join(pending))


def main(argv: list[str]) -> int:
    """The child: `compress KEY_FD` (tar on stdin, age file body on stdout) or `unpack KEY_FD` (age
    file body on stdin, the members of the tar stream inside framed on stdout)."""
    mode, key_fd = argv[0], int(argv[1])
    key = b""
    if key_fd >= 0:
        key = os.read(key_fd, 64)
        os.close(key_fd)
    work = {"compress": _compress, "unpack": _unpack}[mode]
    try:
        work(key)
    except BrokenPipeError:
        return 1  # the parent stopped reading: it knows why
    except (age_stream.AgeError, zstandard.ZstdError, TarFormatError) as exc:
        print(f"damaged: {exc}", file=sys.stderr)
        return DAMAGED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
