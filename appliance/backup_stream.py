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
tar -x` unpacks it. Memory is bounded by the queues and shared-memory rings between the threads and
processes (a few MiB each).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import hashlib
import io
import json
import mmap
import os
import select
import struct
import subprocess
import sys
from collections.abc import Generator, Iterator
from typing import IO, Protocol, cast
from zlib import adler32

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

    def __init__(self, blocks: Iterator[bytes] | Iterator[memoryview]) -> None:
        self.blocks = blocks
        self.buf: bytes | memoryview = b""
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
        """Exactly n bytes (fewer only at the end of the stream), copied: a block may be a view of
        shared memory that is handed back when the next one is taken (UnpackChild.blocks)."""
        if self.at + n <= len(self.buf):
            self.at += n
            return bytes(self.buf[self.at - n: self.at])
        parts = [bytes(self.buf[self.at:])]
        got = len(parts[0])
        self.at = len(self.buf)
        while got < n and self._fill():
            take = min(n - got, len(self.buf))
            parts.append(bytes(self.buf[:take]))
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
        if self.at + size <= len(self.buf):  # the usual case: one view, no generator
            self.at += size
            return iter((memoryview(self.buf)[self.at - size:self.at],))
        return self.pieces(size)

    def whole(self, size: int) -> memoryview | None:
        """The member's data as one view, like raw(), when it lies in the current block (the usual
        case: one call to hash it, one to write it); else None, and data() or raw() take it."""
        if self.at + size > len(self.buf):
            return None
        self.left = 0
        self.at += size
        return memoryview(self.buf)[self.at - size: self.at]

    def hash_later(self, view: memoryview, key: bytes, into: dict[bytes, bytes]) -> None:
        """into[key] = the SHA-256 of `view` (a view from whole()), at the latest when the reader is
        closed (RingReader: in a thread of its own)."""
        into[key] = hashlib.sha256(view).digest()

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
        if self.at + n <= len(self.buf):
            self.at += n
            return
        for _ in self.pieces(n):
            pass

    def _header(self) -> bytes | None:
        block = self.read(BLOCKSIZE)
        if len(block) < BLOCKSIZE:
            raise TarFormatError("the tar stream ends early (truncated)")
        if block == ZERO_BLOCK:
            return None
        stored = _number(block[148:156])
        # The sum of the octets with the checksum field's read as spaces. A half block sums to at
        # most 256 * 255 < 65521, so Adler-32's first half (1 + the sum, modulo 65521) is its exact
        # sum: two C calls instead of iterating 512 octets in Python (measured: 8% of the unpacking
        # child's CPU).
        unsigned = ((adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
                    - sum(block[148:156]) + 8 * 32)
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


# Between the child that decodes a restore and the restoring process, the plaintext tar stream
# travels through RING_BLOCKS blocks of shared memory (a memfd both processes map): the child
# decrypts and decompresses into a free block and sends its number and length on its stdout (FILLED);
# the restoring process parses the tar stream straight from the block, writes each file from it, and
# hands the block back on a second pipe when it takes the next one (FREED), with where the block's
# files lie in it (RANGE): the child computes their SHA-256 before it fills the block again and sends
# them back (DIGESTS). Nothing of the data goes through a pipe, and each file is written with one call
# from the block it lies in.
OFFSET = struct.Struct("<Q")  # where the age body starts, sent to the unpack child before its key
RING_BLOCK = BLOCK  # the plaintext tar stream between the two processes of a restore, in blocks
RING_BLOCKS = 4  # of a ring of shared memory (each block is counted in the RSS of both processes)
FILLED = struct.Struct("<BI")  # the child's messages: a ring block's number and how many bytes of it are filled
RING_END = 255  # the FILLED message after the last block
DIGESTS = 254  # a FILLED message whose number is a count of SHA-256 digests (32 bytes each) that follow
FREED = struct.Struct("<BI")  # the restoring process's messages: a block handed back, a count of RANGEs after it
RANGE = struct.Struct("<II")  # a file's data in a block handed back: offset and size
SHA256_SIZE = 32


# --- the codec process ---------------------------------------------------------------------------
#
# zstd and age run in a child process (this module run with -m), fed or drained through a pipe, the
# way `tar | zstd | age` splits the work (for a restore, through shared memory: UnpackChild). Threads
# were tried first: each message file costs the
# walking thread several releases of the interpreter lock (open, read, hash, write), and on a
# loaded 2-core machine every release let the codec thread in and then waited for the OS to hand
# the lock back, so a restore ran at a fifth of its CPU time. Two processes share no lock. The
# payload key goes to the child through a pipe, never its arguments or environment.

DAMAGED_EXIT = 3
MAX_SECRET = 16 * 1024  # what goes through the key pipe before the child reads it: within a pipe's buffer


def _child(mode: str, stdin: int | IO[bytes], stdout: int | IO[bytes], key_fd: int = -1,
           more_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    fds = ((key_fd,) if key_fd >= 0 else ()) + more_fds
    return subprocess.Popen(  # noqa: S603  our own interpreter running this module
        [sys.executable, "-m", "appliance.backup_stream", mode, str(key_fd), *map(str, more_fds)],
        stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, pass_fds=fds, close_fds=True)


def _key_pipe(key: bytes) -> int:
    if len(key) > MAX_SECRET:
        raise ValueError("a backup passphrase this long is refused")
    r, w = os.pipe()
    os.write(w, key)  # a key or a passphrase: far below a pipe's buffer
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
        # The child makes the age header too: X25519 and scrypt need cryptography, whose 9-10 MB the
        # server would keep for good after its first (nightly) backup (issue 19: idle memory).
        key_fd = _key_pipe(json.dumps({"recipient": recipient, "passphrase": passphrase}).encode())
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


class _Closing(Protocol):
    def close(self) -> None: ...


def plain_tar(source: IO[bytes], key: bytes, child: UnpackChild | None = None) -> tuple[TarReader, _Closing]:
    """A reader of the tar stream inside an age file whose header was read (`key` from
    age_stream.read_header), and what to close when done (it stops the work under the reader). From
    a file, the work is split over two processes: `child` (from unpack_child(), started before the
    header was read) decrypts and decompresses into shared memory, and this one parses the tar stream
    from there and writes each file (the files' SHA-256: RingReader). Else all of it here.

    Why this split: measured on 20k messages / 505 MB on 2 cores (load 9-12), against a child that
    also parsed the tar stream and hashed each file, copied them into slots of shared memory and sent
    their names in batches (in turn with two threads, or with a third process forked for the codecs):
    0.2-0.3 s less CPU (3.5-3.8 s against 3.6-4.0 s; no copy, no batches, one interpreter less
    parsing) and a median of 1.13x the speed in alternation. The codecs (1.2-1.4 s) and this process
    (2.2 s, the hashing included) then overlap like `age -d | zstd -d` and `tar -x`, and no process
    hands an interpreter lock between threads, which on a busy machine waits for a time slice at each
    hand-over."""
    if child is None:
        here = _plain_here(source, key)
        return TarReader(here), here
    child.start(source.tell(), key)
    reader = RingReader(child)
    return reader, reader


class RingReader(TarReader):
    """The tar stream in the blocks of the unpack child's ring: a view of one block at a time (a
    view is valid until its block goes back to the child: TarReader copies what it keeps). The SHA-256
    of the files whose data lies in one block (hash_later) are computed by the child when the block
    comes back to it, and arrive with its next messages; the stream's end waits for the last ones.

    Why the child hashes: measured on 20k messages / 505 MB (2 cores), this process's parsing and
    writing is the longest task of a restore while the child (decrypt and decompress, 1.1-1.3 s of
    CPU) waits for free blocks half of its time. A thread of this process hashed before; it cost no
    less CPU, and every file then handed this process's interpreter lock back and forth between the
    two threads (each open, write and close releases it), which on a busy machine waits for a time
    slice at each hand-over. The child has no other thread: its hashing costs the hashing only."""

    def __init__(self, child: UnpackChild) -> None:
        super().__init__(self._blocks())
        self.child = child
        self.ranges = bytearray()  # RANGEs of the files to hash in the current block
        self.keys: list[tuple[bytes, dict[bytes, bytes]]] = []  # and where their digests go
        # The keys of the blocks handed back whose digests have not come yet, oldest first.
        self.waiting: collections.deque[list[tuple[bytes, dict[bytes, bytes]]]] = collections.deque()

    def _blocks(self) -> Iterator[memoryview]:
        """Raises AgeError when the child found the file damaged, TarFormatError when it ends early."""
        held = -1
        ring, out = self.child.ring, self.child.out
        ready = select.poll()
        ready.register(out, select.POLLIN)
        while True:
            if self.keys and not ready.poll(0):
                # The child is behind (its next message has not come): rather than wait idle, this
                # process hashes the files of the block it holds, and the child has less to do.
                self._hash_here(ring[held * RING_BLOCK:(held + 1) * RING_BLOCK])
            block, size = self._message()
            if block == DIGESTS:
                self._digests(size)
                continue
            if held >= 0:
                self._hand_back(held)
                held = -1
            if block in (RING_END, -1):  # the end, or the child stopped (finish() says why)
                break
            if block >= RING_BLOCKS or size > RING_BLOCK:
                raise TarFormatError("the unpacking process lost its way")
            held = block
            yield ring[block * RING_BLOCK: block * RING_BLOCK + size]
        while block == RING_END and self.waiting:  # the digests of the last blocks handed back
            got, count = self._message()
            if got != DIGESTS:
                break
            self._digests(count)
        self.child.finish()  # raises what the child reported when it failed
        if block != RING_END or self.waiting:
            raise TarFormatError("the tar stream ends early (truncated)")

    def _message(self) -> tuple[int, int]:
        head = _read_exact(self.child.out, FILLED.size)
        if len(head) < FILLED.size:
            return -1, 0  # the child stopped: finish() says why
        block, size = FILLED.unpack(head)
        return block, size

    def _hand_back(self, block: int) -> None:
        if self.keys:  # the child sends digests only for a block with files to hash
            self.waiting.append(self.keys)
        self.child.free(block, self.ranges)
        self.keys, self.ranges = [], bytearray()

    def _hash_here(self, block: memoryview) -> None:
        sha256 = hashlib.sha256
        for (key, into), (offset, size) in zip(self.keys, RANGE.iter_unpack(self.ranges), strict=True):
            into[key] = sha256(block[offset: offset + size]).digest()
        self.keys, self.ranges = [], bytearray()

    def _digests(self, count: int) -> None:
        keys = self.waiting.popleft() if self.waiting else []
        data = _read_exact(self.child.out, count * SHA256_SIZE)
        if count != len(keys) or len(data) != count * SHA256_SIZE:
            raise TarFormatError("the unpacking process lost its way")
        for i, (key, into) in enumerate(keys):
            into[key] = data[i * SHA256_SIZE: (i + 1) * SHA256_SIZE]

    def hash_later(self, view: memoryview, key: bytes, into: dict[bytes, bytes]) -> None:
        """`view` is the one whole() has just returned: it ends where the reader is."""
        self.ranges += RANGE.pack(self.at - len(view), len(view))
        self.keys.append((key, into))

    def close(self) -> None:
        self.child.close()


def _read_exact(fd: int, n: int) -> bytes:
    """n bytes from a pipe (fewer only at its end): a message written at once may be read in parts."""
    data = os.read(fd, n) if n else b""
    if len(data) == n or not data:
        return data
    parts = [data]
    while n > (got := sum(map(len, parts))) and (more := os.read(fd, n - got)):
        parts.append(more)
    return b"".join(parts)


def unpack_child(source: IO[bytes]) -> UnpackChild | None:
    """The `unpack` child for a backup read from a file (None for a stream without a descriptor),
    started now so that its interpreter starts while this process reads the age header (measured:
    about 0.1 s of a restore's 2 s otherwise spent before the first byte is unpacked)."""
    try:
        fd = source.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    return UnpackChild(fd)


class UnpackChild:
    """The `unpack` child reading the age file's body from `fd`; the plaintext tar stream comes out
    in the blocks of `ring` (RingReader). It waits for start(): where the body starts in the file,
    and its key."""

    def __init__(self, fd: int) -> None:
        key_fd, self.key_w = os.pipe()
        freed, self.free_w = os.pipe()
        shared = os.memfd_create("letterbox-restore", os.MFD_CLOEXEC)
        try:
            os.ftruncate(shared, RING_BLOCKS * RING_BLOCK)
            self.map = mmap.mmap(shared, RING_BLOCKS * RING_BLOCK)
            self.proc = _child("unpack", fd, subprocess.PIPE, key_fd, (shared, freed))
        except BaseException:
            os.close(self.key_w)
            os.close(self.free_w)
            raise
        finally:
            for own in (key_fd, freed, shared):
                os.close(own)
        self.ring = memoryview(self.map)
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.fileno()
        # A block of small files has many RANGEs and digests: room for all four blocks' (a few
        # hundred KiB at worst), so neither process ever waits for the other to read.
        _big_pipe(self.free_w)
        _big_pipe(self.out)

    def free(self, block: int, ranges: bytes | bytearray = b"") -> None:
        """The child may fill `block` again once it has hashed the files at `ranges` (RANGEs) in it."""
        with contextlib.suppress(BrokenPipeError):  # the child has stopped: its status says why
            _write_all(self.free_w, FREED.pack(block, len(ranges) // RANGE.size) + ranges)

    def start(self, offset: int, key: bytes) -> None:
        """The child reads on from `offset` (the file is shared with this process: nothing here reads
        it any more)."""
        try:
            os.write(self.key_w, OFFSET.pack(offset) + key)  # 40 bytes: far below a pipe's buffer
        finally:
            self._close_key()

    def _close_key(self) -> None:
        if self.key_w >= 0:
            os.close(self.key_w)
            self.key_w = -1

    def finish(self) -> None:
        """At the end of its output: raises what the child reported if it failed (AgeError for damage)."""
        _finish(self.proc, "unpacking")

    def close(self) -> None:
        self._close_key()
        if self.free_w >= 0:
            os.close(self.free_w)
            self.free_w = -1
        _kill(self.proc)
        with contextlib.suppress(BufferError):  # a view still held by a caller: the map goes with it
            self.ring.release()
            self.map.close()


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
    import zstandard  # not at the top: the box imports this module at every start (issue 19: idle memory)

    with zstandard.ZstdDecompressor().stream_reader(stream, read_size=BLOCK, read_across_frames=True) as z:
        while block := z.read(BLOCK):
            yield block
    for _ in decrypted:  # past the last frame: age authenticates the rest too
        pass


def _compress(secret: bytes) -> None:
    """The `compress` child's work: the age header for the recipient or passphrase in `secret`
    (JSON), then the tar stream on stdin compressed and encrypted."""
    import zstandard  # as in _plain_here

    stdout = sys.stdout.fileno()
    wanted = json.loads(secret)
    head, key = age_stream.new_header(recipients=(wanted["recipient"],) if wanted["recipient"] else (),
                                      passphrase=wanted["passphrase"])
    _write_all(stdout, head)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    enc = age_stream.Encryptor(key)
    while data := os.read(0, BLOCK):  # whatever is there: waiting for a full block would stall the writer
        out = compressor.compress(data)
        if out:
            _write_all(stdout, enc.update(out))
    _write_all(stdout, enc.update(compressor.flush()) + enc.finish())


def _unpack(key: bytes, ring: memoryview, filled: int, freed: int) -> None:
    """The `unpack` child's work: decrypt and decompress the age file's body on stdin into the free
    blocks of `ring`, say each one filled on `filled`, get them back on `freed` with the files to hash
    in them, and send their digests on `filled` (RingReader)."""
    import zstandard  # as in _plain_here

    free = list(range(RING_BLOCKS))
    out = 0  # blocks filled and not handed back yet
    decrypted = age_stream.Decryptor(sys.stdin.buffer, key).blocks()
    source = cast(IO[bytes], _Blocks(decrypted))
    with zstandard.ZstdDecompressor().stream_reader(source, read_size=BLOCK, read_across_frames=True) as z:
        size = RING_BLOCK
        while size == RING_BLOCK:
            if free:
                block = free.pop()
            else:
                block = _hash_freed(ring, freed, filled)
                out -= 1
            into = ring[block * RING_BLOCK:(block + 1) * RING_BLOCK]
            size = 0
            while size < RING_BLOCK and (got := z.readinto(into[size:])):
                size += got
            if size:
                os.write(filled, FILLED.pack(block, size))
                out += 1
    for _ in decrypted:  # past the last frame: age authenticates the rest too
        pass
    os.write(filled, FILLED.pack(RING_END, 0))
    for _ in range(out):  # the digests of the files in the last blocks
        _hash_freed(ring, freed, filled)


def _hash_freed(ring: memoryview, freed: int, filled: int) -> int:
    """Wait for the reader to hand a block back (it does when it takes the next one), send the
    SHA-256 of the files it says lie in it, and return the block's number."""
    head = _read_exact(freed, FREED.size)
    if len(head) < FREED.size:
        raise BrokenPipeError  # the reader has gone
    block, count = (int(v) for v in FREED.unpack(head))
    ranges = _read_exact(freed, count * RANGE.size)
    if block >= RING_BLOCKS or len(ranges) < count * RANGE.size:
        raise BrokenPipeError  # the reader has gone, or lost its way: it knows why
    if count:
        at = block * RING_BLOCK
        sha256 = hashlib.sha256
        digests = [FILLED.pack(DIGESTS, count)]
        for offset, size in RANGE.iter_unpack(ranges):
            if offset + size > RING_BLOCK:
                raise BrokenPipeError
            digests.append(sha256(ring[at + offset: at + offset + size]).digest())
        _write_all(filled, b"".join(digests))
    return block


def main(argv: list[str]) -> int:
    """The child: `compress KEY_FD` (tar on stdin, age file body on stdout) or `unpack KEY_FD SHARED
    FREED` (age file body on stdin, the tar stream inside in the blocks of the memfd SHARED, each
    announced on stdout, which come back on the pipe FREED: UnpackChild)."""
    mode, key_fd, more = argv[0], int(argv[1]), [int(fd) for fd in argv[2:]]
    key = b""
    if key_fd >= 0:
        while piece := os.read(key_fd, 4096):  # a key, or a passphrase (compress): one write, until EOF
            key += piece
        os.close(key_fd)
    if mode == "unpack":  # started before the header was read: where the body starts comes with the key
        if len(key) < OFFSET.size:
            return 1  # the parent gave up (a wrong key, say): it knows why
        os.lseek(0, OFFSET.unpack_from(key)[0], os.SEEK_SET)
        key = key[OFFSET.size:]
    import zstandard  # as in _plain_here

    gc.disable()  # a short-lived process that makes no cycles worth collecting (measured: 3% of its CPU)
    try:
        if mode == "unpack":
            _unpack(key, memoryview(mmap.mmap(more[0], RING_BLOCKS * RING_BLOCK)), sys.stdout.fileno(), more[1])
        else:
            _compress(key)
    except BrokenPipeError:
        return 1  # the parent stopped reading: it knows why
    except (age_stream.AgeError, zstandard.ZstdError) as exc:
        print(f"damaged: {exc}", file=sys.stderr)
        return DAMAGED_EXIT
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Without the interpreter's teardown (its modules, the codecs' objects): the box waits for this
    # exit after the last block of a restore and the last bytes of a backup. Nothing is buffered:
    # the data went out by os.write, and stderr is flushed here.
    sys.stderr.flush()
    os._exit(code)
