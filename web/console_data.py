"""Facts the console shows that come from the running box rather than from one service call: listener
state, the ports clients and DNS records name, disk and spool usage, the certificate."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import STANDARD_PORTS
from web.clients import ClientSettings, client_settings

if TYPE_CHECKING:
    from appliance.services import Services

LISTENERS_KEY = "listeners"  # services.extra: name -> (host, port, up), or a callable returning that
MAX_SPOOL_FILES_COUNTED = 100_000  # the status page stays fast even with a huge backlog


def listeners(services: Services) -> dict[str, tuple[str, int, bool]]:
    entry: Any = services.extra.get(LISTENERS_KEY)
    if callable(entry):
        entry = entry()
    return dict(entry) if isinstance(entry, dict) else {}


def client_settings_for(services: Services) -> ClientSettings:
    return client_settings(services.hostname, services.config.port, listeners(services))


def dns_ports(services: Services) -> dict[str, int]:
    """Ports the SRV records name: what the internet reaches (standard + offset), not test-bound ones."""
    return {
        service: services.config.port(service) or STANDARD_PORTS[service]
        for service in ("submission", "imaps", "pop3s")
    }


@dataclass(frozen=True)
class DiskUsage:
    free: int
    total: int

    @property
    def free_percent(self) -> int:
        return round(100 * self.free / self.total) if self.total else 0


def disk_usage(path: Path) -> DiskUsage:
    usage = shutil.disk_usage(path)
    return DiskUsage(usage.free, usage.total)


def spool_usage(spool: Path) -> tuple[int, int]:
    """(files, bytes) in the outbound spool. Blocking: run through asyncio.to_thread."""
    files = size = 0
    try:
        with os.scandir(spool) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
                    if files >= MAX_SPOOL_FILES_COUNTED:
                        break
    except FileNotFoundError:
        pass
    return files, size
