"""The socket side shared by our own protocol servers (IMAP, POP3): a Channel per connection, the
per-listener connection limits, and a listener whose close() ends the connections too.

The socket side is a small asyncio.Protocol rather than asyncio streams: STARTTLS/STLS must stop
reading *before* the OK goes out and drop whatever plaintext arrived with the command, or bytes
pipelined behind it could be taken as sent over TLS (RFC 3501 6.2.1, RFC 2595 4, CVE-2011-0411).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

WRITE_HIGH_WATER = 256 * 1024  # written but unsent output before a writer waits
CLOSE_TIMEOUT = 5.0


class ConnectionClosed(Exception):
    """The client went away or stopped reading; end the session quietly."""


class Channel(asyncio.Protocol):
    """One socket's bytes both ways, with flow control; it stays the protocol across STARTTLS."""

    def __init__(self, on_connect: Callable[[Channel], None], max_buffered: int) -> None:
        self._on_connect = on_connect
        self._max_buffered = max_buffered  # unread input held before the socket stops being read
        self.transport: asyncio.Transport | None = None
        self._incoming = bytearray()
        self._eof = False
        self._lost = asyncio.Event()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._incoming += data
        self._readable.set()
        if len(self._incoming) > self._max_buffered and self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool | None:
        self._eof = True
        self._readable.set()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost.set()
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # for the handler

    @property
    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def read(self) -> bytes:
        """What has arrived, waiting for something; b"" at the end of the stream."""
        while not self._incoming and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._incoming)
        self._incoming.clear()
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost:
            raise ConnectionClosed("connection closed")

    def stop_reading(self) -> None:
        """Before the OK to STARTTLS: nothing more is read as plaintext, and what came is dropped."""
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        self._incoming.clear()

    async def start_tls(self, context: ssl.SSLContext, handshake_seconds: float) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                         ssl_handshake_timeout=handshake_seconds)
        if transport is None:
            raise ConnectionClosed("TLS handshake failed")
        self.transport = transport
        self._reading_paused = False  # start_tls resumes reading on the new transport

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait(), seconds)
        if not self.lost and self.transport is not None:
            self.transport.abort()


class ListenerLimits(Protocol):
    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_client(self) -> int: ...
    @property
    def tls_handshake_timeout(self) -> float: ...


class Handler(Protocol):
    """One connection's protocol logic: serve() runs the session to its end and never raises."""

    @property
    def peer(self) -> str: ...
    async def serve(self) -> None: ...


class ConnectionLimiter:
    """Open connections of one listener, per client address and in all; refuses past the limits."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._open: collections.Counter[str] = collections.Counter()

    def acquire(self, ip: str) -> bool:
        if self._open[ip] >= self.per_client or self._open.total() >= self.total:
            return False
        self._open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

    def count(self, ip: str) -> int:
        return self._open[ip]


async def start_listener(
    host: str,
    port: int,
    *,
    tls_context: ssl.SSLContext | None,
    limits: ListenerLimits,
    max_buffered: int,
    make_handler: Callable[[Channel], Handler],
    refusal: bytes,
    log: logging.Logger,
) -> asyncio.Server:
    """A listener (implicit TLS when tls_context is given) that refuses connections over the limits
    with `refusal`, and whose close() cancels every session (each says goodbye in its own protocol)."""
    limiter = ConnectionLimiter(limits.max_connections_per_client, limits.max_connections)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def serve_one(channel: Channel, handler: Handler) -> None:
        try:
            await handler.serve()
        finally:
            limiter.release(channel.peer)
            await channel.wait_closed(CLOSE_TIMEOUT)

    def on_connect(channel: Channel) -> None:
        peer = channel.peer
        if not limiter.acquire(peer):
            log.warning("%s: too many connections, refused", peer)
            with contextlib.suppress(Exception):
                channel.write(refusal)
            channel.close()
            return
        task = loop.create_task(serve_one(channel, make_handler(channel)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await loop.create_server(
        lambda: Channel(on_connect, max_buffered),
        host=host,
        port=port,
        ssl=tls_context,
        ssl_handshake_timeout=limits.tls_handshake_timeout if tls_context is not None else None,
        reuse_address=True,
    )
    stop_listening = server.close
    stop_waiting = server.wait_closed

    def close() -> None:
        # asyncio.Server.close() leaves open connections alone; ours are told and closed.
        stop_listening()
        for task in list(tasks):
            task.cancel()

    async def wait_closed() -> None:
        # As in Python 3.12: closed means every connection has finished too (sockets closed).
        if tasks:
            await asyncio.wait(list(tasks))
        await stop_waiting()

    server.close = close  # type: ignore[method-assign]
    server.wait_closed = wait_closed  # type: ignore[method-assign]
    return server
