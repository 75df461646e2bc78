"""The box's name before the wizard sets one, guessed from the system. Its own module because the CLI's
every command needs it (appliance.admin.open_admin) and must not import the composition root for it."""

from __future__ import annotations

import socket

FALLBACK_HOSTNAME = "letterbox.local"
_LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def localhost_like(name: str) -> bool:
    """'localhost', 'localhost.localdomain', 'ip6-localhost'...: names of the loopback, never of the box."""
    first = name.strip().rstrip(".").lower().split(".")[0]
    return not first or first.startswith(_LOOPBACK_NAMES)


def system_hostname() -> str:
    """The box's name until the wizard sets one: the system's full name when it has one; else its short
    name as the LAN's mDNS knows it (name.local); never 'localhost.local' (the first start on a
    system whose getfqdn() says 'localhost' used to pick that)."""
    for name in (socket.getfqdn(), socket.gethostname()):
        name = name.strip().rstrip(".").lower()
        if "." in name and not localhost_like(name):
            return name
    short = socket.gethostname().strip().lower().split(".")[0]
    return f"{short}.local" if short and not localhost_like(short) else FALLBACK_HOSTNAME
