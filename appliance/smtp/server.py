"""asyncio glue for the SMTP listeners: aiosmtpd's protocol with our limits, replies and TLS set-up.

aiosmtpd (1.4.6) parses commands, SIZE, STARTTLS and the AUTH exchange; the subclass below adds what
the box promises on top: DATA read by data_phase.py (only CRLF.CRLF ends it, so bare-LF smuggling
sequences stay content; long lines taken, memory bounded), enhanced status codes on every reply (RFC
2034), an error budget that ends abusive sessions with 421, per-client connection limits, a 421 on timeout, a DATA transfer bounded in time, and per-session
command-size bookkeeping (aiosmtpd keeps that in one dict shared by every session).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import re
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException, _Missing, syntax

from appliance.channel import LISTEN_BACKLOG, ConnectionLimiter, ListenerLimits, Slot
from appliance.disk_full import is_disk_full, room_for
from appliance.message_memory import Hold
from appliance.message_spool import Spill
from appliance.sizes import limit_text
from appliance.smtp import class_members
from appliance.smtp.data_phase import (
    BUSY,
    DISK_FULL,
    LINE_TOO_LONG,
    SPOOL_FAILED,
    TOO_MUCH_DATA,
    Spooled,
    read_back,
    read_message,
)
from appliance.smtp.delivery import Deliverer
from appliance.smtp.handler import LetterboxEnvelope, LetterboxSession, SmtpHandler
from appliance.smtp.limits import (
    DEFAULT_LIMITS,
    MAX_AUTH_COMMAND_OCTETS,
    MAX_AUTH_RESPONSE_OCTETS,
    MAX_COMMAND_OCTETS,
    MAX_TEXT_LINE_OCTETS,
    READ_LIMIT_OCTETS,
    SmtpLimits,
)
from appliance.smtp.policy import (
    LMTP_SERVICE,
    MX_SERVICE,
    SMTP_SERVICES,
    SUBMISSION_SERVICES,
    TEMPORARY_FAILURE,
)

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.smtp")
class_members.install()  # aiosmtpd's per-connection look-ups, once per class (issue 19)

MAX_LOGGED_PROTOCOL_ERRORS = 3  # malformed inputs logged per connection (one short line each)
IDENT = {"lmtp": "LMTP Letterbox"}
DEFAULT_IDENT = "ESMTP Letterbox"

# RFC 3463 class.subject.detail for replies aiosmtpd writes without one, by reply code.
DEFAULT_STATUS = {
    220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.0.0",
    421: "4.3.0", 450: "4.0.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3",
    554: "5.0.0", 555: "5.5.4",
}
# aiosmtpd's refusals of a message over the size limit: at MAIL (its SIZE= declared) and after DATA.
SIZE_REFUSALS = frozenset({TOO_MUCH_DATA, "552 Error: message size exceeds fixed maximum message size"})
# aiosmtpd's own texts we reword (the code stays).
REWORDED = {
    LINE_TOO_LONG: "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: command 'AUTH' not recognized": "503 5.5.1 Error: send EHLO first",
    # RFC 5321 4.2.2/4.1.2: an address that does not parse is a syntax error in the arguments.
    "553 5.1.3 Error: malformed address": "501 5.5.2 Syntax error in the address",
}
# DATA-phase errors aiosmtpd answers once; LMTP owes one reply per recipient (RFC 2033 4.2).
DATA_ERRORS = frozenset({TOO_MUCH_DATA, LINE_TOO_LONG, BUSY, DISK_FULL, SPOOL_FAILED})
UNKNOWN_COMMAND = "500 5.5.1 Error: command not recognized"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 6
AUTH_ABORTED = "501 5.7.0 Auth aborted"
AUTH_NOT_BASE64 = "501 5.5.2 Can't decode base64"

# RFC 5321 4.1.2 Path with a Dot-string local part and a dot-atom domain (RFC 5322 3.2.3 atext).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>")
_REPLY = re.compile(r"(?P<code>[245]\d\d)(?P<sep>[ -])(?P<text>.*)", re.DOTALL)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# A reply that carries its status code already (most of ours): one match of its start.
_HAS_ENHANCED = re.compile(r"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def size_refusal(limit: int) -> str:
    """A message over the size limit (RFC 1870 6.1), with the limit: "too big" alone left a user (msmtp, curl)
    no way to know how far to shrink an attachment."""
    return f"552 5.3.4 Message too big: this server takes messages of at most {limit_text(limit)}"


def with_enhanced_code(line: str) -> str:
    """RFC 2034 3: every 2xx/4xx/5xx reply (but the greeting and HELO/EHLO) carries a status code."""
    if line in REWORDED:
        return REWORDED[line]
    if _HAS_ENHANCED.match(line):
        return line
    if line.startswith("502 Could not VRFY "):  # aiosmtpd's answer to an unparsable address
        return "501 5.5.2 Syntax error in the address"  # RFC 5321 4.2.2/4.3.2: 501 for bad arguments
    m = _REPLY.fullmatch(line)
    if m is None or _ENHANCED.match(m["text"]):
        return line
    code = int(m["code"])
    status = DEFAULT_STATUS.get(code, f"{m['code'][0]}.0.0")
    return f"{m['code']}{m['sep']}{status} {m['text']}"


class ConnectionTracker:
    """The listener's connection limits (the ConnectionLimiter IMAP and POP3 use too), and its live
    sessions, so closing the listener can tell each client 421 instead of leaving it hanging."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limiter = ConnectionLimiter.for_limits(limits)
        self.sessions: set[LetterboxSMTP] = set()


class _CommandTable(dict[str, Any]):
    """aiosmtpd's table of the connection's commands (it looks them up with .get() and lists them
    with .items() for HELP), each bound when asked for (class_members.commands: the class's are
    found once); unknown ones go to our handler (not its own budget of 5 that ends in 502) so one
    error budget governs the session."""

    def __init__(self, owner: LetterboxSMTP, unknown: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        super().__init__()
        self._owner = owner
        self._functions = class_members.commands(type(owner))
        self._unknown = unknown

    def get(self, key: str, default: Any = None) -> Any:
        function = self._functions.get(key)
        return self._unknown if function is None else function.__get__(self._owner)

    def items(self) -> Any:
        return [(name, function.__get__(self._owner)) for name, function in self._functions.items()]


class LetterboxSMTP(SMTP):
    lazy_commands = True  # see _CommandTable
    line_length_limit = READ_LIMIT_OCTETS  # aiosmtpd's name for the stream reader's limit
    command_size_limit = MAX_COMMAND_OCTETS

    def __init__(
        self,
        handler: SmtpHandler,
        *,
        limits: SmtpLimits,
        tracker: ConnectionTracker,
        implicit_tls: bool = False,
        implicit_tls_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        # Port 465: the handshake runs after accept, inside the connection's slot (see _handshake).
        self._implicit_tls_context = implicit_tls_context
        self._raw_transport: asyncio.BaseTransport | None = None  # set while that handshake runs
        self.limits = limits
        self._tracker = tracker
        # aiosmtpd's class-level dict is shared by all sessions and grows on every EHLO: use our own.
        self.command_size_limits: dict[str, int] = collections.defaultdict(lambda: MAX_COMMAND_OCTETS)
        self.command_size_limits["AUTH"] = MAX_AUTH_COMMAND_OCTETS
        if implicit_tls:
            # Port 465 is TLS from the first byte (RFC 8314 3.3); aiosmtpd only knows STARTTLS.
            self._auth_require_tls = False
        self._smtp_methods = _CommandTable(self, self._smtp_unknown)
        self._greeted = False
        self._raw_replies = False
        self._ehlo_lines: list[str] | None = None  # the EHLO reply being gathered for one write
        self._errors = 0
        self._junk_commands = 0
        self._in_rcpt = False  # a RCPT is being answered: a 4xx for it is junk (_junk)
        self._client_ip: str | None = None
        self._slot: Slot | None = None
        self._refused = False
        self._data_deadline: float | None = None
        self._malformed = 0
        self._exceptions = 0
        self._count_next_reply = False
        self._deadline = 0.0  # when the connection times out (_reset_timeout)
        self._timer_armed = False  # _timeout_handle is set and has not fired
        # Port 25 only: the spam layers judge clients from the internet, never logged-in users.
        self._screen_clients = handler.service == MX_SERVICE

    # --- sessions and envelopes carry our extra state -------------------------------------------------

    def _create_session(self) -> LetterboxSession:
        session = LetterboxSession(self.loop)
        session.on_accepted = self.note_accepted
        return session

    def _create_envelope(self) -> LetterboxEnvelope:
        return LetterboxEnvelope()

    # --- connection limits ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self._client_ip is None:  # not the STARTTLS re-entry
            # The address is read once, here, and the slot remembers it: it is what gets released.
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            slot = self._tracker.limiter.acquire(ip)
            if slot is None:
                self._refused = True
                if refused := self._tracker.limiter.refusal_to_log():
                    log.warning("%s: too many connections, refused (%d refused since the last report)", ip, refused)
                assert isinstance(transport, asyncio.WriteTransport)
                if self._implicit_tls_context is None:  # plaintext would only garble a TLS handshake
                    transport.write(
                        f"421 4.7.0 {self.hostname} Too many connections from your address, try later\r\n".encode()
                    )
                transport.close()
                return
            self._client_ip = ip
            self._slot = slot
            slot.on_evict = self._evicted
            self._tracker.sessions.add(self)
            if self._implicit_tls_context is not None:
                assert isinstance(transport, asyncio.ReadTransport)
                transport.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in between
                self._raw_transport = transport
                handshake = self.loop.create_task(self._handshake(transport, slot, self._implicit_tls_context))
                handshake.add_done_callback(self._handshake_done)
                return
            self._start_session(transport, slot)
            return
        # STARTTLS: aiosmtpd starts a new Session (RFC 3207 4.2); the client's spam screen, with its
        # lookups, stays the connection's.
        screen = self.session.screen if isinstance(self.session, LetterboxSession) else None
        super().connection_made(transport)
        if screen is not None and isinstance(self.session, LetterboxSession):
            self.session.screen = screen

    async def _handshake(self, raw: asyncio.BaseTransport, slot: Slot, context: ssl.SSLContext) -> None:
        """Implicit TLS (RFC 8314 3.3) after accept: a silent socket counts per address and network
        and within its pre-auth deadline, which asyncio's own handshake (create_server(ssl=...)) hid."""
        assert isinstance(raw, asyncio.Transport)
        seconds = min(self.limits.tls_handshake_timeout, slot.preauth_deadline - self.loop.time())
        try:
            tls = await self.loop.start_tls(raw, self, context, server_side=True,
                                            ssl_handshake_timeout=max(seconds, 0.001))
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.debug("%s: TLS handshake failed: %s", self._client_ip, exc)
            raw.close()
            return
        if tls is None or raw.is_closing():
            return
        self._raw_transport = None
        self._start_session(tls, slot)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        if self._raw_transport is not None:  # failed, timed out or cancelled: no session was started
            self._raw_transport.close()
            self._raw_transport = None
            self._release()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: TLS set-up failed", self._client_ip, exc_info=task.exception())

    def _start_session(self, transport: asyncio.BaseTransport, slot: Slot) -> None:
        super().connection_made(transport)
        if self._screen_clients and self._client_ip is not None and isinstance(self.session, LetterboxSession):
            # Port 25's spam layers start their lookups now, while the greeting waits (spam/screen.py).
            self.session.screen = self.event_handler.services.spam_screen.connection(self._client_ip)
        # From connect to the first transaction or login: one deadline, shorter under stress.
        slot.watch_preauth(self._preauth_expired)
        if self._handler_coroutine is not None:
            # After a failed STARTTLS handshake asyncio's SSL layer never calls connection_lost
            # on us: the end of the session's coroutine releases the slot as well.
            self._handler_coroutine.add_done_callback(lambda _task: self._release())

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if isinstance(self.session, LetterboxSession) and self.session.screen is not None:
            self.session.screen.close()
        self._release()
        if self.session is None:  # the client went during the implicit-TLS handshake: no session yet
            return
        super().connection_lost(error)

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()  # idempotent: connection_lost and the coroutine's end both call it
            self._tracker.sessions.discard(self)

    def _promote(self) -> None:
        if self._slot is not None:
            self._slot.promote()

    def _evicted(self) -> None:
        # The pre-auth pool is full and this is its oldest session: make room (RFC 5321 4.5.3.2: 421).
        log.info("%s: oldest session without a transaction, dropped to make room", self._client_ip)
        if self._raw_transport is not None:  # still in its TLS handshake
            self._raw_transport.close()
            return
        self._timeout_cb()

    def _preauth_expired(self) -> None:
        log.info("%s: no transaction or login within the pre-auth time, disconnected", self._client_ip)
        self._timeout_cb()

    def shut_down(self) -> None:
        """The listener is closing: RFC 5321 3.8, 421 and close (a transaction not yet answered is
        not acknowledged, so the client will retry it)."""
        if self._raw_transport is not None:  # still in its TLS handshake: nothing to say yet
            self._raw_transport.close()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n".encode())
            transport.close()

    # --- timeouts -------------------------------------------------------------------------------------

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: tell the client why before closing.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        if transport is not None:
            super()._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd leaves it unannotated

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels its timer and schedules a new one at every command and, here, at every
        chunk of DATA (a TimerHandle, a heap push and a cancelled entry left in the loop's heap
        each time: 3 % of the MX's event loop under smtp-source, issue 19). One timer per
        connection instead: a later deadline is only noted, and the timer, when it fires early,
        waits on until it; an earlier one replaces the timer."""
        if duration is None and self._crowded():
            # Postfix's stress (smtpd_timeout 10 s): sessions that logged in or began a transaction hold
            # slots the pre-auth deadline no longer bounds; a crowded listener wants each command soon.
            duration = min(self._timeout_duration, self.limits.stressed_preauth_timeout)
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and self._timer_armed and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._deadline_reached)
        self._timer_armed = True

    def _crowded(self) -> bool:
        """The listener holds stress_fraction of its connections (or of its pre-auth pool)."""
        limiter = self._tracker.limiter
        return limiter.open >= limiter.stress_fraction * limiter.total or limiter.stressed

    async def _junk(self) -> None:
        """A command that carries no mail (or a RCPT refused with a 4xx): past the junk budget each one
        is an error (Postfix's smtpd_junk_command_limit; its excess recipients count as errors too), so
        NOOPs or RCPTs every few minutes cannot hold a slot for ever."""
        self._junk_commands += 1
        if self._junk_commands > (1 if self._crowded() else self.limits.max_junk_commands):
            await self._count_error()

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        await self._junk()
        await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        await self._junk()
        await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        await self._junk()
        await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:  # not listed by HELP, as in aiosmtpd
        await self._junk()
        await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        await self._junk()
        await super().smtp_HELP(arg)

    def _deadline_reached(self) -> None:
        if self.loop.time() < self._deadline:  # the deadline moved on since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        self._timer_armed = False
        self._timeout_cb()

    def data_received(self, data: bytes) -> None:
        if self._data_deadline is not None and self.transport is not None:
            # While DATA flows each chunk restarts the per-chunk timer, but never past the deadline.
            remaining = self._data_deadline - self.loop.time()
            if remaining > 0:
                self._reset_timeout(min(self.limits.data_chunk_timeout, remaining))
        super().data_received(data)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from is not None:
            self._promote()  # a transaction began: the client is doing what port 25 is for

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._in_rcpt = True
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._in_rcpt = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.transport is not None and self.transport.get_extra_info("ssl_object") is not None:
            # After STARTTLS aiosmtpd would say 220 and layer TLS on TLS, which asyncio cannot (the session
            # then hung); on 465 it said 454, "try later". Postfix's words:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self.session is not None and self.session.authenticated:
            self._promote()

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> _Missing | bytes:
        """aiosmtpd's 334 challenge with the response line bounded: its readline() raised on a line past
        the reader's 64 KiB (451 and a logged traceback), and left the rest of the line to be read as
        the next commands. The response is never logged (it carries the password)."""
        text = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(text) if encode_to_b64 else text))
        line = await self._auth_response()
        if line is None:
            await self.push(AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push(AUTH_ABORTED)
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(AUTH_NOT_BASE64)
            return MISSING

    async def _auth_response(self) -> bytes | None:
        """One line of the client's, or None when it was longer than MAX_AUTH_RESPONSE_OCTETS (then read
        to its end and dropped, as aiosmtpd drops a command line too long)."""
        reader = self._reader
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # the client went: what it sent, as readline() gives
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            while True:
                await reader.read(consumed)
                try:
                    await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as more:
                    consumed = more.consumed
                    continue
                except asyncio.IncompleteReadError:
                    pass
                return None
        return line if len(line) <= MAX_AUTH_RESPONSE_OCTETS else None

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with our reader of the message (data_phase.py: long lines, bounded memory)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self._data_deadline = self.loop.time() + self.limits.max_data_seconds
        self._reset_timeout(self.limits.data_chunk_timeout)
        services = self.event_handler.services
        held = services.message_memory.hold(self._client_ip or "unknown")
        memory, root = services.message_memory, services.config.data.root
        # The memory's octets of every message will be written (disk_full.py). The spool's are on the
        # disk already, and counted once more: spool files take at most half the room above the reserve,
        # so slow senders of large messages cannot bring the disk to it, where all mail is refused.
        spill = Spill(self.event_handler.spool_directory, held,
                      lambda octets: room_for(root, memory.others() + memory.spooled + octets))
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                message = await read_message(
                    self._reader, max_line=MAX_TEXT_LINE_OCTETS, max_octets=self.limits.max_message_octets,
                    hold=held.take, spill=spill,
                )
            except asyncio.CancelledError:
                log.info("%s: connection lost during DATA", self._client_ip)
                self._writer.close()
                raise
            self._data_deadline = None
            if isinstance(message, Spooled):
                message = await self._read_back(message, held, spill)
            spill.close()
            if isinstance(message, str):
                await self.push(message)  # before the envelope goes: LMTP says it once per recipient
                self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state
                return
            self.envelope.content = self.envelope.original_content = message
            del message
            status = await self._call_handler_hook("DATA")
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state
            held.release()  # the message is written (or refused) and let go
            await self.push("250 OK" if status is MISSING else status)
        finally:
            spill.close()
            held.release()
            self._data_deadline = None
            if self.transport is not None:
                self._reset_timeout()

    async def _read_back(self, message: Spooled, held: Hold, spill: Spill) -> bytes | str:
        """A spooled message whole in memory, for the checks and the delivery (which take bytes), once
        it has its turn (message_memory.READ_BACK_OCTETS); BUSY when it did not come in time."""
        if not await held.take_back(message.octets):
            log.warning("%s: a message of %d octets not read back in time: too many large ones at once",
                        self._client_ip, message.octets)
            return BUSY
        return await read_back(spill, message)

    # --- greetings and replies ------------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._junk()
        self.command_size_limits["MAIL"] = MAX_COMMAND_OCTETS  # aiosmtpd adds the SIZE/SMTPUTF8 room
        self._raw_replies = True  # RFC 2034: no status codes in the EHLO reply
        # aiosmtpd pushes each line of the reply on its own: a write (a send(2) and a segment) per
        # line, half of a connection's writes (issue 19). Gathered here and written at once; a
        # command that fails half-way sends only the error reply handle_exception gives.
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
            lines = self._ehlo_lines
        finally:
            self._raw_replies = False
            self._ehlo_lines = None
        if lines:
            await super().push("\r\n".join(lines))

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._junk()
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    async def _screen_before_greeting(self) -> str | None:
        """Port 25: the greeting delay and the early-talker check (spam/screen.py); the refusal to send
        instead of the greeting, or None."""
        screen = self.session.screen if isinstance(self.session, LetterboxSession) else None
        if screen is None:
            return None
        reader = self._reader

        def has_spoken() -> bool:
            # Bytes the client sent before our 220 wait unread in the stream's buffer.
            return bool(getattr(reader, "_buffer", b""))

        try:
            return await screen.before_greeting(has_spoken)
        except Exception:
            log.exception("%s: the greeting checks failed; greeting anyway", self._client_ip)
            return None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser (the stdlib's email header parser) raises IndexError and friends
        on input such as `<a@` or `"`; that is the client's syntax error, answered like any other
        malformed address (MAIL/RCPT 553 5.1.3, VRFY 502), never as a server failure (issue 11
        item 10). Our own address rules run later, in the handler."""
        simple = _SIMPLE_PATH.match(arg) if arg else None
        if simple is not None:
            # The usual `<local@domain> PARAMS`, answered as aiosmtpd's parser would (it then drops
            # the white space after '>'; a comment there goes the long way); that parser builds a
            # token tree and even a class per call (issue 19: 12 % of the MX's event loop).
            rest = arg[simple.end():].lstrip(" \t")
            if not rest.startswith("("):
                address = simple.group(1)
                if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
                    return None, None
                return address, rest
        try:
            return super()._getaddr(arg)
        except Exception as exc:  # noqa: BLE001  only parsing runs in there: nothing of ours to hide
            self._note_malformed(type(exc).__name__)
            return None, None

    def _note_malformed(self, what: str) -> None:
        """One short line per connection for the first few malformed inputs, then silence: a client
        cannot make the log grow faster than it sends (the error budget ends the session)."""
        self._malformed += 1
        if self._malformed <= MAX_LOGGED_PROTOCOL_ERRORS:
            log.info("%s: malformed input (%s)%s", self._client_ip, what,
                     "; not logging more of them" if self._malformed == MAX_LOGGED_PROTOCOL_ERRORS else "")

    async def handle_exception(self, error: Exception) -> str:
        """Anything else a command raised: the handler's hook answers (451, TLS failures...); the
        traceback is logged only for the first of them on a connection, one line afterwards."""
        self._exceptions += 1
        if isinstance(error, TLSSetupException) or self._exceptions <= 1 or is_disk_full(error):
            status = await super().handle_exception(error)
        else:
            self._note_malformed(f"{type(error).__name__} in a command")
            status = str(TEMPORARY_FAILURE)
        # Every failed command spends the error budget as a 5xx does (push counts it once sent).
        self._count_next_reply = not isinstance(error, TLSSetupException)
        return status

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        result = super()._getparams(params)
        size = result.get("SIZE") if result is not None else None
        if isinstance(size, str) and not size.isascii():
            return None  # '²' passed aiosmtpd's isdigit() and failed its int(): 451 and a traceback
        if result is not None:
            # RFC 4954 5: MAIL FROM's AUTH= parameter must be accepted where AUTH is offered; the
            # identity it claims is not used (Received says who really authenticated).
            result.pop("AUTH", None)
        return result

    async def _smtp_unknown(self, arg: str) -> None:
        await self.push(UNKNOWN_COMMAND)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, bytes):  # AUTH challenges (334)
            await super().push(status)
            return
        if not self._greeted:
            self._greeted = True
            refusal = await self._screen_before_greeting()
            await super().push(refusal or status)
            if refusal is not None and self.transport is not None:
                self.transport.close()
            return
        if self._ehlo_lines is not None:
            self._ehlo_lines.append(status)
            return
        if self._raw_replies:
            await super().push(status)
            return
        if "\r\n" in status:
            text = "\r\n".join(self._reply_line(line) for line in status.split("\r\n"))
        else:
            text = self._reply_line(status)
        if self._in_rcpt and text.startswith("4"):
            # A recipient refused for now (past the message's limit, greylisted, a guard's delay) carries
            # no mail, as a NOOP: a RCPT every few minutes held a slot for ever, past every budget.
            self._in_rcpt = False
            await self._junk()
            if self.transport is None or self.transport.is_closing():
                return  # the junk budget's 421 was the answer
        await super().push(text)
        if text.startswith("5") or self._count_next_reply:
            self._count_next_reply = False
            await self._count_error()

    def _reply_line(self, line: str) -> str:
        if line in SIZE_REFUSALS:
            return size_refusal(self.limits.max_message_octets)
        return with_enhanced_code(line)

    async def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.limits.max_errors and self.transport is not None:
            log.warning("%s: %d errors, disconnected", self._client_ip, self._errors)
            await super().push(f"421 4.7.0 {self.hostname} Too many errors, closing connection")
            self.transport.close()

    def note_accepted(self) -> None:
        """A message was accepted: the client is behaving, its error and junk budgets start over."""
        self._errors = 0
        self._junk_commands = 0


class LetterboxLMTP(LetterboxSMTP):
    """RFC 2033: LHLO instead of HELO/EHLO; the handler answers DATA once per recipient."""

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self.push('500 5.5.1 Error: command "HELO" not recognized (this is LMTP: use LHLO)')

    async def smtp_EHLO(self, hostname: str) -> None:
        await self.push('500 5.5.1 Error: command "EHLO" not recognized (this is LMTP: use LHLO)')

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status in DATA_ERRORS and self.envelope is not None:
            status = "\r\n".join([status] * max(1, len(self.envelope.rcpt_tos)))
        await super().push(status)


async def start_server(
    services: Services,
    service: str,
    host: str,
    port: int,
    *,
    limits: SmtpLimits = DEFAULT_LIMITS,
    start_serving: bool = True,
) -> asyncio.Server:
    if service not in SMTP_SERVICES:
        raise ValueError(f"not an SMTP service: {service}")
    # aiosmtpd logs every command line at INFO; our handler logs what matters (never passwords).
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    deliverer = Deliverer(services.accounts, services.store, services.spool, lambda: services.hostname,
                          services.srs, delivery_log=services.delivery_log)
    handler = SmtpHandler(services, service, limits, deliverer)
    tracker = ConnectionTracker(limits)
    implicit_tls = service == "submissions"
    starttls = service != LMTP_SERVICE and not implicit_tls
    protocol = LetterboxLMTP if service == LMTP_SERVICE else LetterboxSMTP

    def factory() -> LetterboxSMTP:
        return protocol(
            handler,
            limits=limits,
            tracker=tracker,
            implicit_tls=implicit_tls,
            implicit_tls_context=services.tls.context if implicit_tls else None,
            data_size_limit=limits.max_message_octets,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=services.hostname,  # read per connection: the name can change while the box runs
            ident=IDENT.get(service, DEFAULT_IDENT),
            tls_context=services.tls.context if starttls else None,
            # RFC 8314 / RFC 6409: submission needs TLS first, then AUTH, before any mail.
            require_starttls=service == "submission",
            auth_required=service in SUBMISSION_SERVICES,
            auth_require_tls=True,
            timeout=limits.command_timeout,
            loop=loop,
        )

    server = await loop.create_server(
        factory,
        host=host,
        port=port,
        reuse_address=True,
        backlog=LISTEN_BACKLOG,
        start_serving=start_serving,
    )
    stop_listening = server.close

    def close() -> None:
        # asyncio.Server.close() leaves open connections alone; ours say goodbye.
        stop_listening()
        for session in list(tracker.sessions):
            session.shut_down()

    server.close = close  # type: ignore[method-assign]
    server.limiter = tracker.limiter  # type: ignore[attr-defined]
    return server


async def serve(
    services: Services, service: str, host: str, port: int, *, start_serving: bool = True
) -> asyncio.Server:
    """The listener contract (appliance/app.py): 'smtp' (MX), 'submission', 'submissions', 'lmtp'.
    With start_serving=False the socket is bound but accepts nothing until server.start_serving()."""
    return await start_server(services, service, host, port, start_serving=start_serving)
