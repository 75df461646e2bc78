"""Tell systemd how the box is doing (sd_notify(3)), when it runs as a Type=notify unit.

letterbox.service is Type=notify: `systemctl start|restart letterbox` returns once READY=1 came, that is
once every port is bound and serving, or fails when the box could not start. letterbox-update
(appliance/update.py) relies on that to decide between keeping a new version and rolling back.
Outside systemd (NOTIFY_SOCKET unset) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send one state line ("READY=1", "STOPPING=1", "STATUS=..."); True when a manager was told."""
    address = os.environ.get(SOCKET_ENV, "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket (sd_notify(3))
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        # Never fatal: the box serves mail whether or not its manager hears about it.
        log.warning("cannot notify the service manager (%s): %s", address.lstrip("\0"), exc)
        return False
    return True
