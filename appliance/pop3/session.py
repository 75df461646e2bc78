"""What each POP3 command does, against the services (RFC 1939, RFC 2449, RFC 2595, RFC 5034).

One Pop3Session per connection. The sans-IO Pop3Connection has already checked that a command exists
in the current state and has the right number of arguments; the session dispatches it through one
table per state to a handler named cmd_<command>. A handler answers through `self.io` or raises
Pop3Err, which carries its -ERR reply. Anything else is a bug: the server logs it with its traceback,
the client gets -ERR and the connection closes.

The maildrop is the INBOX as it was at login (a snapshot). Deletions are only marks until QUIT; a
session that ends any other way deletes nothing. Sessions of one mailbox run side by side, as under
Dovecot's default (pop3_lock_session = no), not locked as RFC 1939 8 has it: a connection that died
without a FIN held the lock until its idle timeout and refused every other login of the mailbox
meanwhile (the same phone back on another network). Each QUIT removes the messages its own session
marked, by UID; a message another session removed meanwhile answers RETR and TOP with -ERR, and DELE
and QUIT with +OK, as Dovecot's do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from appliance.auth import Refused
from appliance.disk_full import is_disk_full
from appliance.pop3.limits import DEFAULT_LIMITS, Pop3Limits
from appliance.pop3.maildrop import DropMessage, Maildrop, parse_line_count
from appliance.pop3.protocol import Command, Pop3Connection, State
from appliance.pop3.replies import (
    AUTH,
    IN_USE,
    SYS_PERM,
    SYS_TEMP,
    Continuation,
    Err,
    Ok,
    Pop3Err,
    Reply,
    Streamed,
)
from appliance.pop3.wire import FileBody
from appliance.store.mailstore import Generation, SessionEnd, StoreError, open_message
from appliance.store.model import INBOX

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.pop3")

SERVICE = "pop3"  # the name auth.verify logs and throttles under, for both 110 and 995
IMPLEMENTATION = "Letterbox"
SASL_MECHANISMS = ("PLAIN",)
SEEN = "\\Seen"
# The -ERR of a session whose login no longer holds (handle).
SESSION_END_TEXT: dict[SessionEnd, str] = {
    "removed": "This maildrop no longer exists",
    "disabled": "This account is disabled",
    "password": "The password of this account was changed",
}

Handler = Callable[[Command], Awaitable[None]]


class SessionIO(Protocol):
    """What the session needs from the connection (server.py provides it)."""

    peer: str
    tls_active: bool
    stls_available: bool

    async def send(self, reply: Reply) -> None: ...
    async def read_sasl_line(self) -> bytes | None: ...
    def prepare_tls(self) -> None: ...
    async def start_tls(self) -> None: ...



class Pop3Session:
    def __init__(self, services: Services, io: SessionIO, conn: Pop3Connection,
                 limits: Pop3Limits = DEFAULT_LIMITS) -> None:
        self.services = services
        self.store = services.store
        self.io = io
        self.conn = conn
        self.limits = limits
        self.sessions = services.pop3_sessions
        self.mailbox: str | None = None  # canonical address, once logged in (and counted in self.sessions)
        self.maildrop: Maildrop | None = None
        self._generation: Generation | None = None  # logged in to (MailStore.mailbox_generation)
        self._user: str | None = None  # the USER argument, waiting for PASS
        self._auth_failures = 0
        self._dispatch: dict[State, dict[str, Handler]] = {
            State.AUTHORIZATION: {
                "USER": self.cmd_user,
                "PASS": self.cmd_pass,
                "AUTH": self.cmd_auth,
                "STLS": self.cmd_stls,
                "CAPA": self.cmd_capa,
                "QUIT": self.cmd_quit,
            },
            State.TRANSACTION: {
                "STAT": self.cmd_stat,
                "LIST": self.cmd_list,
                "RETR": self.cmd_retr,
                "DELE": self.cmd_dele,
                "NOOP": self.cmd_noop,
                "RSET": self.cmd_rset,
                "TOP": self.cmd_top,
                "UIDL": self.cmd_uidl,
                "CAPA": self.cmd_capa,
            },
            # The connection enters UPDATE as it hands out QUIT from TRANSACTION (RFC 1939 6).
            State.UPDATE: {"QUIT": self.cmd_update},
        }

    def greeting(self) -> Ok:
        # No APOP timestamp (RFC 1939 7): APOP is not offered.
        return Ok(f"{IMPLEMENTATION} POP3 server ready on {self.services.hostname}")

    async def handle(self, command: Command) -> None:
        handler = self._dispatch[self.conn.state][command.name]
        if (self.mailbox is not None and self._generation is not None
                and (ended := await self.store.session_ended(self.mailbox, self._generation)) is not None):
            # Removed since the login, maybe re-created for someone else, disabled, or given another
            # password: no RETR or QUIT (which would delete by message number) may touch that mailbox
            # (issue 10 item 1).
            log.info("pop3 %s: %s: %s; session ended", self.io.peer, self.mailbox, SESSION_END_TEXT[ended])
            self.conn.close()
            await self.io.send(Err(SESSION_END_TEXT[ended], SYS_PERM))
            return
        try:
            await handler(command)
        except Pop3Err as exc:
            await self.io.send(exc.reply)

    async def close(self) -> None:
        """The connection is gone, however it ended: the session is uncounted, nothing is deleted."""
        if self.mailbox is not None:
            self.sessions.close(self.mailbox)
            self.mailbox = None
        self.maildrop = None

    # --- any state ---------------------------------------------------------------------------------

    async def cmd_capa(self, command: Command) -> None:
        """RFC 2449 5: what this server offers now (mechanisms only where a password may be sent)."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.conn.state is State.AUTHORIZATION:
            if self.io.stls_available and not self.io.tls_active:
                caps.append("STLS")
            if self.io.tls_active:
                caps.extend(["USER", "SASL " + " ".join(SASL_MECHANISMS)])
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        await self.io.send(Ok("Capability list follows", tuple(caps)))

    # --- AUTHORIZATION (RFC 1939 4, 7) -------------------------------------------------------------

    async def cmd_quit(self, command: Command) -> None:
        await self.io.send(Ok(f"{IMPLEMENTATION} POP3 server signing off"))

    async def cmd_stls(self, command: Command) -> None:
        if not self.io.stls_available or self.io.tls_active:
            self._count_bad()
            raise Pop3Err("Already using TLS" if self.io.tls_active else "STLS is not offered here")
        # Stop reading before the +OK: anything the client pipelined after STLS is dropped (RFC 2595 4).
        self.io.prepare_tls()
        await self.io.send(Ok("Begin TLS negotiation"))
        await self.io.start_tls()
        self._user = None  # RFC 2595 4: what the client said before TLS is forgotten

    async def cmd_user(self, command: Command) -> None:
        self._require_tls()
        self._user = command.args[0]
        # The same answer for every name: whether a mailbox exists is not told before the password.
        await self.io.send(Ok("Send your password"))

    async def cmd_pass(self, command: Command) -> None:
        self._require_tls()
        user, self._user = self._user, None
        if user is None:
            self._count_bad()
            raise Pop3Err("Send USER first")
        await self._login(user, command.args[0])

    async def cmd_auth(self, command: Command) -> None:
        if not command.args:
            # RFC 1734 3 (before RFC 5034): AUTH alone lists the mechanisms; clients still probe with it.
            await self.io.send(Ok("Supported mechanisms follow", SASL_MECHANISMS if self.io.tls_active else ()))
            return
        if command.args[0].upper() not in SASL_MECHANISMS:
            raise Pop3Err(f"Unsupported authentication mechanism {command.args[0][:20]}")
        self._require_tls()
        if len(command.args) == 2:
            response = command.args[1].encode("ascii", "replace")
        else:
            await self.io.send(Continuation())
            line = await self.io.read_sasl_line()
            if line is None:
                return  # the client went away, or the line was too long and the connection is over
            response = line.strip()
        if response == b"*":
            raise Pop3Err("Authentication cancelled")  # RFC 5034 4
        try:
            # RFC 5034 4: "=" is an empty initial response.
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._count_bad()
            raise Pop3Err("Invalid base64 in the SASL response") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3:  # RFC 4616 2: [authzid] NUL authcid NUL passwd
            raise Pop3Err("Malformed PLAIN response", AUTH)
        authzid, authcid, password = (part.decode("utf-8", "replace") for part in parts)
        if authzid and authzid.lower() != authcid.lower():
            raise Pop3Err("Logging in as another user is not supported", AUTH)
        await self._login(authcid, password)

    def _require_tls(self) -> None:
        if not self.io.tls_active:
            # No password over cleartext: 110 offers STLS first (RFC 2595 2).
            self._count_bad()
            raise Pop3Err("Plaintext authentication disallowed on non-secure connections: use STLS first", AUTH)

    def _count_bad(self) -> None:
        if self.conn.note_bad_command():
            self.conn.close()
            raise Pop3Err("Too many invalid commands")

    async def _login(self, user: str, password: str) -> None:
        principal = await self.services.auth.login(user, password, SERVICE, self.io.peer)
        if isinstance(principal, Refused):
            # RFC 3206 4: SYS/TEMP, a passing problem; [AUTH] would make clients ask for a new password.
            raise Pop3Err(principal.message(), SYS_TEMP)
        if principal is None or principal.kind != "mailbox":
            self._auth_failures += 1
            if self._auth_failures >= self.limits.max_auth_failures:
                self.conn.close()
                raise Pop3Err("Authentication failed; too many failures, closing", AUTH)
            raise Pop3Err("Authentication failed", AUTH)  # RFC 3206 5
        mailbox = principal.name
        if not self.sessions.open(mailbox):
            # As Dovecot answers past mail_max_userip_connections (RFC 2449 8.1.1: IN-USE).
            log.info("pop3 %s: %s refused, %d sessions open", self.io.peer, mailbox, self.sessions.limit)
            raise Pop3Err(f"Too many POP3 sessions of this mailbox (at most {self.sessions.limit})", IN_USE)
        try:
            self._generation = await self.store.mailbox_generation(mailbox)
            if self._generation is None or self._generation.password_hash != principal.password_hash:
                # Disabled, removed or given another password while its password was checked.
                raise Pop3Err("Authentication failed", AUTH)
            snapshot = await self.store.snapshot(mailbox, INBOX)
        except Exception as exc:
            self.sessions.close(mailbox)
            if not _store_failed(exc):
                raise
            log.warning("pop3 %s: cannot open the maildrop of %s: %s", self.io.peer, mailbox, exc)
            raise Pop3Err("Cannot open the maildrop; try again later", SYS_TEMP) from None
        except BaseException:
            self.sessions.close(mailbox)
            raise
        self.mailbox = mailbox
        self.maildrop = Maildrop(snapshot.uidvalidity, snapshot.messages)
        count, octets = self.maildrop.stat()
        log.info("pop3 %s: %s logged in, %d messages", self.io.peer, mailbox, count)
        await self.io.send(Ok(f"Logged in, {count} messages ({octets} octets)"))

    # --- TRANSACTION (RFC 1939 5, 7) ---------------------------------------------------------------

    @property
    def drop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    async def cmd_stat(self, command: Command) -> None:
        count, octets = self.drop.stat()
        await self.io.send(Ok(f"{count} {octets}"))  # RFC 1939 5: exactly this, for clients that parse it

    async def cmd_list(self, command: Command) -> None:
        if command.args:
            message = self.drop.message(command.args[0])
            await self.io.send(Ok(f"{message.number} {message.size}"))
            return
        count, octets = self.drop.stat()
        await self.io.send(Streamed(f"{count} messages ({octets} octets)", self.drop.listing(unique_ids=False)))

    async def cmd_uidl(self, command: Command) -> None:
        if command.args:
            message = self.drop.message(command.args[0])
            await self.io.send(Ok(f"{message.number} {message.unique_id}"))
            return
        await self.io.send(Streamed("Unique-ID listing follows", self.drop.listing(unique_ids=True)))

    async def cmd_retr(self, command: Command) -> None:
        message = self.drop.message(command.args[0])
        body = await self._open(message, None)
        self.drop.retrieved.add(message.number)
        await self.io.send(Streamed(f"{message.size} octets", body))

    async def cmd_top(self, command: Command) -> None:
        message = self.drop.message(command.args[0])
        lines = parse_line_count(command.args[1])
        body = await self._open(message, lines)
        await self.io.send(Streamed("Top of message follows", body))

    async def _open(self, message: DropMessage, body_lines: int | None) -> FileBody:
        """Open the file before +OK goes out: a message gone since login (another POP3 session's QUIT,
        an IMAP EXPUNGE) gets -ERR without a code, as Dovecot's "-ERR Message 1 expunged.", not half a
        reply."""
        try:
            f = await asyncio.to_thread(open_message, message.path)
        except FileNotFoundError:
            raise Pop3Err(f"Message {message.number} was removed by another session") from None
        except OSError as exc:
            log.error("pop3 %s: cannot read %s: %s", self.io.peer, message.path, exc)
            raise Pop3Err("Cannot read the message; try again later", SYS_TEMP) from None
        return FileBody(f, body_lines, self.limits.stream_chunk)

    async def cmd_dele(self, command: Command) -> None:
        message = self.drop.message(command.args[0])
        self.drop.delete(message)
        await self.io.send(Ok(f"Message {message.number} deleted"))

    async def cmd_noop(self, command: Command) -> None:
        await self.io.send(Ok())

    async def cmd_rset(self, command: Command) -> None:
        self.drop.reset()
        count, octets = self.drop.stat()
        await self.io.send(Ok(f"Maildrop has {count} messages ({octets} octets)"))

    # --- UPDATE (RFC 1939 6) -----------------------------------------------------------------------

    async def cmd_update(self, command: Command) -> None:
        """QUIT from TRANSACTION: messages marked deleted are removed, by UID (one another session
        removed meanwhile is no error), then the session is uncounted. IMAP sessions on the INBOX hear
        of it through the store's watchers (as EXPUNGE)."""
        drop, mailbox = self.drop, self.mailbox
        assert mailbox is not None
        seen, doomed = drop.seen_uids(), drop.deleted_uids()
        reply: Reply
        try:
            if seen:
                # Retrieved and kept: \Seen for IMAP clients, as Dovecot does. Not worth failing QUIT for.
                try:
                    await self.store.store_flags(mailbox, INBOX, seen, frozenset({SEEN}), "add")
                except Exception as exc:
                    if not _store_failed(exc):
                        raise
                    log.warning("pop3 %s: could not mark %s's messages seen: %s", self.io.peer, mailbox, exc)
            removed: list[int] = []
            reply = _signing_off(len(doomed))
            if doomed:
                try:
                    removed = await self.store.expunge(mailbox, INBOX, doomed)
                except Exception as exc:
                    if not _store_failed(exc):
                        raise
                    log.error("pop3 %s: deleting %s's messages failed: %s", self.io.peer, mailbox, exc)
                    reply = Err("Some deleted messages not removed", SYS_TEMP)  # RFC 1939 6
            log.info("pop3 %s: %s quit, %d deleted", self.io.peer, mailbox, len(removed))
        finally:
            await self.close()
        await self.io.send(reply)


def _signing_off(deleted: int) -> Ok:
    """What QUIT deleted (by this session, or by another before it): not what is left, which other
    sessions and new mail change meanwhile."""
    return Ok(f"{IMPLEMENTATION} POP3 server signing off ({deleted} {'message' if deleted == 1 else 'messages'} deleted)")


def _store_failed(exc: BaseException) -> bool:
    """A failure the client is told of with -ERR [SYS/TEMP] (the store's own errors, a full disk);
    anything else is a bug, which the server logs and answers by closing."""
    return isinstance(exc, StoreError) or is_disk_full(exc)
