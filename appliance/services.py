"""The services every listener and the web console share; built once by app.py (the composition root),
passed in, never global. Every field is typed, so go-to-definition and mypy follow the wiring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.account_sessions import AccountSessions
from appliance.backup import BackupJobs
from appliance.certificates import CertContext
from appliance.cpu_pool import CpuPool
from appliance.delivery_log import DeliveryLog
from appliance.message_memory import MessageMemory
from appliance.spam.decisions import DecisionLog
from appliance.spam.dnsbl import Blocklists, ListStatus
from appliance.spam.greylist import Greylist
from appliance.spam.outbound import OutboundGuard
from appliance.spam.screen import SpamScreen
from appliance.status_checks import Probes

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from appliance.accounts import Accounts
    from appliance.auth import Auth
    from appliance.certificates import Renewer
    from appliance.config import ServeConfig
    from appliance.db import Database
    from appliance.events import EventLog
    from appliance.imap.fts import TextIndex
    from appliance.queue.service import OutboundQueue
    from appliance.queue.spool import Spool
    from appliance.settings import Settings
    from appliance.smtp.content import ContentFilter
    from appliance.smtp.inbound import InboundCheck
    from appliance.smtp.probes import RecipientProbeGuard
    from appliance.spam.content_service import SpamContent
    from appliance.srs import SenderRewriter
    from appliance.store.mailstore import MailStore
    from appliance.tls import TlsManager

# service -> (host, bound port, serving): the listeners as the status page and redirects see them.
ListenerStatus = Callable[[], dict[str, tuple[str, int, bool]]]


@dataclass
class Services:
    config: ServeConfig
    db: Database
    settings: Settings  # every run-time setting, live (appliance/settings.py)
    accounts: Accounts
    auth: Auth
    store: MailStore
    tls: TlsManager
    events: EventLog
    spool: Spool  # the box's one outbound spool: the SMTP listeners write, the queue reads
    srs: SenderRewriter  # forwards' envelope senders (SRS0) and bounces to them
    recipient_guard: RecipientProbeGuard  # the MX's defence against recipient harvesting
    # The certificate use-cases' state: the http-01 answers the port-80 listener serves, the order lock.
    certificates: CertContext = field(init=False)
    # Every spam layer's decisions, written in batches (appliance/spam/decisions.py); flushed at stop.
    spam_decisions: DecisionLog = field(init=False)
    greylist: Greylist = field(init=False)  # greylisting state (appliance/spam/greylist.py)
    blocklists: Blocklists = field(init=False)  # DNS blocklist lookups and each list's state
    spam_screen: SpamScreen = field(init=False)  # the MX's connection/envelope-time layers
    outbound_guard: OutboundGuard = field(init=False)  # submission's hourly limits and suspensions
    # Every message in and out, per recipient (appliance/delivery_log.py); flushed at stop.
    delivery_log: DeliveryLog = field(init=False)
    # Started after the listeners are bound (Box._start_background); None where a test runs without them.
    queue: OutboundQueue | None = None
    inbound_check: InboundCheck | None = None  # the MX's SPF/DKIM/DMARC check (appliance/inbound_auth.py)
    renewer: Renewer | None = None
    content_filter: ContentFilter | None = None  # the MX's spam check at DATA (appliance/spam/content_filter.py)
    spam_content: SpamContent | None = None  # that filter, the learner, Junk for the console and the CLI
    account_sessions: AccountSessions = field(default_factory=AccountSessions)  # IMAP sessions per account
    pop3_sessions: AccountSessions = field(default_factory=AccountSessions)  # POP3 sessions per account
    # Incoming messages (SMTP DATA, IMAP APPEND) held in memory at once, all sessions together.
    message_memory: MessageMemory = field(default_factory=MessageMemory)
    # CPU-heavy work (SEARCH BODY scans, full-text indexing) in a worker process (appliance/cpu_pool.py).
    cpu: CpuPool = field(default_factory=CpuPool)
    text_index: TextIndex | None = None  # SEARCH BODY/TEXT's full-text index (appliance/imap/fts.py)
    # Backups and restores running in the background, watched by the console's Backups page.
    backups: BackupJobs = field(default_factory=BackupJobs)
    listener_status: ListenerStatus | None = None  # set by the Box once its listeners are bound
    web_app: ASGIApp | None = None  # the one console app the HTTP and HTTPS listeners share
    # What the status checklist's network checks connect to (appliance/status_checks.py); tests swap it.
    status_probes: Probes = field(default_factory=Probes)

    def __post_init__(self) -> None:
        self.certificates = CertContext(
            db=self.db, tls=self.tls, events=self.events, hostname=lambda: self.hostname,
            acme_dir=self.config.data.tls / "acme", http01={}, cpu=self.cpu,
        )
        self.spam_decisions = DecisionLog(self.db, keep_days=lambda: self.settings.now.spam.decisions_keep_days)
        self.greylist = Greylist(self.db)
        self.blocklists = Blocklists(ListStatus(self.db), lambda: self.settings.now.dns_resolver)
        self.spam_screen = SpamScreen(self.settings, self.blocklists, self.greylist, self.spam_decisions)

        async def notify_postmaster(subject: str, text: str) -> bool:
            from appliance.postmaster import mail_postmaster

            return await mail_postmaster(self, subject, text)

        self.outbound_guard = OutboundGuard(self.db, self.settings, self.events, self.spam_decisions,
                                            notify_postmaster=notify_postmaster)
        self.delivery_log = DeliveryLog(self.db, enabled=lambda: self.settings.now.delivery_log,
                                        keep_days=lambda: self.settings.now.delivery_log_days)

    @property
    def hostname(self) -> str:
        """The box's name, live: the wizard renames the box while it runs, so every service reads
        this when it uses it (banner, EHLO, Received, Authentication-Results, HELO, DSN...) and never
        keeps a copy; one that needs a function gets `lambda: services.hostname`."""
        return self.settings.now.hostname

    async def set_hostname(self, name: str) -> None:
        """Rename the box (the wizard; any later console page or CLI command goes through here): kept
        in the db for the next start, and in force at once for every service."""
        await self.settings.save(hostname=name)

    def listeners(self) -> dict[str, tuple[str, int, bool]]:
        return self.listener_status() if self.listener_status is not None else {}
