"""Free loopback TCP ports for the test peers (pebble, Dovecot, the DNS server, qemu's forwards)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """`count` different free loopback ports. All are held until each is picked: one socket bound and
    closed at a time may be given the same port again (a fresh-clone `make image-test` got one port for
    two qemu forwards; a `make test` gave pebble one port for its ACME and management listeners)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


PORT_ATTEMPTS = 3  # fresh ports after another process took one between picking and binding it


class PortTaken(RuntimeError):
    """A peer could not bind a port picked for it: free_ports' ports are in the kernel's ephemeral range,
    and any process's outgoing connection may take one before the peer binds it. Told from the peer's
    log at once, so its start is tried again on fresh ports instead of failing at a deadline."""


def port_taken(log: str) -> bool:
    """Whether a peer's log says a bind failed (rspamd, Redis: 'Address ...'; Go's pebble: 'bind: address ...')."""
    return "address already in use" in log.lower()
