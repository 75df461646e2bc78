"""asyncio glue for IMAP: sockets, implicit TLS (993) and STARTTLS (143), timeouts, connection limits.

Bytes from the socket go into the sans-IO ImapConnection; its events go to the ImapSession; the
session's responses come back here to be written, streamed literals chunk by chunk from their files
(read in a worker thread) so a large message never sits in memory whole.

An APPEND's literals past their first limits.append_in_memory_octets (256 KiB) are written to a spool
file as they come, as SMTP DATA's (appliance/message_spool.Spill): a client
trickling a large message holds that much of the box's budget for messages being received, not the
whole. Once the command is in, they are read back (in turn with SMTP's) and the session gets it whole.

The socket side (Channel, connection limits, the listener) is shared with the other protocol
servers in appliance/channel.py; STARTTLS there stops reading before the reply goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import zlib
from typing import TYPE_CHECKING

from appliance import waits
from appliance.channel import Channel, ConnectionClosed, DeadlineExpired, Slot, start_listener
from appliance.disk_full import DISK_FULL_TEXT, room_for
from appliance.imap.commands import Command
from appliance.imap.limits import DEFAULT_LIMITS, ImapLimits
from appliance.imap.protocol import (
    NEED_DATA,
    ContinuationRequest,
    Fatal,
    ImapConnection,
    RawLine,
    Reject,
    SpoolChunk,
    SpooledCommand,
    SpooledLiteral,
)
from appliance.imap.responses import Bye, Piece, Response, StreamedLiteral, Tagged
from appliance.imap.session import ImapSession, SessionConfig
from appliance.message_memory import BUSY_TEXT
from appliance.message_spool import Spill, SpoolRefusal

if TYPE_CHECKING:
    from appliance.services import Services

INFLATE_CHUNK = 64 * 1024  # octets inflated per step, so a compression bomb costs no memory
log = logging.getLogger("letterbox.imap")

IMPLICIT_TLS_SERVICES = frozenset({"imaps"})
MAX_BUFFERED_INPUT = 256 * 1024  # unread input held before the socket stops being read
WRITE_BATCH = 64 * 1024  # small responses joined up to this size per write
SHUTDOWN_TEXT = "Server shutting down"
LOGGED_IN_STATES = frozenset({"authenticated", "selected"})
# A Spill's refusals as an APPEND's NO: its text and response code (RFC 5530).
SPOOL_REFUSALS = {
    SpoolRefusal.BUSY: (BUSY_TEXT, "UNAVAILABLE"),
    SpoolRefusal.DISK_FULL: (DISK_FULL_TEXT, "OVERQUOTA"),
    SpoolRefusal.FAILED: ("Local error in keeping the message, try again later", "UNAVAILABLE"),
}


class ConnectionHandler:
    """One client connection: the SessionIO the session talks through, and the read loop."""

    def __init__(
        self, services: Services, channel: Channel, slot: Slot, implicit_tls: bool, limits: ImapLimits
    ) -> None:
        self.services = services
        self.channel = channel
        self.slot = slot
        self.limits = limits
        self.peer = channel.peer
        # Loop time the command being received began (its first byte), None between commands.
        self._command_started: float | None = None
        self.tls_active = implicit_tls
        # RFC 4978: raw DEFLATE (no zlib header: wbits -15) both ways once COMPRESS succeeded. It sits
        # above TLS: the channel carries the compressed bytes, TLS records and all, unchanged.
        self._deflate: zlib._Compress | None = None
        self._inflate: zlib._Decompress | None = None
        self.starttls_available = not implicit_tls
        # The APPEND messages this connection holds in memory (their first 256 KiB while they come, then
        # whole once read back) and spools, given back once each command ends.
        self._messages = services.message_memory.hold(channel.peer)
        self.conn = ImapConnection(limits, room=self._room_for_append,
                                   append_allowed=lambda: self.session.state in LOGGED_IN_STATES,
                                   hold=self._messages.take, spool=self._messages.expect)
        # The spool files of the command being received's literals, and the refusal one of them met
        # (the rest of its literals are then read and dropped).
        self._spills: dict[SpooledLiteral, Spill] = {}
        self._spool_refusal: SpoolRefusal | None = None
        self.session = ImapSession(services, self, SessionConfig(services.hostname, limits.idle_timeout,
                                                                limits.max_append_octets))
        # Output not yet handed to the channel: written when a command has been answered, when the
        # connection next reads from the client (_read) or when WRITE_BATCH is reached, so a
        # command's untagged answers and its tagged reply go out in one write. Each write to the TLS
        # transport was a TLS record and a send(2) that gave the GIL up and waited to get it back
        # while the database and worker threads ran: a quarter of the event loop's time under
        # imaptest's stress mode (issue 19). Output made while a read is already waiting (IDLE's
        # updates) goes out from the next loop iteration (call_soon).
        self._out: list[bytes] = []
        self._out_octets = 0
        self._flush_soon: asyncio.Handle | None = None
        self._reading = False

    # --- SessionIO ---------------------------------------------------------------------------------

    async def send(self, *responses: Response) -> None:
        # Many small responses (a FETCH of 100,000 FLAGS) go out in few writes: each write to a TLS
        # transport becomes at least one TLS record.
        if len(responses) <= 1:
            pieces = responses[0].render() if responses else []
            if self._wrote_short(responses, pieces):
                await self._drain()
                return
        else:
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
                    self._write(b"".join(pending))
                    pending, size = [], 0
                    await self._drain()
                if not isinstance(piece, bytes):
                    pieces[i] = b""  # streamed (and closed) below, whatever happens
                    await self._stream(piece)
            if pending:
                self._write(b"".join(pending))
            if any(isinstance(response, Tagged) for response in responses):
                # A command's tagged reply goes out now, not when its handler returns: some go on
                # after their answer (a SELECT looks up the folder's message cache for the prefill,
                # and a first open's commit holds the folder lock meanwhile), and the client waited
                # for that too (a cold SELECT of 1k 10-12 -> 22-27 ms, issue 19).
                self._answered()
            await self._drain()
        finally:
            for piece in pieces:  # literals never streamed (the client went away): close their files
                if not isinstance(piece, bytes):
                    _close(piece)

    def _wrote_short(self, responses: tuple[Response, ...], pieces: list[Piece]) -> bool:
        """send() of one short response (a tagged reply, an untagged line: `pieces`, its rendering)
        or of none (a catch-up with nothing to tell), most sends, without its loop, lists and joins
        (issue 19); False, and nothing written, for anything else."""
        if pieces and (len(pieces) > 1 or type(pieces[0]) is not bytes or len(pieces[0]) >= WRITE_BATCH):
            return False
        if pieces:
            self._write(pieces[0])  # type: ignore[arg-type]  # bytes, as looked at above
            if isinstance(responses[0], Tagged):
                self._answered()  # as send() does
        return True

    def _write(self, data: bytes) -> None:
        if self._deflate is not None:
            # A sync flush per write: the client can decode every response as soon as it arrives.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self._out.append(data)
        self._out_octets += len(data)
        if self._out_octets >= WRITE_BATCH:
            self.flush()
        elif self._reading and self._flush_soon is None:
            # Not when a command's answer is made: a call_soon per answer was one more loop
            # iteration per command (a select(2) that gave the GIL up, issue 19); _read flushes.
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush_later)

    def flush(self) -> None:
        """Hand the output kept so far to the channel (ConnectionClosed when it is gone)."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_octets = 0
            if waits.ENABLED:
                with waits.loop_span("loop: channel.write"):
                    self.channel.write(data)
            else:
                self.channel.write(data)

    def _answered(self) -> None:
        """A tagged reply is made: out now, or, when the client has pipelined more behind it, at the
        loop's next iteration, so the answers of the commands that run on without waiting (a lock, a
        thread, the disk) go out in one write with it. imaptest's stress mode sends five or six
        commands at a time, and each answer was a TLS record, a send(2) and a wakeup of the client:
        a third of the event loop's time (issue 19). No answer waits behind a command that waits."""
        if self.conn.buffered:
            if self._flush_soon is None:
                self._flush_soon = asyncio.get_running_loop().call_soon(self._flush_later)
            return
        self._flush_later()

    def _flush_later(self) -> None:
        self._flush_soon = None
        with contextlib.suppress(ConnectionClosed):  # the client went: the session sees it at its next read
            self.flush()

    @property
    def compressed(self) -> bool:
        return self._deflate is not None

    def start_compression(self) -> None:
        """After the OK to COMPRESS (RFC 4978 3): what the client pipelined behind the command is
        compressed already, so it goes through the decompressor with the rest."""
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        pending = self.conn.take_buffer()
        if pending:
            self._receive(pending)

    async def _stream(self, source: StreamedLiteral) -> None:
        chunks = source.chunks()
        sent = 0
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                sent += len(chunk)
                self._write(chunk)
                await self._drain()
        finally:
            _close(source)
        if sent != source.length:
            # The literal's length is already on the wire: the stream cannot be resynchronised.
            raise ConnectionClosed(f"literal of {source.length} octets produced {sent}")

    async def _drain(self) -> None:
        if self.channel.drained:
            # The usual case: no wait_for, whose task for drain() and timer cost two more event loop
            # iterations per response (each a select(2) and a look at the change counters, issue 19).
            return
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
                    self._input_done()
                    return event.data
                if event is NEED_DATA:
                    if not await self._read(seconds, bye=False):
                        return None
                    continue
                if isinstance(event, Fatal):
                    self._input_done()
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
        self.flush()  # the OK to STARTTLS goes out in plain text, before the handshake
        try:
            await self.channel.start_tls(self.services.tls.context, self.limits.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            raise ConnectionClosed(f"STARTTLS handshake failed: {exc}") from None
        self.tls_active = True
        self.starttls_available = False

    # --- the loop ----------------------------------------------------------------------------------

    def _command_deadline(self) -> float | None:
        """When the command being received must be complete: from its first byte, not per read."""
        if self._command_started is None:
            return None
        literal_seconds = self.conn.command_literal_octets / self.limits.min_literal_rate
        return self._command_started + self.limits.command_timeout + literal_seconds

    def _input_done(self) -> None:
        """A command (or raw line) is complete: the next one's clock starts with its first byte."""
        self._command_started = None

    async def _read(self, seconds: float, bye: bool = True) -> bool:
        loop = asyncio.get_running_loop()
        if self._command_started is None and self.conn.buffered:
            # Part of the next command came pipelined behind the last one: its clock starts now,
            # when the server turns to it, not while the server was busy answering the one before.
            self._command_started = loop.time()
        deadline = self._command_deadline()
        if deadline is not None:
            seconds = min(seconds, deadline - loop.time())
        if self._inflate_more():
            return True
        self._flush_later()  # what was answered goes out before the client is waited for
        self._reading = True
        try:
            if seconds <= 0:
                raise TimeoutError
            # The channel's own timer, not wait_for (a task per read, whose start and end were two
            # more event loop iterations per command) nor asyncio.timeout (a timer per read; issue 19).
            if waits.ENABLED:
                with waits.span("client: between commands" if self._command_started is None
                                else "client: rest of a command", whole_box=True):
                    data = await self.channel.read_within(seconds)
            else:
                data = await self.channel.read_within(seconds)
        except DeadlineExpired as exc:
            # The pre-auth deadline (appliance/channel.py Slot) passed: say why, then close.
            log.info("imap %s: %s, disconnected", self.peer, exc)
            await self._say_bye(f"Autologout: {exc}")
            raise
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline - 0.001:
                log.info("imap %s: command not complete within its time limit, disconnected", self.peer)
                await self._say_bye("Autologout: command not completed in time")
                raise ConnectionClosed("command deadline") from None
            if bye:
                await self._say_bye("Autologout: idle for too long")
            return False
        finally:
            self._reading = False
        if not data:
            return False
        if self._command_started is None:
            self._command_started = loop.time()
        self._receive(data)
        return True

    def _receive(self, data: bytes) -> None:
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data, INFLATE_CHUNK)
            except zlib.error:
                raise ConnectionClosed("invalid compressed data") from None
        self.conn.receive_data(data)

    def _inflate_more(self) -> bool:
        """Bounded inflation (a small input may expand a thousandfold): input left over from the last
        step is inflated before the socket is read again."""
        if self._inflate is None or not self._inflate.unconsumed_tail:
            return False
        self._receive(self._inflate.unconsumed_tail)
        return True

    def _timeout(self) -> float:
        if self.session.state == "not_authenticated":
            return self.limits.preauth_timeout
        return self.limits.authenticated_timeout  # RFC 3501 5.4: at least 30 minutes

    def _room_for_append(self, octets: int) -> bool:
        """Only a logged-in client is told the disk is full; before the login the session answers."""
        return self.session.state not in LOGGED_IN_STATES or self.room_for_append(octets)

    def hold(self, octets: int) -> bool:
        """Whether `octets` more of the command being answered (a CATENATE URL's content) may be held
        in memory; they are, until the command is answered (run releases them)."""
        return self._messages.take(octets)

    def room_for_append(self, octets: int) -> bool:
        """Whether the data disk keeps its reserve once `octets` more (this command's messages) and
        every other message being received (other APPENDs, SMTP DATA) are written."""
        return room_for(self.services.store.root, octets + self.services.message_memory.others(self._messages))

    def _room_for_spool(self, octets: int) -> bool:
        """Whether the disk keeps its reserve once every message being received is written, this
        command's own included: the `octets` about to be spooled are still `coming` (Hold.expect) there."""
        return room_for(self.services.store.root, self.services.message_memory.others())

    async def _spool(self, event: SpoolChunk) -> None:
        """Octets of an APPEND literal past what the command keeps in memory: to its spool file."""
        try:
            if self._spool_refusal is None:
                spill = self._spills.get(event.literal)
                if spill is None:
                    spill = Spill(self.services.config.data.tmp, self._messages, self._room_for_spool,
                                  what="APPEND")
                    self._spills[event.literal] = spill
                self._spool_refusal = await spill.write(event.data)
                if self._spool_refusal is not None:
                    self._close_spills()  # its octets given back to the disk now, not after the literal
        finally:
            self._messages.arrived(len(event.data))

    async def _read_back(self, event: SpooledCommand) -> None:
        """The command's spooled literals whole in memory (the session and the store take bytes), in
        turn with SMTP's (message_memory.READ_BACK_OCTETS); or its refusal (the next event, a NO)."""
        self._input_done()
        refusal = self._spool_refusal
        if refusal is None:
            octets = sum(literal.octets for literal in event.literals)
            if not await self._messages.take_back(octets):
                log.warning("imap %s: an APPEND of %d octets not read back in time: too many large ones at once",
                            self.peer, octets)
                refusal = SpoolRefusal.BUSY
        if refusal is None:
            try:
                for literal in event.literals:
                    spill = self._spills.get(literal)
                    if spill is None or spill.file is None:
                        raise OSError("no spool file")
                    literal.data = await spill.read_after(literal.take_head())
            except OSError as exc:
                log.error("imap %s: a spooled APPEND could not be read back: %s", self.peer, exc)
                refusal = SpoolRefusal.FAILED
        self._close_spills()  # before the session writes the message: the disk has its octets back
        if refusal is not None:
            for literal in event.literals:
                literal.data = None
                literal.take_head()
            self.conn.refuse_spooled(*SPOOL_REFUSALS[refusal])

    def _close_spills(self) -> None:
        for spill in self._spills.values():
            spill.close()
        self._spills.clear()

    def _command_over(self) -> None:
        """The command being received is answered, refused, or its client gone: its spool files closed
        (nothing is left in <data>/tmp), its part of the budget given back."""
        self._close_spills()
        self._spool_refusal = None
        self._messages.release()

    async def run(self) -> None:
        # RFC 3501 5.4 lets a server end an idle unauthenticated session; ours bounds the whole
        # pre-auth phase from connect (shorter when the listener is under stress).
        self.slot.watch_preauth(lambda: self.channel.expire("too slow to log in"))
        await self.send(self.session.greeting())
        while self.session.state != "logout":
            event = self.conn.next_event()
            if event is NEED_DATA:
                if not await self._read(self._timeout()):
                    return
            elif isinstance(event, Command):
                self._input_done()
                try:
                    status = await self._answer(event)
                finally:
                    del event  # its literals: the memory given back below is free
                    self._command_over()
                self._promote()
                if status == "BAD" and self.conn.note_bad_command():
                    await self.send(Bye("Too many invalid commands"))
                    return
                await self.channel.take_turn()
            elif isinstance(event, ContinuationRequest):
                await self.send(event.reply)
            elif isinstance(event, SpoolChunk):
                await self._spool(event)
            elif isinstance(event, SpooledCommand):
                await self._read_back(event)  # the next event is the command, or its refusal
            elif isinstance(event, Reject):
                self._input_done()
                self._command_over()
                await self.send(event.reply)
            elif isinstance(event, Fatal):
                await self.send(event.reply)
                return
            elif isinstance(event, RawLine):
                self._input_done()
                continue

    def _promote(self) -> None:
        if self.session.state in LOGGED_IN_STATES and not self.slot.authenticated:
            self.slot.promote()  # out of the pre-auth pool, its deadline and its stress
            if not self.slot.evicted:
                self.channel.cancel_expiry()  # the deadline passed during the login itself

    async def _answer(self, command: Command) -> str:
        probe = waits.begin(("UID " if getattr(command, "uid", False) else "") + command.name) if waits.ENABLED else None
        status = await (waits.Steps(self.session.handle(command)) if probe is not None else self.session.handle(command))
        # Answered: out before a command pipelined behind it waits for anything (a thread, a lock),
        # while the client waits for this answer.
        self._answered()
        if probe is not None:
            waits.end(probe)
        return status

    async def _say_bye(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self._write(Bye(text).to_bytes())

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
            self._command_over()
            with contextlib.suppress(Exception):
                await self.session.close()
            with contextlib.suppress(ConnectionClosed):
                self.flush()  # the last answers and a BYE, before the close
            self.channel.close()


def _close(source: StreamedLiteral) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


async def start_server(
    services: Services,
    service: str,
    host: str,
    port: int,
    limits: ImapLimits = DEFAULT_LIMITS,
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
        refusal=Bye("Too many connections from your address").to_bytes(),
        log=log,
        start_serving=start_serving,
    )


async def serve(
    services: Services, service: str, host: str, port: int, *, start_serving: bool = True
) -> asyncio.Server:
    """The listener contract (appliance/app.py): 'imap' (143, STARTTLS) or 'imaps' (993, implicit TLS).
    With start_serving=False the socket is bound but accepts nothing until server.start_serving()."""
    return await start_server(services, service, host, port, start_serving=start_serving)
