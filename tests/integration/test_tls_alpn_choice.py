"""TLS-ALPN-01 on 443 (RFC 8737): the challenge certificate only for a client offering acme-tls/1 for
a name being validated; everyone else (no SNI, h2/http1.1, no ALPN) gets the box's certificate.
The choice is read from the ClientHello, also when it arrives split across packets."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from cryptography import x509

from appliance.client_hello import ClientHello, NotClientHello, parse_client_hello
from appliance.tls import ACME_TLS_ALPN, tls_alpn_challenge_pem
from tests.conftest import BoxHandle
from tests.support.tls_probe import unverified_context

ACME_ID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def handshake(port: int, *, sni: str | None, alpn: list[str] | None, split: int | None = None,
              version: ssl.TLSVersion | None = None) -> tuple[x509.Certificate, str | None]:
    """A client handshake driven by hand over a MemoryBIO, so the ClientHello can be sent in pieces."""
    ctx = unverified_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = outgoing.read()
            if out:
                if first and split:
                    pieces = [out[:split], out[split:2 * split], out[2 * split:]]
                    for piece in pieces:
                        if piece:
                            sock.sendall(piece)
                            time.sleep(0.05)  # separate segments: the server sees the pieces one by one
                else:
                    sock.sendall(out)
                first = False
            if done:
                break
            data = sock.recv(65536)
            if not data:
                raise EOFError("server closed during the handshake")
            incoming.write(data)
        der = obj.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), obj.selected_alpn_protocol()


@pytest.fixture
def challenge(box: BoxHandle) -> x509.Certificate:
    cert_pem, key_pem = tls_alpn_challenge_pem("localhost", "token.thumbprint")
    box.services.tls.set_challenge("localhost", cert_pem, key_pem)
    return x509.load_pem_x509_certificate(cert_pem)


def test_acme_tls_client_gets_challenge_certificate(box: BoxHandle, challenge: x509.Certificate) -> None:
    cert, alpn = handshake(box.port("https"), sni="localhost", alpn=[ACME_TLS_ALPN])
    assert cert.serial_number == challenge.serial_number
    assert alpn == ACME_TLS_ALPN
    ext = cert.extensions.get_extension_for_oid(ACME_ID)
    assert ext.critical


def test_client_hello_split_across_packets(box: BoxHandle, challenge: x509.Certificate) -> None:
    tls = box.services.tls
    outcomes: list[bool] = []
    choose = tls._choose

    def recording(sslobj: ssl.SSLObject, data: bytes) -> bool:
        outcomes.append(choose(sslobj, data))
        return outcomes[-1]

    tls._choose = recording  # type: ignore[method-assign]  # to see that the server waited for the rest
    for split in (5, 60, 300):  # byte by byte is the parser test's job (below): this is the socket path
        cert, _ = handshake(box.port("https"), sni="localhost", alpn=[ACME_TLS_ALPN], split=split)
        assert cert.serial_number == challenge.serial_number, split
        cert, _ = handshake(box.port("https"), sni="localhost", alpn=["h2", "http/1.1"], split=split)
        assert cert.serial_number == box.services.tls.info().serial, split
    assert outcomes.count(False) >= 6, outcomes  # each split handshake waited at least once for more bytes


def test_everyone_else_gets_the_box_certificate(box: BoxHandle, challenge: x509.Certificate) -> None:
    cases: list[tuple[str | None, list[str] | None]] = [
        ("localhost", None), ("localhost", ["h2", "http/1.1"]), ("localhost", ["http/1.1"]),
        (None, [ACME_TLS_ALPN]), (None, None), ("other.example.test", [ACME_TLS_ALPN]),
    ]
    for sni, alpn in cases:
        cert, selected = handshake(box.port("https"), sni=sni, alpn=alpn)
        assert cert.serial_number == box.services.tls.info().serial, (sni, alpn)
        assert selected != ACME_TLS_ALPN


def test_tls12_client_also_switched(box: BoxHandle, challenge: x509.Certificate) -> None:
    cert, _ = handshake(box.port("https"), sni="localhost", alpn=[ACME_TLS_ALPN], version=ssl.TLSVersion.TLSv1_2)
    assert cert.serial_number == challenge.serial_number


def test_challenge_cleared(box: BoxHandle, challenge: x509.Certificate) -> None:
    box.services.tls.clear_challenge("localhost")
    cert, _ = handshake(box.port("https"), sni="localhost", alpn=[ACME_TLS_ALPN])
    assert cert.serial_number == box.services.tls.info().serial


# --- the parser on its own -------------------------------------------------------------------------------

def _client_hello(sni: str | None, alpn: list[str] | None) -> bytes:
    ctx = unverified_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_parser_byte_by_byte() -> None:
    hello = _client_hello("Mail.Example.test", ["h2", ACME_TLS_ALPN])
    for i in range(len(hello)):
        assert parse_client_hello(hello[:i]) is None
    assert parse_client_hello(hello) == ClientHello("mail.example.test", ("h2", ACME_TLS_ALPN))
    assert parse_client_hello(_client_hello(None, None)) == ClientHello(None, ())


def test_parser_handshake_spanning_records() -> None:
    hello = _client_hello("localhost", [ACME_TLS_ALPN])
    body = hello[5:]
    records = b"".join(b"\x16\x03\x01" + len(body[i:i + 50]).to_bytes(2, "big") + body[i:i + 50]
                       for i in range(0, len(body), 50))
    assert parse_client_hello(records) == ClientHello("localhost", (ACME_TLS_ALPN,))


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                  b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00"])
def test_parser_refuses_what_is_not_a_client_hello(junk: bytes) -> None:
    with pytest.raises(NotClientHello):
        parse_client_hello(junk)


def test_plain_text_on_tls_port_fails_cleanly(box: BoxHandle) -> None:
    with socket.create_connection(("127.0.0.1", box.port("imaps")), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        while sock.recv(4096):
            pass
    # and the listener still works
    cert, _ = handshake(box.port("imaps"), sni="localhost", alpn=None)
    assert cert.serial_number == box.services.tls.info().serial
