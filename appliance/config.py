"""Where the box keeps its data and which ports it listens on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DATA_ENV = "LETTERBOX_DATA"
DEFAULT_DATA = Path("./data")

# Standard ports; `--port-offset N` adds N to each (make run uses 10000).
STANDARD_PORTS: dict[str, int] = {
    "smtp": 25,
    "submission": 587,
    "submissions": 465,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
    "http": 80,
    "https": 443,
    "lmtp": 24,
}


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


@dataclass(frozen=True)
class DataLayout:
    """The one data directory and everything in it (see README, 'Data directory')."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "letterbox.db"

    @property
    def mail(self) -> Path:
        return self.root / "mail"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def dkim(self) -> Path:
        return self.root / "dkim"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def deleted(self) -> Path:
        """Mail of removed mailboxes and keys of removed domains, kept for a while (appliance/store/trash.py)."""
        return self.root / "deleted"

    @property
    def tmp(self) -> Path:
        """Parts of messages being received (appliance/message_spool.py); emptied at start."""
        return self.root / "tmp"

    def create(self) -> None:
        paths = (self.root, self.mail, self.spool, self.tls, self.dkim, self.backups, self.deleted, self.tmp)
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
        # Keys, mail, the queue and the db are private to the box (issue 11 item 6): no other local
        # user may list or read them, whatever the umask was when an older version made them.
        for path in paths:
            if path.stat().st_mode & 0o077:
                path.chmod(0o700)


@dataclass(frozen=True)
class ServeConfig:
    data: DataLayout
    listen: str = "0.0.0.0"  # noqa: S104  a mail server serves the network by design
    port_offset: int = 0
    # Per-service overrides (tests pass port 0 or free ports); None means standard + offset.
    port_overrides: dict[str, int] = field(default_factory=dict)
    # Services not to start at all (e.g. {"http", "https"} in protocol tests).
    disabled: frozenset[str] = frozenset()
    hostname: str | None = None  # default: the db setting, else the system's FQDN

    def port(self, service: str) -> int:
        if service in self.port_overrides:
            return self.port_overrides[service]
        return STANDARD_PORTS[service] + self.port_offset

    def published_ports(self) -> dict[str, int]:
        """Ports the SRV records name: what the internet reaches (standard + offset), not test-bound ones."""
        return {service: self.port(service) or STANDARD_PORTS[service] for service in ("submission", "imaps", "pop3s")}

    def listen_address(self, service: str) -> str:
        # LMTP hands mail in without authentication: loopback only, whatever --listen says.
        return "127.0.0.1" if service == "lmtp" else self.listen

    def with_ports(self, **ports: int) -> ServeConfig:
        return replace(self, port_overrides={**self.port_overrides, **ports})
