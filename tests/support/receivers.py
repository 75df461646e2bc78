"""Receiving SMTP servers for outbound tests: aiosmtpd on a chosen loopback address, on its own thread,
with scripted replies and a record of every transaction (issue 7).

The queue connects to whatever address the test zone's MX/A records give, on one port (the
`outbound_port` setting), so every receiver of a test listens on the same port number on a
different loopback address (127.0.0.2, 127.0.0.3, ::1 ...).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Transaction:
    helo: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    tls: bool
    login: str | None


@dataclass
class Script:
    """Replies to give instead of 250. Lists are used up one reply per command."""

    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply, every time
    data: list[str] = field(default_factory=list)  # replies to the final '.', in order
    mail: list[str] = field(default_factory=list)
    greeting_code: int | None = None  # e.g. 554: refuse the session
    rcpt_limit: int | None = None  # recipients a transaction takes; past them "452 4.5.3 Too many recipients"


def free_port(hosts: Iterable[str] = ("127.0.0.1", "127.0.0.2", "127.0.0.3")) -> int:
    """A port number free on every one of `hosts` (IPv6 addresses allowed)."""
    hosts = list(hosts)
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError("no port free on all of " + ", ".join(hosts))


class _Handler:
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.receiver.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.receiver.script.mail:
            return self.receiver.script.mail.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        reply = self.receiver.script.rcpt.get(address)
        if reply is not None:
            return reply
        limit = self.receiver.script.rcpt_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.receiver.script.data:
            reply = self.receiver.script.data.pop(0)
            if not reply.startswith("2"):
                return reply
        else:
            reply = "250 2.0.0 OK: queued"
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.receiver.record(Transaction(
            helo=str(session.host_name), mail_from=str(envelope.mail_from), rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"", mail_options=tuple(envelope.mail_options),
            tls=session.ssl is not None or _on_tls(server), login=login,
        ))
        if self.receiver.reply_when is not None:
            await asyncio.to_thread(self.receiver.reply_when.wait)
        return reply


def _on_tls(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _Protocol(SMTP):
    receiver: Receiver

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not aiosmtpd's second call after STARTTLS
            self.receiver.connections += 1
        self.receiver.transports.add(transport)
        if self.receiver.script.greeting_code is not None:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"{self.receiver.script.greeting_code} 5.3.2 go away\r\n".encode())
            transport.close()
            return
        super().connection_made(transport)


class Receiver:
    """`with Receiver("127.0.0.2", port) as r:` ... `r.wait(1)` -> the transactions so far."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        credentials: dict[str, str] | None = None,
        implicit_tls: bool = False,
        pipelining: bool = True,
        smtputf8: bool = True,
        size_limit: int = 33554432,
        script: Script | None = None,
        reply_when: threading.Event | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.reply_when = reply_when  # set: the 250 to DATA waits until it is (the message recorded first)
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.credentials = credentials
        self.implicit_tls = implicit_tls
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.size_limit = size_limit
        self.script = script or Script()
        self.transactions: list[Transaction] = []
        self.connections = 0
        self.transports: set[asyncio.BaseTransport] = set()
        self.failed_logins = 0
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"receiver-{host}")
        self._server: asyncio.AbstractServer | None = None

    def record(self, transaction: Transaction) -> None:
        with self._changed:
            self.transactions.append(transaction)
            self._changed.notify_all()

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert self.credentials is not None
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            if self.credentials.get(login) == password:
                return AuthResult(success=True, auth_data=auth_data)
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)

    def start(self) -> Receiver:
        self._thread.start()
        receiver = self

        def factory() -> SMTP:
            with warnings.catch_warnings():
                # Implicit TLS is TLS, but aiosmtpd only knows STARTTLS and warns about AUTH without it.
                warnings.simplefilter("ignore", UserWarning)
                return make()

        def make() -> SMTP:
            protocol = _Protocol(
                _Handler(receiver),
                hostname=f"receiver.{receiver.host}",
                data_size_limit=receiver.size_limit,
                enable_SMTPUTF8=receiver.smtputf8,
                tls_context=None if receiver.implicit_tls else receiver.tls_context,
                require_starttls=receiver.require_starttls,
                auth_required=receiver.credentials is not None,
                auth_require_tls=not receiver.implicit_tls,
                authenticator=receiver._authenticate if receiver.credentials is not None else None,
                timeout=30,
                loop=receiver._loop,
            )
            protocol.receiver = receiver
            return protocol

        async def serve() -> asyncio.AbstractServer:
            return await self._loop.create_server(
                factory, host=self.host, port=self.port, reuse_address=True,
                ssl=self.tls_context if self.implicit_tls else None,
            )

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def wait(self, count: int = 1, timeout: float = 20) -> list[Transaction]:
        """Block until at least `count` transactions have arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.transactions) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.host}: {len(self.transactions)} of {count} transactions arrived")
                self._changed.wait(left)
            return list(self.transactions)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for transport in list(self.transports):
                cast(asyncio.Transport, transport).abort()  # socket transports all have abort()
            await asyncio.sleep(0.05)  # let connection_lost run before the loop goes

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
