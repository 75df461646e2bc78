"""The SMTP client side: one session to one destination, carrying one or more messages.

Built on smtplib (blocking; the queue runs it on its own thread pool) with what an MTA needs on top:
connecting to a chosen address while naming the host (SNI, logs), trying the next MX when a host is
down, opportunistic STARTTLS without certificate checks (RFC 7435) or required and verified for a
relay, AUTH for a relay, SIZE / 8BITMIME / SMTPUTF8 honoured, MAIL and RCPT pipelined (RFC 2920), and
every reply kept per recipient so the queue can decide what is final.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.queue.mx import Hop

log = logging.getLogger("letterbox.queue.smtp")

CONNECT_TIMEOUT = 30.0  # seconds to open a TCP connection (RFC 5321 4.5.3.2 sets none; 30 s is usual)
COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2.1-6: 5 minutes for the greeting and each reply
DATA_END_TIMEOUT = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final "."
MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 4.5.3.1.8: every server takes at least 100
# One attempt's bounds, Postfix's smtp_mx_address_limit and smtp_mx_session_limit: 20 addresses whose
# hosts accept TCP and never greet held one of the queue's sessions 20 x 30 s = 10 minutes an attempt.
# The addresses left untried wait for the next attempt (equal-preference MX hosts are shuffled again).
MX_ADDRESS_LIMIT = 5  # addresses tried (TCP connections attempted)
MX_SESSION_LIMIT = 2  # addresses whose TCP connection opened but gave no usable session

TlsPolicy = Literal["opportunistic", "required", "implicit"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY_LINE = re.compile(rb"(\d{3})(?:[ -]|\r?\n?$)")
PROTOCOL_ERROR = "5.5.0"  # RFC 3463: a reply the protocol has no place for (Postfix bounces with it too)


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # continuation lines joined by spaces

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @property
    def status(self) -> str:
        """The RFC 3463 status: the reply's own enhanced code when it has one of the right class; a code
        that is no 2xx, 4xx or 5xx (a 3xx out of place, a 199) is a protocol error, 5.5.0, as Postfix's."""
        first = str(self.code)[0]
        if first not in "245":
            return PROTOCOL_ERROR
        m = _ENHANCED.match(self.text)
        if m and m.group(1) == first:
            return m.group(0)
        return f"{first}.0.0"

    @property
    def positive(self) -> bool:
        """RFC 5321 4.2.1: MAIL, RCPT and the final "." succeed with a 2xx only."""
        return 200 <= self.code < 300


def reply_from(code: int, message: bytes | str) -> Reply:
    """The reply as the queue keeps it: lines joined by spaces, and any character that is not printable
    (terminal escapes, NUL, bidi overrides) a '?', as Postfix's smtp_chat makes them: the text is the
    remote server's choice and `letterbox queue list` prints it to the administrator's terminal."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not joined.isprintable():
        joined = "".join(ch if ch.isprintable() else "?" for ch in joined)
    return Reply(code, joined)


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    status: str  # RFC 3463: '2.0.0' delivered, '4.x.x' try again, '5.x.x' give up
    text: str  # the remote reply ('550 5.1.1 No such user') or a description of the local problem
    remote: str = ""  # 'mx.example.net[192.0.2.1]' when a server said it

    @property
    def delivered(self) -> bool:
        return self.status.startswith("2")

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


def from_reply(reply: Reply, hop: Hop) -> Outcome:
    return Outcome(reply.status, str(reply), str(hop))


@dataclass(frozen=True)
class Outgoing:
    """One message for one destination: the envelope and the exact bytes to send (CRLF ends)."""

    sender: str  # '' for the null sender
    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class RelayLogin:
    user: str
    password: str = field(repr=False)  # never logged, never shown


class SessionFailed(Exception):
    """No usable session to any of the hops; the status says whether a retry can help."""

    def __init__(self, status: str, text: str, remote: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.remote = remote

    def outcome(self) -> Outcome:
        return Outcome(self.status, self.text, self.remote)


class _HopFailed(Exception):
    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.connected = False  # the TCP connection had opened (MX_SESSION_LIMIT counts it)


# One reply's bounds (an EHLO has about 15 lines). smtplib kept every line of a multiline reply however
# many came: an MX (any domain a user mails, or a forward's target) that answered EHLO with 300 MB of
# "250-" lines in 2 s raised the box's RSS by 900 MB, and more would have had it killed for memory.
MAX_REPLY_LINES = 100
MAX_REPLY_OCTETS = 64 * 1024


class _Pinned(smtplib.SMTP):
    """Connect to a chosen address while smtplib keeps the host *name* (used for SNI and checks); and
    read replies within MAX_REPLY_LINES and MAX_REPLY_OCTETS, each whole reply within the socket's
    timeout (smtplib's file read gave the timeout to each recv: an MX that sent a byte every few
    seconds held the session, one of the queue's 20, for as long as it liked)."""

    pinned_address = ""
    connected = False  # the TCP connection opened (whatever came after)
    _host: str  # smtplib's, declared here for the type checker
    _unread = b""  # received after the last line taken
    _unread_from: socket.socket | None = None  # the socket it came from

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(self.pinned_address or host, port, timeout)  # type: ignore[misc]
        self.connected = True
        return sock

    def _readline(self, sock: socket.socket, deadline: float) -> bytes:
        """One line (up to smtplib's _MAXLINE + 1 octets), or what came before the end of the stream."""
        if self._unread_from is not sock:
            # STARTTLS put a TLS socket in: what came in plain text after its 220 is dropped (RFC 3207
            # 5, the STARTTLS injection of CVE-2011-0411), as smtplib drops its file.
            self._unread, self._unread_from = b"", sock
        limit = smtplib._MAXLINE + 1  # type: ignore[attr-defined]
        while True:
            end = self._unread.find(b"\n", 0, limit)
            if end >= 0 or len(self._unread) >= limit:
                cut = end + 1 if end >= 0 else limit
                line, self._unread = self._unread[:cut], self._unread[cut:]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                line, self._unread = self._unread, b""
                return line
            self._unread += chunk

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's getreply, bounded: past a bound the connection is closed, as when the peer drops
        it (SMTPServerDisconnected: the next hop, or a retry later)."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        budget = sock.gettimeout()
        deadline = math.inf if budget is None else time.monotonic() + budget
        try:
            return self._reply(sock, deadline)
        finally:
            if self.sock is sock:
                sock.settimeout(budget)

    def _reply(self, sock: socket.socket, deadline: float) -> tuple[int, bytes]:
        lines: list[bytes] = []
        octets = read = 0
        while True:
            try:
                line = self._readline(sock, deadline)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            octets += len(line)
            read += 1
            if len(line) > smtplib._MAXLINE:  # type: ignore[attr-defined]
                self.close()
                raise smtplib.SMTPResponseException(500, "Line too long.")
            if read > MAX_REPLY_LINES or octets > MAX_REPLY_OCTETS:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"reply longer than {MAX_REPLY_LINES} lines or {MAX_REPLY_OCTETS} octets")
            reply_line = _REPLY_LINE.match(line)
            if reply_line is None:
                # A line without a reply code: smtplib ended the reply there, so the rest of it was
                # read as the next command's reply; from there every pipelined reply was one behind,
                # and a RCPT's 250 read as the reply to DATA counted the message as delivered, unsent.
                # Skipped, as Postfix's smtp_chat does (the bounds above still hold).
                continue
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return int(reply_line[1]), b"\n".join(lines)


class _PinnedSMTP(_Pinned):
    pass


class _PinnedSMTPS(_Pinned, smtplib.SMTP_SSL):
    pass


def opportunistic_context() -> ssl.SSLContext:
    """RFC 7435 opportunistic TLS: encrypt when offered, accept any certificate (MX hosts rarely
    have one that names them, and refusing would only push the mail to plain text)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store to load: nothing is verified
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class CaFileError(SessionFailed):
    """The relay's CA file cannot be read or holds no certificate: a delivery through the relay is
    deferred with this as its error (it was a traceback in the log and no error on the message), and
    `letterbox relay set` refuses the file."""

    def __init__(self, ca_file: str, reason: str) -> None:
        super().__init__("4.3.5", f"cannot use the CA file {ca_file}: {reason}")


def verifying_context(ca_file: str | None = None) -> ssl.SSLContext:
    """For a relay we send a password to: the certificate must be valid for its name. CaFileError when
    `ca_file` cannot be used."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except OSError as exc:  # ssl.SSLError too: a file that holds no certificate
        raise CaFileError(ca_file or "", str(exc)) from None


def tls_description(sock: Any) -> str:
    version = sock.version() if hasattr(sock, "version") else None
    if not version:
        return ""
    cipher = sock.cipher() or ("", "", 0)
    return f"{version} {cipher[0]}".strip()


def _ascii(text: str) -> bool:
    return text.isascii()


class AbortSignal:
    """Lets the queue end every session at once when it stops: sockets are shut down under the
    threads blocked on them, and no new session starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        self._live: set[smtplib.SMTP] = set()

    @property
    def aborted(self) -> bool:
        return self._aborted

    def attach(self, smtp: smtplib.SMTP) -> None:
        with self._lock:
            if self._aborted:
                raise _HopFailed("4.3.2", "the queue is stopping")
            self._live.add(smtp)

    def detach(self, smtp: smtplib.SMTP) -> None:
        with self._lock:
            self._live.discard(smtp)

    def check(self) -> None:
        if self._aborted:
            raise _HopFailed("4.3.2", "the queue is stopping")

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            live = list(self._live)
        for smtp in live:
            sock = smtp.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class OutboundSession:
    """One open SMTP session. Blocking: use from one thread at a time (abort() from any thread)."""

    def __init__(self, smtp: smtplib.SMTP, hop: Hop, tls: str, abort: AbortSignal) -> None:
        self._smtp = smtp
        self._abort = abort
        self.hop = hop
        self.tls = tls  # e.g. 'TLSv1.3 TLS_AES_256_GCM_SHA384'; '' when the session is plain text
        self.broken = False  # set when the connection can carry no further message
        self.messages = 0

    # --- opening --------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        hops: Sequence[Hop],
        *,
        port: int,
        helo_name: str,
        tls_policy: TlsPolicy = "opportunistic",
        tls_context: ssl.SSLContext | None = None,
        login: RelayLogin | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        abort: AbortSignal | None = None,
    ) -> OutboundSession:
        """A session with the first hop that answers properly, among the first MX_ADDRESS_LIMIT and
        before MX_SESSION_LIMIT of them were connected to in vain; raises SessionFailed otherwise."""
        abort = abort or AbortSignal()
        errors: list[str] = []
        last_status = "4.4.1"
        context = tls_context or opportunistic_context()
        sessions = 0
        tried = hops[:MX_ADDRESS_LIMIT]
        for hop in tried:
            attempts = [True, False] if tls_policy == "opportunistic" else [True]
            connected = False  # a TCP connection opened: a session, in Postfix's count
            for use_starttls in attempts:
                try:
                    return cls._open_one(
                        hop, port=port, helo_name=helo_name, tls_policy=tls_policy, starttls=use_starttls,
                        context=context, login=login, connect_timeout=connect_timeout,
                        command_timeout=command_timeout, abort=abort,
                    )
                except _StarttlsBroken as exc:
                    # RFC 7435 opportunistic: a failed handshake falls back to plain text, once.
                    connected = True
                    log.info("%s: TLS handshake failed (%s); retrying without STARTTLS", hop, exc)
                    errors.append(f"{hop}:{port}: TLS handshake failed: {exc}")
                    continue
                except _HopFailed as exc:
                    connected = connected or exc.connected
                    log.info("%s: %s", hop, exc.text)
                    errors.append(f"{hop}:{port}: {exc.text}")  # Postfix's 'mx.example.net[192.0.2.1]:25'
                    last_status = exc.status
                    break
            sessions += connected
            if abort.aborted or sessions >= MX_SESSION_LIMIT:
                break
        detail = "; ".join(errors[-3:]) or "no address to try"
        raise SessionFailed(last_status, detail, str(hop) if tried else "")

    @classmethod
    def _open_one(  # noqa: C901  connect, EHLO, STARTTLS, AUTH in RFC order (5321, 3207, 4954), one reply check per step
        cls,
        hop: Hop,
        *,
        port: int,
        helo_name: str,
        tls_policy: TlsPolicy,
        starttls: bool,
        context: ssl.SSLContext,
        login: RelayLogin | None,
        connect_timeout: float,
        command_timeout: float,
        abort: AbortSignal,
    ) -> OutboundSession:
        smtp: _PinnedSMTP | _PinnedSMTPS
        if tls_policy == "implicit":
            smtp = _PinnedSMTPS(local_hostname=helo_name, timeout=connect_timeout, context=context)
        else:
            smtp = _PinnedSMTP(local_hostname=helo_name, timeout=connect_timeout)
        smtp.pinned_address = hop.address
        smtp._host = hop.name  # smtplib sets this only when __init__ connects; STARTTLS sends it as SNI
        abort.attach(smtp)
        try:
            try:
                code, message = smtp.connect(hop.name, port)
            except ssl.SSLError as exc:
                raise _HopFailed("4.7.5", f"TLS handshake failed: {exc}") from exc
            except (OSError, smtplib.SMTPException) as exc:
                raise _HopFailed("4.4.1", f"connection failed: {exc}") from exc
            abort.check()
            assert smtp.sock is not None
            smtp.sock.settimeout(command_timeout)
            if code != 220:
                # RFC 5321 3.1: a 554 greeting means "no service here"; another MX may serve. The
                # client should still say QUIT.
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
                raise _HopFailed("4.4.2" if code < 500 else "4.3.0",
                                 f"refused to talk to me: {reply_from(code, message)}")
            cls._hello(smtp)
            tls = tls_description(smtp.sock) if tls_policy == "implicit" else ""
            if tls_policy != "implicit" and starttls and smtp.has_extn("starttls"):
                try:
                    code, message = smtp.starttls(context=context)
                except smtplib.SMTPResponseException as exc:
                    if tls_policy == "required":
                        raise _HopFailed("4.7.5", f"STARTTLS refused: {reply_from(exc.smtp_code, exc.smtp_error)}") from exc
                    raise _StarttlsBroken(str(reply_from(exc.smtp_code, exc.smtp_error))) from exc
                # ConnectionError: the peer reset the connection during the handshake (after its 220:
                # smtplib turns a failed read of a reply into SMTPServerDisconnected, not this). It
                # depends on timing whether a peer that closes at once is seen as a TLS EOF or,
                # when our ClientHello reached it first, as a reset: both are a broken STARTTLS.
                except (ssl.SSLError, ssl.CertificateError, ConnectionError) as exc:
                    if tls_policy == "required":
                        raise _HopFailed("4.7.5", f"TLS handshake failed: {exc}") from exc
                    raise _StarttlsBroken(str(exc)) from exc
                tls = tls_description(smtp.sock)
                cls._hello(smtp)  # RFC 3207 4.2: forget the pre-TLS EHLO, ask again
            elif tls_policy == "required":
                raise _HopFailed("4.7.4", "the relay does not offer STARTTLS; not sending the password in clear")
            if login is not None:
                try:
                    smtp.login(login.user, login.password)
                except smtplib.SMTPAuthenticationError as exc:
                    # Our configuration is wrong, not the mail: defer (4.7.8), never bounce for it.
                    raise _HopFailed("4.7.8", f"relay refused our login: {reply_from(exc.smtp_code, exc.smtp_error)}") from exc
                except smtplib.SMTPException as exc:
                    raise _HopFailed("4.7.8", f"relay login failed: {exc}") from exc
            abort.check()
            return cls(smtp, hop, tls, abort)
        except (_HopFailed, _StarttlsBroken, OSError, smtplib.SMTPException) as exc:
            # One way out of a session that did not open: the connection closed and out of the abort's
            # reach; a socket or protocol error is the hop's failure (or the queue stopping).
            abort.detach(smtp)
            _close_quietly(smtp)
            if isinstance(exc, _StarttlsBroken):
                raise
            failed = exc if isinstance(exc, _HopFailed) else \
                _HopFailed("4.3.2", "the queue is stopping") if abort.aborted else \
                _HopFailed("4.4.2", f"session failed: {exc}")
            failed.connected = smtp.connected
            if failed is exc:
                raise
            raise failed from exc

    @staticmethod
    def _hello(smtp: smtplib.SMTP) -> None:
        code, message = smtp.ehlo()
        if code == 250:
            return
        code, message = smtp.helo()  # RFC 5321 4.1.1.1: a server that knows no EHLO may know HELO
        if code != 250:
            raise _HopFailed("4.4.2", f"HELO refused: {reply_from(code, message)}")

    # --- sending --------------------------------------------------------------------------------------

    def _feature(self, name: str) -> str | None:
        return self._smtp.esmtp_features.get(name) if self._smtp.has_extn(name) else None

    def precheck(self, message: Outgoing) -> Outcome | None:
        """A permanent problem that makes sending pointless, judged from the server's EHLO."""
        envelope_utf8 = not all(_ascii(a) for a in (message.sender, *message.recipients))
        if envelope_utf8 and self._feature("smtputf8") is None:
            # RFC 6531 3.2: a non-ASCII address needs SMTPUTF8 end to end.
            return Outcome("5.6.7", f"{self.hop.name} does not support SMTPUTF8, needed for a non-ASCII address",
                           str(self.hop))
        if not message.data.isascii() and self._feature("8bitmime") is None:
            # RFC 6152 3: without 8BITMIME only 7-bit data may be sent; converting would break DKIM.
            return Outcome("5.6.3", f"{self.hop.name} does not accept 8-bit data (no 8BITMIME)", str(self.hop))
        size = self._feature("size")
        if size and size.strip().isascii() and size.strip().isdigit() and 0 < int(size) < len(message.data):
            # RFC 1870 6: the server told us its fixed limit.
            return Outcome("5.3.4", f"message is {len(message.data)} bytes; {self.hop.name} accepts at most "
                                    f"{int(size)}", str(self.hop))
        return None

    def _mail_options(self, message: Outgoing) -> list[bytes]:
        options = []
        if self._feature("size") is not None:
            options.append(f"SIZE={len(message.data)}".encode())
        if not message.data.isascii():
            options.append(b"BODY=8BITMIME")
        envelope_utf8 = not all(_ascii(a) for a in (message.sender, *message.recipients))
        if self._feature("smtputf8") is not None and (envelope_utf8 or not message.data.isascii()):
            options.append(b"SMTPUTF8")  # RFC 6531 3.4: the message may carry UTF-8 headers
        return options

    def send(self, message: Outgoing) -> dict[str, Outcome]:
        """One transaction per MAX_RCPTS_PER_TRANSACTION recipients; an outcome for each recipient.
        After a broken connection the remaining recipients get a temporary outcome and `broken` is set.

        Recipients refused with 452 (RFC 5321 4.5.3.1.10: "too many recipients") in a transaction that
        delivered to others go in the next transaction at once, as Postfix does, not to the retry
        schedule with an attempt counted against them. Each such transaction delivers to at least one
        recipient, so this ends; a 452 to every recipient of a transaction is a real delay."""
        problem = self.precheck(message)
        if problem is not None:
            return dict.fromkeys(message.recipients, problem)
        outcomes: dict[str, Outcome] = {}
        options = self._mail_options(message)
        pending = list(message.recipients)
        while pending:
            chunk, pending = pending[:MAX_RCPTS_PER_TRANSACTION], pending[MAX_RCPTS_PER_TRANSACTION:]
            if self.broken:
                lost = Outcome("4.4.2", "connection lost before this recipient was tried", str(self.hop))
                outcomes.update(dict.fromkeys(chunk, lost))
                continue
            done, too_many = self._transaction(message.sender, chunk, message.data, options)
            outcomes.update(done)
            if too_many and any(done[r].delivered for r in chunk):
                pending = too_many + pending
        self.messages += 1
        return outcomes

    def _command(self, verb: bytes, address: str, options: Sequence[bytes] = ()) -> bytes:
        return b" ".join([verb + b"<" + address.encode("utf-8") + b">", *options]) + b"\r\n"

    def _read(self) -> Reply:
        code, message = self._smtp.getreply()
        return reply_from(code, message)

    def _transaction(self, sender: str, recipients: list[str], data: bytes,
                     options: list[bytes]) -> tuple[dict[str, Outcome], list[str]]:
        """The outcomes, and the recipients whose RCPT got a 452 (to try in another transaction)."""
        rcpt_replies: list[Reply] = []
        outcomes = self._exchange(sender, recipients, data, options, rcpt_replies)
        return outcomes, [r for r, reply in zip(recipients, rcpt_replies, strict=False) if reply.code == 452]

    def _exchange(  # noqa: C901  the RFC 5321 3.3 transaction: one reply check per command, per-recipient outcomes
        self, sender: str, recipients: list[str], data: bytes, options: list[bytes], rcpt_replies: list[Reply]
    ) -> dict[str, Outcome]:
        """`rcpt_replies` gets the replies to RCPT as they come."""
        hop = self.hop
        try:
            mail_cmd = self._command(b"MAIL FROM:", sender, options)
            rcpt_cmds = [self._command(b"RCPT TO:", r) for r in recipients]
            if self._smtp.has_extn("pipelining"):
                # RFC 2920 3.1: MAIL and every RCPT in one write; the replies come back in order.
                self._smtp.send(mail_cmd + b"".join(rcpt_cmds))
                mail_reply = self._read()
                rcpt_replies.extend(self._read() for _ in rcpt_cmds)
            else:
                self._smtp.send(mail_cmd)
                mail_reply = self._read()
                if mail_reply.positive:
                    for cmd in rcpt_cmds:
                        self._smtp.send(cmd)
                        rcpt_replies.append(self._read())
            if mail_reply.code == 421 or any(r.code == 421 for r in rcpt_replies):
                self.broken = True  # RFC 5321 3.8: the server is closing the session
            if not mail_reply.positive:
                self._reset()
                return dict.fromkeys(recipients, from_reply(mail_reply, hop))
            outcomes = {r: from_reply(reply, hop) for r, reply in zip(recipients, rcpt_replies, strict=True)}
            accepted = [r for r, reply in zip(recipients, rcpt_replies, strict=True) if reply.positive]
            if not accepted or self.broken:
                self._reset()
                if self.broken:
                    lost = Outcome("4.4.2", "server closed the session (421)", str(hop))
                    outcomes.update(dict.fromkeys(accepted, lost))
                return outcomes
            assert self._smtp.sock is not None
            timeout = self._smtp.sock.gettimeout()
            self._smtp.sock.settimeout(DATA_END_TIMEOUT)
            try:
                code, message = self._smtp.data(data)
            finally:
                if self._smtp.sock is not None:
                    self._smtp.sock.settimeout(timeout)
            final = reply_from(code, message)
            if code == 421:
                self.broken = True
            if not final.positive:
                self._reset()
            outcomes.update(dict.fromkeys(accepted, from_reply(final, hop)))
            return outcomes
        except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
            reply = reply_from(exc.smtp_code, exc.smtp_error)
            if not str(exc.smtp_code).startswith(("4", "5")):
                # A 250 (or any non-failure) instead of 354: the message was never sent, yet it counted
                # as delivered. Postfix bounces it as a protocol error; what the server waits for now
                # is unknown, so the connection ends.
                self.broken = True
                return dict.fromkeys(recipients, Outcome(
                    PROTOCOL_ERROR, f"Protocol error: {reply} (in reply to DATA)", str(hop)))
            if exc.smtp_code == 421:
                self.broken = True
            self._reset()
            return dict.fromkeys(recipients, from_reply(reply, hop))
        except (OSError, smtplib.SMTPException) as exc:
            # Connection lost or timed out mid-transaction. If it died after the final "." the
            # message may have arrived: a retry can duplicate it, which beats losing it.
            self.broken = True
            log.info("%s: connection lost: %s", hop, exc)
            return dict.fromkeys(recipients, Outcome("4.4.2", f"connection lost: {exc}", str(hop)))

    def _reset(self) -> None:
        if self.broken:
            return
        try:
            code, _ = self._smtp.rset()
            if code != 250:
                self.broken = True
        except (OSError, smtplib.SMTPException):
            self.broken = True

    # --- closing --------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self.broken:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._smtp.quit()
        self._abort.detach(self._smtp)
        _close_quietly(self._smtp)


class _StarttlsBroken(Exception):
    pass


def _close_quietly(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError, smtplib.SMTPException):
        smtp.close()
