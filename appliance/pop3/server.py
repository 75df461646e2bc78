"""asyncio glue for POP3: sockets, implicit TLS (995) and STLS (110), timeouts, connection limits.

Bytes from the socket go into the sans-IO Pop3Connection; its commands go to the Pop3Session; the
session's replies come back here to be written, RETR and TOP bodies chunk by chunk from the message
file (read in a worker thread), so a large message never sits in memory whole.

The socket side (Channel, connection limits, the listener) is shared with the other protocol
servers in appliance/channel.py; STLS there stops reading before the reply goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING

from appliance.channel import Channel, ConnectionClosed, DeadlineExpired, Slot, start_listener
from appliance.pop3.limits import DEFAULT_LIMITS, Pop3Limits
from appliance.pop3.protocol import NEED_DATA, Command, Fatal, Pop3Connection, Reject, SaslResponse, State
from appliance.pop3.replies import SYS_TEMP, Err, MessageBody, Reply, Streamed
from appliance.pop3.session import Pop3Session

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.pop3")

IMPLICIT_TLS_SERVICES = frozenset({"pop3s"})
MAX_BUFFERED_INPUT = 64 * 1024  # unread input held before the socket stops being read
SHUTDOWN_REPLY = Err("Server shutting down", SYS_TEMP)
INTERNAL_ERROR_REPLY = Err("Internal server error, closing connection", SYS_TEMP)


class ConnectionHandler:
    """One client connection: the SessionIO the session talks through, and the read loop."""

    def __init__(
        self, services: Services, channel: Channel, slot: Slot, implicit_tls: bool, limits: Pop3Limits
    ) -> None:
        self.services = services
        self.channel = channel
        self.slot = slot
        self.limits = limits
        self.peer = channel.peer
        # Loop time the line being received began (its first byte), None between lines.
        self._line_started: float | None = None
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
                self._line_done()
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

    def _line_done(self) -> None:
        """A line is complete: the next one's clock starts with its first byte."""
        self._line_started = None

    async def _read(self) -> bool:
        loop = asyncio.get_running_loop()
        if self._line_started is None and self.conn.buffered:
            # Part of the next line came pipelined (RFC 2449 6.6) behind the last one: its clock
            # starts when the server turns to it, not while it was busy answering the one before.
            self._line_started = loop.time()
        seconds = self.limits.idle_timeout
        deadline = None
        if self._line_started is not None:  # a line has begun: it must end in time, however slowly it comes
            deadline = self._line_started + self.limits.command_timeout
            seconds = min(seconds, deadline - loop.time())
        try:
            if seconds <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(self.channel.read(), seconds)
        except DeadlineExpired as exc:
            # RFC 1939 3: on autologout the server closes without a reply and without UPDATE.
            log.info("pop3 %s: %s, disconnected", self.peer, exc)
            self.conn.close()
            return False
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline - 0.001:
                log.info("pop3 %s: line not complete within %.0f s, disconnected", self.peer,
                         self.limits.command_timeout)
            else:
                log.info("pop3 %s: idle for %.0f s, disconnected", self.peer, self.limits.idle_timeout)
            self.conn.close()
            return False
        if not data:
            self.conn.close()
            return False
        if self._line_started is None:
            self._line_started = loop.time()
        self.conn.receive_data(data)
        return True

    async def run(self) -> None:
        # The whole AUTHORIZATION state is bounded from connect (shorter under stress), not per read.
        self.slot.watch_preauth(lambda: self.channel.expire("too slow to log in"))
        await self.send(self.session.greeting())
        while self.conn.state is not State.CLOSED:
            event = self.conn.next_event()
            if event is NEED_DATA:
                if not await self._read():
                    return
            elif isinstance(event, Command):
                self._line_done()
                await self.session.handle(event)
                if self.conn.state is State.TRANSACTION and not self.slot.authenticated:
                    self.slot.promote()  # out of the pre-auth pool, its deadline and its stress
                    if not self.slot.evicted:
                        self.channel.cancel_expiry()  # the deadline passed during the login itself
            elif isinstance(event, Reject):
                self._line_done()
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


async def start_server(
    services: Services,
    service: str,
    host: str,
    port: int,
    limits: Pop3Limits = DEFAULT_LIMITS,
    *,
    start_serving: bool = True,
) -> asyncio.Server:
    implicit_tls = service in IMPLICIT_TLS_SERVICES
    return await start_listener(
        host, port,
        tls_context=services.tls.context if implicit_tls else None,
        limits=limits,
        max_buffered=MAX_BUFFERED_INPUT,
        make_handler=lambda channel, slot: ConnectionHandler(services, channel, slot, implicit_tls, limits),
        refusal=Err("Too many connections from your address", SYS_TEMP).render(),
        log=log,
        start_serving=start_serving,
    )


async def serve(
    services: Services, service: str, host: str, port: int, *, start_serving: bool = True
) -> asyncio.Server:
    """The listener contract (appliance/app.py): 'pop3' (110, STLS) or 'pop3s' (995, implicit TLS).
    With start_serving=False the socket is bound but accepts nothing until server.start_serving()."""
    return await start_server(services, service, host, port, start_serving=start_serving)
