"""A listener out of file descriptors, said once a minute, not once a second (the event loop's handler).

When the process has no descriptor left (EMFILE; ENFILE, ENOBUFS, ENOMEM alike), asyncio's accept loop
stops reading that listener for ACCEPT_RETRY_DELAY (1 s), tries again, and each time hands the error
to the loop's exception handler, whose default logs "socket.accept() out of system resource" with a
traceback: a line and a traceback per listener per second for as long as it lasts, which buried
everything else the box said. The box keeps asyncio's retry (the listener accepts again once
descriptors come back) and says it in one line per listener per INTERVAL, with how many failed
accepts it did not repeat.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("letterbox")

ACCEPT_OUT_OF_RESOURCE = "socket.accept() out of system resource"  # asyncio's message (selector_events)
INTERVAL = 60.0  # seconds between two lines about one listener

Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptErrors:
    """The loop's exception handler: accept failures as above, every other context to `then` (the
    handler there was before, or asyncio's default)."""

    def __init__(self, then: Handler | None = None, *, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._then = then
        self._interval = interval
        self._clock = clock
        self._said: dict[str, tuple[float, int]] = {}  # listener -> (when last said, failures not said since)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") != ACCEPT_OUT_OF_RESOURCE or not isinstance(exc, OSError):
            if self._then is not None:
                self._then(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        where = _listener(context.get("socket"))
        now = self._clock()
        said = self._said.get(where)
        if said is not None and now - said[0] < self._interval:
            self._said[where] = (said[0], said[1] + 1)
            return
        self._said[where] = (now, 0)
        untold = f"; {said[1]} more failed accepts since the last line" if said is not None and said[1] else ""
        log.error("cannot accept connections on %s: %s (%s, open files limit %s): new connections wait, tried"
                  " again every second; said again in %d s at most%s", where, exc.strerror,
                  errno.errorcode.get(exc.errno or 0, exc.errno), _limit(), self._interval, untold)


def install(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Set the handler on `loop`; returns what puts the one before back."""
    before = loop.get_exception_handler()
    loop.set_exception_handler(AcceptErrors(before))
    return lambda: loop.set_exception_handler(before)


def _listener(sock: Any) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except (AttributeError, OSError, TypeError, ValueError):
        return "a listener"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
