"""asyncio glue for IMAP: sockets, implicit TLS (993) and STARTTLS (143), timeouts, connection limits.

Bytes from the socket go into the sans-IO ImapConnection; its events go to the ImapSession; the
session's responses come back here to be written, streamed literals chunk by chunk from their files
(read in a worker thread) so a large message never sits in memory whole.

The socket side is a small asyncio.Protocol (Channel) rather than asyncio streams: STARTTLS must stop
reading *before* the OK goes out and drop whatever plaintext arrived with the command, or bytes
pipelined behind STARTTLS (or the start of the client's TLS handshake) could be taken for the wrong
layer (RFC 3501 6.2.1, CVE-2011-0411).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.imap.commands import Command
from appliance.imap.limits import DEFAULT_LIMITS, ImapLimits
from appliance.imap.protocol import (
    NEED_DATA,
    ContinuationRequest,
    Fatal,
    ImapConnection,
    RawLine,
    Reject,
)
from appliance.imap.responses import Bye, Response, StreamedLiteral
from appliance.imap.session import ImapSession, SessionConfig

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.imap")

IMPLICIT_TLS_SERVICES = frozenset({"imaps"})
MAX_BUFFERED_INPUT = 256 * 1024  # unread input held before the socket stops being read
WRITE_HIGH_WATER = 256 * 1024  # written but unsent output before a writer waits
WRITE_BATCH = 64 * 1024  # small responses joined up to this size per write
SHUTDOWN_TEXT = "Server shutting down"
CLOSE_TIMEOUT = 5.0


class ConnectionClosed(Exception):
    """The client went away or stopped reading; end the session quietly."""


class Channel(asyncio.Protocol):
    """One socket's bytes both ways, with flow control; it stays the protocol across STARTTLS."""

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


class ConnectionHandler:
    """One client connection: the SessionIO the session talks through, and the read loop."""

    def __init__(self, services: Services, channel: Channel, implicit_tls: bool, limits: ImapLimits) -> None:
        self.services = services
        self.channel = channel
        self.limits = limits
        assert channel.transport is not None
        peer = channel.transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        self.tls_active = implicit_tls
        self.starttls_available = not implicit_tls
        self.conn = ImapConnection(limits)
        self.session = ImapSession(services, self, SessionConfig(services.hostname, limits.idle_timeout))

    # --- SessionIO ---------------------------------------------------------------------------------

    async def send(self, *responses: Response) -> None:
        # Many small responses (a FETCH of 100,000 FLAGS) go out in few writes: each write to a TLS
        # transport becomes at least one TLS record.
        pieces = [piece for response in responses for piece in response.render()]
        pending: list[bytes] = []
        size = 0
        try:
            for i, piece in enumerate(pieces):
                if isinstance(piece, bytes):
                    pending.append(piece)
                    size += len(piece)
                    if size < WRITE_BATCH:
                        continue
                if pending:
                    self.channel.write(b"".join(pending))
                    pending, size = [], 0
                    await self._drain()
                if not isinstance(piece, bytes):
                    pieces[i] = b""  # streamed (and closed) below, whatever happens
                    await self._stream(piece)
            if pending:
                self.channel.write(b"".join(pending))
            await self._drain()
        finally:
            for piece in pieces:  # literals never streamed (the client went away): close their files
                if not isinstance(piece, bytes):
                    _close(piece)

    async def _stream(self, source: StreamedLiteral) -> None:
        chunks = source.chunks()
        sent = 0
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                sent += len(chunk)
                self.channel.write(chunk)
                await self._drain()
        finally:
            _close(source)
        if sent != source.length:
            # The literal's length is already on the wire: the stream cannot be resynchronised.
            raise ConnectionClosed(f"literal of {source.length} octets produced {sent}")

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.channel.drain(), self.limits.write_timeout)
        except TimeoutError:
            raise ConnectionClosed("client stopped reading") from None

    async def read_line(self, seconds: float) -> bytes | None:
        """A raw line (AUTHENTICATE response, IDLE's DONE); None when the client goes or times out."""
        self.conn.expect_raw_line()
        try:
            while True:
                event = self.conn.next_event()
                if isinstance(event, RawLine):
                    return event.data
                if event is NEED_DATA:
                    if not await self._read(seconds, bye=False):
                        return None
                    continue
                if isinstance(event, Fatal):
                    await self.send(event.reply)
                    return None
        finally:
            self.conn.cancel_raw_line()

    def wait_line(self, seconds: float) -> asyncio.Task[bytes | None]:
        return asyncio.ensure_future(self.read_line(seconds))

    def prepare_tls(self) -> None:
        self.channel.stop_reading()
        self.conn.discard_buffer()

    async def start_tls(self) -> None:
        try:
            await self.channel.start_tls(self.services.tls.context, self.limits.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            raise ConnectionClosed(f"STARTTLS handshake failed: {exc}") from None
        self.tls_active = True
        self.starttls_available = False

    # --- the loop ----------------------------------------------------------------------------------

    async def _read(self, seconds: float, bye: bool = True) -> bool:
        try:
            data = await asyncio.wait_for(self.channel.read(), seconds)
        except TimeoutError:
            if bye:
                await self._say_bye("Autologout: idle for too long")
            return False
        if not data:
            return False
        self.conn.receive_data(data)
        return True

    def _timeout(self) -> float:
        if self.session.state == "not_authenticated":
            return self.limits.preauth_timeout
        return self.limits.authenticated_timeout  # RFC 3501 5.4: at least 30 minutes

    async def run(self) -> None:
        await self.send(self.session.greeting())
        while self.session.state != "logout":
            event = self.conn.next_event()
            if event is NEED_DATA:
                if not await self._read(self._timeout()):
                    return
            elif isinstance(event, Command):
                status = await self.session.handle(event)
                if status == "BAD" and self.conn.note_bad_command():
                    await self.send(Bye("Too many invalid commands"))
                    return
            elif isinstance(event, ContinuationRequest | Reject):
                await self.send(event.reply)
            elif isinstance(event, Fatal):
                await self.send(event.reply)
                return
            elif isinstance(event, RawLine):
                continue

    async def _say_bye(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.channel.write(Bye(text).to_bytes())

    async def serve(self) -> None:
        try:
            await self.run()
        except ConnectionClosed as exc:
            log.debug("imap %s: connection ended: %s", self.peer, exc)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.debug("imap %s: connection ended: %s", self.peer, exc)
        except asyncio.CancelledError:
            await self._say_bye(SHUTDOWN_TEXT)
            raise
        except Exception:
            log.exception("imap %s: unexpected error", self.peer)
            await self._say_bye("Internal server error, closing connection")
        finally:
            with contextlib.suppress(Exception):
                await self.session.close()
            self.channel.close()


def _close(source: StreamedLiteral) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


class Tracker:
    """Connections of one listener: counts per client address, and the tasks serving them."""

    def __init__(self, limits: ImapLimits) -> None:
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
    services: Services, service: str, host: str, port: int, limits: ImapLimits = DEFAULT_LIMITS
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
            log.warning("imap %s: too many connections, refused", handler.peer)
            with contextlib.suppress(Exception):
                channel.write(Bye("Too many connections from your address").to_bytes())
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
        # asyncio.Server.close() leaves open connections alone; ours are told BYE and closed.
        stop_listening()
        for task in list(tracker.tasks):
            task.cancel()

    server.close = close  # type: ignore[method-assign]
    return server


async def serve(services: Services, service: str, host: str, port: int) -> asyncio.Server:
    """The listener contract (appliance/app.py): 'imap' (143, STARTTLS) or 'imaps' (993, implicit TLS)."""
    return await start_server(services, service, host, port)
