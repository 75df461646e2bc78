"""age (https://age-encryption.org/v1), streamed, for X25519 keys and passphrases.

The format is small: a text header with one stanza per recipient, each wrapping a random 16-byte
file key (`X25519`: an ephemeral key exchange; `scrypt`: a passphrase), an HMAC over the header, a
16-byte nonce, then the STREAM payload: ChaCha20-Poly1305 over 64 KiB chunks, the last one marked
in its nonce. Both directions are written here over the `cryptography` primitives rather than
pyrage because a backup needs them streamed and fast: pyrage's passphrase functions take the whole
file at once, and its `encrypt_io`/`decrypt_io` pull the data through Python file objects in small
reads while holding the interpreter lock, which measured here as a quarter of a backup's time.
Here the payload is cut into chunks by slicing large buffers, and the AEAD calls run in the
backup's worker thread. `age -d` (and pyrage) open these files, and these functions open theirs.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import os
from collections.abc import Iterator
from hashlib import sha256
from typing import IO, TYPE_CHECKING, Any

# `cryptography` is imported by the functions that use it: `serve` imports this module with the backup
# scheduler, and cryptography's Rust library alone is 9-10 MB of a box's RSS (issue 19: idle memory).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

INTRO = b"age-encryption.org/v1\n"
SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
X25519_LABEL = b"age-encryption.org/v1/X25519"
# 2**15 * 128 * 8 = 32 MiB of scrypt memory: inside the backup's memory budget (age's own default,
# 2**18, needs 256 MiB). age accepts any work factor up to 2**22 when it decrypts.
LOG_N = 15
MAX_LOG_N = 20
CHUNK = 64 * 1024
TAG = 16
SEALED = CHUNK + TAG
MAX_HEADER = 64 * 1024
READ_CHUNKS = 16  # sealed chunks read from the file at once (1 MiB)


class AgeError(Exception):
    """`damaged` tells a file that was altered or cut short from a wrong key or a foreign file."""

    def __init__(self, text: str, *, damaged: bool = False, wrong_key: bool = False) -> None:
        super().__init__(text)
        self.damaged = damaged
        self.wrong_key = wrong_key


# --- keys: Bech32 (BIP 173), which age uses for both halves of an X25519 key -----------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _bech32_decode(text: str, hrp: str) -> bytes:
    text = text.strip().lower()
    sep = text.rfind("1")
    if text[:sep] != hrp or len(text) - sep < 7 or any(c not in _CHARSET for c in text[sep + 1:]):
        raise AgeError(f"not an age key (expected {hrp.upper() if hrp.startswith('age-') else hrp}1...)")
    data = [_CHARSET.index(c) for c in text[sep + 1:]]
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    if _polymod(expanded + data) != 1:
        raise AgeError("the age key is mistyped (its checksum does not match)")
    acc = bits = 0
    out = bytearray()
    for v in data[:-6]:
        acc = (acc << 5) | v
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if len(out) != 32:
        raise AgeError("not an X25519 age key")
    return bytes(out)


def recipient_key(text: str) -> bytes:
    """The 32 octets of an `age1...` recipient."""
    return _bech32_decode(text, "age")


def identity_key(text: str) -> bytes:
    """The 32 octets of an `AGE-SECRET-KEY-1...` identity."""
    return _bech32_decode(text, "age-secret-key-")


# --- header ------------------------------------------------------------------------------------------

def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _wrap_key(passphrase: str, salt: bytes, log_n: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=SCRYPT_LABEL + salt, length=32, n=2**log_n, r=8, p=1).derive(passphrase.encode("utf-8"))


def _public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    # public_bytes_raw, not public_bytes(Encoding.Raw, ...): the serialization module costs the
    # restore's unpack child (which imports this module) 17 ms of its start, before any work.
    return pub.public_bytes_raw()


def _x25519_stanza(recipient: bytes, file_key: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    ephemeral = X25519PrivateKey.generate()
    share = _public(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    wrap = _hkdf(shared, share + recipient, X25519_LABEL)
    body = ChaCha20Poly1305(wrap).encrypt(b"\x00" * 12, file_key, None)
    return b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"


def _scrypt_stanza(passphrase: str, file_key: bytes, log_n: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    salt = os.urandom(16)
    body = ChaCha20Poly1305(_wrap_key(passphrase, salt, log_n)).encrypt(b"\x00" * 12, file_key, None)
    return b"-> scrypt " + _b64(salt) + b" " + str(log_n).encode() + b"\n" + _b64(body) + b"\n"


def new_header(*, recipients: tuple[str, ...] = (), passphrase: str = "", log_n: int = LOG_N) -> tuple[bytes, bytes]:
    """(the header and payload nonce to write first, the payload key) for a new file."""
    file_key = os.urandom(16)
    if passphrase:
        stanzas = _scrypt_stanza(passphrase, file_key, log_n)
    else:
        stanzas = b"".join(_x25519_stanza(recipient_key(r), file_key) for r in recipients)
    header = INTRO + stanzas + b"---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), header, sha256).digest()
    nonce = os.urandom(16)
    return header + b" " + _b64(mac) + b"\n" + nonce, _hkdf(file_key, nonce, b"payload")


def _read_stanzas(source: IO[bytes]) -> tuple[list[tuple[list[bytes], bytes]], bytes, bytes]:
    """The header's stanzas as (arguments, body), its MAC and the bytes the MAC covers."""
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
    if lines[0] != INTRO:
        raise AgeError("not an age file, or its header is damaged")
    stanzas: list[tuple[list[bytes], bytes]] = []
    i = 1
    try:
        while i < len(lines) - 1:
            if not lines[i].startswith(b"-> "):
                raise ValueError("a stanza must start with '-> '")
            args = lines[i][3:].rstrip(b"\n").split(b" ")
            body = b""
            i += 1
            while True:  # body lines are 64 columns, the last one shorter (possibly empty)
                piece = lines[i].rstrip(b"\n")
                body += piece
                i += 1
                if len(piece) < 64:
                    break
            stanzas.append((args, _unb64(body)))
        mac = _unb64(lines[-1][4:].rstrip(b"\n"))
    except (ValueError, IndexError) as exc:
        raise AgeError("not an age file, or its header is damaged") from exc
    return stanzas, mac, b"".join(lines[:-1]) + b"---"


def read_header(source: IO[bytes], *, identity: str = "", passphrase: str = "") -> bytes:
    """Read the header and nonce, unwrap the file key with the identity or the passphrase, check the
    header's MAC; returns the payload key."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    stanzas, mac, covered = _read_stanzas(source)
    scrypt = [s for s in stanzas if s[0][:1] == [b"scrypt"]]
    file_key: bytes | None = None
    if passphrase:
        if not scrypt:
            raise AgeError("this backup is not protected by a passphrase: give the emergency kit", wrong_key=True)
        file_key = _unwrap_scrypt(scrypt, stanzas, passphrase)
    else:
        if scrypt:
            raise AgeError("this backup is protected by a passphrase, not by the emergency kit", wrong_key=True)
        secret = X25519PrivateKey.from_private_bytes(identity_key(identity))
        ours = _public(secret)
        for args, body in stanzas:
            if args[0] != b"X25519" or len(args) != 2 or len(body) != 32:
                continue
            try:
                share = _unb64(args[1])
                shared = secret.exchange(X25519PublicKey.from_public_bytes(share))
                file_key = ChaCha20Poly1305(_hkdf(shared, share + ours, X25519_LABEL)).decrypt(
                    b"\x00" * 12, body, None)
                break
            except (InvalidTag, ValueError):
                continue
        if file_key is None:
            raise AgeError("no matching key: this file was not made for this key", wrong_key=True)
    if not hmac.compare_digest(hmac.new(_hkdf(file_key, b"", b"header"), covered, sha256).digest(), mac):
        raise AgeError("the file's header is damaged", damaged=True)
    nonce = source.read(16)
    if len(nonce) != 16:
        raise AgeError("the file ends early (truncated)", damaged=True)
    return _hkdf(file_key, nonce, b"payload")


def _unwrap_scrypt(scrypt: list[tuple[list[bytes], bytes]], stanzas: list[Any], passphrase: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if len(stanzas) != 1:  # the spec: an scrypt stanza is the only one
        raise AgeError("not an age file, or its header is damaged")
    args, body = scrypt[0]
    try:
        salt, log_n = _unb64(args[1]), int(args[2])
    except (ValueError, IndexError) as exc:
        raise AgeError("not an age file, or its header is damaged") from exc
    if not 1 <= log_n <= MAX_LOG_N or len(salt) != 16:
        raise AgeError("the passphrase stanza asks for an unreasonable work factor")
    try:
        return ChaCha20Poly1305(_wrap_key(passphrase, salt, log_n)).decrypt(b"\x00" * 12, body, None)
    except InvalidTag:
        raise AgeError("wrong passphrase", wrong_key=True) from None


# --- payload -----------------------------------------------------------------------------------------

def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class Encryptor:
    """The STREAM payload: plaintext in, ciphertext out. One full chunk is always held back, since
    only at the end is it known whether it is the last (age marks the last chunk in its nonce, and
    only an empty file ends with an empty chunk)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.aead = ChaCha20Poly1305(key)
        self.pending = bytearray()
        self.counter = 0

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        self.pending += data
        if len(self.pending) <= CHUNK:
            return b""
        full = (len(self.pending) - 1) // CHUNK * CHUNK
        view = memoryview(self.pending)
        out = []
        for at in range(0, full, CHUNK):
            out.append(self.aead.encrypt(_nonce(self.counter, False), view[at:at + CHUNK], None))
            self.counter += 1
        view.release()
        del self.pending[:full]
        return b"".join(out)

    def finish(self) -> bytes:
        out = self.aead.encrypt(_nonce(self.counter, True), bytes(self.pending), None)
        self.pending.clear()
        return out


class Decryptor(io.RawIOBase):
    """The plaintext of the STREAM payload that follows the header in `source`, as a raw stream. A
    chunk that does not authenticate, or a file that ends without its last chunk, raises AgeError
    (plaintext before it has already been handed out: callers stage what they read)."""

    def __init__(self, source: IO[bytes], key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.source = source
        self.aead = ChaCha20Poly1305(key)
        self.counter = 0
        self.sealed = b""
        self.plain = b""
        self.at = 0
        self.eof = False
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.at >= len(self.plain):
            if self.done:
                return 0
            self._more()
        n = min(len(b), len(self.plain) - self.at)
        b[:n] = self.plain[self.at:self.at + n]
        self.at += n
        return n

    def blocks(self) -> Iterator[bytes]:
        """The plaintext in large pieces (a chunk, 64 KiB, each): what a pipeline stage wants."""
        if self.at < len(self.plain):
            yield self.plain[self.at:]
        self.plain, self.at = b"", 0
        while not self.done:
            yield from self._chunks()

    def _more(self) -> None:
        self.plain, self.at = b"".join(self._chunks()), 0

    def _chunks(self) -> list[bytes]:
        """The next chunks decrypted, each its own bytes (joining them would copy it all once more)."""
        from cryptography.exceptions import InvalidTag

        parts = [self.sealed]
        have = len(self.sealed)
        while not self.eof and have <= SEALED * READ_CHUNKS:
            data = self.source.read(SEALED * READ_CHUNKS)
            if not data:
                self.eof = True
            parts.append(data)
            have += len(data)
        sealed = b"".join(parts) if len(parts) > 2 or self.sealed else parts[-1]
        if not sealed:
            raise AgeError("the file ends early (truncated)", damaged=True)
        # Every whole chunk but the final one of the file (which may be whole too) is not the last:
        # a chunk that ends the data read so far waits until more is read, or none is.
        count = -(-len(sealed) // SEALED) if self.eof else (len(sealed) - 1) // SEALED
        view = memoryview(sealed)
        out = []
        try:
            for i in range(count):
                last = self.eof and i == count - 1
                chunk = view[i * SEALED:(i + 1) * SEALED]
                if last and len(chunk) == TAG and self.counter > 0:
                    raise AgeError("the file is damaged (an empty last chunk)", damaged=True)
                out.append(self.aead.decrypt(_nonce(self.counter, last), chunk, None))
                self.counter += 1
        except InvalidTag:
            raise AgeError("the file is damaged or truncated (a chunk does not authenticate)",
                           damaged=True) from None
        self.done = self.eof
        self.sealed = b"" if self.done else bytes(view[count * SEALED:])
        return out


# --- streams for simple callers ------------------------------------------------------------------------

class _EncryptingRaw(io.RawIOBase):
    def __init__(self, sink: IO[bytes], key: bytes) -> None:
        self.sink = sink
        self.enc = Encryptor(key)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = memoryview(b)
        self.sink.write(self.enc.update(data))
        return len(data)


@contextlib.contextmanager
def writer(sink: IO[bytes], *, recipients: tuple[str, ...] = (), passphrase: str = "", log_n: int = LOG_N) -> Iterator[IO[bytes]]:
    """A writable stream whose bytes reach `sink` as an age file."""
    header, key = new_header(recipients=recipients, passphrase=passphrase, log_n=log_n)
    sink.write(header)
    raw = _EncryptingRaw(sink, key)
    buffered = io.BufferedWriter(raw, buffer_size=1024 * 1024)
    yield buffered
    buffered.flush()
    sink.write(raw.enc.finish())


def passphrase_writer(sink: IO[bytes], passphrase: str, *, log_n: int = LOG_N) -> contextlib.AbstractContextManager[IO[bytes]]:
    return writer(sink, passphrase=passphrase, log_n=log_n)


@contextlib.contextmanager
def reader(source: IO[bytes], *, identity: str = "", passphrase: str = "") -> Iterator[IO[bytes]]:
    key = read_header(source, identity=identity, passphrase=passphrase)
    yield io.BufferedReader(Decryptor(source, key), buffer_size=1024 * 1024)


def passphrase_reader(source: IO[bytes], passphrase: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    return reader(source, passphrase=passphrase)
