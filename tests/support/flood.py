"""Hostile connection patterns from chosen loopback source addresses (issue 10 items 2 and 6): abrupt TLS
closes at each stage of the handshake, idle sockets held open, and normal logins from a given address.

Linux routes all of 127.0.0.0/8 to lo, so binding a client socket to 127.0.0.x before connect() gives
the server that source address.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import resource
import smtplib
import socket
import ssl
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from tests.support.tls_probe import unverified_context

# The protocols' TLS ports: implicit TLS, or plaintext then STARTTLS/STLS.
IMPLICIT_TLS = ("imaps", "pop3s", "submissions")
STARTTLS = ("imap", "pop3", "submission")
TLS_SERVICES = IMPLICIT_TLS + STARTTLS

# How an abrupt client goes away.
RST_AFTER_HELLO = "rst_after_hello"  # ClientHello sent, then a reset
CLOSE_MID_HANDSHAKE = "close_mid_handshake"  # part of the server's reply read, then close()
RST_AFTER_HANDSHAKE = "rst_after_handshake"  # a completed handshake, then a reset
MODES = (RST_AFTER_HELLO, CLOSE_MID_HANDSHAKE, RST_AFTER_HANDSHAKE)


def raise_open_files_limit(wanted: int = 16384) -> None:
    """Thousands of sockets on both ends of loopback need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def connect_from(source: str, port: int, timeout: float = 15) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def reset(sock: socket.socket) -> None:
    """close() with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_until(sock: socket.socket, ends: Iterable[bytes]) -> bytes:
    data = b""
    while not any(end in data for end in ends):
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


def plaintext_to_tls(sock: socket.socket, service: str) -> None:
    """Greeting, then the protocol's STARTTLS command and its go-ahead."""
    if service == "imap":
        _read_until(sock, [b"\r\n"])
        sock.sendall(b"a STARTTLS\r\n")
        _read_until(sock, [b"a OK"])
    elif service == "pop3":
        _read_until(sock, [b"\r\n"])
        sock.sendall(b"STLS\r\n")
        _read_until(sock, [b"+OK"])
    elif service == "submission":
        _read_until(sock, [b"\r\n"])
        sock.sendall(b"EHLO flood.test\r\n")
        _read_until(sock, [b"250 "])
        sock.sendall(b"STARTTLS\r\n")
        _read_until(sock, [b"220 "])
    else:
        raise ValueError(service)


# Built once: loading the system's CA store for each of a thousand connections costs more than the
# handshakes themselves, and these clients never verify anything.
_ABRUPT_CONTEXT = unverified_context()


def abrupt_tls(port: int, service: str, source: str, mode: str) -> None:
    """One connection that goes away abruptly at the given stage of the TLS handshake."""
    context = _ABRUPT_CONTEXT
    sock = connect_from(source, port)
    try:
        if service in STARTTLS:
            plaintext_to_tls(sock, service)
        if mode == RST_AFTER_HANDSHAKE:
            tls = context.wrap_socket(sock, server_hostname="localhost")
            sock = tls  # the reset goes out on the same descriptor
            return
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        engine = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            engine.do_handshake()
        sock.sendall(outgoing.read())
        if mode == CLOSE_MID_HANDSHAKE:
            sock.recv(64)  # a piece of the ServerHello
            sock.close()
    except (OSError, EOFError):
        pass  # refused, reset or closed by the server (its limits may say no mid-flood): still an abrupt client
    finally:
        if sock.fileno() != -1:
            reset(sock)


def abrupt_tls_flood(port: Callable[[str], int]) -> None:
    """167 abrupt TLS clients per TLS port (1,002 in all) from 127.0.0.2..127.0.0.21, in the three ways
    of going away. 127.0.0.2 resets 60 completed handshakes per port, more than any per-address limit
    (IMAP/POP3 50, SMTP 20): one leaked slot per connection locks it out (issue 10 item 2)."""
    jobs = []
    for service in TLS_SERVICES:
        for j in range(167):
            if j < 60:
                jobs.append((port(service), service, "127.0.0.2", RST_AFTER_HANDSHAKE))
            else:
                jobs.append((port(service), service, f"127.0.0.{3 + j % 19}", MODES[j % 3]))
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(lambda job: abrupt_tls(*job), jobs))


def idle_flood_sources() -> tuple[list[str], list[str]]:
    """Source addresses of 2,000 idle sockets (issue 10 item 6): for the MX, 100 addresses of one /24
    and 5 others; for IMAP, 40 addresses of the /24 and 2 others."""
    slash24 = [f"127.0.0.{i}" for i in range(2, 102)]
    mx_sources = [a for a in slash24 for _ in range(9)] + [f"127.0.{n}.1" for n in range(1, 6) for _ in range(20)]
    imap_sources = [a for a in slash24[:40] for _ in range(24)] + [f"127.0.{n}.1" for n in (6, 7) for _ in range(20)]
    return mx_sources, imap_sources


def hold(port: int, sources: list[str]) -> list[socket.socket]:
    """Idle connections from each source in turn, held open (never a byte sent)."""
    def one(source: str) -> socket.socket | None:
        try:
            return connect_from(source, port, timeout=30)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [sock for sock in pool.map(one, sources) if sock is not None]


# --- normal clients from a chosen source address ------------------------------------------------------

class Imap(imaplib.IMAP4):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return connect_from(self.source, self.port, timeout or 15)


class ImapSsl(imaplib.IMAP4_SSL):
    def __init__(self, port: int, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = connect_from(self.source, self.port, timeout or 15)
        wrapped: socket.socket = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        return wrapped


class Pop3(poplib.POP3):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=15)

    def _create_socket(self, timeout: float) -> socket.socket:
        return connect_from(self.source, self.port, timeout)


class Pop3Ssl(poplib.POP3_SSL):
    def __init__(self, port: int, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        self.tls = context  # poplib keeps it as `context`, which its stubs do not declare
        super().__init__("127.0.0.1", port, context=context, timeout=15)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = connect_from(self.source, self.port, timeout)
        return self.tls.wrap_socket(sock, server_hostname=self.host)


def login(service: str, port: int, source: str, context: ssl.SSLContext, user: str, password: str) -> None:
    """A normal login over the service's TLS (implicit or after STARTTLS) from `source`; raises if refused."""
    if service == "imaps":
        with ImapSsl(port, source, context) as imaps:
            assert imaps.login(user, password)[0] == "OK"
            imaps.logout()
    elif service == "imap":
        with Imap(port, source) as imap:
            imap.starttls(ssl_context=context)
            assert imap.login(user, password)[0] == "OK"
            imap.logout()
    elif service in ("pop3s", "pop3"):
        pop: poplib.POP3 = Pop3Ssl(port, source, context) if service == "pop3s" else Pop3(port, source)
        try:
            if service == "pop3":
                pop.stls(context=context)
            pop.user(user)
            assert pop.pass_(password).startswith(b"+OK")
            pop.quit()
        finally:
            pop.close()
    elif service == "submissions":
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=15, source_address=(source, 0)) as smtps:
            smtps.login(user, password)
    elif service == "submission":
        with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0)) as smtp:
            smtp.starttls(context=context)
            smtp.login(user, password)
    else:
        raise ValueError(service)


def deliver(port: int, source: str, recipient: str) -> None:
    """One message through the MX from `source`."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0)) as mx:
        mx.sendmail("someone@sender.test", [recipient], b"Subject: through the flood\r\n\r\nstill here\r\n")
