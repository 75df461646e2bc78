"""Handshake with each TLS listener of the box (STARTTLS or implicit) and return the certificate it served."""

from __future__ import annotations

import socket
import ssl

from cryptography import x509

IMPLICIT = ("submissions", "imaps", "pop3s", "https")
STARTTLS = ("smtp", "submission", "imap", "pop3")
TLS_SERVICES = STARTTLS + IMPLICIT


def _read_until(sock: socket.socket, done: bytes | tuple[bytes, ...]) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
        lines = data.split(b"\r\n")
        if any(line.startswith(done) for line in lines[:-1]):
            return data


def _starttls(sock: socket.socket, service: str) -> None:
    if service in ("smtp", "submission"):
        _read_until(sock, b"220 ")
        sock.sendall(b"EHLO probe.test\r\n")
        _read_until(sock, b"250 ")
        sock.sendall(b"STARTTLS\r\n")
        _read_until(sock, b"220 ")
    elif service == "imap":
        _read_until(sock, b"* OK")
        sock.sendall(b"S STARTTLS\r\n")
        _read_until(sock, b"S OK")
    elif service == "pop3":
        _read_until(sock, b"+OK")
        sock.sendall(b"STLS\r\n")
        _read_until(sock, b"+OK")
    else:
        raise ValueError(service)


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def served_certificate(port: int, service: str, context: ssl.SSLContext | None = None,
                       server_hostname: str | None = "localhost", host: str = "127.0.0.1",
                       timeout: float = 10) -> x509.Certificate:
    """The leaf the listener served on a new handshake (verified when `context` verifies)."""
    ctx = context or unverified_context()
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if service in STARTTLS:
            _starttls(raw, service)
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)
