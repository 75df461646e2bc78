"""Who may send what to whom: relay, recipient and sender decisions as pure functions.

The handler looks the facts up (is the domain ours, what does the address resolve to, is the mailbox
full, does the user own the sender address) and these functions turn facts into a route or a reply.
The rule that keeps the box from being an open relay lives in `recipient_route`: a client that has not
authenticated can only reach addresses `Accounts.resolve()` gives something for; forwards to other
domains only ever come out of aliases an administrator made, and of SRS addresses of ours whose hash
and age verify (`srs_route`: a bounce of a forward goes back to the original sender, appliance/srs.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from appliance.account_errors import InvalidAddress
from appliance.address import Address, UnreadableAddresses, header_addresses, parse_path

# Which listener a session arrived on. "lmtp" is an MTA on loopback handing in mail for local users.
MX_SERVICE = "smtp"
SUBMISSION_SERVICES = frozenset({"submission", "submissions"})
LMTP_SERVICE = "lmtp"
SMTP_SERVICES = frozenset({MX_SERVICE, LMTP_SERVICE, *SUBMISSION_SERVICES})

MAX_ECHO = 100  # how much of a client's address a reply repeats


@dataclass(frozen=True)
class Reply:
    """One SMTP reply line: `550 5.1.1 text` (RFC 5321 4.2, RFC 3463 enhanced status code)."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


class SmtpReject(Exception):
    """A refusal that carries the reply the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def echo(text: str) -> str:
    """A client's address as a reply may quote it: bounded, printable."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[:MAX_ECHO])
    return shown + ("..." if len(text) > MAX_ECHO else "")


# --- replies ----------------------------------------------------------------------------------------

SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 4.5.3.1.10
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")  # RFC 3463 X.2.2
NOT_OWNED_SENDER = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "A null sender cannot be used for submission")
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(553, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs MAIL FROM ... SMTPUTF8")  # RFC 6531 3.5
LITERAL_REFUSED = Reply(550, "5.1.2", "Address literals are not accepted as destinations")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Local error in processing, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")  # appliance/disk_full.py
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")  # RFC 5321 6.3


def forwarding_loop(rcpt: str, others: int = 0) -> Reply:
    """Postfix local(8)'s words for mail that comes back to an alias that forwarded it already; `others`:
    how many more recipients of the message loop too (SMTP's one reply for them all)."""
    more = f" and {others} other recipient{'s' if others > 1 else ''}" if others else ""
    return Reply(554, "5.4.6", f"mail forwarding loop for {echo(rcpt)}{more}")
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header section too large")


def header_sender_refused(field: str, address: str) -> Reply:
    return Reply(550, "5.7.1", f"{field}: <{echo(address)}> is not an address you may send as; "
                               "use your own address or one of your aliases")


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{echo(address)}>: Relay access denied")


def unknown_user(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{echo(address)}>: No such user here")


def alias_stopped(address: str, why: str) -> Reply:
    """An alias that leads nowhere through a loop (or a chain past the depth limit): "No such user here"
    sent an administrator reading the log to look for a missing user. 5.4.6 is RFC 3463's routing
    loop, Postfix's code for "mail forwarding loop"."""
    text = "alias loop" if why == "loop" else "alias chain too deep"
    return Reply(554, "5.4.6", f"{text} for <{echo(address)}>")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# --- addresses --------------------------------------------------------------------------------------

def parse_sender(text: str, *, smtputf8: bool) -> Address | None:
    """MAIL FROM reverse-path: None for `<>` (RFC 5321 4.5.5). Raises SmtpReject."""
    if not smtputf8 and not text.isascii():
        raise SmtpReject(NEED_SMTPUTF8)
    try:
        return parse_path(text, smtputf8=smtputf8)
    except InvalidAddress:
        raise SmtpReject(BAD_SENDER_SYNTAX) from None


def is_bare_postmaster(text: str) -> bool:
    """RFC 5321 4.5.1: `RCPT TO:<Postmaster>` without a domain must be accepted."""
    return text.strip("<> \t").lower() == "postmaster"


def parse_recipient(text: str, *, smtputf8: bool) -> Address:
    """RCPT TO forward-path; a source route is dropped (RFC 5321 4.1.1.3). Raises SmtpReject."""
    if not smtputf8 and not text.isascii():
        raise SmtpReject(NEED_SMTPUTF8)
    try:
        address = parse_path(text, smtputf8=smtputf8)
    except InvalidAddress:
        raise SmtpReject(BAD_RECIPIENT_SYNTAX) from None
    if address is None:  # `<>` is only a reverse-path
        raise SmtpReject(BAD_RECIPIENT_SYNTAX)
    return address


def postmaster_domain(hostname: str, domains: Sequence[str]) -> str | None:
    """Which local domain a bare `postmaster` belongs to: the host name's own domain, else the first."""
    labels = hostname.lower().split(".")
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        if candidate in domains:
            return candidate
    return domains[0] if domains else None


# RFC 5321 4.5.1 (postmaster) and RFC 2142 (abuse, for reports of spam sent from the box's users): every
# domain the box serves has them, going to the administrators unless a mailbox or alias of that name
# exists, as Mail-in-a-Box makes both for every domain.
ROLE_ADDRESSES = frozenset({"postmaster", "abuse"})


def is_role_address(address: Address) -> bool:
    """postmaster@ or abuse@ (any case) at a domain the box serves: never refused for want of an alias."""
    return address.local.lower() in ROLE_ADDRESSES and not address.is_literal


@dataclass(frozen=True)
class MailboxFacts:
    address: str  # canonical
    enabled: bool
    created_at: int


def postmaster_mailboxes(
    admins: Sequence[str], mailboxes: Sequence[MailboxFacts], primary_domain: str | None
) -> tuple[str, ...]:
    """Where mail to a postmaster nobody set up goes (RFC 5321 4.5.1 says it must be accepted): the
    console administrators whose names are mailboxes of the box; else the oldest mailbox of the
    primary domain (the one the box is named after: the wizard's first mailbox); else the oldest
    mailbox at all. Disabled mailboxes never count. Empty when the box has no mailbox."""
    enabled = sorted((m for m in mailboxes if m.enabled), key=lambda m: (m.created_at, m.address))
    by_address = {m.address: m for m in enabled}
    from_admins = tuple(dict.fromkeys(a.lower() for a in admins if a.lower() in by_address))
    if from_admins:
        return from_admins
    primary = [m for m in enabled if primary_domain and m.address.endswith(f"@{primary_domain}")]
    first = (primary or enabled)[:1]
    return tuple(m.address for m in first)


# --- decisions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipientRoute:
    """Where one accepted RCPT goes: local mailboxes and alias forwards, or (authenticated users only)
    one remote address."""

    rcpt: str  # the address as the client gave it, normalised (for Received "for" and Delivered-To)
    mailboxes: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()
    remote: str | None = None

    @property
    def outbound(self) -> tuple[str, ...]:
        return (*self.forwards, self.remote) if self.remote else self.forwards


def sender_verdict(
    sender: Address | None, *, service: str, principal: str | None, owns_sender: bool
) -> Reply:
    """Submission: a logged-in user sends only as an address they own (their mailbox, or an alias
    that reaches it). MX and LMTP take any syntactically valid sender; SPF/DMARC judge it later."""
    if service in SUBMISSION_SERVICES:
        if principal is None:
            return Reply(530, "5.7.0", "Authentication required")
        if sender is None:
            return NULL_SENDER_REFUSED
        if not owns_sender:
            return NOT_OWNED_SENDER
    return SENDER_OK


def header_senders(fields: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(field, address) for every author a reader will see: each address of each From: (RFC 5322
    3.6.2 allows several) and of Sender:. A From:/Sender: that names no address at all yields
    (field, '') so it is refused too; the stdlib's lenient splitter errs towards more addresses."""
    found: list[tuple[str, str]] = []
    for name, value in fields:
        if name not in ("from", "sender"):
            continue
        field = "From" if name == "from" else "Sender"
        try:
            addresses = header_addresses(value)
        except UnreadableAddresses:  # no address a reader is shown: refused as naming nobody
            addresses = []
        found.extend((field, addr) for addr in addresses or [""])
    return found


@dataclass(frozen=True)
class RecipientFacts:
    """What the handler looked up about one recipient."""

    address: Address
    local_domain: bool  # the domain is one of ours (never true for an address literal)
    mailboxes: tuple[str, ...] = ()  # Accounts.resolve() result, empty for remote or unknown
    forwards: tuple[str, ...] = ()
    full: Mapping[str, bool] | None = None  # mailbox -> over quota
    stopped: str = ""  # Resolution.stopped: why an alias led nowhere


def recipient_route(
    facts: RecipientFacts, *, authenticated: bool, accepted_so_far: int, max_recipients: int
) -> RecipientRoute | Reply:
    """The relay rule. Local domain: the address must resolve to something (550 5.1.1 otherwise).
    Any other destination: only for an authenticated client (554 5.7.1 relay denied otherwise)."""
    address = facts.address
    if accepted_so_far >= max_recipients:
        return TOO_MANY_RECIPIENTS
    rcpt = address.canonical if facts.local_domain else str(address)
    if facts.local_domain and not address.is_literal:
        if not facts.mailboxes and not facts.forwards:
            return alias_stopped(str(address), facts.stopped) if facts.stopped else unknown_user(str(address))
        full = facts.full or {}
        if not facts.forwards and all(full.get(mb, False) for mb in facts.mailboxes):
            return MAILBOX_FULL
        return RecipientRoute(rcpt, facts.mailboxes, facts.forwards)
    if not authenticated:
        return relay_denied(str(address))
    if address.is_literal:
        return LITERAL_REFUSED
    return RecipientRoute(rcpt, remote=rcpt)


def srs_invalid(address: str) -> Reply:
    return Reply(550, "5.7.1", f"<{echo(address)}>: Invalid or expired SRS address")


def srs_route(
    rcpt: str, *, original: str | None, mailboxes: tuple[str, ...] = (), accepted_so_far: int,
    max_recipients: int,
) -> RecipientRoute | Reply:
    """RCPT TO an SRS0 address of one of our domains: relayed to the sender it encodes when it
    verified (`original`), refused with 550 when forged or expired (None). An original of a local
    domain (`mailboxes` resolved by the caller) is delivered here."""
    if accepted_so_far >= max_recipients:
        return TOO_MANY_RECIPIENTS
    if original is None:
        return srs_invalid(rcpt)
    if mailboxes:
        return RecipientRoute(rcpt, mailboxes)
    return RecipientRoute(rcpt, forwards=(original,))


def declared_size(mail_options: Sequence[str]) -> int:
    """SIZE=n from MAIL FROM (RFC 1870 6), 0 when absent."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return 0
