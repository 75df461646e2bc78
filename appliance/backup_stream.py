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

import contextlib
import fcntl
import gc
import hashlib
import io
import mmap
import os
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
        shared memory that is handed back when the next one is taken (_decoded_ring)."""
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


# Between the child that unpacks a restore and the reader of that restore, the members travel in
# batches: a BATCH head (the size of an index, the size of a body and the shared-memory slot that
# holds it, whether one member's data follows in the pipe), then the index (for each member a FRAME:
# type, length of the name, size; then the name). The body, the data of the index's files one after
# another without tar's padding, is not in the pipe: the child copies it into one of SLOTS slots of
# shared memory (a memfd both processes map), the reader writes the files straight from there and
# hands the slot's number back on a second pipe when the batch is done. A file larger than SMALL is
# the last of its batch and its data follows the index in the pipe, streamed in pieces, so memory
# stays bounded whatever the sizes. A batch with an empty index ends the stream.
# Why batches: measured on 20k messages / 505 MB, the reader's per-member Python (a generator and a
# read per header, name and piece) cost about as much CPU as its hashing; a batch is one read, and
# each file's data is one slice of a slot, written in one call. Why shared memory: through the pipe
# every byte was copied twice more, with the kernel's pipe handling on both sides.
#
# Who hashes: the child, each file's SHA-256 from its copy in the slot, the very bytes the reader
# writes (the slot is not touched again until the reader hands it back), sent in the file's FRAME; a
# streamed file's the reader computes as its pieces come. Measured on 2 cores: the writer (open,
# write, close for each of 20k files) is the longest task of a restore, like tar's in `age -d |
# zstd -d | tar -x`, and with the hashing it had 2.0 s of CPU against tar's 1.0 s; the child's
# parsing thread waited for free slots most of the time.
FRAME = struct.Struct("<cIQ32s")  # type, length of the name, size, SHA-256 of the data (in a slot)
BATCH = struct.Struct("<IIBB")  # index size, body size, whether a streamed member follows, the body's slot
SMALL = BLOCK  # the largest file sent inside a batch
MAX_INDEX = PIECE + MAX_PAX + FRAME.size  # what the child sends at most (it flushes above PIECE)
MAX_BODY = PIECE + SMALL  # a slot
SLOTS = 4
NO_SLOT = 255  # a batch without a body
OFFSET = struct.Struct("<Q")  # where the age body starts, sent to the unpack child before its key
RING_BLOCK = BLOCK  # the plaintext tar stream between the two unpacking processes, in blocks
RING_BLOCKS = 8  # of a ring of shared memory (_decoded_ring)
FILLED = struct.Struct("<BI")  # a ring block's number and how many bytes of it are filled
RING_END = 255  # the FILLED message after the last block
MAX_FILES = 256  # files in one batch


class FrameReader(TarReader):
    """The members of a restore as the `unpack` child sends them (same interface as TarReader), read
    from the pipe `fd` one batch at a time, their data in a shared-memory slot: a member's data is a
    view of it, valid until the next member. close() stops the child."""

    def __init__(self, child: UnpackChild) -> None:
        super().__init__(iter(()))
        self.child = child
        self.fd = child.out
        self.head = memoryview(bytearray(BATCH.size))
        self.index = memoryview(bytearray(MAX_INDEX))
        self.slots = child.slots
        self.current = self.head[:0]
        self.current_sha = b""  # the child's SHA-256 of current
        self.streamed = 0  # bytes of a large member still in the pipe

    def _fill_exact(self, view: memoryview) -> None:
        while view:
            n = os.readv(self.fd, [view])
            if n == 0:
                self.child.finish()  # raises what the child reported when it failed
                raise TarFormatError("the tar stream ends early (truncated)")
            view = view[n:]

    def batches(self) -> Iterator[tuple[bytes, memoryview, int]]:
        """Each batch: its index, its body (a view of its slot) and whether the data of its last
        member is streamed after it (FrameReader.streamed is then set to its size when the index has
        been read through: see members())."""
        while True:
            self._fill_exact(self.head)
            index_size, body_size, streamed, slot = BATCH.unpack(self.head)
            if index_size > MAX_INDEX or body_size > MAX_BODY or (slot >= SLOTS and (slot != NO_SLOT or body_size)):
                raise TarFormatError("a batch of members is too large")
            if index_size == 0:
                return
            index = self.index[:index_size]
            self._fill_exact(index)
            start = slot * MAX_BODY
            yield bytes(index), self.slots[start:start + body_size], streamed
            if slot != NO_SLOT:
                self.child.free(slot)  # every member of the batch is done with: the child may reuse it

    def members(self) -> Iterator[tuple[str, bytes, int]]:
        for index, body, streamed in self.batches():
            index_size = len(index)
            at = data = 0
            while at < index_size:
                kind, name_size, size, self.current_sha = FRAME.unpack_from(index, at)
                at += FRAME.size
                name = index[at:at + name_size].decode("utf-8", "surrogateescape")
                at += name_size
                if at >= index_size and streamed:
                    self.streamed, self.current = size, body[:0]
                else:
                    self.current = body[data:data + size]
                    data += size
                yield name, kind, size
                self.skip_streamed()

    def skip_streamed(self) -> None:
        while self.streamed:
            for _ in self._streamed_pieces():
                pass

    def _streamed_pieces(self) -> Iterator[memoryview]:
        while self.streamed:
            # A new buffer for each piece: a caller may keep the pieces (b"".join takes them all first).
            view = memoryview(bytearray(min(self.streamed, BLOCK)))
            self._fill_exact(view)
            self.streamed -= len(view)
            yield view

    def raw(self, size: int) -> Iterator[memoryview]:
        if self.streamed:
            return self._streamed_pieces()
        return iter((self.current,))

    def data(self, size: int) -> Iterator[memoryview]:
        if self.streamed:
            return super().data(size)  # pieces() below: the streamed data, hashed as it comes
        self.sha = self.current_sha
        return iter((self.current,))

    def pieces(self, n: int) -> Iterator[memoryview]:
        return self._streamed_pieces()

    def drain(self) -> None:
        """After members(): read to the end and check how the child ended (a damaged end shows there)."""
        while os.read(self.fd, BLOCK):
            pass
        self.child.finish()

    def close(self) -> None:
        self.child.close()


# --- the codec process ---------------------------------------------------------------------------
#
# zstd and age run in a child process (this module run with -m), fed or drained through a pipe, the
# way `tar | zstd | age` splits the work; for a restore the child parses the tar stream too, and a
# process forked from it decrypts and decompresses (_decoded_ring). Threads were tried first: each message file costs the
# walking thread several releases of the interpreter lock (open, read, hash, write), and on a
# loaded 2-core machine every release let the codec thread in and then waited for the OS to hand
# the lock back, so a restore ran at a fifth of its CPU time. Two processes share no lock. The
# payload key goes to the child through a pipe, never its arguments or environment.

DAMAGED_EXIT = 3


def _child(mode: str, stdin: int | IO[bytes], stdout: int | IO[bytes], key_fd: int = -1,
           more_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    fds = ((key_fd,) if key_fd >= 0 else ()) + more_fds
    return subprocess.Popen(  # noqa: S603  our own interpreter running this module
        [sys.executable, "-m", "appliance.backup_stream", mode, str(key_fd), *map(str, more_fds)],
        stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, pass_fds=fds, close_fds=True)


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


class _Closing(Protocol):
    def close(self) -> None: ...


def plain_tar(source: IO[bytes], key: bytes, child: UnpackChild | None = None) -> tuple[TarReader, _Closing]:
    """A reader of the tar stream inside an age file whose header was read (`key` from
    age_stream.read_header), and what to close when done (it stops the work under the reader). From
    a file, the work is split over three processes, like `age -d | zstd -d | tar -x`: `child` (from
    unpack_child(), started before the header was read) parses the tar stream, copies and hashes each
    file and sends them in batches (FrameReader), while a process forked from it decrypts and
    decompresses (_decoded_ring); this one checks each member and writes it. Else all of it here.

    The third process is a fork sharing memory with the child, not a new interpreter behind a pipe:
    measured on 20k messages / 505 MB on 2 cores, that one cost about 1 s more CPU than it saved (one
    more copy of every byte through a pipe, one more interpreter)."""
    if child is None:
        here = _plain_here(source, key)
        return TarReader(here), here
    child.start(source.tell(), key)
    reader = FrameReader(child)
    return reader, reader


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
    """The `unpack` child reading the age file's body from `fd`; its members come out of `out`. It
    waits for start(): where the body starts in the file, and its key."""

    def __init__(self, fd: int) -> None:
        key_fd, self.key_w = os.pipe()
        freed, self.free_w = os.pipe()
        shared = os.memfd_create("letterbox-restore", os.MFD_CLOEXEC)
        try:
            os.ftruncate(shared, SLOTS * MAX_BODY)
            self.map = mmap.mmap(shared, SLOTS * MAX_BODY)
            self.proc = _child("unpack", fd, subprocess.PIPE, key_fd, (shared, freed))
        except BaseException:
            os.close(self.key_w)
            os.close(self.free_w)
            raise
        finally:
            for own in (key_fd, freed, shared):
                os.close(own)
        self.slots = memoryview(self.map)
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.fileno()
        _big_pipe(self.out)

    def free(self, slot: int) -> None:
        """The child may fill `slot` again."""
        with contextlib.suppress(BrokenPipeError):  # the child has stopped: reading its output says why
            os.write(self.free_w, bytes((slot,)))

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
            self.slots.release()
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


def _compress(key: bytes) -> None:
    import zstandard  # as in _plain_here

    stdout = sys.stdout.fileno()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    enc = age_stream.Encryptor(key)
    while data := os.read(0, BLOCK):  # whatever is there: waiting for a full block would stall the writer
        out = compressor.compress(data)
        if out:
            _write_all(stdout, enc.update(out))
    _write_all(stdout, enc.update(compressor.flush()) + enc.finish())


def _unpack(key: bytes, shared: int, freed: int) -> None:
    """The age file's body on stdin, the members of the tar stream inside in batches on stdout, their
    file data in the slots of the shared memory `shared`, which come back on `freed` (FrameReader).

    This process parses the tar stream, copies and hashes each file and sends the batches; a process
    forked from it decrypts and decompresses (_decoded_ring)."""
    out = sys.stdout.fileno()
    slots = memoryview(mmap.mmap(shared, SLOTS * MAX_BODY))
    free = list(range(SLOTS))
    tar = TarReader(_decoded_ring(key, freed))
    index: list[bytes] = []
    index_size = body_size = files = 0
    slot, at = NO_SLOT, 0  # the slot the batch's file data goes into, and where the next file goes

    def flush(streamed: int) -> None:
        _write_all(out, BATCH.pack(index_size, body_size, streamed, slot) + b"".join(index))

    sha256 = hashlib.sha256
    for name, kind, length in tar.members():
        raw = name.encode("utf-8", "surrogateescape")
        size = length if kind == REGTYPE else 0  # nothing follows a directory's name
        if size > SMALL:  # the last of its batch, its data streamed after it (the reader hashes it)
            index.append(FRAME.pack(kind, len(raw), size, b"") + raw)
            index_size += FRAME.size + len(raw)
            flush(1)
            for piece in tar.raw(size):
                _write_all(out, piece)
        else:
            digest = b""
            if kind == REGTYPE:
                if slot == NO_SLOT:
                    slot = free.pop() if free else _freed_slot(freed)
                    at = slot * MAX_BODY
                start = at
                for piece in tar.raw(size):
                    end = at + len(piece)
                    slots[at:end] = piece
                    at = end
                digest = sha256(slots[start:at]).digest()  # of the copy the reader writes
                body_size += size
                files += 1
            index.append(FRAME.pack(kind, len(raw), size, digest) + raw)
            index_size += FRAME.size + len(raw)
            # Handed on a quarter of a pipe at a time, as Sink does.
            if body_size < PIECE and index_size < PIECE and files < MAX_FILES:
                continue
            flush(0)
        index, index_size, body_size, files, slot = [], 0, 0, 0, NO_SLOT
    tar.drain()
    if index:
        flush(0)
    _write_all(out, BATCH.pack(0, 0, 0, NO_SLOT))


def _decoded_ring(key: bytes, freed_slots: int) -> Iterator[memoryview]:
    """The plaintext tar stream inside the age file's body on stdin, as views of the blocks of a ring
    of shared memory (a memfd) that a process forked from this one fills: decryption and
    decompression run there, beside this process's parsing and hashing, as `age -d | zstd -d` runs
    beside `tar -x`. A block goes back to the decoder when the next one is taken, so a view is valid
    until then (TarReader copies what it keeps).

    Why a process and not threads (as before): measured on 20k messages / 505 MB on 2 cores, the
    decryption, decompression and parsing threads of this process handed the interpreter lock to each
    other hundreds of times a second, and on a busy machine each hand-over waited for a time slice;
    the process and the restoring one both waited about half of the time. Why forked and shared
    memory, not a new interpreter and a pipe (measured slower): a fork takes a millisecond and shares
    the imported modules, and the plaintext is not copied through the kernel twice."""
    ring_fd = os.memfd_create("letterbox-plain", os.MFD_CLOEXEC)
    try:
        os.ftruncate(ring_fd, RING_BLOCKS * RING_BLOCK)
        ring = mmap.mmap(ring_fd, RING_BLOCKS * RING_BLOCK)
    finally:
        os.close(ring_fd)
    filled_r, filled_w = os.pipe()
    freed_r, freed_w = os.pipe()
    pid = os.fork()  # no thread runs in this process: nothing is forked in the middle of its work
    if pid == 0:  # the decoder; it never returns into the caller's code
        code = 1
        try:
            for fd in (filled_r, freed_w, freed_slots):
                os.close(fd)
            # Its own stdout: the restoring process sees the end of the batches when the parser ends.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            code = _decode_into(key, memoryview(ring), filled_w, freed_r)
        finally:
            os._exit(code)
    os.close(filled_w)
    os.close(freed_r)
    view = memoryview(ring)
    head = bytearray(FILLED.size)
    held = block = -1
    try:
        while os.readv(filled_r, [head]) == FILLED.size:  # messages under PIPE_BUF arrive whole
            block, size = FILLED.unpack(head)
            if held >= 0:
                with contextlib.suppress(BrokenPipeError):  # the decoder has finished (or failed: see below)
                    os.write(freed_w, bytes((held,)))
                held = -1
            if block == RING_END or block >= RING_BLOCKS or size > RING_BLOCK:
                break
            held = block
            yield view[block * RING_BLOCK: block * RING_BLOCK + size]
    finally:
        os.close(filled_r)
        os.close(freed_w)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == DAMAGED_EXIT:
        raise age_stream.AgeError("the file is damaged or truncated", damaged=True)
    if code != 0 or block != RING_END:
        raise OSError(f"the decoding process failed (exit {code})")


def _decode_into(key: bytes, ring: memoryview, filled: int, freed: int) -> int:
    """The forked decoder of _decoded_ring: decrypt and decompress stdin into the free blocks of
    `ring`, say each one filled on `filled`, get them back on `freed`. Returns the exit status."""
    import zstandard  # as in _plain_here

    free = list(range(RING_BLOCKS))
    decrypted = age_stream.Decryptor(sys.stdin.buffer, key).blocks()
    source = cast(IO[bytes], _Blocks(decrypted))
    try:
        with zstandard.ZstdDecompressor().stream_reader(source, read_size=BLOCK, read_across_frames=True) as z:
            size = RING_BLOCK
            while size == RING_BLOCK:
                block = free.pop() if free else _freed_slot(freed)
                into = ring[block * RING_BLOCK:(block + 1) * RING_BLOCK]
                size = 0
                while size < RING_BLOCK and (got := z.readinto(into[size:])):
                    size += got
                if size:
                    os.write(filled, FILLED.pack(block, size))
        for _ in decrypted:  # past the last frame: age authenticates the rest too
            pass
        os.write(filled, FILLED.pack(RING_END, 0))
    except BrokenPipeError:
        return 1  # the parser has stopped: it knows why
    except (age_stream.AgeError, zstandard.ZstdError) as exc:
        print(f"damaged: {exc}", file=sys.stderr)
        return DAMAGED_EXIT
    return 0


def _freed_slot(freed: int) -> int:
    """Wait for the reader to hand a slot back (it does after writing the batch that was in it)."""
    got = os.read(freed, 1)
    if not got:
        raise BrokenPipeError  # the reader has gone
    return got[0]


def main(argv: list[str]) -> int:
    """The child: `compress KEY_FD` (tar on stdin, age file body on stdout) or `unpack KEY_FD SHARED
    FREED` (age file body on stdin, the members of the tar stream inside framed on stdout, their data
    in the slots of the memfd SHARED, which come back on the pipe FREED)."""
    mode, key_fd, more = argv[0], int(argv[1]), [int(fd) for fd in argv[2:]]
    key = b""
    if key_fd >= 0:
        key = os.read(key_fd, 64)
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
            _unpack(key, more[0], more[1])
        else:
            _compress(key)
    except BrokenPipeError:
        return 1  # the parent stopped reading: it knows why
    except (age_stream.AgeError, zstandard.ZstdError, TarFormatError) as exc:
        print(f"damaged: {exc}", file=sys.stderr)
        return DAMAGED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
