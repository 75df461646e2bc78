"""What each SMTP command does, as aiosmtpd handler hooks: EHLO, AUTH, MAIL, RCPT, DATA.

One handler per listener; per-connection state lives in aiosmtpd's Session and our Envelope. Lookups
happen here, decisions in policy.py, writing in delivery.py. Any unexpected error is logged with its
traceback and answered with a 451 (the client retries); no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session, TLSSetupException

from appliance import srs
from appliance.account_errors import InvalidAddress
from appliance.address import Address, parse_address
from appliance.auth import Principal, Refused
from appliance.delivery_log import Delivery, message_id_of
from appliance.disk_full import room_for
from appliance.queue.spool import new_queue_id
from appliance.smtp import headers
from appliance.smtp.content import ContentFacts, ContentVerdict
from appliance.smtp.delivery import Deliverer, InboundMessage, failure_reply
from appliance.smtp.headers import ReceivedFacts, TlsFacts
from appliance.smtp.inbound import InboundFacts, InboundVerdict
from appliance.smtp.limits import SmtpLimits
from appliance.smtp.policy import (
    HEADER_TOO_LARGE,
    INSUFFICIENT_STORAGE,
    LMTP_SERVICE,
    MX_SERVICE,
    SUBMISSION_SERVICES,
    TEMPORARY_FAILURE,
    TOO_MANY_HOPS,
    MailboxFacts,
    RecipientFacts,
    RecipientRoute,
    Reply,
    SmtpReject,
    declared_size,
    forwarding_loop,
    header_sender_refused,
    header_senders,
    is_bare_postmaster,
    is_role_address,
    parse_recipient,
    parse_sender,
    postmaster_domain,
    postmaster_mailboxes,
    recipient_route,
    sender_verdict,
    srs_route,
    unknown_user,
)
from appliance.smtp.probes import PROBING_BLOCKED, RecipientProbeGuard

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP

    from appliance.services import Services
    from appliance.spam.screen import ConnectionScreen

log = logging.getLogger("letterbox.smtp")

# RFC 1869 / 2920 / 2034 / 6531 / 3207: what EHLO offers beyond what aiosmtpd lists itself.
EXTRA_EHLO_KEYWORDS = ("PIPELINING", "ENHANCEDSTATUSCODES")
LARGE_MESSAGE = 256 * 1024  # bigger messages are normalised off the event loop

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_NOT_HERE = "502 5.5.1 AUTH not available on this port; use submission (587 or 465)"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN = "501 5.5.2 Cannot split the AUTH PLAIN response"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"


class LetterboxSession(Session):
    """aiosmtpd's Session without the deprecation warning its login_data setter logs on every AUTH."""

    refused_recipients = 0  # RCPTs refused with 5xx so far on this connection (probes.py delays)
    # The MX's spam layers for this client (appliance/spam/screen.py); None elsewhere and when skipped.
    screen: ConnectionScreen | None = None
    # Called when a message was accepted: the connection (server.py) starts its error budget over.
    on_accepted: Callable[[], None] | None = None

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value

    @property
    def principal(self) -> Principal | None:
        return self.auth_data if self.authenticated and isinstance(self.auth_data, Principal) else None

    def end_login(self) -> None:
        """The login no longer counts: the session is as before AUTH (which may be tried again)."""
        self.authenticated = False
        self.auth_data = None


class LetterboxEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.sender: Address | None = None
        self.routes: list[RecipientRoute] = []


def _session(session: Session) -> LetterboxSession:
    assert isinstance(session, LetterboxSession)
    return session


def _envelope(envelope: Envelope) -> LetterboxEnvelope:
    assert isinstance(envelope, LetterboxEnvelope)
    return envelope


def peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def tls_facts(server: SMTP) -> TlsFacts | None:
    transport = server.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("unknown", "", 0)
    return TlsFacts(version=str(ssl_object.version() or "TLS"), cipher=str(cipher[0]), bits=int(cipher[2] or 0))


def render_ehlo(responses: list[str], keywords: list[str]) -> list[str]:
    """Rebuild the EHLO reply: aiosmtpd's lines (minus AUTH where we hide it) plus our keywords."""
    lines = [line[4:] for line in responses]  # strip '250-' / '250 '
    greeting, offered = lines[0], [kw for kw in lines[1:] if kw != "HELP"]
    offered.extend(kw for kw in keywords if kw not in offered)
    offered.append("HELP")
    body = [greeting, *offered]
    return [f"250-{text}" for text in body[:-1]] + [f"250 {body[-1]}"]


class SmtpHandler:
    """The hooks for one listener (`service` is 'smtp', 'submission', 'submissions' or 'lmtp')."""

    def __init__(self, services: Services, service: str, limits: SmtpLimits, deliverer: Deliverer) -> None:
        self.services = services
        self.service = service
        self.limits = limits
        self.deliverer = deliverer
        self.lmtp = service == LMTP_SERVICE
        self.submission = service in SUBMISSION_SERVICES
        self.spool_directory = services.config.data.tmp  # large messages' (server.py, message_spool.py)

    # --- EHLO / LHLO ----------------------------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        keep = [r for r in responses if not (r[4:].startswith("AUTH") and not self.submission)]
        return render_ehlo(keep, list(EXTRA_EHLO_KEYWORDS))

    # --- AUTH (RFC 4954) ------------------------------------------------------------------------------

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> Any:
        if not self.submission:
            return AUTH_NOT_HERE
        return MISSING  # aiosmtpd goes on to our auth_<MECHANISM> method

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: [authzid] NUL authcid NUL passwd, as an initial response or after a 334."""
        blob: Any
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)  # challenge_auth already replied
        else:
            blob = _b64(args[1])
            if blob is None:
                return AuthResult(success=False, handled=False, message=AUTH_BAD_BASE64)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=AUTH_BAD_PLAIN)
        authzid, login, password = parts
        if authzid and authzid != login:  # acting for someone else is not supported
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        return await self._verify(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """The de-facto LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
        login: Any
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = _b64(args[1])
            if login is None:
                return AuthResult(success=False, handled=False, message=AUTH_BAD_BASE64)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes)
        assert isinstance(password, bytes)
        return await self._verify(server, login, password)

    async def _verify(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        try:
            address, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        # The shared service throttles (it may sleep here) and logs the attempt, never the password.
        principal = await self.services.auth.login(address, secret, "smtp", peer_ip(server.session))
        if isinstance(principal, Refused):
            # RFC 4954 6: 454 4.7.0 is the temporary failure; 535 would tell the user the password is wrong.
            return AuthResult(success=False, handled=False, message=f"454 4.7.0 {principal.message()}")
        if principal is None or principal.kind != "mailbox":
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        log.info("%s: authenticated as %s", peer_ip(server.session), principal.name)
        return AuthResult(success=True, auth_data=principal, message=AUTH_OK)

    # --- MAIL -----------------------------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        env = _envelope(envelope)
        principal = _session(session).principal
        if principal is not None and not await self.services.accounts.may_log_in(principal.name,
                                                                                 principal.password_hash):
            # Removed, disabled or given another password since the AUTH (a stolen password the owner
            # or the administrator acted on): this session sends no more (530 below), as IMAP and POP3
            # sessions of such a mailbox end.
            log.info("%s: %s may no longer log in; the session's login no longer counts", peer_ip(session),
                     principal.name)
            _session(session).end_login()
            principal = None
        try:
            sender = parse_sender(address, smtputf8=env.smtp_utf8)
        except SmtpReject as reject:
            return str(reject.reply)
        if not room_for(self.services.config.data.root,
                        declared_size(mail_options) + self.services.message_memory.others()):
            # Before the disk is full (appliance/disk_full.py): the sender keeps the message and retries.
            log.warning("%s: MAIL FROM:<%s> refused: the disk is nearly full", peer_ip(session), address[:100])
            return str(INSUFFICIENT_STORAGE)
        owns = bool(
            principal and sender and await self.services.accounts.may_send_as(principal.name, str(sender))
        )
        reply = sender_verdict(
            sender, service=self.service, principal=principal.name if principal else None, owns_sender=owns
        )
        if reply.positive and self.submission and principal is not None:
            limited = await self.services.outbound_guard.check_message(principal.name, peer_ip(session))
            if limited is not None:
                log.info("%s: MAIL FROM:<%s> by %s refused: %s", peer_ip(session), address[:100], principal.name, limited)
                return limited
        if reply.positive:
            # The hook replaces aiosmtpd's default handling, so it records the sender itself.
            env.mail_from = address
            env.mail_options.extend(mail_options)
            env.sender = sender
        else:
            log.info("%s: MAIL FROM:<%s> refused: %s", peer_ip(session), address[:100], reply)
        return str(reply)

    # --- RCPT -----------------------------------------------------------------------------------------

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        env = _envelope(envelope)
        sess, ip = _session(session), peer_ip(session)
        guard = self._probe_guard(sess)
        if guard is not None and guard.blocked(ip):
            route: RecipientRoute | Reply = PROBING_BLOCKED  # the same answer for every address: no oracle
        else:
            try:
                route = await self._route(sess, env, address)
            except SmtpReject as reject:
                route = reject.reply
        if not isinstance(route, Reply) and self.submission and sess.principal is not None:
            limited = await self.services.outbound_guard.check_recipient(sess.principal.name, len(env.routes), ip)
            if limited is not None:
                log.info("%s: RCPT TO:<%s> by %s refused: %s", ip, address[:100], sess.principal.name, limited)
                return limited
        if not isinstance(route, Reply) and sess.screen is not None and sess.principal is None:
            refused = await sess.screen.check_recipient(sess.host_name or "", str(env.sender or ""), route.rcpt)
            if refused is not None:
                log.info("%s: RCPT TO:<%s> refused: %s", ip, address[:100], refused)
                return refused
        if isinstance(route, Reply):
            log.info("%s: RCPT TO:<%s> refused: %s", ip, address[:100], route)
            self._log_refused(sess, env, route, "recipient", (address,))
            if guard is not None and (route.code >= 500 or route is PROBING_BLOCKED):
                if route.status == "5.1.1":
                    guard.record_unknown(ip)
                sess.refused_recipients += 1
                delay = guard.delay_for(sess.refused_recipients)
                if delay:
                    # Postfix's smtpd_error_sleep_time: an asyncio sleep that holds nothing; only
                    # this client, whose next command waits for this reply, is slowed.
                    await guard.sleep(delay)
            return str(route)
        env.rcpt_tos.append(address)
        env.rcpt_options.extend(rcpt_options)
        env.routes.append(route)
        return "250 2.1.5 Recipient ok"

    def _probe_guard(self, session: LetterboxSession) -> RecipientProbeGuard | None:
        """The MX's harvesting defence, for clients that have not logged in (read live: tests and a
        later setting may replace it)."""
        if self.service != MX_SERVICE or session.principal is not None:
            return None
        return self.services.recipient_guard

    async def _route(self, session: LetterboxSession, env: LetterboxEnvelope, text: str) -> RecipientRoute | Reply:
        accounts = self.services.accounts
        bounce_route = await self._srs_route(env, text)
        if bounce_route is not None:
            return bounce_route
        if is_bare_postmaster(text):
            domain = postmaster_domain(self.services.hostname, await accounts.list_domains())
            if domain is None:
                return unknown_user(text)
            address = Address("postmaster", domain)
        else:
            address = parse_recipient(text, smtputf8=env.smtp_utf8)
        local = not address.is_literal and await accounts.is_local_domain(address.domain)
        mailboxes: tuple[str, ...] = ()
        forwards: tuple[str, ...] = ()
        full: dict[str, bool] = {}
        stopped = ""
        if local:
            resolution = await accounts.resolve(str(address))
            stopped = resolution.stopped
            mailboxes, forwards = resolution.mailboxes, resolution.forwards
            if not mailboxes and not forwards and is_role_address(address) and not self.submission:
                mailboxes = await self._postmaster_mailboxes()
            size = declared_size(env.mail_options)
            for mailbox in mailboxes:
                used, quota = await self.services.store.usage(mailbox)
                full[mailbox] = bool(quota) and used + size >= quota
        facts = RecipientFacts(address, local, mailboxes, forwards, full, stopped)
        return recipient_route(
            facts,
            authenticated=session.principal is not None,
            accepted_so_far=len(env.routes),
            max_recipients=self.limits.max_recipients,
        )

    async def _postmaster_mailboxes(self) -> tuple[str, ...]:
        """RFC 5321 4.5.1 and RFC 2142 on the MX and LMTP: postmaster@ and abuse@ every domain of ours
        reach someone even when no alias was made: the administrators (policy.postmaster_mailboxes says whom)."""
        accounts = self.services.accounts
        mailboxes = [MailboxFacts(m.address, m.enabled, m.created_at) for m in await accounts.list_users()]
        primary = postmaster_domain(self.services.hostname, await accounts.list_domains())
        return postmaster_mailboxes(await accounts.list_admins(), mailboxes, primary)

    async def _srs_route(self, env: LetterboxEnvelope, text: str) -> RecipientRoute | Reply | None:
        """RCPT TO an SRS0 address of one of our domains (a bounce of a forward, appliance/srs.py);
        None for any other address. Looked at before the usual parsing: an SRS address may exceed
        the 64-octet local part that parse_recipient enforces (the path limit still holds)."""
        local, at, domain = text.strip().strip("<>").rpartition("@")
        if not at or not srs.is_srs(local):
            return None
        accounts = self.services.accounts
        if not await accounts.is_local_domain(domain):
            return None  # someone else's SRS address: the ordinary relay rule decides
        original: str | None = None
        mailboxes: tuple[str, ...] = ()
        try:
            original = self.services.srs.reverse(f"{local}@{domain}").original
            target = parse_address(original, smtputf8=True)
            if not target.is_literal and await accounts.is_local_domain(target.domain):
                mailboxes = (await accounts.resolve(str(target))).mailboxes
        except (srs.InvalidSrs, InvalidAddress):
            original = None
        return srs_route(f"{local}@{domain}", original=original, mailboxes=mailboxes,
                         accepted_so_far=len(env.routes), max_recipients=self.limits.max_recipients)

    # --- DATA -----------------------------------------------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        env = _envelope(envelope)
        # The room MAIL FROM found may be gone: every message received meanwhile (this one included,
        # held until it is answered) is about to be written too (appliance/disk_full.py).
        if not room_for(self.services.config.data.root, self.services.message_memory.others()):
            log.warning("%s: DATA refused: the disk is nearly full", peer_ip(session))
            return self._for_all(env, INSUFFICIENT_STORAGE)
        try:
            return await self._data(server, _session(session), env)
        except Exception as exc:  # noqa: BLE001  failure_reply logs it, with its traceback unless the disk is full
            return self._for_all(env, failure_reply(exc, f"{peer_ip(session)}: DATA failed"))

    def _for_all(self, env: LetterboxEnvelope, reply: Reply | str) -> str:
        """LMTP (RFC 2033 4.2) answers DATA once per accepted recipient, SMTP once."""
        return "\r\n".join([str(reply)] * len(env.routes)) if self.lmtp else str(reply)

    async def _data(self, server: SMTP, session: LetterboxSession, env: LetterboxEnvelope) -> str:
        raw = env.original_content or b""
        if len(raw) > LARGE_MESSAGE:
            data = await asyncio.to_thread(headers.normalise_line_ends, raw)
        else:
            data = headers.normalise_line_ends(raw)
        data = headers.body_separated(data)
        routes = self._without_loops(session, env, data)
        if isinstance(routes, str):
            return routes
        if headers.header_section_too_large(data):
            # The From: checks (DMARC, submission) read this much; a field past it would be unseen.
            return self._refuse_data(session, env, HEADER_TOO_LARGE, "size", data)
        principal = session.principal
        if self.submission and principal is not None:
            refused = await self._header_sender_refused(principal.name, data)
            if refused is not None:
                log.info("%s: %s refused: %s", peer_ip(session), principal.name, refused)
                return self._refuse_data(session, env, refused, "sender", data)
            # Before any copy is made: local ones and the queue's (which DKIM-signs what it sends).
            data = headers.add_submission_headers(headers.mended_for_submission(data), self.services.hostname)
        sender = "" if env.sender is None else str(env.sender)
        tls = tls_facts(server)
        helo = session.host_name or "unknown"

        check = self.services.inbound_check
        queue_id = new_queue_id()
        # Mail from the internet: may its sender be told about failures? (None: not judged here.)
        sender_verified: bool | None = None
        verdict = InboundVerdict()
        if check is not None and self.service == MX_SERVICE:
            facts = InboundFacts(peer_ip(session), helo, sender, tuple(r.rcpt for r in env.routes), tls is not None)
            verdict = await check(facts, data)
            if verdict.reject:
                return self._refuse_data(session, env, verdict.reject, "dmarc", data)
            data = verdict.headers + (data if verdict.message is None else verdict.message)
            sender_verified = verdict.sender_authenticated
        content = await self._content_check(ContentFacts(
            peer_ip(session), helo, sender, tuple(r.rcpt for r in env.routes),
            tuple(dict.fromkeys(mb for r in env.routes for mb in r.mailboxes)), queue_id,
            spf=verdict.spf, dkim=verdict.dkim, dmarc=verdict.dmarc, dmarc_policy=verdict.dmarc_policy,
        ), data)
        if content.reject:
            return self._refuse_data(session, env, content.reject, "rspamd", data)
        data = content.headers + (data if content.message is None else content.message)
        # Mail received too, as Postfix's cleanup treats all mail (submission's went before any copy).
        # After the checks, so DKIM judged the bytes as signed; no honest signer covers these fields.
        data = headers.without_bcc(data)

        received = ReceivedFacts(
            helo=helo,
            peer_ip=peer_ip(session),
            hostname=self.services.hostname,
            protocol=headers.with_keyword(
                lmtp=self.lmtp, extended=session.extended_smtp, tls=tls is not None,
                authenticated=principal is not None, utf8=env.smtp_utf8,
            ),
            queue_id=queue_id,
            tls=tls,
            auth_user=principal.name if principal else None,
        )
        message = InboundMessage(sender, routes, data, received, received.auth_user,
                                 sender_verified=sender_verified, junk=content.junk)
        # Shielded: a client hanging up mid-delivery must not cancel a half-done write; the work
        # finishes and the client, having seen no reply, retries (a duplicate beats a loss).
        report = await asyncio.shield(self.deliverer.deliver(message, per_recipient=self.lmtp))
        if report.summary.positive and session.on_accepted is not None:
            session.on_accepted()
        if report.summary.positive and self.submission and principal is not None:
            await self.services.outbound_guard.note_sent(principal.name, len(env.routes))
        if self.lmtp:  # one reply per RCPT, in order: a looping alias's refusal where it was left out
            delivered = iter(report.replies)
            return "\r\n".join(str(next(delivered) if route in routes else forwarding_loop(route.rcpt))
                                for route in env.routes)
        return str(report.summary)

    def _without_loops(self, session: LetterboxSession, env: LetterboxEnvelope,
                       data: bytes) -> tuple[RecipientRoute, ...] | str:
        """The routes to deliver, or the refusal of a looping message: 50 Received: lines (RFC 5321
        6.3), or every route an alias that forwards and forwarded this message already (its
        Delivered-To, delivery.py), as Postfix's local(8) finds a forwarding loop: an alias that
        forwards to a mailbox elsewhere that forwards back looped 25 times (50 Received: lines), each
        time a copy for every target. The other routes are delivered (under LMTP each looping one
        gets its own refusal; under SMTP, one reply for the message, it is logged as refused)."""
        if headers.count_received(data) >= self.limits.max_received_headers:
            return self._refuse_data(session, env, TOO_MANY_HOPS, "loop", data)
        routes = tuple(env.routes)
        if not any(route.forwards for route in routes):
            return routes
        seen = headers.delivered_to_values(data)
        looping = [route for route in routes if route.forwards and route.rcpt.lower() in seen]
        if not looping:
            return routes
        log.warning("%s: mail forwarding loop for %s: not delivered to it again", peer_ip(session),
                    ", ".join(route.rcpt for route in looping))
        for route in looping:  # each refusal names its own alias (the first one's named them all)
            self._log_refused(session, env, forwarding_loop(route.rcpt), "loop", (route.rcpt,), data)
        if len(looping) < len(routes):
            return tuple(route for route in routes if route not in looping)
        if self.lmtp:  # one reply per recipient (RFC 2033 4.2), each for its own
            return "\r\n".join(str(forwarding_loop(route.rcpt)) for route in routes)
        return str(forwarding_loop(looping[0].rcpt, len(looping) - 1))

    async def _content_check(self, facts: ContentFacts, data: bytes) -> ContentVerdict:
        """The content filter (issue 16), before any copy is written: on the MX only (mail from the
        internet; submission and LMTP are trusted senders)."""
        content = self.services.content_filter
        if content is None or self.service != MX_SERVICE:
            return ContentVerdict()
        return await content(facts, data)

    def _log_refused(self, session: LetterboxSession, env: LetterboxEnvelope, reply: Reply | str, check: str,
                     recipients: tuple[str, ...], data: bytes | None = None) -> None:
        """Refusals in the delivery log: admins see them all; a logged-in sender sees their own."""
        principal = session.principal
        for rcpt in recipients:
            self.services.delivery_log.record(Delivery(
                direction="out" if principal else "in", result="rejected",
                sender="" if env.sender is None else str(env.sender), recipient=rcpt[:320],
                size=len(data) if data is not None else None, detail=str(reply), check=check,
                client=peer_ip(session), message_id=message_id_of(data) if data else None,
                owner=principal.name if principal else ""))

    def _refuse_data(self, session: LetterboxSession, env: LetterboxEnvelope, reply: Reply | str, check: str,
                     data: bytes) -> str:
        self._log_refused(session, env, reply, check, tuple(r.rcpt for r in env.routes), data)
        return self._for_all(env, reply)

    async def _header_sender_refused(self, login: str, data: bytes) -> Reply | None:
        """The envelope rule applied to what the recipient reads (as Postfix's
        reject_sender_login_mismatch with header checks, and mox): every From: address and Sender:
        must be one the login may send as (issue 10 item 11)."""
        for field, address in header_senders(headers.raw_fields(data)):
            if not address or not await self.services.accounts.may_send_as(login, address):
                return header_sender_refused(field, address)
        return None

    # --- anything unexpected --------------------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's doing (a failed handshake after STARTTLS): aiosmtpd closes the connection.
            log.info("STARTTLS handshake failed: %s", error.__cause__ or error)
            return str(TEMPORARY_FAILURE)
        return str(failure_reply(error, "SMTP session error"))


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
