"""asyncio glue for POP3: sockets, implicit TLS (995) and STLS (110), timeouts, connection limits.

Bytes from the socket go into the sans-IO Pop3Connection; its commands go to the Pop3Session; the
session's replies come back here to be written, RETR and TOP bodies chunk by chunk from the message
file (read in a worker thread), so a large message never sits in memory whole.

The socket side is a small asyncio.Protocol (Channel) rather than asyncio streams: STLS must stop
reading *before* the +OK goes out and drop whatever plaintext arrived with the command, or bytes
pipelined behind STLS could be taken as sent over TLS (RFC 2595 4, CVE-2011-0411).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.pop3.limits import DEFAULT_LIMITS, Pop3Limits
from appliance.pop3.protocol import NEED_DATA, Command, Fatal, Pop3Connection, Reject, SaslResponse, State
from appliance.pop3.replies import SYS_TEMP, Err, MessageBody, Reply, Streamed
from appliance.pop3.session import Pop3Session

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.pop3")

IMPLICIT_TLS_SERVICES = frozenset({"pop3s"})
MAX_BUFFERED_INPUT = 64 * 1024  # unread input held before the socket stops being read
WRITE_HIGH_WATER = 256 * 1024  # written but unsent output before a writer waits
CLOSE_TIMEOUT = 5.0
SHUTDOWN_REPLY = Err("Server shutting down", SYS_TEMP)
INTERNAL_ERROR_REPLY = Err("Internal server error, closing connection", SYS_TEMP)


class ConnectionClosed(Exception):
    """The client went away or stopped reading; end the session quietly."""


class Channel(asyncio.Protocol):
    """One socket's bytes both ways, with flow control; it stays the protocol across STLS."""

    def __init__(self, on_connect: Callable[[Channel], None]) -> None:
        self._on_connect = on_connect
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
        if len(self._incoming) > MAX_BUFFERED_INPUT and self.transport is not None and not self._reading_paused:
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
        """Before the +OK to STLS: nothing more is read as plaintext, and what came is dropped."""
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


class ConnectionHandler:
    """One client connection: the SessionIO the session talks through, and the read loop."""

    def __init__(self, services: Services, channel: Channel, implicit_tls: bool, limits: Pop3Limits) -> None:
        self.services = services
        self.channel = channel
        self.limits = limits
        assert channel.transport is not None
        peer = channel.transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        self.tls_active = implicit_tls
        self.stls_available = not implicit_tls
        self.conn = Pop3Connection(limits)
        self.session = Pop3Session(services, self, self.conn, limits)
        self._streaming = False  # a body is half sent: no further reply can be understood

    # --- SessionIO ---------------------------------------------------------------------------------

    async def send(self, reply: Reply) -> None:
        self.channel.write(self.conn.send(reply))
        if isinstance(reply, Streamed):
            await self._stream(reply.body)
        await self._drain()

    async def _stream(self, body: MessageBody) -> None:
        chunks = body.chunks()
        self._streaming = True
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                self.channel.write(chunk)
                await self._drain()
        finally:
            body.close()
        self._streaming = False

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.channel.drain(), self.limits.write_timeout)
        except TimeoutError:
            raise ConnectionClosed("client stopped reading") from None

    async def read_sasl_line(self) -> bytes | None:
        """The client's answer to a SASL continuation; None when it goes, times out or overflows."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, SaslResponse):
                return event.data
            if event is NEED_DATA:
                if not await self._read():
                    return None
            elif isinstance(event, Fatal):
                await self.send(event.reply)
                return None

    def prepare_tls(self) -> None:
        self.channel.stop_reading()
        self.conn.discard_buffer()

    async def start_tls(self) -> None:
        try:
            await self.channel.start_tls(self.services.tls.context, self.limits.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            raise ConnectionClosed(f"STLS handshake failed: {exc}") from None
        self.tls_active = True
        self.stls_available = False

    # --- the loop ----------------------------------------------------------------------------------

    async def _read(self) -> bool:
        try:
            data = await asyncio.wait_for(self.channel.read(), self.limits.idle_timeout)
        except TimeoutError:
            # RFC 1939 3: on autologout the server closes without a reply and without UPDATE.
            log.info("pop3 %s: idle for %.0f s, disconnected", self.peer, self.limits.idle_timeout)
            self.conn.close()
            return False
        if not data:
            self.conn.close()
            return False
        self.conn.receive_data(data)
        return True

    async def run(self) -> None:
        await self.send(self.session.greeting())
        while self.conn.state is not State.CLOSED:
            event = self.conn.next_event()
            if event is NEED_DATA:
                if not await self._read():
                    return
            elif isinstance(event, Command):
                await self.session.handle(event)
            elif isinstance(event, Reject):
                await self.send(event.reply)
            elif isinstance(event, Fatal):
                await self.send(event.reply)
                return
            elif isinstance(event, SaslResponse):  # only while AUTH waits for it, in read_sasl_line
                continue

    def _say(self, reply: Err) -> None:
        if self._streaming:
            return  # inside a message body the client would take the reply for message text
        with contextlib.suppress(Exception):
            self.channel.write(reply.render())

    async def serve(self) -> None:
        try:
            await self.run()
        except (ConnectionClosed, ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.debug("pop3 %s: connection ended: %s", self.peer, exc)
        except asyncio.CancelledError:
            self._say(SHUTDOWN_REPLY)
            raise
        except Exception:
            log.exception("pop3 %s: unexpected error", self.peer)
            self._say(INTERNAL_ERROR_REPLY)
        finally:
            self.conn.close()
            with contextlib.suppress(Exception):
                await self.session.close()
            self.channel.close()


class Tracker:
    """Connections of one listener: counts per client address, and the tasks serving them."""

    def __init__(self, limits: Pop3Limits) -> None:
        self.limits = limits
        self.per_client: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[None]] = set()

    def acquire(self, ip: str) -> bool:
        if len(self.tasks) >= self.limits.max_connections:
            return False
        if self.per_client[ip] >= self.limits.max_connections_per_client:
            return False
        self.per_client[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.per_client[ip] -= 1
        if self.per_client[ip] <= 0:
            del self.per_client[ip]


async def start_server(
    services: Services, service: str, host: str, port: int, limits: Pop3Limits = DEFAULT_LIMITS
) -> asyncio.Server:
    implicit_tls = service in IMPLICIT_TLS_SERVICES
    tracker = Tracker(limits)
    loop = asyncio.get_running_loop()

    async def serve_one(handler: ConnectionHandler) -> None:
        try:
            await handler.serve()
        finally:
            tracker.release(handler.peer)
            await handler.channel.wait_closed(CLOSE_TIMEOUT)

    def on_connect(channel: Channel) -> None:
        handler = ConnectionHandler(services, channel, implicit_tls, limits)
        if not tracker.acquire(handler.peer):
            log.warning("pop3 %s: too many connections, refused", handler.peer)
            with contextlib.suppress(Exception):
                channel.write(Err("Too many connections from your address", SYS_TEMP).render())
            channel.close()
            return
        task = loop.create_task(serve_one(handler))
        tracker.tasks.add(task)
        task.add_done_callback(tracker.tasks.discard)

    server = await loop.create_server(
        lambda: Channel(on_connect),
        host=host,
        port=port,
        ssl=services.tls.context if implicit_tls else None,
        ssl_handshake_timeout=limits.tls_handshake_timeout if implicit_tls else None,
        reuse_address=True,
    )
    stop_listening = server.close

    def close() -> None:
        # asyncio.Server.close() leaves open connections alone; ours are told and closed.
        stop_listening()
        for task in list(tracker.tasks):
            task.cancel()

    stop_waiting = server.wait_closed

    async def wait_closed() -> None:
        # As in Python 3.12: closed means every connection has finished too (sockets closed).
        if tracker.tasks:
            await asyncio.wait(list(tracker.tasks))
        await stop_waiting()

    server.close = close  # type: ignore[method-assign]
    server.wait_closed = wait_closed  # type: ignore[method-assign]
    return server


async def serve(services: Services, service: str, host: str, port: int) -> asyncio.Server:
    """The listener contract (appliance/app.py): 'pop3' (110, STLS) or 'pop3s' (995, implicit TLS)."""
    return await start_server(services, service, host, port)
