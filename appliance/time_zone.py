"""The box's time zone: chosen in the wizard (suggested from the system's), used for every time a
person reads (console, reports). Stored as an IANA name ('Europe/Berlin'); '' means the system's."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import zoneinfo
from pathlib import Path

MAX_NAME = 64  # the longest IANA names are ~30 characters
_ZONEINFO_ROOTS = ("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/", "/usr/share/lib/zoneinfo/")


@functools.cache
def available() -> tuple[str, ...]:
    """Every zone name this machine knows (tzdata), sorted, without the legacy aliases ('posix/...',
    'right/...', 'SystemV/...') that only confuse a person choosing."""
    return tuple(sorted(name for name in zoneinfo.available_timezones()
                        if not name.startswith(("posix/", "right/", "SystemV/", "Etc/GMT")) and name != "localtime"))


def system_zone() -> str:
    """The machine's own zone name: $TZ, /etc/timezone (Debian), or where /etc/localtime points; 'UTC'
    when none of them names a known zone."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text(encoding="utf-8").strip())
    target = os.path.realpath("/etc/localtime")
    candidates += [target[len(root):] for root in _ZONEINFO_ROOTS if target.startswith(root)]
    for name in candidates:
        if name in ("Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"):
            return "UTC"
        if name and name in zoneinfo.available_timezones():
            return name
    return "UTC"


def check(name: str) -> tuple[str | None, str | None]:
    """(name, None) for a known zone, else (None, why)."""
    name = name.strip()[:MAX_NAME]
    if name in zoneinfo.available_timezones():
        return name, None
    return None, "Choose a time zone from the list (for example Europe/Berlin or America/New_York)."


def zone(name: str) -> dt.tzinfo:
    """The zone for a stored name; the system's when empty or no longer known."""
    try:
        return zoneinfo.ZoneInfo(name or system_zone())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def shown(moment: float | dt.datetime, name: str, *, seconds: bool = False) -> str:
    """'2026-11-28 21:05 CET': a time as a person reads it, always with its zone."""
    when = moment if isinstance(moment, dt.datetime) else dt.datetime.fromtimestamp(moment, dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    local = when.astimezone(zone(name))
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")
