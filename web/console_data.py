"""Facts the console shows that come from the running box rather than from one service call: listener
state, the ports clients and DNS records name, disk usage, what the outbound queue holds."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import STANDARD_PORTS
from appliance.disk_full import used_percent
from appliance.queue.spool import QueuedMessage, QueuedRecipient
from web.clients import ClientSettings, client_settings

if TYPE_CHECKING:
    from appliance.services import Services

def listeners(services: Services) -> dict[str, tuple[str, int, bool]]:
    return services.listeners()


def console_address(services: Services) -> str:
    """The console as the box names itself (its host name and the HTTPS port it serves), for what an
    administrator hands on to a mailbox's owner: not the Host this request came with, which may be the
    box's LAN address or an SSH tunnel's localhost:8443, no use to the owner's phone."""
    bound = listeners(services).get("https")
    port = bound[1] if bound else services.config.port("https")
    return f"https://{services.hostname}{'' if port in (0, 443) else f':{port}'}/"


def client_settings_for(services: Services) -> ClientSettings:
    return client_settings(services.hostname, services.config.port, listeners(services))


# What the internet must reach: mail in (25), mail programs (587, 465, 993, 995) and the console and
# Let's Encrypt's check (80, 443). IMAP's and POP3's STARTTLS ports only serve the LAN.
FORWARDED = ("smtp", "submission", "submissions", "imaps", "pop3s", "http", "https")


def forwarded_ports(services: Services) -> list[int]:
    """The ports a router must forward to the box, as the box serves them (`make run`: 10025...)."""
    config = services.config
    return [config.port(service) or STANDARD_PORTS[service] for service in FORWARDED if service not in config.disabled]


def dns_ports(services: Services) -> dict[str, int]:
    """Ports the SRV records name: what the internet reaches (standard + offset), not test-bound ones."""
    return services.config.published_ports()


@dataclass(frozen=True)
class DiskUsage:
    free: int
    total: int
    used_percent: int  # as the checklist's Disk item and `df` say it (its free share of the total did not match)


def disk_usage(path: Path) -> DiskUsage:
    usage = shutil.disk_usage(path)
    return DiskUsage(usage.free, usage.total, used_percent(usage.used, usage.free))


@dataclass(frozen=True)
class QueueSummary:
    messages: int
    size: int
    deferred: int  # messages with a recipient tried and waiting for the next attempt
    failed: int  # messages with a recipient that failed for good (its report is still to go out)


def recipient_state(recipient: QueuedRecipient) -> str:
    """'waiting' (not tried yet), 'deferred' (tried, will be tried again), 'delivered' or 'failed'."""
    if recipient.state == "queued":
        return "deferred" if recipient.attempts else "waiting"
    return recipient.state


def queue_summary(messages: list[QueuedMessage]) -> QueueSummary:
    states = [{recipient_state(r) for r in m.recipients} for m in messages]
    return QueueSummary(
        messages=len(messages),
        size=sum(m.size for m in messages),
        deferred=sum(1 for s in states if "deferred" in s),
        failed=sum(1 for s in states if "failed" in s),
    )
