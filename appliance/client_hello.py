"""Read the server name (SNI) and ALPN protocols from a TLS ClientHello, before any handshake.

Sans-IO: bytes in, a ClientHello (or "need more") out. The box uses it to answer TLS-ALPN-01
(RFC 8737) on 443 only for a client that offers `acme-tls/1`: Python's sni_callback runs before ALPN
is chosen, so the decision has to be made from the ClientHello itself.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CLIENT_HELLO = 64 * 1024  # a ClientHello is a few KiB even with post-quantum key shares
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0  # RFC 6066 3
_EXT_ALPN = 16  # RFC 7301 3.1


class NotClientHello(ValueError):
    """The bytes are not (the start of) a TLS ClientHello: let the TLS library fail it properly."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[str, ...]


def _handshake_bytes(data: bytes) -> bytes | None:
    """Concatenate the handshake records' payloads (RFC 8446 5.1: a message may span records) until the
    ClientHello is complete; None when more bytes are needed."""
    out = bytearray()
    pos = 0
    while True:
        if len(out) >= 4:
            need = 4 + int.from_bytes(out[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise NotClientHello("ClientHello too large")
            if len(out) >= need:
                return bytes(out[:need])
        if len(data) - pos < 5:
            return None
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            raise NotClientHello("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if length == 0 or length > 2**14 + 2048:
            raise NotClientHello("bad record length")
        if len(data) - pos - 5 < length:
            # Only a partial record so far: hand back what is there once the record is complete.
            if pos + 5 + length > MAX_CLIENT_HELLO + 5 * 8:
                raise NotClientHello("ClientHello too large")
            return None
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if out and out[0] != _CLIENT_HELLO:
            raise NotClientHello("first handshake message is not a ClientHello")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NotClientHello("truncated ClientHello")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    def done(self) -> bool:
        return self.pos >= len(self.data)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data` (TLS records as received), or None if incomplete.
    Raises NotClientHello for anything else."""
    message = _handshake_bytes(data)
    if message is None:
        return None
    r = _Reader(message[4:])
    r.take(2 + 32)  # legacy_version, random (RFC 8446 4.1.2)
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    server_name: str | None = None
    alpn: list[str] = []
    if r.done():
        return ClientHello(None, ())
    extensions = _Reader(r.vector(2))
    while not extensions.done():
        kind = extensions.number(2)
        body = _Reader(extensions.vector(2))
        if kind == _EXT_SERVER_NAME and not body.done():
            names = _Reader(body.vector(2))
            while not names.done():
                name_type = names.number(1)
                name = names.vector(2)
                if name_type == 0 and server_name is None:  # host_name
                    server_name = name.decode("ascii", "replace").lower().rstrip(".")
        elif kind == _EXT_ALPN and not body.done():
            protocols = _Reader(body.vector(2))
            while not protocols.done():
                alpn.append(protocols.vector(1).decode("ascii", "replace"))
    return ClientHello(server_name, tuple(alpn))
