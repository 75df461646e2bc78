"""age (https://age-encryption.org/v1) with a passphrase, streamed.

pyrage encrypts to X25519 keys from a stream, but its passphrase functions take and return the
whole file at once, which a backup of several GB cannot afford. The format is small: a text header
with one `scrypt` stanza that wraps a random 16-byte file key, an HMAC over the header, then the
STREAM payload (ChaCha20-Poly1305 over 64 KiB chunks, the last one marked in its nonce). This writes
and reads exactly that, so `age -d` (which asks for the passphrase) opens these files too.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import os
from collections.abc import Iterator
from hashlib import sha256
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

INTRO = b"age-encryption.org/v1\n"
SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
# 2**15 * 128 * 8 = 32 MiB of scrypt memory: inside the backup's memory budget (age's own default,
# 2**18, needs 256 MiB). age accepts any work factor up to 2**22 when it decrypts.
LOG_N = 15
MAX_LOG_N = 20
CHUNK = 64 * 1024
TAG = 16
MAX_HEADER = 64 * 1024


class AgeError(Exception):
    pass


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _wrap_key(passphrase: str, salt: bytes, log_n: int) -> bytes:
    return Scrypt(salt=SCRYPT_LABEL + salt, length=32, n=2**log_n, r=8, p=1).derive(passphrase.encode("utf-8"))


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class _StreamWriter(io.RawIOBase):
    def __init__(self, sink: IO[bytes], key: bytes) -> None:
        self.sink = sink
        self.aead = ChaCha20Poly1305(key)
        self.buf = bytearray()
        self.counter = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = memoryview(b)
        self.buf += data
        # Keep one full chunk back: only at the end is it known whether it is the last.
        while len(self.buf) > CHUNK:
            chunk = bytes(self.buf[:CHUNK])
            del self.buf[:CHUNK]
            self.sink.write(self.aead.encrypt(_nonce(self.counter, False), chunk, None))
            self.counter += 1
        return len(data)

    def finish(self) -> None:
        self.sink.write(self.aead.encrypt(_nonce(self.counter, True), bytes(self.buf), None))
        self.buf.clear()


@contextlib.contextmanager
def passphrase_writer(sink: IO[bytes], passphrase: str, *, log_n: int = LOG_N) -> Iterator[IO[bytes]]:
    file_key = os.urandom(16)
    salt = os.urandom(16)
    body = ChaCha20Poly1305(_wrap_key(passphrase, salt, log_n)).encrypt(b"\x00" * 12, file_key, None)
    header = INTRO + b"-> scrypt " + _b64(salt) + b" " + str(log_n).encode() + b"\n" + _b64(body) + b"\n---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), header, sha256).digest()
    sink.write(header + b" " + _b64(mac) + b"\n")
    nonce = os.urandom(16)
    sink.write(nonce)
    writer = _StreamWriter(sink, _hkdf(file_key, nonce, b"payload"))
    buffered = io.BufferedWriter(writer, buffer_size=1024 * 1024)
    yield buffered
    buffered.flush()
    writer.finish()


class _StreamReader(io.RawIOBase):
    def __init__(self, source: IO[bytes], key: bytes) -> None:
        self.source = source
        self.aead = ChaCha20Poly1305(key)
        self.counter = 0
        self.pending = b""
        self.ahead = source.read(CHUNK + TAG)
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.pending and not self.done:
            self._next()
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _next(self) -> None:
        chunk = self.ahead
        if not chunk:
            raise AgeError("the file ends early (truncated)")
        self.ahead = self.source.read(CHUNK + TAG)
        last = not self.ahead
        try:
            self.pending = self.aead.decrypt(_nonce(self.counter, last), chunk, None)
        except InvalidTag:
            raise AgeError("the file is damaged (a chunk does not authenticate)") from None
        self.counter += 1
        self.done = last


def _read_header(source: IO[bytes]) -> tuple[list[bytes], bytes, bytes]:
    lines: list[bytes] = []
    total = 0
    while True:
        line = source.readline(MAX_HEADER)
        total += len(line)
        if not line.endswith(b"\n") or total > MAX_HEADER:
            raise AgeError("not an age file, or its header is damaged")
        lines.append(line)
        if line.startswith(b"---"):
            break
    return lines[:-1], lines[-1], b"".join(lines[:-1]) + b"---"


@contextlib.contextmanager
def passphrase_reader(source: IO[bytes], passphrase: str) -> Iterator[IO[bytes]]:
    lines, mac_line, mac_input = _read_header(source)
    if not lines or lines[0] != INTRO:
        raise AgeError("not an age file, or its header is damaged")
    stanzas = [ln for ln in lines[1:] if ln.startswith(b"-> ")]
    if len(stanzas) != 1 or not stanzas[0].startswith(b"-> scrypt "):
        raise AgeError("this backup is not protected by a passphrase: give the emergency kit")
    try:
        _, _, salt_text, log_text = stanzas[0].split()
        salt, log_n = _unb64(salt_text), int(log_text)
        body = _unb64(lines[2].rstrip(b"\n"))
        mac = _unb64(mac_line[4:].rstrip(b"\n"))
    except (ValueError, IndexError) as exc:
        raise AgeError("not an age file, or its header is damaged") from exc
    if not 1 <= log_n <= MAX_LOG_N or len(salt) != 16:
        raise AgeError("the passphrase stanza asks for an unreasonable work factor")
    try:
        file_key = ChaCha20Poly1305(_wrap_key(passphrase, salt, log_n)).decrypt(b"\x00" * 12, body, None)
    except InvalidTag:
        raise AgeError("wrong passphrase") from None
    if not hmac.compare_digest(hmac.new(_hkdf(file_key, b"", b"header"), mac_input, sha256).digest(), mac):
        raise AgeError("the file's header is damaged")
    nonce = source.read(16)
    if len(nonce) != 16:
        raise AgeError("the file ends early (truncated)")
    yield io.BufferedReader(_StreamReader(source, _hkdf(file_key, nonce, b"payload")), buffer_size=1024 * 1024)
