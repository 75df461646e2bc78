"""The services every listener and the web console share; built once by app.py, passed in, never global."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.backup import BackupJobs
from appliance.certificates import CertContext

HOSTNAME_SETTING = "hostname"  # the db setting app.py starts with (after --hostname)

if TYPE_CHECKING:
    from appliance.accounts import Accounts
    from appliance.auth import Auth
    from appliance.certificates import Renewer
    from appliance.config import ServeConfig
    from appliance.db import Database
    from appliance.events import EventLog
    from appliance.store.mailstore import MailStore
    from appliance.tls import TlsManager


@dataclass
class Services:
    config: ServeConfig
    db: Database
    accounts: Accounts
    auth: Auth
    store: MailStore
    tls: TlsManager
    events: EventLog
    # The box's name, live: the wizard renames the box while it runs, so every service reads
    # `services.hostname` when it uses it (banner, EHLO, Received, Authentication-Results, HELO,
    # DSN...) and never keeps a copy; one that needs a function gets `lambda: services.hostname`.
    hostname: str
    # The certificate use-cases' state: the http-01 answers the port-80 listener serves, the order lock.
    certificates: CertContext = field(init=False)
    renewer: Renewer | None = None  # started with the background services
    # Backups and restores running in the background, watched by the console's Backups page.
    backups: BackupJobs = field(default_factory=BackupJobs)
    # Filled by the issues that add them (outbound queue, dns checker, ...): name -> service object.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.certificates = CertContext(
            db=self.db, tls=self.tls, events=self.events, hostname=lambda: self.hostname,
            acme_dir=self.config.data.tls / "acme", http01={},
        )

    async def set_hostname(self, name: str) -> None:
        """Rename the box (the wizard; any later console page or CLI command goes through here): kept
        in the db for the next start, and in force at once for every service, since they read
        `hostname` when they use it."""
        await self.db.set_setting(HOSTNAME_SETTING, name)
        self.hostname = name
